"""Text handling of the service: seam rule (split before whitespace), streaming decode, stop strings."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from emserve.client import split_stream, split_text
from emserve.client import split_text as client_split
from emserve.server.errors import InvalidArgument
from emserve.server.rpc.text import StreamDecoder, TextCodec, checked_ids

TEXT = ("The quick brown fox jumps over the lazy dog.  Episodic memory segments a stream of tokens\n\n"
        "into events by surprise. Hello world! This is a tiny tokenizer trained offline. ") * 6


@pytest.fixture(scope="module")
def codec(tiny_model_dir: Path) -> TextCodec:
    return TextCodec(str(tiny_model_dir))


@pytest.mark.parametrize("size", [16, 31, 64, 200])
def test_split_before_whitespace_keeps_tokens(codec: TextCodec, size: int) -> None:
    """Every word is shorter than ``size``: every cut is before whitespace, and tokens are unchanged."""
    pieces = list(split_text(TEXT, size))
    assert "".join(pieces) == TEXT and all(len(p) <= size for p in pieces)
    assert all(p[0].isspace() for p in pieces[1:] if len(p) > 1 and p.strip())  # cut before whitespace
    assert [t for p in pieces for t in codec.encode(p)] == codec.encode(TEXT)
    assert list(client_split(TEXT, size)) == pieces


def test_split_stream_reads_a_stream_into_the_same_pieces() -> None:
    """``emserve ingest`` reads files and stdin through split_stream, a block at a time."""
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab \n\tcé") for _ in range(rng.randint(0, 400)))
        size = rng.randint(1, 40)
        assert list(split_stream(io.StringIO(text), size)) == list(split_text(text, size)), (text, size)
    with pytest.raises(ValueError):
        list(split_stream(io.StringIO("x"), 0))


def test_split_long_word_is_cut_anyway() -> None:
    assert list(split_text("abcdefghij", 4)) == ["abcd", "efgh", "ij"]
    with pytest.raises(ValueError):
        list(split_text("x", 0))


def test_stream_decoder_without_stop(codec: TextCodec) -> None:
    ids = codec.encode("Hello world! This is a test.")
    d = StreamDecoder(codec)
    out = "".join(d.push([t]) for t in ids) + d.finish()
    assert out == codec.decode(ids) and d.stopped is None


def test_stream_decoder_stop_string_cut_and_held_back(codec: TextCodec) -> None:
    ids = codec.encode("Hello world! This is a tiny test.")
    d = StreamDecoder(codec, stop=["is a tiny", "zzz"])
    pieces = []
    for t in ids:
        pieces.append(d.push([t]))
        if d.stopped:
            break
    pieces.append(d.finish())
    text = "".join(pieces)
    assert d.stopped == "is a tiny"
    assert text == "Hello world! This "
    # nothing of the stop string was ever emitted, even partially
    assert all("is a" not in p for p in pieces)


def test_stream_decoder_holds_incomplete_utf8(codec: TextCodec) -> None:
    ids = codec.encode("café ∑ done")
    d = StreamDecoder(codec)
    pieces = [d.push([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.finish() == "café ∑ done"


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_decoder_matches_a_whole_decode_and_is_linear(codec: TextCodec, chunk: int) -> None:
    """Pieces pushed one or a few ids at a time join to the whole decode; the decoder decodes each id a
    bounded number of times (the quadratic one decoded the whole answer at every push)."""
    ids = codec.encode("Grüße, café ∑ ok. " * 3 + TEXT * 3)
    assert len(ids) > 900
    decoded: list[int] = []
    counting = TextCodec.__new__(TextCodec)
    counting.tokenizer = codec.tokenizer
    whole_decode = counting.decode
    counting.decode = lambda xs: (decoded.append(len(xs)), whole_decode(xs))[1]  # type: ignore[method-assign]
    d = StreamDecoder(counting, stop=["never here"])
    out = "".join(d.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + d.finish()
    assert out == codec.decode(ids) == d.text and d.stopped is None
    assert sum(decoded) < 8 * len(ids)


def test_chat_template_refused_without_template(codec: TextCodec) -> None:
    from emserve.server.errors import InvalidArgument

    assert not codec.has_chat_template
    with pytest.raises(InvalidArgument):
        codec.chat_prompt("hi")


def test_chat_template_of_the_default_model() -> None:
    from emserve.server.provision.models import MARKER_FILE, emserve_home

    folder = emserve_home() / "models" / "smollm2-135m"
    if not (folder / MARKER_FILE).exists():
        pytest.skip("the default model is not prepared (make setup)")
    codec = TextCodec(str(folder))
    assert codec.has_chat_template
    ids = codec.chat_prompt("What is the pass key?")
    text = codec.tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is the pass key?<|im_end|>" in text and text.rstrip().endswith("assistant")
    assert codec.decode(ids).count("What is the pass key?") == 1


def test_checked_ids_accepts_the_vocabulary_and_names_what_is_outside_it() -> None:
    from emserve.api.v1 import emserve_pb2 as pb

    msg = pb.IngestRequest(tokens=pb.TokenIds(ids=[0, 5, 99]))
    assert checked_ids(msg.tokens.ids, 100, "tokens") == [0, 5, 99]  # a protobuf repeated field
    assert checked_ids([], 100, "tokens") == []
    assert all(type(t) is int for t in checked_ids((1, 2), 100, "tokens"))
    with pytest.raises(InvalidArgument, match=r"size 100\): \[100, 4294967295, 100, 100, 100\]") as ei:
        checked_ids([1, 100, 4294967295, 2, 100, 100, 100, 100], 100, "prompt_tokens")
    assert ei.value.field == "prompt_tokens"
    for bad in ([-1], [2**70], ["x"]):
        with pytest.raises(InvalidArgument):
            checked_ids(bad, 100, "tokens")

"""Text <-> token ids for the service: the model's tokenizer, its chat template, streaming decode.

Seam rule (ingestion): every text message is tokenized on its own, without special tokens, so a
message boundary is always a token boundary and the same message always gives the same tokens (which
is what makes re-sent text deduplicable by offset). With byte-level BPE tokenizers, text split just
before a whitespace character tokenizes exactly as the unsplit text; the client's
:func:`emserve.client.split_text` cuts there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from emserve.server.errors import InvalidArgument

REPLACEMENT = "\ufffd"


def checked_ids(values: Sequence[int], vocab_size: int, field: str) -> list[int]:
    """``values`` as a list of ints, all in ``[0, vocab_size)``; else InvalidArgument on ``field`` naming the
    first five outside it. One vectorized pass (a message holds up to ``max_message_tokens`` ids)."""
    try:
        a = np.asarray(values, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        raise InvalidArgument(field, f"token ids must be integers in [0, {vocab_size})") from None
    bad = a[(a < 0) | (a >= vocab_size)]
    if bad.size:
        raise InvalidArgument(field, f"token ids outside the vocabulary (size {vocab_size}): {bad[:5].tolist()}")
    return a.tolist()


class TextCodec:
    """The model's tokenizer (``AutoTokenizer`` of the model folder). Thread-safe for encode/decode."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_prompt(self, text: str) -> list[int]:
        """``text`` as one user turn of the model's chat template, plus the generation prompt."""
        if not self.has_chat_template:
            raise InvalidArgument("chat_template", "the model has no chat template; send chat_template=false")
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return self.encode(rendered)

    def chat_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """A conversation (``[{"role", "content"}, ...]``) in the model's chat template, plus the generation prompt."""
        if not self.has_chat_template:
            raise InvalidArgument("messages", "the model has no chat template")
        turns = []
        for m in messages:
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InvalidArgument("messages", "each message needs a string role and a string content")
            turns.append({"role": m["role"], "content": m["content"]})
        rendered = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return self.encode(rendered)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


class StreamDecoder:
    """Incremental detokenization of a generation, with stop strings.

    :meth:`push` returns the text that is final so far: it holds back an incomplete UTF-8 character
    and any tail that could be the start of a stop string. When a stop string appears, the text is
    cut before it and :attr:`stopped` names it (the caller then ends the generation).

    Linear in the answer's length: each push decodes only the ids since the last final text, with a few
    ids before them as context (vLLM's prefix/read offsets; a tokenizer may decode a token differently
    at the start of a text), and looks for stop strings only in the text not yet emitted (a stop string
    cannot start inside emitted text: its beginning would have been held back).
    """

    def __init__(self, codec: TextCodec, stop: Sequence[str] = ()) -> None:
        self.codec = codec
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.stopped: str | None = None
        self._longest = max((len(s) for s in self.stop), default=0)
        self._pieces: list[str] = []  # the emitted text
        self._pending = ""  # decoded, final, not emitted yet (held back)
        self._prefix = 0  # ids[_prefix:_read] decode to the context of the next piece
        self._read = 0  # ids before this are in the emitted or pending text

    def _decode_new(self, final: bool) -> None:
        """Move the text of the ids since ``_read`` to the pending text, unless it ends in an incomplete
        character (then wait for more ids; at ``final``, take it as it is)."""
        if self._read >= len(self.ids):
            return
        context = self.codec.decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        text = self.codec.decode(self.ids[self._prefix :])
        if not final and (len(text) <= len(context) or not text.startswith(context) or text.endswith(REPLACEMENT)):
            return  # nothing new, the context decodes differently now, or a character is incomplete: wait
        self._pending += text[len(context) :]
        self._prefix, self._read = self._read, len(self.ids)

    def _cut(self) -> None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self._pending.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            self.stopped = best[1]
            self._pending = self._pending[: best[0]]

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, final: bool) -> str:
        self._cut()
        out = self._pending
        if self.stopped is None and not final:
            hold = self._held_tail(out)
            if hold:
                out = out[:-hold]
        self._pending = self._pending[len(out) :]
        if out:
            self._pieces.append(out)
        return out

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in ids)
        if self.stopped is not None:
            return ""
        self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the generation."""
        if self.stopped is not None:
            return ""
        self._decode_new(final=True)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

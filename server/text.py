"""Text <-> token ids for the service: the model's tokenizer, its chat template, streaming decode.

Seam rule (ingestion): every text message is tokenized on its own, without special tokens, so a
message boundary is always a token boundary and the same message always gives the same tokens (which
is what makes re-sent text deduplicable by offset). With byte-level BPE tokenizers, text split just
before a whitespace character tokenizes exactly as the unsplit text; the client's
:func:`emserve.client.split_text` cuts there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from emserve.server.errors import InvalidArgument

REPLACEMENT = "\ufffd"


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

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


class StreamDecoder:
    """Incremental detokenization of a generation, with stop strings.

    :meth:`push` returns the text that is final so far: it holds back an incomplete UTF-8 character
    and any tail that could be the start of a stop string. When a stop string appears, the text is
    cut before it and :attr:`stopped` names it (the caller then ends the generation).
    """

    def __init__(self, codec: TextCodec, stop: Sequence[str] = ()) -> None:
        self.codec = codec
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped: str | None = None
        self._longest = max((len(s) for s in self.stop), default=0)

    def _cut(self, text: str) -> str:
        if not self.stop:
            return text
        start = max(0, len(self.emitted) - self._longest)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return text
        self.stopped = best[1]
        return text[: best[0]]

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted):  # an earlier piece decoded differently: wait for more
            return ""
        new = text[len(self.emitted) :]
        self.emitted = text
        return new

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in ids)
        text = self._cut(self.codec.decode(self.ids))
        if self.stopped is None:
            text = text.rstrip(REPLACEMENT)
            hold = self._held_tail(text)
            if hold:
                text = text[:-hold]
        return self._emit(text)

    def finish(self) -> str:
        """The rest of the text at the end of the generation."""
        text = self._cut(self.codec.decode(self.ids)) if self.stopped is None else self.emitted
        return self._emit(text) if text.startswith(self.emitted) else ""

    @property
    def text(self) -> str:
        return self.emitted

"""The model's words, for the question path's lexical rules (``emserve.retrieval.lexical``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from emserve.retrieval.lexical import Vocabulary


@functools.lru_cache(maxsize=4)
def model_vocabulary(model_path: str) -> Vocabulary | None:
    """The words of the model's tokens (None: no tokenizer at the path)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - a model folder without a usable tokenizer
        return None
    return Vocabulary.from_texts(tok.batch_decode([[i] for i in range(len(tok))]))


def content_vocab(model_path: str) -> np.ndarray | None:
    """bool ``[vocab]``: the token's text holds a letter or a digit (None: no tokenizer at the path)."""
    vocab = model_vocabulary(model_path)
    return None if vocab is None else vocab.content


def content_rows(model_path: str, token_ids: Sequence[int]) -> np.ndarray:
    """Indices of the tokens of ``token_ids`` that name something (a letter or a digit in their text):
    a question's query tokens without its newlines and punctuation. All of them when none does, or
    when the model has no tokenizer to tell."""
    vocab = content_vocab(model_path)
    ids = np.asarray(token_ids, np.int64)
    if vocab is None:
        return np.arange(ids.shape[0])
    keep = np.flatnonzero((ids < vocab.shape[0]) & vocab[np.clip(ids, 0, vocab.shape[0] - 1)])
    return keep if keep.size else np.arange(ids.shape[0])

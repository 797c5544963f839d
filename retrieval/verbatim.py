"""The window's words said again: the copy rule's match (``question_copy``: what followed a question's last
words where the window says them verbatim) and the echo rule's tests (``question_echo``: whether an answer
restates its question, whether the window says part of an answer).

A question that restates a fact's lead-in ("... The pass key is") ends with words the window may hold
verbatim ("The pass key is 27611"); the token after the longest such run is the answer's draft
(``server/session/answer.py``, docs/recall.md rule 8). Words are compared by
``Vocabulary.verbatim`` (lowercased, stripped text, no stemming): a copy is only as good as its match.
An answer that restates the question (" the pass key of the amber door.") is decided again among the
model's next choices, for one the window says (:func:`restates`, :func:`grounded`; docs/recall.md rule 19).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emserve.retrieval.lexical import Vocabulary


def continuation(question_ids: Sequence[int], segments: Sequence[tuple[int, np.ndarray]], vocab: Vocabulary,
                 min_match: int) -> tuple[int, int, int] | None:
    """What followed the question's last words where the window says them verbatim: ``(token id, its
    stream offset, match length)`` of the token after the longest run of the window that equals the
    question's last tokens (compared as words: ``Vocabulary.verbatim``), at least ``min_match`` tokens
    long and followed by a token of the same segment; ties go to the latest run (the most recent
    statement). None when there is none.

    ``segments``: the window's contiguous runs of the stream, ``(offset of the first token, token ids)``.
    A question that restates a fact's lead-in ("... The pass key is") finds that fact ("The pass key is
    27611"); its look-alikes, which name another key, match fewer tokens.
    """
    q = np.asarray(question_ids, np.int64)
    if min_match <= 0 or q.size < min_match:
        return None
    size = vocab.verbatim.shape[0]
    qc = vocab.verbatim[np.clip(q, 0, size - 1)][::-1]  # the question's words, last first
    best: tuple[int, int, int] | None = None
    for offset, ids in segments:
        ids = np.asarray(ids, np.int64)
        if ids.size < min_match + 1:
            continue
        tc = vocab.verbatim[np.clip(ids, 0, size - 1)]
        ends = np.flatnonzero(tc[:-1] == qc[0])  # a run ends at j, followed by j + 1 in the segment
        if ends.size == 0:
            continue
        length = np.ones(ends.size, np.int64)
        alive = np.ones(ends.size, bool)
        for k in range(1, int(qc.size)):
            pos = ends - k
            alive &= pos >= 0
            alive[alive] &= tc[pos[alive]] == qc[k]
            if not alive.any():
                break
            length += alive
        for j, n in zip(ends.tolist(), length.tolist(), strict=True):
            if n >= min_match and (best is None or (n, offset + j) >= (best[2], best[1] - 1)):
                best = (int(ids[j + 1]), offset + j + 1, n)
    return best


def _question_words(question_ids: Sequence[int], vocab: Vocabulary) -> np.ndarray:
    """The ``Vocabulary.verbatim`` words of a question's content tokens (ids outside the vocabulary skipped)."""
    q = np.asarray(question_ids, np.int64)
    q = q[(q >= 0) & (q < vocab.verbatim.shape[0])]
    return vocab.verbatim[q[vocab.content[q]]]


def restates(answer_ids: Sequence[int], question_ids: Sequence[int], vocab: Vocabulary, min_words: int) -> bool | None:
    """Whether an answer's start restates its question (``question_echo``): True once ``min_words`` of its
    content tokens (``Vocabulary.content``) are all question tokens, compared as ``Vocabulary.verbatim``
    words; False at its first content token that is not; None while undecided (fewer such tokens so far).
    An answer that only says the question's words again (" the pass key of the amber door.") answers
    nothing, whatever follows; one that names anything else (a digit, another word) is not an echo."""
    if min_words <= 0:
        return False
    size = vocab.verbatim.shape[0]
    said = set(_question_words(question_ids, vocab).tolist())
    n = 0
    for t in answer_ids:
        if not 0 <= t < size or not vocab.content[t]:
            continue
        if int(vocab.verbatim[t]) not in said:
            return False
        n += 1
        if n >= min_words:
            return True
    return None


def grounded(answer_ids: Sequence[int], segments: Sequence[tuple[int, np.ndarray]], question_ids: Sequence[int],
             vocab: Vocabulary, min_run: int) -> bool:
    """Whether the window says part of an answer verbatim: a run of at least ``min_run`` consecutive answer
    tokens equal (as ``Vocabulary.verbatim`` words) to a run of one segment, holding a content token that
    is not a question word (the question's own words, said again, are no evidence). ``segments``: as for
    :func:`continuation`."""
    size = vocab.verbatim.shape[0]
    a = np.clip(np.asarray(answer_ids, np.int64), 0, size - 1)
    if min_run <= 0 or a.size < min_run:
        return False
    said = np.isin(vocab.verbatim[a], _question_words(question_ids, vocab))
    news = vocab.content[a] & ~said  # the answer's tokens that are evidence when the window says them
    ac = vocab.verbatim[a]
    for _, ids in segments:
        tc = vocab.verbatim[np.clip(np.asarray(ids, np.int64), 0, size - 1)]
        if tc.size < min_run:
            continue
        for i in range(a.size - min_run + 1):
            for j in np.flatnonzero(tc == ac[i]).tolist():
                n = 0
                while i + n < a.size and j + n < tc.size and tc[j + n] == ac[i + n]:
                    n += 1
                if n >= min_run and news[i:i + n].any():
                    return True
    return False

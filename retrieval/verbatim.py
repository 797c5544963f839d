"""The copy rule's match (``question_copy``): what followed a question's last words where the window
says them verbatim.

A question that restates a fact's lead-in ("... The pass key is") ends with words the window may hold
verbatim ("The pass key is 27611"); the token after the longest such run is the answer's draft
(``server/session/question.py``, docs/recall.md rule 8). Words are compared by
``Vocabulary.verbatim`` (lowercased, stripped text, no stemming): a copy is only as good as its match.
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

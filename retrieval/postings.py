"""Word postings of a growing stream: which events hold each word, kept as the events close.

The lexical rules (:mod:`emserve.retrieval.lexical`, :mod:`emserve.retrieval.bridge`) weigh a question's
words by the events that hold them. Found by a pass over the stream, that costs every token of the
stream per question; the postings answer it from the pairs of the asked words alone.

Rules:

* A *pair* is ``(word, event)``: the event (its index in the event table) holds a token whose word is
  ``word`` (``word_of[token id]``: ``Vocabulary.canonical`` or ``Vocabulary.verbatim``; ids outside
  the vocabulary read as the last id, as ``Vocabulary.stream_ids`` reads them). Tokens outside every
  event hold nothing.
* :meth:`WordPostings.pairs` returns the distinct pairs of the asked words among the first ``n``
  events, sorted by word, then event: what ``word_pairs``'s pass over the stream finds, the same array.
* Events are added in order (:meth:`WordPostings.extend`) and never change; a table that is not the
  one the postings were built from (fewer events, or a different last known event) is indexed anew.
* Storage: the pairs sorted by word (a CSR of ``int32`` events: ~4 bytes per pair, about 3 per token),
  and the pairs of the events added since, merged into it when they reach a quarter of its size.
* :meth:`WordPostings.count` gives a word's events without reading them (a weight needs only that);
  :meth:`WordPostings.pairs` reads them, all or within event ranges (a common word's near the rare ones).

The sorted-pair arithmetic the lexical rules share lives here too: :func:`unique_pairs`,
:func:`distinct_pairs` and :func:`passage_rows` (the passages a word's events reach).
"""

from __future__ import annotations

import numpy as np

MERGE_FRACTION = 0.25
"""The tail (pairs of the events added since the last merge) is merged once it holds this share of the base."""


class WordPostings:
    """The ``(word, event)`` pairs of the events added so far, by word (module docstring)."""

    def __init__(self, word_of: np.ndarray) -> None:
        self.word_of = np.asarray(word_of, np.int64)
        self.num_words = int(self.word_of.max()) + 1 if self.word_of.size else 0
        self._reset()

    def _reset(self) -> None:
        self.num_events = 0
        self._last: tuple[int, int] | None = None  # (start, end) of the last event indexed
        self._offsets = np.zeros(self.num_words + 1, np.int64)  # CSR over words of the merged pairs
        self._events = np.zeros(0, np.int32)
        self._tail: list[np.ndarray] = []  # [k, 2] (word, event) pairs of later events, each sorted by word
        self._tail_size = 0

    @property
    def nbytes(self) -> int:
        return int(self._offsets.nbytes + self._events.nbytes + sum(t.nbytes for t in self._tail))

    def extend(self, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        """Index the events of ``starts``/``ends`` (the whole table's, sorted and disjoint) not indexed yet.
        ``tokens``: the stream's token ids from ``starts[self.num_events]`` on (at least to ``ends[-1]``)
        once the postings are current, else from ``starts[0]`` on: check :meth:`needs_from` first."""
        n = int(starts.shape[0])
        if n <= self.num_events:
            return
        first = self.num_events
        base = int(starts[first])
        lo, hi = starts[first:] - base, ends[first:] - base
        sizes = hi - lo
        tok = np.asarray(tokens)
        size = self.word_of.shape[0]
        ids = tok[range_indices(lo, hi)].astype(np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= size):
            ids = np.clip(ids, 0, size - 1)
        word = self.word_of[ids]
        event = np.repeat(np.arange(first, n, dtype=np.int64), sizes)
        key = word * n + event  # distinct, sorted by word then event
        key = np.unique(key)
        pairs = np.stack([key // n, key % n], 1)
        self._tail.append(pairs)
        self._tail_size += pairs.shape[0]
        self.num_events = n
        self._last = (int(starts[-1]), int(ends[-1]))
        if self._tail_size >= MERGE_FRACTION * max(self._events.shape[0], 1):
            self._merge()

    def needs_from(self, starts: np.ndarray, ends: np.ndarray) -> int:
        """The first event whose tokens :meth:`extend` needs for this table: ``self.num_events``, or 0 when
        the table is not the one indexed (the postings are then reset)."""
        k = self.num_events
        if k and (starts.shape[0] < k or (int(starts[k - 1]), int(ends[k - 1])) != self._last):
            self._reset()
        return self.num_events

    def _merge(self) -> None:
        if not self._tail:
            return
        counts = np.diff(self._offsets)
        words = np.repeat(np.arange(self.num_words, dtype=np.int64), counts)
        tail = np.concatenate(self._tail)
        all_words = np.concatenate([words, tail[:, 0]])
        all_events = np.concatenate([self._events.astype(np.int64), tail[:, 1]])
        order = np.argsort(all_words, kind="stable")  # the tail's events come after the base's, word by word
        self._events = all_events[order].astype(np.int32)
        self._offsets = np.zeros(self.num_words + 1, np.int64)
        np.cumsum(np.bincount(all_words, minlength=self.num_words), out=self._offsets[1:])
        self._tail, self._tail_size = [], 0

    def _events_of(self, word: int, tails: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """The word's events, sorted, as parts: the merged ones, then each tail's."""
        parts = [self._events[self._offsets[word] : self._offsets[word + 1]]]
        for t, tw in tails:
            parts.append(t[np.searchsorted(tw, word) : np.searchsorted(tw, word, side="right"), 1])
        return parts

    def _known(self, words: np.ndarray) -> np.ndarray:
        w = np.unique(np.asarray(words, np.int64))
        return w[(w >= 0) & (w < self.num_words)]

    def count(self, words: np.ndarray, n_events: int) -> tuple[np.ndarray, np.ndarray]:
        """``(words, df)``: the distinct ``words`` held by any of events ``0 .. n_events-1`` (sorted) and how
        many of those events hold each; a binary search per word and part, no pair is read."""
        tails = [(t, t[:, 0]) for t in self._tail]
        w = self._known(words)
        df = np.array([sum(int(np.searchsorted(e, n_events)) for e in self._events_of(word, tails))
                       for word in w.tolist()], np.int64)
        return w[df > 0], df[df > 0]

    def pairs(self, words: np.ndarray, n_events: int, within: np.ndarray | None = None) -> np.ndarray:
        """int64 ``[k, 2]``: the distinct ``(word, event)`` pairs of ``words`` among events ``0 .. n_events-1``,
        sorted by word, then event. ``within``: ``[m, 2]`` sorted, disjoint ``[start, end)`` event ranges
        the pairs are kept in (a binary search per range and part instead of reading every pair)."""
        parts_w, parts_e = [], []
        tails = [(t, t[:, 0]) for t in self._tail]
        for word in self._known(words).tolist():
            es = []
            for part in self._events_of(word, tails):
                part = part[: np.searchsorted(part, n_events)]
                if within is not None:
                    part = part[range_indices(np.searchsorted(part, within[:, 0]),
                                              np.searchsorted(part, within[:, 1]))]
                es.append(part.astype(np.int64))
            e = np.concatenate(es)
            parts_w.append(np.full(e.shape[0], word, np.int64))
            parts_e.append(e)
        if not parts_e:
            return np.zeros((0, 2), np.int64)
        return np.stack([np.concatenate(parts_w), np.concatenate(parts_e)], 1)


# ------------------------------------------------------------------ sorted (word, event) pairs
def range_indices(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """int64: the indices of the ranges ``[lo[i], hi[i])`` one after the other (an empty range adds
    nothing)."""
    sizes = np.maximum(np.asarray(hi, np.int64) - np.asarray(lo, np.int64), 0)
    return np.repeat(np.asarray(lo, np.int64) - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))


def unique_pairs(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of an integer ``[n, 2]`` array, sorted (by the first column, then the second), and
    the index of each one's first occurrence: ``np.unique(pairs, axis=0, return_index=True)``, on one
    int64 key per row (a plain sort, many times faster than the row-wise one on a million pairs)."""
    a = np.asarray(pairs, np.int64).reshape(-1, 2)
    if a.shape[0] == 0:
        return a.copy(), np.zeros(0, np.int64)
    lo = a.min(axis=0)
    width = int(a[:, 1].max() - lo[1]) + 1
    key = (a[:, 0] - lo[0]) * width + (a[:, 1] - lo[1])
    _, first = np.unique(key, return_index=True)
    return a[first], first


def distinct_pairs(word: np.ndarray, ev: np.ndarray, words: np.ndarray) -> np.ndarray:
    """``unique_pairs`` of ``(word, ev)`` rows whose ``ev`` is non-decreasing and whose words are among
    ``words`` (sorted, distinct): a stable sort by the word's rank in ``words`` (a radix sort on small
    ints) keeps each word's events in order, and equal neighbours are dropped."""
    small = np.uint8 if words.size <= 1 << 8 else np.uint16 if words.size <= 1 << 16 else np.int64
    rank_of = np.zeros(int(words[-1]) + 1 if words.size else 0, small)
    rank_of[words] = np.arange(words.size)
    order = np.argsort(rank_of[word], kind="stable")
    w, e = word[order], ev[order]
    new = np.ones(w.shape[0], bool)
    new[1:] = (w[1:] != w[:-1]) | (e[1:] != e[:-1])
    return np.stack([w[new], e[new]], 1).astype(np.int64, copy=False)


def passage_rows(pairs: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(word, passage)`` rows of distinct ``(word, event)`` ``pairs`` sorted by word, then
    event (as :func:`unique_pairs` returns them): passage ``p`` (events ``p .. p+span-1``) holds a word
    when one of its events does. Returns ``(row, passage)``: each row's index into ``pairs`` (a pair
    whose word opens the passage's run) and the passage, in the order of ``(word, passage)`` sorted; what
    ``unique_pairs`` of every ``(word, event - d)``, ``0 <= d < span``, gives, in one pass: a pair adds the
    passages ``[event - span + 1, event]`` that its word's previous pair did not."""
    span = max(1, int(span))
    n = int(pairs.shape[0])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    word, ev = pairs[:, 0], pairs[:, 1]
    lo = np.maximum(ev - span + 1, 0)
    same = np.zeros(n, bool)
    same[1:] = word[1:] == word[:-1]
    prev_end = np.where(same, np.concatenate([[-1], ev[:-1]]), -1)
    lo = np.maximum(lo, prev_end + 1)
    count = np.maximum(ev - lo + 1, 0)
    row = np.repeat(np.arange(n, dtype=np.int64), count)
    first = np.cumsum(count) - count  # where each pair's run starts in ``row``
    passage = lo[row] + np.arange(row.shape[0], dtype=np.int64) - first[row]
    return row, passage

"""Lexical matching of a question against the stream's events: the words a question names, found in the stream.

A question usually names what it asks about ("the special magic number for tender-glacier", "the pass
key of the amber harbor door"). The attention scores of its query tokens rank every sentence of the
same form alike (each look-alike shares "special magic number"); the name itself is a few tokens
among many and rarely decides the ranking. The words are in the log, though: this module ranks the
events by the rare words they share with the question, as a sparse retriever would (BM25's idf,
no term frequency: events are sentence-sized).

Rules:

* Tokens are compared by their text, lowercased, stripped of spaces and of an English inflection
  (``Vocabulary.canonical``, :func:`light_stem`: " Harbor" and "harbor" are one word, and so are
  "stopped" and "stopping"); only tokens holding a letter or a digit count, and a question's
  line-opening labels ("Question:", "Answer:") do not (``Vocabulary.question_words``).
* A word found in ``df`` of the ``E`` retrievable events weighs ``idf = ln((E - df + 0.5) / (df + 0.5))``,
  0 when negative (a word in half the events or more names nothing).
* A passage is :data:`PASSAGE_EVENTS` consecutive events; its score is the sum of the weights of the
  distinct question words it holds. An event scores its best passage: a sentence cut in two by a
  surprise boundary (a name in one event, "hid the treasure in the ... chest" in the next) still
  matches as one.
* :func:`lexical_hits` takes the events scoring at least ``ratio`` of the best (the *candidates*) and
  ranks them by what tells them apart (:func:`_discriminating_scores`): look-alike facts share the
  question's form words ("the courier wrote down the number", "hid the treasure in the chest") and
  differ in the few words that name the asked one, so among the candidates a word found in most of
  their places weighs its idf alone and a word found in few weighs more. Ties: the plain score, then
  the event holding more of the words on its own, then the later event (the most recent statement of
  a fact). At most ``limit`` hits, each more than ``spacing`` events from those before it (a hit's
  neighbours come with it; the next hit is another place).

Pure numpy, no tokenizer: the caller builds the :class:`Vocabulary` from its tokenizer's texts.
Cost: with a session's word postings (:mod:`emserve.retrieval.postings`) the asked words' ``(word, event)``
pairs, not the stream; without them one pass over the stream's token ids (a lookup of each in a
``[vocab]`` mask). :func:`lexical_hits` scores only the events near its essential words (MaxScore's
exact pruning, :func:`_hit_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from emserve.retrieval.postings import WordPostings, distinct_pairs, passage_rows, unique_pairs

PairsOf = Callable[..., np.ndarray]
"""``pairs_of(words, within=None)`` of :func:`word_weights`."""

LABEL_TOKENS = 3
"""The most tokens of a line-opening label (``Question:``, ``User:``) that :meth:`Vocabulary.question_words` drops."""


_VOWELS = frozenset("aeiouy")


def light_stem(word: str) -> str:
    """``word`` (lowercase) without its English inflection, as a search engine's light stemmer takes it
    off (Harman's S-stemmer for plurals, Porter's step 1b for "-ed" and "-ing"): "keys" -> "key",
    "stories" -> "story", "stopped" and "stopping" -> "stop", "hidden" and "wrote" unchanged (no
    irregular forms). Words of three letters or fewer, and anything not purely alphabetic, are
    unchanged; so are "-ss", "-us", "-is" and "-eed" endings ("glass", "bus", "speed")."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s"):
        return word if word.endswith(("ss", "us", "is")) else word[:-1]
    for suffix in ("ing", "ed"):
        root = word[: -len(suffix)]
        if word.endswith(suffix) and not word.endswith("eed") and len(root) >= 3 and _VOWELS & set(root):
            if root[-1] == root[-2] and root[-1] not in "lsz" and root[-1] not in _VOWELS:
                root = root[:-1]  # "stopp" -> "stop"
            return root
    return word


@dataclass(frozen=True)
class Vocabulary:
    """Per token id: ``canonical`` word id, what the lexical rules match (equal for tokens whose
    lowercased, stripped text has the same :func:`light_stem`), ``content`` (the text holds a letter or
    a digit), ``joins`` (it continues the word before it: no leading whitespace, and a letter or a
    digit), ``breaks`` (the text holds a newline), ``colon`` (the text, leading spaces aside, starts
    with a colon) and ``verbatim`` (equal for tokens of equal lowercased, stripped text: what
    :func:`continuation` compares, a copy being only as good as its match)."""

    canonical: np.ndarray  # int64 [vocab]
    content: np.ndarray  # bool [vocab]
    joins: np.ndarray  # bool [vocab]
    breaks: np.ndarray  # bool [vocab]
    colon: np.ndarray  # bool [vocab]
    verbatim: np.ndarray  # int64 [vocab]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Vocabulary:
        """From the decoded text of every token id (``texts[i]``: token ``i``)."""
        keys = [t.strip().lower() for t in texts]
        exact: dict[str, int] = {}
        verbatim = np.fromiter((exact.setdefault(k, len(exact)) for k in keys), np.int64, len(keys))
        stems: dict[str, int] = {}
        canonical = np.fromiter((stems.setdefault(light_stem(k), len(stems)) for k in keys), np.int64, len(keys))
        content = np.fromiter((any(ch.isalnum() for ch in k) for k in keys), bool, len(keys))
        joins = np.fromiter((bool(t) and not t[0].isspace() and any(ch.isalnum() for ch in t) for t in texts),
                            bool, len(texts))
        breaks = np.fromiter(("\n" in t for t in texts), bool, len(texts))
        colon = np.fromiter((t.lstrip(" ").startswith(":") for t in texts), bool, len(texts))
        return cls(canonical, content, joins, breaks, colon, verbatim)

    def question_words(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """:meth:`words` of a question without its line-opening labels: the words from the start of a
        line to a colon on it, when at most :data:`LABEL_TOKENS` tokens (``Question:``, ``Answer:``,
        ``User:``). A label names the prompt's format, not the asked fact; matched against the stream
        it finds what happens to hold the word (an index listing "question", a quiz), and its idf is
        high exactly where the stream never uses it as a label."""
        ids = np.asarray(token_ids, np.int64)
        ids = ids[(ids >= 0) & (ids < self.canonical.shape[0])]
        keep = np.ones(ids.shape[0], bool)
        start = 0  # the first token of the current line
        for i in range(ids.shape[0]):
            if self.colon[ids[i]] and 0 < i - start <= LABEL_TOKENS:
                keep[start:i] = False
            if self.breaks[ids[i]]:
                start = i + 1
        return self.words(ids[keep])

    def first_word(self, token_ids: Sequence[int] | np.ndarray) -> int:
        """How many of ``token_ids`` make up their first word: the first token and those that join it."""
        ids = np.asarray(token_ids, np.int64)
        n = 1 if ids.size else 0
        while n < ids.size and 0 <= ids[n] < self.joins.shape[0] and self.joins[ids[n]]:
            n += 1
        return n

    def stream_ids(self, tokens: np.ndarray) -> np.ndarray:
        """A stream's token ids as indices into the per-id arrays: as they are when all are inside the
        vocabulary, else clipped to it (an id outside it reads as the last id)."""
        ids = np.asarray(tokens)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.canonical.shape[0]):
            ids = np.clip(ids.astype(np.int64), 0, self.canonical.shape[0] - 1)
        return ids

    def holding(self, words: np.ndarray, *, word_starts: bool = False) -> np.ndarray:
        """bool ``[vocab]``: the token ids whose canonical word is among ``words`` (and, ``word_starts``,
        that start a word: not :attr:`joins`). Indexed by a stream's ids, one lookup per token finds
        where the words are (instead of a set-membership test of every token's word)."""
        want = np.zeros(int(self.canonical.max()) + 1 if self.canonical.size else 0, bool)
        w = np.asarray(words, np.int64)
        want[w[(w >= 0) & (w < want.shape[0])]] = True
        out = want[self.canonical]
        return out & ~self.joins if word_starts else out

    def words(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The distinct canonical words of the content tokens among ``token_ids`` (ids outside the
        vocabulary are skipped)."""
        ids = np.asarray(token_ids, np.int64)
        ids = ids[(ids >= 0) & (ids < self.canonical.shape[0])]
        return np.unique(self.canonical[ids[self.content[ids]]])


PASSAGE_EVENTS = 2
"""Consecutive events a question's words are matched in together (module docstring)."""


def _weighted_pairs(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    vocab: Vocabulary, postings: WordPostings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(word, event)`` pairs of the question's content words (labels aside:
    :meth:`Vocabulary.question_words`) in the events, and each pair's word weight (idf), without the
    pairs of weight 0 (a word in half the events or more: it adds nothing to any score, and such words
    make most of the pairs)."""
    pairs, weight = word_pairs(vocab.question_words(question_ids), tokens, starts, ends, vocab, postings)
    keep = weight > 0.0
    return pairs[keep], weight[keep]


def word_pairs(words: np.ndarray, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               vocab: Vocabulary, postings: WordPostings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(word, event)`` pairs of ``words`` (canonical content words) in the events, sorted by
    word then event, and each pair's word weight (idf). ``postings`` (of ``vocab.canonical``, covering the
    events): the pairs come from them instead of a pass over ``tokens`` (the same pairs)."""
    found, idf, pairs_of = word_weights(words, tokens, starts, ends, vocab, postings)
    pairs = pairs_of(found)
    return pairs, idf[np.searchsorted(found, pairs[:, 0])]


def word_weights(words: np.ndarray, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, vocab: Vocabulary,
                 postings: WordPostings | None = None) -> tuple[np.ndarray, np.ndarray, PairsOf]:
    """``(found, idf, pairs_of)``: the ``words`` some event holds (sorted), their weights, and a function
    giving the ``(word, event)`` pairs of some of them (sorted by word then event; ``within``: only in
    these ``[start, end)`` event ranges). With ``postings`` the weights come from their counts and a
    word's pairs are read only when asked for; without, from one pass over the stream."""
    n_events = int(starts.shape[0])
    none = np.zeros(0, np.int64)
    if n_events == 0 or words.size == 0:
        return none, np.zeros(0, np.float64), lambda ws, within=None: np.zeros((0, 2), np.int64)
    if postings is not None:
        if postings.num_events < n_events:
            raise ValueError(f"the postings cover {postings.num_events} events, not {n_events}")
        found, df = postings.count(words, n_events)

        def from_postings(ws: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
            return postings.pairs(ws, n_events, within)

        pairs_of: PairsOf = from_postings
    else:
        every = _stream_pairs(words, tokens, starts, ends, vocab)
        found, df = np.unique(every[:, 0], return_counts=True)

        def from_stream(ws: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
            rows = every[np.isin(every[:, 0], ws)]
            if within is not None:
                at = np.searchsorted(within[:, 0], rows[:, 1], side="right") - 1
                rows = rows[(at >= 0) & (rows[:, 1] < within[np.maximum(at, 0), 1])]
            return rows

        pairs_of = from_stream
    idf = np.maximum(np.log((n_events - df + 0.5) / (df + 0.5)), 0.0)
    return found, idf, pairs_of


def _stream_pairs(words: np.ndarray, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  vocab: Vocabulary) -> np.ndarray:
    """:func:`word_pairs`'s pairs by one pass over the stream's tokens (a lookup of each in a mask)."""
    n_events = int(starts.shape[0])
    if tokens.size == 0:
        return np.zeros((0, 2), np.int64)
    base = int(starts[0])
    ids = vocab.stream_ids(tokens)
    pos = np.flatnonzero(vocab.holding(words)[ids]) + base
    ev = np.searchsorted(starts, pos, side="right") - 1
    inside = (ev >= 0) & (pos < ends[np.clip(ev, 0, n_events - 1)])
    ev, word = ev[inside], vocab.canonical[ids[pos[inside] - base]]
    return distinct_pairs(word, ev, np.unique(words))


def _passage_scores(pairs: np.ndarray, weight: np.ndarray, n_events: int, span: int) -> np.ndarray:
    """Per event: the best score of the ``span``-event passages holding it (``span`` 1: its own).
    ``pairs``: distinct ``(word, event)``, sorted by word then event."""
    span = max(1, int(span))
    row, p = passage_rows(pairs, span)
    passage = np.bincount(p, weight[row], minlength=n_events)  # summed in row order, as np.add.at would
    best = passage.copy()
    for d in range(1, span):
        best[d:] = np.maximum(best[d:], passage[:-d])
    return best


def lexical_scores(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   vocab: Vocabulary, span: int = PASSAGE_EVENTS, postings: WordPostings | None = None) -> np.ndarray:
    """float64 ``[E]``: each event's score (module docstring; ``span`` events to a passage) for the
    question ``question_ids``.

    ``tokens``: the stream's token ids from ``starts[0]`` on (``tokens[j]`` is token ``starts[0] + j``);
    ``starts``/``ends``: the retrievable events' bounds, sorted and disjoint; ``postings`` (of
    ``vocab.canonical``, covering those events): the words' events come from them, not from ``tokens``.
    """
    n_events = int(starts.shape[0])
    pairs, weight = _weighted_pairs(question_ids, tokens, starts, ends, vocab, postings)
    if pairs.size == 0:
        return np.zeros(n_events, np.float64)
    return _passage_scores(pairs, weight, n_events, span)


def lexical_hits(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 vocab: Vocabulary, limit: int, ratio: float = 0.5, spacing: int = 0,
                 span: int = PASSAGE_EVENTS, postings: WordPostings | None = None) -> np.ndarray:
    """Event indices (into ``starts``) scoring at least ``ratio`` of the best score, best first (ties:
    the better own score, then the later event), each more than ``spacing`` events from the hits
    before it, at most ``limit``; empty when no event holds a weighed question word."""
    n_events = int(starts.shape[0])
    if limit <= 0 or n_events == 0:
        return np.zeros(0, np.int64)
    pairs, weight = _hit_pairs(question_ids, tokens, starts, ends, vocab, postings, ratio, span)
    if pairs.size == 0:
        return np.zeros(0, np.int64)
    scores = _passage_scores(pairs, weight, n_events, span)
    own = _passage_scores(pairs, weight, n_events, 1)
    top = float(scores.max())
    if top <= 0.0:
        return np.zeros(0, np.int64)
    keep = np.flatnonzero(scores >= ratio * top)
    apart = _discriminating_scores(pairs, weight, keep, n_events, span)
    order = keep[np.lexsort((-keep, -own[keep], -scores[keep], -apart[keep]))]
    out: list[int] = []
    for c in order.tolist():
        if all(abs(c - h) > spacing for h in out):
            out.append(c)
            if len(out) == limit:
                break
    return np.asarray(out, np.int64)


def _essential(idf: np.ndarray, ratio: float) -> np.ndarray:
    """bool per word: MaxScore's *essential* words. The best score is at least the largest weight (the
    passage holding that word), so a hit scores at least ``ratio`` of it; the lightest words whose
    weights sum below that ("of", "is") cannot make a hit alone, and the others are essential."""
    light = np.cumsum(np.sort(idf)) < ratio * float(idf.max()) * (1.0 - 1e-9)
    essential = np.ones(idf.shape[0], bool)
    essential[np.argsort(idf, kind="stable")[light]] = False
    return essential


def _hit_pairs(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               vocab: Vocabulary, postings: WordPostings | None, ratio: float,
               span: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs :func:`lexical_hits` scores, and their weights: the question words' of weight > 0 within
    ``2 * (span - 1)`` events of an event holding an essential word (:func:`_essential`; exact pruning).
    Every hit's passages hold an essential word, so every passage score a hit reads (its own, its
    passages', its place's for :func:`_discriminating_scores`) lies within that reach, computed from all
    its words; scores outside it come out lower than they are, below the cut either way. A light word's
    pairs are read in that reach only."""
    n_events = int(starts.shape[0])
    found, idf, pairs_of = word_weights(vocab.question_words(question_ids), tokens, starts, ends, vocab, postings)
    found, idf = found[idf > 0.0], idf[idf > 0.0]
    if found.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    essential = _essential(idf, ratio)
    heavy = pairs_of(found[essential])
    light = np.zeros((0, 2), np.int64)
    if not essential.all():
        reach = 2 * (max(1, int(span)) - 1)
        x = np.unique(heavy[:, 1])
        lo, hi = np.maximum(x - reach, 0), np.minimum(x + reach + 1, n_events)
        run = np.concatenate([[True], lo[1:] > hi[:-1]])  # a new range where it does not touch the one before
        last = np.concatenate([np.flatnonzero(run)[1:] - 1, [x.size - 1]])
        light = pairs_of(found[~essential], within=np.stack([lo[run], hi[last]], 1))
    both = np.concatenate([heavy, light])
    pairs = both[np.argsort(both[:, 0], kind="stable")]  # each part is sorted by word then event
    return pairs, idf[np.searchsorted(found, pairs[:, 0])]


def _discriminating_scores(pairs: np.ndarray, weight: np.ndarray, candidates: np.ndarray, n_events: int,
                           span: int) -> np.ndarray:
    """Per event: its best ``span``-event passage score with each question word weighed
    ``idf * (1 + idf among the candidates' places)``.

    A *place* is a run of candidate events less than ``span + 1`` apart, with the events its passages
    reach (``span - 1`` each side). Among ``P`` places a word found in ``d`` of them weighs
    ``max(0, ln((P - d + 0.5) / (d + 0.5)))`` there, as idf does among events: 0 for the words most
    places share (the form of a look-alike fact, which made them candidates), ``ln((2P - 1) / 3)`` for a
    word only one place holds. With one or two places every word's local weight is 0 and the order is
    the plain score's.
    """
    if candidates.size == 0:
        return np.zeros(n_events, np.float64)
    span = max(1, int(span))
    place = np.cumsum(np.concatenate([[1], np.diff(candidates) > span])) - 1
    places = int(place[-1]) + 1
    of_event = np.full(n_events, -1, np.int64)
    for d in range(-(span - 1), span):  # a place reaches its passages' events (an event two reach: the first)
        at = candidates + d
        ok = (at >= 0) & (at < n_events)
        free = of_event[at[ok]] < 0
        of_event[at[ok][free]] = place[ok][free]
    where = of_event[pairs[:, 1]]
    held, _ = unique_pairs(np.stack([pairs[:, 0], where], 1)[where >= 0])  # (word, place), each once
    uw, df = np.unique(held[:, 0], return_counts=True)
    local = np.maximum(np.log((places - df + 0.5) / (df + 0.5)), 0.0)
    k = np.clip(np.searchsorted(uw, pairs[:, 0]), 0, max(uw.size - 1, 0))
    boost = np.where(uw[k] == pairs[:, 0], local[k], 0.0) if uw.size else np.zeros(pairs.shape[0])
    return _passage_scores(pairs, weight * (1.0 + boost), n_events, span)

"""Lexical matching of a question against the stream's events: the words a question names, found verbatim.

A question usually names what it asks about ("the special magic number for tender-glacier", "the pass
key of the amber harbor door"). The attention scores of its query tokens rank every sentence of the
same form alike (each look-alike shares "special magic number"); the name itself is a few tokens
among many and rarely decides the ranking. The words are in the log, though: this module ranks the
events by the rare words they share with the question, as a sparse retriever would (BM25's idf,
no term frequency: events are sentence-sized).

Rules:

* Tokens are compared by their text, lowercased and stripped of spaces (``Vocabulary.canonical``:
  " Harbor" and "harbor" are one word); only tokens holding a letter or a digit count, and a question's
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
Cost: one pass over the stream's token ids per question (``np.isin`` on ``[num_tokens]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LABEL_TOKENS = 3
"""The most tokens of a line-opening label (``Question:``, ``User:``) that :meth:`Vocabulary.question_words` drops."""


@dataclass(frozen=True)
class Vocabulary:
    """Per token id: ``canonical`` word id (equal for tokens of equal lowercased, stripped text),
    ``content`` (the text holds a letter or a digit), ``joins`` (it continues the word before it: no
    leading whitespace, and a letter or a digit), ``breaks`` (the text holds a newline) and ``colon``
    (the text, leading spaces aside, starts with a colon)."""

    canonical: np.ndarray  # int64 [vocab]
    content: np.ndarray  # bool [vocab]
    joins: np.ndarray  # bool [vocab]
    breaks: np.ndarray  # bool [vocab]
    colon: np.ndarray  # bool [vocab]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Vocabulary:
        """From the decoded text of every token id (``texts[i]``: token ``i``)."""
        keys = [t.strip().lower() for t in texts]
        ids: dict[str, int] = {}
        canonical = np.fromiter((ids.setdefault(k, len(ids)) for k in keys), np.int64, len(keys))
        content = np.fromiter((any(ch.isalnum() for ch in k) for k in keys), bool, len(keys))
        joins = np.fromiter((bool(t) and not t[0].isspace() and any(ch.isalnum() for ch in t) for t in texts),
                            bool, len(texts))
        breaks = np.fromiter(("\n" in t for t in texts), bool, len(texts))
        colon = np.fromiter((t.lstrip(" ").startswith(":") for t in texts), bool, len(texts))
        return cls(canonical, content, joins, breaks, colon)

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

    def words(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The distinct canonical words of the content tokens among ``token_ids`` (ids outside the
        vocabulary are skipped)."""
        ids = np.asarray(token_ids, np.int64)
        ids = ids[(ids >= 0) & (ids < self.canonical.shape[0])]
        return np.unique(self.canonical[ids[self.content[ids]]])


PASSAGE_EVENTS = 2
"""Consecutive events a question's words are matched in together (module docstring)."""


def _weighted_pairs(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(word, event)`` pairs of the question's content words (labels aside:
    :meth:`Vocabulary.question_words`) in the events, and each pair's word weight (idf)."""
    return _word_pairs(vocab.question_words(question_ids), tokens, starts, ends, vocab)


def _word_pairs(words: np.ndarray, tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(word, event)`` pairs of ``words`` (canonical content words) in the events, and
    each pair's word weight (idf)."""
    empty = np.zeros((0, 2), np.int64), np.zeros(0, np.float64)
    n_events = int(starts.shape[0])
    if n_events == 0 or words.size == 0 or tokens.size == 0:
        return empty
    base = int(starts[0])
    ids = np.clip(np.asarray(tokens, np.int64), 0, vocab.canonical.shape[0] - 1)
    canon = vocab.canonical[ids]
    pos = np.flatnonzero(np.isin(canon, words)) + base
    if pos.size == 0:
        return empty
    ev = np.searchsorted(starts, pos, side="right") - 1
    inside = (ev >= 0) & (pos < ends[np.clip(ev, 0, n_events - 1)])
    ev, word = ev[inside], canon[pos[inside] - base]
    pairs = np.unique(np.stack([word, ev], 1), axis=0)  # (word, event), each once
    if pairs.size == 0:
        return empty
    uw, df = np.unique(pairs[:, 0], return_counts=True)
    idf = np.maximum(np.log((n_events - df + 0.5) / (df + 0.5)), 0.0)
    return pairs, idf[np.searchsorted(uw, pairs[:, 0])]


def _passage_scores(pairs: np.ndarray, weight: np.ndarray, n_events: int, span: int) -> np.ndarray:
    """Per event: the best score of the ``span``-event passages holding it (``span`` 1: its own)."""
    span = max(1, int(span))
    word, ev = pairs[:, 0], pairs[:, 1]
    # passage p = events p .. p+span-1; each (word, passage) once
    rows = np.concatenate([np.stack([word, ev - d, np.arange(ev.shape[0])], 1) for d in range(span)])
    rows = rows[rows[:, 1] >= 0]
    _, first = np.unique(rows[:, :2], axis=0, return_index=True)
    rows = rows[first]
    passage = np.zeros(n_events, np.float64)
    np.add.at(passage, rows[:, 1], weight[rows[:, 2]])
    best = passage.copy()
    for d in range(1, span):
        best[d:] = np.maximum(best[d:], passage[:-d])
    return best


def lexical_scores(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   vocab: Vocabulary, span: int = PASSAGE_EVENTS) -> np.ndarray:
    """float64 ``[E]``: each event's score (module docstring; ``span`` events to a passage) for the
    question ``question_ids``.

    ``tokens``: the stream's token ids from ``starts[0]`` on (``tokens[j]`` is token ``starts[0] + j``);
    ``starts``/``ends``: the retrievable events' bounds, sorted and disjoint.
    """
    n_events = int(starts.shape[0])
    pairs, weight = _weighted_pairs(question_ids, tokens, starts, ends, vocab)
    if pairs.size == 0:
        return np.zeros(n_events, np.float64)
    return _passage_scores(pairs, weight, n_events, span)


def lexical_hits(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 vocab: Vocabulary, limit: int, ratio: float = 0.5, spacing: int = 0,
                 span: int = PASSAGE_EVENTS) -> np.ndarray:
    """Event indices (into ``starts``) scoring at least ``ratio`` of the best score, best first (ties:
    the better own score, then the later event), each more than ``spacing`` events from the hits
    before it, at most ``limit``; empty when no event holds a weighed question word."""
    n_events = int(starts.shape[0])
    if limit <= 0 or n_events == 0:
        return np.zeros(0, np.int64)
    pairs, weight = _weighted_pairs(question_ids, tokens, starts, ends, vocab)
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
    held = np.unique(np.stack([pairs[:, 0], where], 1)[where >= 0], axis=0)  # (word, place), each once
    uw, df = np.unique(held[:, 0], return_counts=True)
    local = np.maximum(np.log((places - df + 0.5) / (df + 0.5)), 0.0)
    k = np.clip(np.searchsorted(uw, pairs[:, 0]), 0, max(uw.size - 1, 0))
    boost = np.where(uw[k] == pairs[:, 0], local[k], 0.0) if uw.size else np.zeros(pairs.shape[0])
    return _passage_scores(pairs, weight * (1.0 + boost), n_events, span)


def continuation(question_ids: Sequence[int], segments: Sequence[tuple[int, np.ndarray]], vocab: Vocabulary,
                 min_match: int) -> tuple[int, int, int] | None:
    """What followed the question's last words where the window says them verbatim: ``(token id, its
    stream offset, match length)`` of the token after the longest run of the window that equals the
    question's last tokens (compared as words: ``Vocabulary.canonical``), at least ``min_match`` tokens
    long and followed by a token of the same segment; ties go to the latest run (the most recent
    statement). None when there is none.

    ``segments``: the window's contiguous runs of the stream, ``(offset of the first token, token ids)``.
    A question that restates a fact's lead-in ("... The pass key is") finds that fact ("The pass key is
    27611"); its look-alikes, which name another key, match fewer tokens.
    """
    q = np.asarray(question_ids, np.int64)
    if min_match <= 0 or q.size < min_match:
        return None
    size = vocab.canonical.shape[0]
    qc = vocab.canonical[np.clip(q, 0, size - 1)][::-1]  # the question's words, last first
    best: tuple[int, int, int] | None = None
    for offset, ids in segments:
        ids = np.asarray(ids, np.int64)
        if ids.size < min_match + 1:
            continue
        tc = vocab.canonical[np.clip(ids, 0, size - 1)]
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


BRIDGE_RARE = 0.75
"""A bridge word's idf is at least this share of the largest idf (a word in one event): it is found in
about ``E ** 0.25`` of ``E`` events or fewer, rare enough to name one thing (:func:`bridge_hit`)."""
ASKED_RARE = 0.6
"""A question word the second hop looks for weighs at least this share of the largest idf (about
``E ** 0.4`` events or fewer): "code" in a question about a code, not "what" or "which"."""


def bridge_hit(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               vocab: Vocabulary, first: int, spacing: int, span: int = PASSAGE_EVENTS) -> int | None:
    """The second hop of a question whose first lexical hit (event ``first``) names a thing the asked
    fact is stated about elsewhere: "Maria hid the treasure in the cobalt chest" found by "Maria", and
    "The cobalt chest is locked with the code 51234" found by "cobalt chest" with "code". None when
    there is no such passage.

    * The *missing* words: the question's words that the first hit's neighbourhood (``spacing`` events
      each side) does not hold, not common (idf >= :data:`ASKED_RARE` of the largest).
    * The *bridge phrases* (:func:`_bridge_phrases`): where the first hit's sentence (``span - 1``
      events each side of it) names the thing with a question word ("the cobalt chest"), the two words
      together. The hop is the ``span``-event passage more than ``spacing + 1`` events from ``first``
      that holds a bridge phrase and a missing word, scored by its best phrase's weight plus the
      distinct missing words' weights (ties: the later); returned as its first event where a phrase
      starts. A phrase is rarer than either of its words: a colour or a material that the stream uses
      elsewhere ("silver", "slate") still names one chest with the word "chest", and the look-alike
      fact about another thing of the same name ("the crimson gate") does not hold the phrase.
    * Else the *bridge words*: the words of the first hit's passage (its best-scoring ``span``-event
      passage) that the question does not name, rare enough to name one thing (idf >= :data:`BRIDGE_RARE`
      of the largest); the hop is the passage away from ``first`` holding one and a missing word,
      scored by the sum of the distinct such words' weights, as its event holding a bridge word.

    Same weights and arguments as :func:`lexical_hits`. A single-hop question whose first hit holds
    the asked fact has no passage elsewhere that joins that hit's thing to a rare word the question
    asks for and the hit lacks, or one that does not matter: the rule adds one passage.
    """
    n_events = int(starts.shape[0])
    if n_events < 2 or tokens.size == 0 or not 0 <= first < n_events:
        return None
    base = int(starts[0])

    def words_of(lo: int, hi: int) -> np.ndarray:  # the distinct content words of events lo .. hi-1
        lo, hi = max(lo, 0), min(hi, n_events)
        if hi <= lo:
            return np.zeros(0, np.int64)
        a, b = int(starts[lo]) - base, int(ends[hi - 1]) - base
        ids = np.clip(np.asarray(tokens[a:b], np.int64), 0, vocab.canonical.shape[0] - 1)
        pos = np.arange(a, b, dtype=np.int64) + base
        inside = pos < ends[lo + np.searchsorted(starts[lo:hi], pos, side="right") - 1]  # not between events
        return np.unique(vocab.canonical[ids][vocab.content[ids] & inside])

    asked = vocab.question_words(question_ids)
    around = [(p, words_of(p, p + span)) for p in range(first - span + 1, first + 1) if p >= 0]
    pairs, weight = _word_pairs(np.union1d(asked, np.concatenate([w for _, w in around])), tokens, starts, ends,
                                vocab)
    if pairs.size == 0:
        return None
    uw, at = np.unique(pairs[:, 0], return_index=True)
    idf = weight[at]
    top = float(np.log((n_events - 0.5) / 1.5))

    def weight_of(words: np.ndarray) -> float:
        return float(idf[np.searchsorted(uw, words)].sum()) if words.size else 0.0

    missing = np.setdiff1d(asked, words_of(first - spacing, first + spacing + 1))
    is_missing = np.isin(uw, missing) & (idf >= ASKED_RARE * top)
    if not is_missing.any():
        return None
    missing_pairs = pairs[np.isin(pairs[:, 0], uw[is_missing])]
    hop = _phrase_passage(tokens, starts, ends, vocab, first, spacing, span, asked[np.isin(asked, uw)],
                          (uw, idf), missing_pairs)
    if hop is not None:
        return hop
    # the first hit's passage: the one its question words weigh most in (ties: the later, at the hit)
    found = max(reversed(around), key=lambda pw: weight_of(np.intersect1d(pw[1], asked)))[1]
    is_bridge = np.isin(uw, np.setdiff1d(found, asked)) & (idf >= BRIDGE_RARE * top)
    if not is_bridge.any():
        return None
    pairs = pairs[np.isin(pairs[:, 0], uw[is_bridge | is_missing])]
    return _bridge_passage(pairs, uw, idf, is_bridge, is_missing, n_events, first, spacing, span)


def _whole_word_runs(canon: np.ndarray, joins: np.ndarray, seqs: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Per sequence of canonical words: the positions in ``canon`` where it is said as whole words (it
    starts a word, and the token after it does not continue one). One pass over the stream."""
    n = int(canon.shape[0])
    if not seqs or n == 0:
        return [np.zeros(0, np.int64) for _ in seqs]
    at = np.flatnonzero(np.isin(canon, np.unique([s[0] for s in seqs])) & ~joins)
    out = []
    for seq in seqs:
        k = len(seq)
        pos = at[(canon[at] == seq[0]) & (at + k <= n)]
        for j in range(1, k):
            pos = pos[canon[pos + j] == seq[j]]
        after = pos + k
        out.append(pos[(after >= n) | ~joins[np.minimum(after, n - 1)]])
    return out


def _bridge_phrases(ids: np.ndarray, vocab: Vocabulary, asked: np.ndarray,
                    named: np.ndarray) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The pairs of adjacent words of ``ids`` (a word: a token and the tokens joining it) where one is a
    question word that names something (every content token of it in ``named``) and the other a content
    word the question does not name (not every content token in ``asked``): ``(the pair, the other
    word)`` as canonical words. "the cobalt chest" asked about a chest gives (("cobalt", "chest"),
    ("cobalt",))."""
    canon = vocab.canonical[ids]
    heads = np.flatnonzero(~vocab.joins[ids])
    if heads.size == 0 or heads[0] != 0:
        heads = np.concatenate([[0], heads])
    bounds = list(zip(heads.tolist(), [*heads[1:].tolist(), int(ids.shape[0])], strict=True))

    def kind(a: int, b: int) -> int:  # 1: a question word naming something, 2: no question word, 0: else
        words = canon[a:b][vocab.content[ids[a:b]]]
        if words.size == 0:
            return 0
        if np.isin(words, asked).all():
            return 1 if np.isin(words, named).all() else 0
        return 2

    kinds = [kind(a, b) for a, b in bounds]
    found: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in range(len(bounds) - 1):
        (one, k1), (two, k2) = (bounds[i], kinds[i]), (bounds[i + 1], kinds[i + 1])
        if {k1, k2} == {1, 2}:
            other = one if k1 == 2 else two
            found.setdefault(tuple(canon[one[0] : two[1]].tolist()), tuple(canon[other[0] : other[1]].tolist()))
    return list(found.items())


def _phrase_passage(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, vocab: Vocabulary, first: int,
                    spacing: int, span: int, asked: np.ndarray, weights: tuple[np.ndarray, np.ndarray],
                    missing_pairs: np.ndarray) -> int | None:
    """:func:`bridge_hit` by its bridge phrases: the best passage away from ``first`` holding a phrase
    and a missing word (``missing_pairs``: their ``(word, event)`` pairs), as its first event where a
    phrase starts; None when none does. ``asked``/``weights``: the question's words found in the
    stream and the ``(words, idf)`` of those and the missing ones. A phrase counts when its question
    word is not common (idf >= :data:`ASKED_RARE` of the largest), its other word is not common as a
    whole word, and the phrase is in few events (idf >= :data:`BRIDGE_RARE` of the largest)."""
    n_events = int(starts.shape[0])
    base = int(starts[0])
    top = float(np.log((n_events - 0.5) / 1.5))
    uw, idf = weights
    named = asked[idf[np.searchsorted(uw, asked)] >= ASKED_RARE * top]
    lo, hi = max(first - span + 1, 0), min(first + span, n_events)
    ids = np.clip(np.asarray(tokens, np.int64), 0, vocab.canonical.shape[0] - 1)
    found = _bridge_phrases(ids[int(starts[lo]) - base : int(ends[hi - 1]) - base], vocab, asked, named)
    if not found:
        return None
    phrases, others = [p for p, _ in found], [o for _, o in found]
    runs = _whole_word_runs(vocab.canonical[ids], vocab.joins[ids], [*phrases, *others])

    def events_holding(pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # of the first, last token
        at = pos + base
        return (np.searchsorted(starts, at, side="right") - 1, np.searchsorted(starts, at + k - 1, side="right") - 1)

    def idf_in(events: np.ndarray) -> float:
        df = np.unique(events[events >= 0]).size
        return max(float(np.log((n_events - df + 0.5) / (df + 0.5))), 0.0)

    best = np.zeros(n_events, np.float64)  # per passage: its best phrase's weight
    holder = np.full(n_events, n_events, np.int64)  # per passage: its first event where a phrase starts
    for phrase, other, pos, other_pos in zip(phrases, others, runs[: len(phrases)], runs[len(phrases) :],
                                             strict=True):
        if idf_in(events_holding(other_pos, len(other))[0]) < ASKED_RARE * top:
            continue  # the other word is common: it names nothing
        a, b = events_holding(pos, len(phrase))
        w = idf_in(np.concatenate([a, b]))
        if w < BRIDGE_RARE * top:
            continue
        for start_event in a[a >= 0].tolist():
            for p in range(max(start_event - span + 1, 0), start_event + 1):
                best[p] = max(best[p], w)
                holder[p] = min(holder[p], start_event)
    far = np.abs(np.arange(n_events) - first) > spacing + 1
    if not (best > 0)[far].any():
        return None
    word, event = missing_pairs[:, 0], missing_pairs[:, 1]
    rows = np.unique(np.concatenate([np.stack([word, event - d], 1) for d in range(max(1, span))]), axis=0)
    rows = rows[rows[:, 1] >= 0]
    missing = np.zeros(n_events, np.float64)
    np.add.at(missing, rows[:, 1], idf[np.searchsorted(uw, rows[:, 0])])
    score = np.where((best > 0) & (missing > 0) & far, best + missing, 0.0)
    if score.max() <= 0.0:
        return None
    chosen = int(n_events - 1 - np.argmax(score[::-1]))  # ties: the later passage
    return int(holder[chosen])


def _bridge_passage(pairs: np.ndarray, uw: np.ndarray, idf: np.ndarray, is_bridge: np.ndarray,
                    is_missing: np.ndarray, n_events: int, first: int, spacing: int, span: int) -> int | None:
    """:func:`bridge_hit`'s last step: over the ``(word, event)`` pairs of the bridge and missing words
    (``uw``: the words, sorted, with their ``idf`` and kinds), the best passage away from ``first``
    holding one of each, as its first event holding a bridge word; None when none does."""
    k = np.searchsorted(uw, pairs[:, 0])
    word_b, word_m, weight = is_bridge[k], is_missing[k], idf[k]
    # passage p = events p .. p+span-1: each (word, passage) once
    rows = np.concatenate([np.stack([pairs[:, 0], pairs[:, 1] - d, np.arange(pairs.shape[0])], 1)
                           for d in range(max(1, span))])
    rows = rows[(rows[:, 1] >= 0) & (np.abs(rows[:, 1] - first) > spacing + 1)]
    if rows.size == 0:
        return None
    _, once = np.unique(rows[:, :2], axis=0, return_index=True)
    rows = rows[once]
    p, r = rows[:, 1], rows[:, 2]
    score = np.zeros(n_events, np.float64)
    has_b = np.zeros(n_events, bool)
    has_m = np.zeros(n_events, bool)
    np.add.at(score, p, np.where(word_b[r] | word_m[r], weight[r], 0.0))
    has_b[p[word_b[r]]] = True
    has_m[p[word_m[r]]] = True
    score[~(has_b & has_m)] = 0.0
    if score.max() <= 0.0:
        return None
    best = int(n_events - 1 - np.argmax(score[::-1]))  # ties: the later passage
    holders = np.unique(pairs[word_b & (pairs[:, 1] >= best) & (pairs[:, 1] < best + span), 1])
    return int(holders[0])

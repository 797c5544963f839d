"""A two-hop question's second hop: the passage stating the asked fact about a thing its first lexical
hit names (:func:`bridge_hit`).

"Maria hid the treasure in a chest. What is the code of that chest?": the first hit
(:func:`emserve.retrieval.lexical.lexical_hits`) is Maria's sentence, "Maria hid the treasure in the
cobalt chest"; the asked fact, "The cobalt chest is locked with the code 51234", names neither Maria nor
anything the question says but "code". This module finds it by what joins the two: the phrase the
first hit names the thing with ("cobalt chest"), else a rare word of the first hit ("cobalt"), together
with a word the question asks for that the first hit lacks ("code"). Same weights as
:mod:`emserve.retrieval.lexical` (idf over the retrievable events); pure numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from emserve.retrieval.lexical import PASSAGE_EVENTS, Vocabulary, word_weights
from emserve.retrieval.postings import WordPostings, passage_rows, range_indices

BRIDGE_RARE = 0.75
"""A bridge word's idf is at least this share of the largest idf (a word in one event): it is found in
about ``E ** 0.25`` of ``E`` events or fewer, rare enough to name one thing (:func:`bridge_hit`)."""
ASKED_RARE = 0.6
"""A question word the second hop looks for weighs at least this share of the largest idf (about
``E ** 0.4`` events or fewer): "code" in a question about a code, not "what" or "which"."""


def bridge_hit(question_ids: Sequence[int], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               vocab: Vocabulary, first: int, spacing: int, span: int = PASSAGE_EVENTS,
               postings: WordPostings | None = None) -> int | None:
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
    * Else the *bridge words*: the whole words of the first hit's passage (its best-scoring ``span``-event
      passage; :func:`_passage_words`: a number said digit by digit is one word, not ten digits) that the
      question does not name, rare enough as whole words to name one thing (idf >= :data:`BRIDGE_RARE` of
      the largest); the hop is the passage away from ``first`` holding one and a missing word, scored by
      the sum of the distinct such words' weights, as its event holding a bridge word.

    Same weights and arguments as :func:`~emserve.retrieval.lexical.lexical_hits` (``postings``: of
    ``vocab.verbatim``, the words compared here). A single-hop
    question whose first hit holds the asked fact has no passage elsewhere that joins that hit's thing
    to a rare word the question asks for and the hit lacks, or one that does not matter: the rule adds
    one passage.
    Words are compared exactly here (``Vocabulary.verbatim``, not the stems the first hit is found by):
    the rule's rarity bounds were set on exact words, and stems that merge a rare word with a common
    one ("textiles", "textile") opened the gate on single-hop questions (docs/recall.md, rule 16).
    """
    n_events = int(starts.shape[0])
    if n_events < 2 or tokens.size == 0 or not 0 <= first < n_events:
        return None
    vocab = dataclasses.replace(vocab, canonical=vocab.verbatim)
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
    uw, idf, pairs_of = word_weights(np.union1d(asked, np.concatenate([w for _, w in around])), tokens, starts,
                                     ends, vocab, postings)
    if uw.size == 0:
        return None
    top = float(np.log((n_events - 0.5) / 1.5))

    def weight_of(words: np.ndarray) -> float:
        return float(idf[np.searchsorted(uw, words)].sum()) if words.size else 0.0

    missing = np.setdiff1d(asked, words_of(first - spacing, first + spacing + 1))
    is_missing = np.isin(uw, missing) & (idf >= ASKED_RARE * top)
    if not is_missing.any():
        return None
    missing_pairs = pairs_of(uw[is_missing])  # rare words: few pairs
    hop = _phrase_passage(tokens, starts, ends, vocab, first, spacing, span, asked[np.isin(asked, uw)],
                          (uw, idf), missing_pairs, postings)
    if hop is not None:
        return hop
    # the first hit's passage: the one its question words weigh most in (ties: the later, at the hit)
    p = max(reversed(around), key=lambda pw: weight_of(np.intersect1d(pw[1], asked)))[0]
    lo, hi = int(starts[p]) - base, int(ends[min(p + span, n_events) - 1]) - base
    bridge = _bridge_words(_passage_words(vocab.stream_ids(np.asarray(tokens[lo:hi])), vocab, asked), tokens,
                           starts, ends, vocab, postings, _most_events(n_events, BRIDGE_RARE * top))
    if not bridge:
        return None
    return _word_passage(bridge, missing_pairs, uw[is_missing], idf[is_missing], n_events, first, spacing, span,
                         int(vocab.canonical.max()) + 1)


def _bridge_words(words: list[tuple[int, ...]], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                  vocab: Vocabulary, postings: WordPostings | None, most: int) -> list[np.ndarray]:
    """Per word of ``words`` (:func:`_passage_words`) said in ``most`` events or fewer (rare enough: idf >=
    :data:`BRIDGE_RARE` of the largest), the events saying it (:func:`_word_events`)."""
    if postings is not None and not np.array_equal(starts[1:], ends[:-1]):
        postings = None  # tokens lie between events: the postings do not see those
    stream = vocab.stream_ids(np.asarray(tokens)) if postings is None else None  # the one pass, read once
    said = (_word_events(w, tokens, starts, ends, vocab, postings, most, stream) for w in words)
    return [e for e in said if e is not None and e.size]


def _word_passage(bridge: list[np.ndarray], missing_pairs: np.ndarray, missing: np.ndarray, missing_idf: np.ndarray,
                  n_events: int, first: int, spacing: int, span: int, first_id: int) -> int | None:
    """:func:`bridge_hit` by its bridge words (``bridge``: per word, the events saying it): the missing words
    (``missing``, sorted, with their ``missing_idf`` and ``(word, event)`` pairs) keep their ids, the bridge
    words take ids from ``first_id`` on (after every vocabulary word), and :func:`_bridge_passage` scores."""
    words = np.concatenate([missing, first_id + np.arange(len(bridge), dtype=np.int64)])
    weights = np.concatenate([missing_idf, [np.log((n_events - e.size + 0.5) / (e.size + 0.5)) for e in bridge]])
    is_bridge = np.arange(words.size) >= missing.size
    pairs = np.concatenate([missing_pairs, *(np.stack([np.full(e.size, first_id + j, np.int64), e], 1)
                                             for j, e in enumerate(bridge))])
    return _bridge_passage(pairs, words, weights, is_bridge, ~is_bridge, n_events, first, spacing, span)


def _most_events(n_events: int, bar: float) -> int:
    """The most events a word may be in for its idf, ``ln((E - df + 0.5) / (df + 0.5))``, to reach ``bar``."""

    def idf(df: int) -> float:
        return float(np.log((n_events - df + 0.5) / (df + 0.5)))

    most = int((n_events + 0.5 - 0.5 * np.exp(bar)) / (1.0 + np.exp(bar)))
    while most + 1 <= n_events and idf(most + 1) >= bar:
        most += 1
    while most >= 0 and idf(most) < bar:
        most -= 1
    return most


def _passage_words(ids: np.ndarray, vocab: Vocabulary, asked: np.ndarray) -> list[tuple[int, ...]]:
    """The distinct whole words of the stream ids ``ids`` that the question does not name (not every token
    in ``asked``), each as the canonical words of its tokens. A word is a content token that does not
    continue a content token before it, and the tokens joining it: " 73247" (" ", "7", "3", "2", "4", "7")
    is the one word "73247", not five digits; " Qu" "illing" "ham" is one name, not its pieces."""
    content, joins = vocab.content[ids], vocab.joins[ids]
    after_content = np.concatenate([[False], content[:-1]])
    heads = np.flatnonzero(content & ~(joins & after_content))
    found: dict[tuple[int, ...], None] = {}
    for h in heads.tolist():
        end = h + 1
        while end < ids.shape[0] and joins[end]:
            end += 1
        word = vocab.canonical[ids[h:end]]
        if not np.isin(word, asked).all():
            found.setdefault(tuple(word.tolist()), None)
    return list(found)


def _word_events(word: tuple[int, ...], tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 vocab: Vocabulary, postings: WordPostings | None, most: int,
                 stream: np.ndarray | None = None) -> np.ndarray | None:
    """The events (sorted, distinct) saying ``word`` (canonical words of its tokens, as :func:`_passage_words`
    gives them), or None when more than ``most`` do. A word of one token: the events holding the token (as
    the postings count it: a token that starts a word is rarely continued). A word of several tokens:
    where they are said in order as a whole word (not continuing a content token before them, not
    continued by a joining token), the event of its first token. With ``postings`` (of events that tile the
    stream), only the events holding its rarest token are read; without them, ``stream`` (the stream's ids as
    ``Vocabulary.stream_ids`` reads them, computed once by the caller; else here)."""
    n_events, n = int(starts.shape[0]), int(tokens.shape[0])
    base = int(starts[0])
    canon = vocab.canonical
    k = len(word)
    seq = np.asarray(word, np.int64)
    if postings is None and stream is None:
        stream = vocab.stream_ids(np.asarray(tokens))

    def ids(pos: np.ndarray) -> np.ndarray:
        return stream[pos] if stream is not None else vocab.stream_ids(np.asarray(tokens[pos]))

    if postings is not None:
        found, df = postings.count(seq, n_events)
        if found.size < np.unique(seq).size:
            return None  # a token no event holds
        rarest = int(found[np.argmin(df)])
        if k == 1 and int(df.min()) > most:
            return None
        events = np.unique(postings.pairs(np.array([rarest]), n_events)[:, 1])
        if k == 1:
            return events
        j = int(np.flatnonzero(seq == rarest)[0])
        at = range_indices(starts[events] - base, ends[events] - base)
        at = at[canon[ids(at)] == rarest]
    else:
        assert stream is not None
        j = 0
        at = np.flatnonzero(canon[stream] == seq[0])
    pos = at - j
    pos = pos[(pos >= 0) & (pos + k <= n)]
    if k > 1:
        for m in range(k):
            pos = pos[canon[ids(pos + m)] == seq[m]]
        if pos.size:
            here, before = ids(pos), ids(np.maximum(pos - 1, 0))
            whole = (pos == 0) | ~(vocab.joins[here] & vocab.content[before])
            after = pos + k
            whole &= (after >= n) | ~vocab.joins[ids(np.minimum(after, n - 1))]
            pos = pos[whole]
    event = np.searchsorted(starts, pos + base, side="right") - 1
    inside = (event >= 0) & (pos + base < ends[np.maximum(event, 0)])
    events = np.unique(event[inside])
    return events if events.size <= most else None


def _whole_word_runs(tokens: np.ndarray, vocab: Vocabulary, seqs: Sequence[tuple[int, ...]],
                     among: np.ndarray | None = None) -> list[np.ndarray]:
    """Per sequence of canonical words: the positions in the stream ``tokens`` (token ids) where it is said
    as whole words (it starts a word, and the token after it does not continue one). ``among``: the
    positions where a sequence may start (sorted; a superset of those holding a first word): only the
    tokens there and after them are read; else every position: one pass over the stream."""
    n = int(tokens.shape[0])
    if not seqs or n == 0:
        return [np.zeros(0, np.int64) for _ in seqs]

    whole = vocab.stream_ids(np.asarray(tokens)) if among is None else None  # the one pass, read once

    def ids(at: np.ndarray) -> np.ndarray:  # the tokens at these positions, as Vocabulary.stream_ids reads them
        return whole[at] if whole is not None else vocab.stream_ids(np.asarray(tokens[at]))

    starting = vocab.holding(np.unique([s[0] for s in seqs]), word_starts=True)
    if whole is not None:
        at = np.flatnonzero(starting[whole])
    else:
        assert among is not None
        at = among[starting[ids(among)]]
    canon, joins = vocab.canonical, vocab.joins
    out = []
    for seq in seqs:
        k = len(seq)
        pos = at[(canon[ids(at)] == seq[0]) & (at + k <= n)]
        for j in range(1, k):
            pos = pos[canon[ids(pos + j)] == seq[j]]
        after = pos + k
        out.append(pos[(after >= n) | ~joins[ids(np.minimum(after, n - 1))]])
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


def _event_tokens(starts: np.ndarray, ends: np.ndarray, postings: WordPostings | None,
                  words: Sequence[int]) -> np.ndarray | None:
    """The stream positions (from ``starts[0]``) of the tokens of the events holding ``words``, by the
    postings; None (look everywhere) without postings, or where tokens lie between events (the postings
    do not see those)."""
    n_events = int(starts.shape[0])
    if postings is None or not np.array_equal(starts[1:], ends[:-1]):
        return None
    events = np.unique(postings.pairs(np.asarray(words, np.int64), n_events)[:, 1])
    return range_indices(starts[events] - starts[0], ends[events] - starts[0])


def _phrase_passage(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, vocab: Vocabulary, first: int,
                    spacing: int, span: int, asked: np.ndarray, weights: tuple[np.ndarray, np.ndarray],
                    missing_pairs: np.ndarray, postings: WordPostings | None = None) -> int | None:
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
    near = vocab.stream_ids(np.asarray(tokens[int(starts[lo]) - base : int(ends[hi - 1]) - base]))
    found = _bridge_phrases(np.asarray(near, np.int64), vocab, asked, named)
    if not found:
        return None
    phrases, others = [p for p, _ in found], [o for _, o in found]
    seqs = [*phrases, *others]
    runs = _whole_word_runs(tokens, vocab, seqs, _event_tokens(starts, ends, postings, [q[0] for q in seqs]))

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
    row, passage = passage_rows(missing_pairs, span)
    missing = np.bincount(passage, idf[np.searchsorted(uw, missing_pairs[row, 0])], minlength=n_events)
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
    r, p = passage_rows(pairs, span)
    far = np.abs(p - first) > spacing + 1
    r, p = r[far], p[far]
    if p.size == 0:
        return None
    score = np.bincount(p, np.where(word_b[r] | word_m[r], weight[r], 0.0), minlength=n_events)
    has_b = np.zeros(n_events, bool)
    has_m = np.zeros(n_events, bool)
    has_b[p[word_b[r]]] = True
    has_m[p[word_m[r]]] = True
    score[~(has_b & has_m)] = 0.0
    if score.max() <= 0.0:
        return None
    best = int(n_events - 1 - np.argmax(score[::-1]))  # ties: the later passage
    holders = np.unique(pairs[word_b & (pairs[:, 1] >= best) & (pairs[:, 1] < best + span), 1])
    return int(holders[0])

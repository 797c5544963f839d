"""Word postings (``emserve.retrieval.postings``): the pairs a pass over the stream finds, kept as events close."""

from __future__ import annotations

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from emserve.retrieval.bridge import bridge_hit
from emserve.retrieval.lexical import Vocabulary, _stream_pairs, lexical_hits, lexical_scores
from emserve.retrieval.postings import WordPostings

TEXTS = ["<s>", " the", "The", " magic", " number", " for", " tender", " proud", "-", "gl", "ac", "ier", " is",
         " 42", ".", "\n", " Tender", " glacier", "?", " numbers", " chest", " cobalt", " code", " Maria", " hid"]
VOCAB = Vocabulary.from_texts(TEXTS)


def _events(sizes: list[int], gaps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Events of ``sizes`` from token 7 on, each after a gap of ``gaps[i]`` tokens outside every event."""
    starts, at = [], 7
    for size, gap in zip(sizes, gaps, strict=True):
        at += gap
        starts.append(at)
        at += size
    s = np.array(starts, np.int64)
    return s, s + np.array(sizes, np.int64)


def _grown(word_of: np.ndarray, stream: np.ndarray, starts: np.ndarray, ends: np.ndarray,
           cuts: list[int]) -> WordPostings:
    """Postings extended at each cut (events closed so far), reading only the tokens they need."""
    p = WordPostings(word_of)
    for c in [*sorted(cuts), len(starts)]:
        if c == 0:
            continue
        k = p.needs_from(starts[:c], ends[:c])
        if k < c:
            p.extend(stream[starts[k]:], starts[:c], ends[:c])
    return p


streams = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 6), min_size=n, max_size=n), st.lists(st.integers(0, 2), min_size=n, max_size=n),
    st.lists(st.integers(0, n), max_size=6), st.integers(0, 2**31 - 1)))


@settings(max_examples=150, deadline=None)
@given(streams, st.lists(st.integers(-2, len(TEXTS) + 2), max_size=8))
def test_postings_give_the_stream_pass_s_pairs(stream_args, words):
    sizes, gaps, cuts, seed = stream_args
    starts, ends = _events(sizes, gaps)
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, len(TEXTS) + 3, int(ends[-1]) + 5)  # a few ids outside the vocabulary
    for word_of in (VOCAB.canonical, VOCAB.verbatim):
        vocab = Vocabulary(word_of, VOCAB.content, VOCAB.joins, VOCAB.breaks, VOCAB.colon, VOCAB.verbatim)
        p = _grown(word_of, stream, starts, ends, cuts)
        assert p.num_events == len(starts)
        w = np.unique(np.asarray([x for x in words if 0 <= x < len(TEXTS)], np.int64))
        w = np.unique(word_of[w])
        for n in {1, len(starts) // 2 or 1, len(starts)}:
            tokens = stream[starts[0]:ends[n - 1]]
            want = _stream_pairs(w, tokens, starts[:n], ends[:n], vocab)
            np.testing.assert_array_equal(p.pairs(w, n), want.reshape(-1, 2))


def test_lexical_rules_answer_the_same_from_postings():
    """The lexical hits, scores and the second hop over postings equal those of the pass over the stream."""
    text = ["The", "cobalt", "chest", "the", "code", "is", "42.", "Maria", "hid", "the", "magic", "number", "for",
            "the", "proud", "glacier", "in", "the", "cobalt", "chest.", "The", "tender", "glacier", "is", "42.",
            "the", "number", "is", "the", "code."]
    tid = {t: i for i, t in enumerate(TEXTS)}
    rng = np.random.default_rng(1)
    filler = [tid[" the"], tid[" is"], tid["."]]
    ids = [tid.get(" " + w.strip(".").lower(), tid["."]) for w in text]
    stream = np.array(list(rng.choice(filler, 60)) + ids + list(rng.choice(filler, 40)) + ids, np.int64)
    sizes = np.full(len(stream) // 4, 4)
    starts = np.arange(0, 4 * len(sizes), 4, dtype=np.int64)
    ends = starts + sizes
    stems = _grown(VOCAB.canonical, stream, starts, ends, [3, 10, 20, 21, 40])
    words = _grown(VOCAB.verbatim, stream, starts, ends, [5, 30])
    question = [tid[" code"], tid[" for"], tid[" chest"], tid[" Maria"], tid[" hid"], tid["?"]]
    tokens = stream[: ends[-1]]
    hits = lexical_hits(question, tokens, starts, ends, VOCAB, 3, spacing=1)
    assert hits.size and np.array_equal(hits, lexical_hits(question, tokens, starts, ends, VOCAB, 3, spacing=1,
                                                           postings=stems))
    assert np.array_equal(lexical_scores(question, tokens, starts, ends, VOCAB),
                          lexical_scores(question, tokens, starts, ends, VOCAB, postings=stems))
    for first in range(len(starts)):
        assert bridge_hit(question, tokens, starts, ends, VOCAB, first, 1) == \
            bridge_hit(question, tokens, starts, ends, VOCAB, first, 1, postings=words)


def test_a_different_table_is_indexed_anew_and_merges_keep_the_pairs():
    stream = np.random.default_rng(2).integers(0, len(TEXTS), 4000)
    starts = np.arange(0, 4000, 5, dtype=np.int64)
    ends = starts + 5
    p = _grown(VOCAB.canonical, stream, starts, ends, list(range(1, 800, 7)))  # 114 small extends: merged often
    every = np.unique(VOCAB.canonical)
    want = _stream_pairs(every, stream[:4000], starts, ends, VOCAB)
    np.testing.assert_array_equal(p.pairs(every, 800), want)
    assert p.nbytes < 16 * want.shape[0]
    # the same table cut short and grown differently (a session reopened after a crash): rebuilt
    ends2 = ends.copy()
    ends2[99] -= 2
    assert p.needs_from(starts[:100], ends2[:100]) == 0 and p.num_events == 0
    p.extend(stream, starts[:100], ends2[:100])
    np.testing.assert_array_equal(p.pairs(every, 100), _stream_pairs(every, stream[:ends2[99]], starts[:100],
                                                                     ends2[:100], VOCAB))
    with np.testing.assert_raises(ValueError):
        lexical_hits([1, 3], stream, starts, ends, VOCAB, 2, postings=p)  # covers 100 events, not 800


HOP_TEXTS = ["<s>", " the", "The", " a", " of", ".", " Maria", " Hugo", " hid", " treasure", " in", " cobalt",
             " teal", " chest", " code", " is", " 51234", " 777", "What", "?", " locked", " with", " where",
             " gate", " amb", "er"]
HOP = Vocabulary.from_texts(HOP_TEXTS)
SENTENCES = ["Maria hid the treasure in the amb er chest .", "Hugo hid the treasure in the teal chest .",
             "The teal chest is locked with the code 777 .", "The amb er chest is locked with the code 51234 .",
             "the cobalt gate code is 777 .", "the amb er a .", "the cobalt a .", "Maria hid the cobalt chest ."]


def _hop(text: str) -> list[int]:
    ids = {t: i for i, t in enumerate(HOP_TEXTS)}
    return [ids[" " + w] if " " + w in ids else ids[w] for w in text.split()]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(30, 150), st.booleans())
def test_the_second_hop_is_the_same_from_postings(seed, n_events, gaps):
    """``bridge_hit`` over the postings (the words' events; the bridge phrases looked for in those
    events' tokens only) equals the pass over the stream: two-hop links, facts and look-alikes placed at
    random among filler, cut into events at random (inside phrases too), with tokens between events or
    without."""
    rng = np.random.default_rng(seed)
    filler = _hop("the a of . of the a . a of the .")
    text = []
    for _ in range(n_events // 3):
        text += _hop(SENTENCES[rng.integers(len(SENTENCES))]) if rng.random() < 0.4 else filler[: rng.integers(2, 9)]
    sizes = []
    while sum(sizes) < len(text):
        sizes.append(int(rng.integers(1, 7)))
    sizes[-1] -= sum(sizes) - len(text)
    sizes = [x for x in sizes if x > 0]
    n = len(sizes)
    gap = list(rng.integers(0, 3, n)) if gaps else [0] * n
    starts, ends = _events(sizes, gap)
    stream = rng.choice(_hop("the amb er chest cobalt code ."), int(ends[-1]) + 3)  # what lies between events
    for (a, b), chunk in zip(zip(starts, ends, strict=True), np.split(np.array(text), np.cumsum(sizes)[:-1]),
                             strict=True):
        stream[a:b] = chunk
    words = _grown(HOP.verbatim, stream, starts, ends, [n // 2])
    tokens = stream[starts[0]:ends[-1]]
    question = _hop("What is the code of the chest where Maria hid the treasure ?")
    found = 0
    for first in range(n):
        want = bridge_hit(question, tokens, starts, ends, HOP, first, 2)
        assert bridge_hit(question, tokens, starts, ends, HOP, first, 2, postings=words) == want
        found += want is not None
    event(f"hops found: {min(found, 3)}")


class _Watched:
    """A stream that records the positions read and refuses to be read whole (``np.asarray`` of it)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape, self.size, self.dtype = a, a.shape, a.size, a.dtype
        self.read = np.zeros(a.shape[0], bool)

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def __getitem__(self, key):
        self.read[np.arange(self.a.shape[0])[key]] = True
        return self.a[key]

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole stream was read")


def test_with_postings_the_lexical_rules_read_only_the_tokens_near_their_words():
    """A question's hits and its second hop from the postings read the tokens around the first hit and those
    of the events holding a bridge phrase's first word, not the stream (a session hands them a view of its
    mapped log: what is not read costs nothing); the same hits and hop as from the whole stream."""
    rng = np.random.default_rng(3)
    filler = _hop("the a of . of the a . a of the .")
    text = list(rng.choice(filler, 6000))
    for at, sentence in ((1000, "Maria hid the treasure in the cobalt chest ."),
                         (2500, "Hugo hid the treasure in the teal chest ."),
                         (4000, "The cobalt chest is locked with the code 51234 ."),
                         (5000, "The teal chest is locked with the code 777 .")):
        words = _hop(sentence)
        text[at:at + len(words)] = words
    stream = np.array(text, np.int64)
    starts = np.arange(0, 6000, 4, dtype=np.int64)
    ends = starts + 4
    stems, words = _grown(HOP.canonical, stream, starts, ends, [700]), _grown(HOP.verbatim, stream, starts, ends, [])
    question = _hop("What is the code of the chest where Maria hid the treasure ?")
    hits = lexical_hits(question, stream, starts, ends, HOP, 2, spacing=2)
    first = int(hits[0])
    want = bridge_hit(question, stream, starts, ends, HOP, first, 2)
    assert first == 250 and want == 1000  # Maria's link, then the cobalt chest's code
    watched = _Watched(stream)
    assert np.array_equal(lexical_hits(question, watched, starts, ends, HOP, 2, spacing=2, postings=stems), hits)
    assert bridge_hit(question, watched, starts, ends, HOP, first, 2, postings=words) == want
    assert 0 < watched.read.sum() < 0.05 * stream.size

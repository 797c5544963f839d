"""Lexical matching of a question against events (``emserve.retrieval.lexical``), on a toy vocabulary."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from emserve.retrieval.bridge import _whole_word_runs, bridge_hit
from emserve.retrieval.lexical import Vocabulary, lexical_hits, lexical_scores
from emserve.retrieval.verbatim import continuation, grounded, restates

TEXTS = ["<s>", " the", "The", " magic", " number", " for", " tender", " proud", "-", "gl", "ac", "ier", " is",
         " 42", ".", "\n", " Tender", " glacier", "?"]
VOCAB = Vocabulary.from_texts(TEXTS)
ID = {t: i for i, t in enumerate(TEXTS)}


def ids(*words: str) -> list[int]:
    return [ID[w] for w in words]


def test_vocabulary_folds_case_and_spaces_and_keeps_content_words():
    assert VOCAB.canonical[ID[" the"]] == VOCAB.canonical[ID["The"]]
    assert VOCAB.canonical[ID[" tender"]] == VOCAB.canonical[ID[" Tender"]]
    assert not VOCAB.content[ID["."]] and not VOCAB.content[ID["\n"]] and VOCAB.content[ID[" 42"]]
    assert set(VOCAB.words(ids(" the", "The", "?", " tender", " Tender")).tolist()) == {
        VOCAB.canonical[ID[" the"]], VOCAB.canonical[ID[" tender"]]}
    assert VOCAB.words([10**6, -1]).size == 0  # outside the vocabulary: skipped


def _stream(events: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.array([len(e) for e in events])
    starts = 100 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.concatenate([np.array(e) for e in events]), starts, starts + sizes


def test_rare_words_decide_and_common_words_weigh_nothing():
    filler = ids(" the", " is", ".")
    events = [filler] * 6 + [
        ids(" the", " magic", " number", " for", " proud", "-", "gl", "ac", "ier", " is", " 42", "."),
        ids(" the", " magic", " number", " for", " tender", "-", "gl", "ac", "ier", " is", " 42", "."),
        ids(" the", " is", " Tender", "."),
    ]
    tokens, starts, ends = _stream(events)
    q = ids("\n", "The", " magic", " number", " for", " tender", "-", "gl", "ac", "ier", "?")
    s = lexical_scores(q, tokens, starts, ends, VOCAB, span=1)
    assert np.all(s[:6] == 0)  # "the" is in every event: no weight
    assert s[7] > s[6] > 0 and s[7] > s[8] > 0  # both look-alikes share "magic number ... glacier"
    n = len(events)
    idf = lambda df: max(math.log((n - df + 0.5) / (df + 0.5)), 0.0)  # noqa: E731
    assert math.isclose(s[8], idf(2))  # "tender" (either case) in events 7 and 8
    assert math.isclose(s[7] - s[6], idf(2))
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=2, span=1).tolist() == [7, 6]
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=5, ratio=0.95, span=1).tolist() == [7]
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=0).size == 0


def test_ties_go_to_the_later_event_and_tokens_outside_events_do_not_count():
    events = [ids(" the", " 42", "."), ids(" the", "."), ids(" the", " 42", ".")] + [ids(" the", ".")] * 4
    tokens, starts, ends = _stream(events)
    # a gap between events 1 and 2 holding the word: outside every event, it is not counted
    ends = ends.copy()
    ends[1] -= 1
    tokens[starts[1] - 100 + 1] = ID[" 42"]
    assert lexical_hits(ids(" 42", "?"), tokens, starts, ends, VOCAB, limit=3, span=1).tolist() == [2, 0]
    assert lexical_hits(ids("?", "."), tokens, starts, ends, VOCAB, limit=3).size == 0  # no content word
    assert lexical_scores(ids(" 42"), tokens[:0], starts[:0], ends[:0], VOCAB).size == 0


def test_a_fact_cut_in_two_events_matches_as_one_passage():
    filler = ids(" the", " is", ".")
    name, fact = ids(" the", " magic", " number", " for", " Tender"), ids("-", "gl", "ac", "ier", " is", " 42", ".")
    events = [filler] * 4 + [name, fact] + [filler] * 2 + [ids(" the", " magic", " number", " for", " proud", "-",
                                                              "gl", "ac", "ier", ".")] + [filler] * 3
    tokens, starts, ends = _stream(events)
    q = ids("The", " magic", " number", " for", " tender", "-", "gl", "ac", "ier", "?")
    own = lexical_scores(q, tokens, starts, ends, VOCAB, span=1)
    assert own[8] > own[4] > own[5]  # event by event the look-alike wins
    s = lexical_scores(q, tokens, starts, ends, VOCAB)  # span 2: "tender" + "glacier" in one passage
    assert s[4] == s[5] > s[8] == own[8]
    # the hit is the event of the pair holding more of the words; its neighbour is no second hit
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=2, ratio=0.1, spacing=1).tolist() == [4, 8]
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=2, ratio=0.1, spacing=0).tolist() == [4, 5]
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=2, ratio=0.1, spacing=5).tolist() == [4]


def test_among_look_alikes_the_word_that_tells_them_apart_decides():
    """Four look-alikes say the question's form ("magic number for ... is") and one more of its words than
    the asked fact, which alone names "tender": by plain idf a look-alike wins; among the candidates'
    places the shared words weigh their idf alone and "tender" more, so the asked fact comes first."""
    filler = [ids(" the", ".")] * 4
    asked = ids(" the", " magic", " number", " tender", ".")
    looks = [ids(" the", " magic", " number", " for", w, " is", ".") for w in (" proud", " 42", " proud", " 42")]
    events = filler + [asked] + [e for look in looks for e in (*filler, look)] + filler
    tokens, starts, ends = _stream(events)
    q = ids("The", " magic", " number", " for", " tender", " is", "?")
    plain = lexical_scores(q, tokens, starts, ends, VOCAB, span=1)
    at = [4] + [4 + 5 * k for k in range(1, 5)]
    assert all(plain[a] > plain[4] for a in at[1:])  # each look-alike holds "for" and "is"
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=3, span=1, spacing=1).tolist()[0] == 4
    # with only two candidate places nothing tells words apart among them: the plain order stands
    two = filler + [asked] + filler + [looks[0]] + filler
    tokens, starts, ends = _stream(two)
    assert lexical_hits(q, tokens, starts, ends, VOCAB, limit=2, span=1, spacing=1).tolist() == [9, 4]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, len(TEXTS) - 1), min_size=1, max_size=5), min_size=1, max_size=12),
       st.lists(st.integers(1, len(TEXTS) - 1), min_size=1, max_size=6), st.integers(1, 3))
def test_passage_scores_match_brute_force(events, question, span):
    tokens, starts, ends = _stream(events)
    n = len(events)
    words = [set(VOCAB.words(e).tolist()) for e in events]
    qw = set(VOCAB.words(question).tolist())
    df = {w: sum(w in ws for ws in words) for w in qw}
    idf = {w: max(math.log((n - d + 0.5) / (d + 0.5)), 0.0) for w, d in df.items()}

    def passage(p: int) -> float:
        held = set().union(*words[p:p + span]) & qw
        return sum(idf[w] for w in held)

    want = [max(passage(p) for p in range(max(0, e - span + 1), e + 1)) for e in range(n)]
    got = lexical_scores(question, tokens, starts, ends, VOCAB, span=span)
    assert np.allclose(got, want)


# ------------------------------------------------------------------------------------------ continuation
def _seg(offset: int, *words: str) -> tuple[int, np.ndarray]:
    return offset, np.array(ids(*words))


def test_continuation_follows_the_longest_verbatim_run_of_the_question_end():
    question = ids("?", "The", " magic", " number", " for", " tender", "-", "gl", "ac", "ier", " is")
    asked = _seg(500, " the", " magic", " number", " for", " tender", "-", "gl", "ac", "ier", " is", " 42", ".")
    lookalike = _seg(900, " the", " magic", " number", " for", " proud", "-", "gl", "ac", "ier", " is", "\n", ".")
    # the look-alike is later and shares the last five tokens; the asked fact matches ten (case folded)
    assert continuation(question, [asked, lookalike], VOCAB, 3) == (ID[" 42"], 510, 10)
    assert continuation(question, [lookalike], VOCAB, 3) == (ID["\n"], 910, 5)
    assert continuation(question, [lookalike], VOCAB, 6) is None  # shorter than asked for


def test_continuation_needs_a_following_token_in_the_same_segment_and_prefers_the_latest():
    question = ids(" magic", " number", " is")
    cut = _seg(100, " the", " magic", " number", " is")  # the value is not in the window
    assert continuation(question, [cut], VOCAB, 2) is None
    early, late = _seg(100, " magic", " number", " is", " 42"), _seg(300, " magic", " number", " is", ".")
    assert continuation(question, [early, late], VOCAB, 2) == (ID["."], 303, 3)  # equal runs: the latest
    assert continuation(question, [late, early], VOCAB, 2) == (ID["."], 303, 3)
    # a run never spans two segments (they are not adjacent in the stream)
    assert continuation(question, [_seg(100, " the", " magic"), _seg(400, " number", " is", " 42")], VOCAB, 3) is None
    assert continuation(question, [], VOCAB, 2) is None and continuation(question, [early], VOCAB, 0) is None


def test_restates_needs_enough_question_words_and_nothing_else():
    question = ids("?", "The", " magic", " number", " for", " tender", "-", "gl", "ac", "ier", " is")
    echo = ids(" the", " magic", " number", " for", " tender", ".")
    assert restates(echo, question, VOCAB, 4) is True  # case folded: " the" is the question's "The"
    assert restates(echo[:3], question, VOCAB, 4) is None  # three question words so far: undecided
    assert restates(ids(".", "\n", " the", " magic", " number", " is"), question, VOCAB, 4) is True  # no content
    assert restates(ids(" the", " magic", " 42", " number", " is"), question, VOCAB, 4) is False  # names a value
    assert restates(ids(" the", " proud", " magic", " number"), question, VOCAB, 4) is False  # a word not asked
    assert restates(echo, question, VOCAB, 0) is False and restates([], question, VOCAB, 2) is None


def test_grounded_needs_a_run_the_window_says_with_a_word_the_question_does_not():
    question = ids(" magic", " number", " for", " tender", " is")
    window = [_seg(100, " the", " magic", " number", " for", " tender", " is", " 42", ".")]
    assert grounded(ids(" 42", ".", "\n"), window, question, VOCAB, 2)  # " 42." is said
    assert grounded(ids(" is", " 42"), window, question, VOCAB, 2)
    assert not grounded(ids(" 42", "\n"), window, question, VOCAB, 2)  # " 42\n" is not
    # the question's own words, even where the window says them, are no evidence
    assert not grounded(ids(" magic", " number", " for", " tender", " is"), window, question, VOCAB, 3)
    assert not grounded(ids(" 42", "."), window, question, VOCAB, 3)  # shorter than asked for
    # a run never spans two segments
    assert not grounded(ids(" is", " 42"), [_seg(10, " the", " is"), _seg(50, " 42", ".")], question, VOCAB, 2)
    assert not grounded(ids(" 42", "."), window, question, VOCAB, 0) and not grounded([], window, question, VOCAB, 1)


def test_first_word_is_the_first_token_and_those_that_join_it():
    texts = [" ", "8", "4", ".", " The", "rap", " pass", "-", "word"]
    vocab = Vocabulary.from_texts(texts)
    assert vocab.first_word([0, 1, 2, 3, 4]) == 3  # " 84" then "."
    assert vocab.first_word([4, 5, 6]) == 2  # " The" "rap", then " pass" starts a word
    assert vocab.first_word([6, 7, 8]) == 1  # "-" is no letter or digit
    assert vocab.first_word([]) == 0 and vocab.first_word([1, 10**6]) == 1


HOP_TEXTS = ["<s>", " the", "The", " a", " of", ".", " Maria", " Hugo", " hid", " treasure", " in", " cobalt",
             " teal", " chest", " code", " is", " 51234", " 777", "What", "?", " locked", " with", " where", " gate",
             " amb", "er", " box", " ", "7", "3", " Qu", "illing", "ham", "een"]
HOP = Vocabulary.from_texts(HOP_TEXTS)
HID = {t: i for i, t in enumerate(HOP_TEXTS)}


def hop_ids(text: str) -> list[int]:
    return [HID[" " + w] if " " + w in HID else HID[w] for w in text.split()]


def _hop_stream(facts: dict[int, str], n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    filler = ["the a of .", "a of the .", "of the a ."]
    return _stream([hop_ids(facts.get(i, filler[i % 3])) for i in range(n)])


TWO_HOP = {10: "Maria hid the treasure in the cobalt chest .", 20: "Hugo hid the treasure in the teal chest .",
           30: "The teal chest is locked with the code 777 .", 40: "The cobalt chest is locked with the code 51234 ."}
TWO_HOP_Q = hop_ids("What is the code of the chest where Maria hid the treasure ?")


def test_bridge_hit_finds_the_fact_stated_about_a_rare_word_of_the_first_hit():
    """The first hit names the thing ("cobalt"), the asked fact ("code") is stated about it elsewhere:
    the second hop is the passage holding both, not the look-alike holding "code" and "teal"."""
    tokens, starts, ends = _hop_stream(TWO_HOP)
    assert lexical_hits(TWO_HOP_Q, tokens, starts, ends, HOP, limit=1, spacing=2).tolist() == [10]
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) == 40
    # from the look-alike's link the hop goes to the look-alike's fact
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=20, spacing=2) == 30


def test_bridge_hit_needs_a_missing_question_word_and_a_rare_bridge_word():
    tokens, starts, ends = _hop_stream(TWO_HOP)
    # everything the question names is in the first hit's neighbourhood: nothing is missing
    assert bridge_hit(hop_ids("where hid Maria the treasure ?"), tokens, starts, ends, HOP, first=10, spacing=2) is None
    # "code" is asked and missing, but the link holds no rare word the question does not name
    plain = {**TWO_HOP, 10: "Maria hid the treasure in the chest ."}
    tokens, starts, ends = _hop_stream(plain)
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) is None
    # "cobalt" in many events names nothing: no bridge
    common = {**TWO_HOP, **{i: "the cobalt a ." for i in range(45, 60)}}
    tokens, starts, ends = _hop_stream(common)
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) is None


def test_bridge_hit_is_another_place_than_the_first_hit():
    """A passage within ``spacing + 1`` events of the first hit is its neighbourhood, not a second hop."""
    near = {10: "Maria hid the treasure in the cobalt chest .", 13: "The cobalt chest is locked with the code 51234 ."}
    tokens, starts, ends = _hop_stream(near)
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) is None
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=1) == 13
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=99, spacing=2) is None  # no such event


def test_bridge_words_are_whole_words():
    """A number said as digit tokens (" " "7" "3") is one word, and so is a name cut into pieces (" Qu"
    "illing" "ham"): a look-alike elsewhere holding the asked "code" and one of the link's digits or name
    pieces ("the gate code is 37", "the Queen code") is no second hop; a passage saying the whole word is.
    Seen at 1M tokens of pass-key filler, where digits and function words are rare: the pieces of the
    asked key's value joined the first hit to other keys' sentences."""

    def ids(text: str) -> list[int]:
        return [HID[" "] if w == "_" else hop_ids(w)[0] for w in text.split()]

    filler = ["the a of .", "a of the .", "of the a ."]

    def stream(facts: dict[int, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _stream([ids(facts.get(i, filler[i % 3])) for i in range(60)])

    number = {10: "Maria hid the treasure in the chest _ 7 3 .", 40: "The gate code is _ 3 7 ."}
    for facts, hop in ((number, None), ({**number, 50: "The box _ 7 3 code is 51234 ."}, 50)):
        tokens, starts, ends = stream(facts)
        assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) == hop
    name = {10: "Maria hid the treasure in Qu illing ham .", 40: "The Qu een code is 777 ."}
    for facts, hop in ((name, None), ({**name, 50: "Qu illing ham chest code is 51234 ."}, 50)):
        tokens, starts, ends = stream(facts)
        assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) == hop


LABEL_TEXTS = ["<s>", "Question", ":", " Where", " did", " Rosa", " hide", " the", " treasure", "?", "\n", "Answer",
               " question", ",", " 5", " Greta", " hid", " was", " hidden", " in", " chest", ".", " 10", ":", "30",
               "Note"]
LABEL = Vocabulary.from_texts(LABEL_TEXTS)
LID = {t: i for i, t in enumerate(LABEL_TEXTS)}


def lids(*words: str) -> list[int]:
    return [LID[w] for w in words]


def test_a_question_s_line_opening_labels_are_not_its_words():
    q = lids("Question", ":", " Where", " did", " Rosa", " hide", " the", " treasure", "?", "\n", "Answer", ":",
             " Rosa")
    words = set(LABEL.question_words(q).tolist())
    assert LABEL.canonical[LID["Question"]] not in words and LABEL.canonical[LID["Answer"]] not in words
    assert {LABEL.canonical[LID[w]] for w in (" Where", " Rosa", " treasure")} <= words
    assert LABEL.canonical[LID["Question"]] in set(LABEL.words(q).tolist())  # words() keeps them
    # a colon later in the line, or after a longer run, marks no label
    late = lids(" Rosa", " hid", " the", " treasure", " in", " 10", ":", "30")
    assert set(LABEL.question_words(late).tolist()) == set(LABEL.words(late).tolist())


def test_a_label_word_in_the_stream_does_not_pull_the_first_hit_to_a_look_alike():
    """An index line listing "question" beside a look-alike ("Greta hid the treasure in the chest") matched
    the prompt's "Question:" and outscored the asked sentence, which names Rosa."""
    filler = lids(" the", ".")
    events = [filler] * 12 + [
        lids(" Greta", " hid", " the", " treasure", " in", " the", " chest", "."), lids(" question", ",", " 5"),
        filler, filler,
        lids(" the", " treasure", " Rosa", " was", " hidden", " in", " the", " chest", "."), lids("Note", "."),
    ]
    tokens, starts, ends = _stream(events)
    q = lids("Question", ":", " Where", " did", " Rosa", " hide", " the", " treasure", "?", "\n", "Answer", ":",
             " the", " treasure", " hid", " in", " the", " chest")
    assert lexical_hits(q, tokens, starts, ends, LABEL, limit=1).tolist() == [16]
    from emserve.retrieval import lexical

    plain = Vocabulary(LABEL.canonical, LABEL.content, LABEL.joins, LABEL.breaks, np.zeros_like(LABEL.colon),
                       LABEL.verbatim)
    assert lexical.lexical_hits(q, tokens, starts, ends, plain, limit=1).tolist() != [16]  # labels counted: lost


def test_bridge_phrase_names_the_thing_where_its_words_alone_are_not_rare():
    """"cobalt" is in a few events besides the link (a colour the text uses), too many for a bridge word
    (rule 12 finds no hop), while "cobalt chest" is said twice: the phrase finds the fact; and the
    look-alike that holds "cobalt" and the asked "code" but is about a gate is not the hop, though it is
    later (ties and the word rule go to the later)."""
    uses = {i: "the cobalt a ." for i in (3, 55)}
    facts = {**TWO_HOP, **uses}
    tokens, starts, ends = _hop_stream(facts)
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) == 40
    decoy = {**facts, 50: "the cobalt gate code is 777 ."}
    tokens, starts, ends = _hop_stream(decoy)
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) == 40
    # without the phrase the rarer lone word "cobalt" would be the bridge, and the later passage wins
    plain = {**TWO_HOP, 40: "The cobalt is locked with the code 51234 .", 50: "the cobalt gate code is 777 ."}
    tokens, starts, ends = _hop_stream(plain)
    assert bridge_hit(TWO_HOP_Q, tokens, starts, ends, HOP, first=10, spacing=2) == 50


def test_bridge_phrase_of_a_word_cut_into_tokens_is_found_as_whole_words():
    """"amber" is two tokens (" amb" "er"); the phrase is matched as whole words, and the hop is the
    event where it starts, also when a boundary falls inside it."""
    link = {10: "Maria hid the treasure in the amb er chest ."}
    q = hop_ids("What is the code of the chest where Maria hid the treasure ?")
    filler = ["the a of .", "a of the .", "of the a ."]
    events = [hop_ids(link.get(i, filler[i % 3])) for i in range(60)]
    events[40], events[41] = hop_ids("The amb"), hop_ids("er chest is locked with the code 51234 .")
    tokens, starts, ends = _stream(events)
    assert bridge_hit(q, tokens, starts, ends, HOP, first=10, spacing=2) == 40
    amber = tuple(HOP.canonical[hop_ids("amb er")].tolist())
    found = _whole_word_runs(HOP.stream_ids(tokens), HOP, [amber, amber[:1]])
    assert [len(f) for f in found] == [2, 0]  # " amb" alone is never a whole word here


def test_light_stem_takes_off_english_inflections_only():
    from emserve.retrieval.lexical import light_stem

    cases = {"stopped": "stop", "stopping": "stop", "stop": "stop", "keys": "key", "stories": "story",
             "classes": "class", "wished": "wish", "falling": "fall", "glass": "glass", "bus": "bus",
             "speed": "speed", "hidden": "hidden", "wrote": "wrote", "is": "is", "was": "was", "ring": "ring",
             "42nd": "42nd", "sing": "sing"}
    assert {w: light_stem(w) for w in cases} == cases


def test_inflected_words_match_and_the_copy_stays_verbatim():
    """"stopping" in the question finds "stopped" in the stream (one stem); the continuation rule compares
    exact words, so "The keys are" is no run of "The key is"."""
    texts = ["<s>", " the", " courier", " stopped", " stopping", " rested", " at", " gate", " key", " keys", " is",
             " are", " 7", "."]
    v = Vocabulary.from_texts(texts)
    tid = {t: i for i, t in enumerate(texts)}
    filler = [tid[" the"], tid[" at"], tid["."]]
    events = [filler] * 8 + [[tid[" the"], tid[" courier"], tid[" stopped"], tid[" at"], tid[" gate"], tid["."]],
                             [tid[" the"], tid[" courier"], tid[" rested"], tid[" at"], tid[" gate"], tid["."]]]
    tokens, starts, ends = _stream(events)
    q = [tid[" courier"], tid[" stopping"], tid[" at"], tid[" gate"]]
    assert lexical_hits(q, tokens, starts, ends, v, limit=1, span=1).tolist() == [8]
    assert v.canonical[tid[" key"]] == v.canonical[tid[" keys"]] and v.verbatim[tid[" key"]] != v.verbatim[tid[" keys"]]
    window = [(0, np.array([tid[" the"], tid[" key"], tid[" is"], tid[" 7"]]))]
    assert continuation([tid[" the"], tid[" keys"], tid[" is"]], window, v, 2) is None
    assert continuation([tid[" the"], tid[" key"], tid[" is"]], window, v, 2) == (tid[" 7"], 3, 3)


def test_unique_pairs_is_numpys_row_unique():
    from emserve.retrieval.postings import unique_pairs

    rng = np.random.default_rng(3)
    for n, lo, hi in ((0, 0, 1), (1, 0, 1), (500, -5, 7), (2000, 0, 40000)):
        a = rng.integers(lo, hi, (n, 2))
        a[:, 1] -= hi // 3  # negative second column too
        rows, first = unique_pairs(a)
        want_rows, want_first = np.unique(a, axis=0, return_index=True)
        np.testing.assert_array_equal(rows, want_rows.reshape(-1, 2))
        np.testing.assert_array_equal(first, want_first)
        np.testing.assert_array_equal(a[first], rows)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 30)), max_size=40), st.integers(1, 4))
def test_passage_rows_are_the_distinct_word_passage_rows(raw, span):
    """``passage_rows`` gives what ``unique_pairs`` of every ``(word, event - d)`` gives (passages from 0),
    in the same order, each row naming a pair of its word whose events reach the passage; the scores
    summed over it in that order are bit-identical to the sort's."""
    from emserve.retrieval.postings import passage_rows, unique_pairs

    pairs, _ = unique_pairs(np.array(raw, np.int64).reshape(-1, 2))
    row, passage = passage_rows(pairs, span)
    rows = np.concatenate([pairs - [0, d] for d in range(span)]) if pairs.size else pairs
    want, _ = unique_pairs(rows[rows[:, 1] >= 0])
    np.testing.assert_array_equal(np.stack([pairs[row, 0], passage], 1).reshape(-1, 2), want)
    assert np.all((pairs[row, 1] >= passage) & (pairs[row, 1] < passage + span))
    weight = np.random.default_rng(span).random(7)[pairs[:, 0]] if pairs.size else np.zeros(0)
    slow = np.zeros(32)
    np.add.at(slow, want[:, 1], weight[np.searchsorted(pairs[:, 0], want[:, 0])] if want.size else [])
    assert np.array_equal(np.bincount(passage, weight[row], minlength=32), slow)


def test_distinct_pairs_sort_by_word_and_keep_each_event_once():
    from emserve.retrieval.postings import distinct_pairs, unique_pairs

    rng = np.random.default_rng(5)
    for n, k in ((0, 1), (50, 3), (3000, 300), (3000, 70000)):
        words = np.unique(rng.integers(0, 100_000, k))
        ev = np.sort(rng.integers(0, n // 4 + 1, n))
        word = words[rng.integers(0, words.size, n)]
        want, _ = unique_pairs(np.stack([word, ev], 1))
        np.testing.assert_array_equal(distinct_pairs(word, ev, words), want)


def test_a_vocabulary_finds_words_by_a_lookup_per_token():
    """``holding``: the token ids whose canonical word is asked (and, for whole words, that start one);
    ``stream_ids``: a stream's ids as they are, or clipped where some fall outside the vocabulary."""
    v = Vocabulary.from_texts([" Harbor", "harbor", " harbors", "er", " gate", "\n"])
    harbor = v.canonical[0]
    assert v.holding(np.array([harbor])).tolist() == [True, True, True, False, False, False]
    assert v.holding(np.array([v.canonical[3]]), word_starts=True).tolist() == [False] * 6  # "er" joins a word
    assert v.holding(np.array([], np.int64)).sum() == 0
    ids = np.array([0, 4, 2], np.int32)
    assert v.stream_ids(ids) is ids or np.array_equal(v.stream_ids(ids), ids)
    assert v.stream_ids(np.array([0, 9, -1])).tolist() == [0, 5, 0]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(20, 300), st.integers(1, 3), st.integers(1, 4),
       st.sampled_from([0.0, 0.3, 0.5, 0.9]), st.booleans())
def test_pruned_hits_are_the_unpruned_ones(seed, n_events, span, limit, ratio, postings):
    """``_hit_pairs`` (MaxScore's pruning) leaves every hit and its order as scoring all events does, from a
    pass over the stream and from postings: Zipf-like streams where common words are in most events and
    rare ones in a few."""
    import emserve.retrieval.lexical as lexical
    from emserve.retrieval.postings import WordPostings

    rng = np.random.default_rng(seed)
    size = len(TEXTS)
    freq = 1.0 / np.arange(1, size) ** 1.3  # id 0 ("<s>") left out
    sizes = rng.integers(1, 7, n_events)
    tokens = 1 + rng.choice(size - 1, int(sizes.sum()), p=freq / freq.sum())
    starts = 50 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
    ends = starts + sizes
    post = None
    if postings:
        post = WordPostings(VOCAB.canonical)
        post.extend(np.concatenate([np.zeros(50, np.int64), tokens])[starts[0]:], starts, ends)
    question = list(1 + rng.choice(size - 1, int(rng.integers(1, 8))))
    got = lexical_hits(question, tokens, starts, ends, VOCAB, limit, ratio=ratio, spacing=1, span=span, postings=post)
    real = lexical._essential
    try:
        lexical._essential = lambda idf, ratio: np.ones(idf.shape[0], bool)  # every word essential: no pruning
        want = lexical_hits(question, tokens, starts, ends, VOCAB, limit, ratio=ratio, spacing=1, span=span)
    finally:
        lexical._essential = real
    np.testing.assert_array_equal(got, want)
    # every score a hit reads (its passages', its own, its place's) is the unpruned one, bit for bit
    pairs, weight = lexical._weighted_pairs(question, tokens, starts, ends, VOCAB)
    if pairs.size == 0:
        return
    scores = lexical._passage_scores(pairs, weight, n_events, span)
    keep = np.flatnonzero(scores >= ratio * scores.max())
    cut, w = lexical._hit_pairs(question, tokens, starts, ends, VOCAB, post, ratio, span)
    assert np.array_equal(lexical._passage_scores(cut, w, n_events, span)[keep], scores[keep])
    assert np.array_equal(lexical._passage_scores(cut, w, n_events, 1)[keep],
                          lexical._passage_scores(pairs, weight, n_events, 1)[keep])
    assert np.array_equal(lexical._discriminating_scores(cut, w, keep, n_events, span)[keep],
                          lexical._discriminating_scores(pairs, weight, keep, n_events, span)[keep])


def test_most_events_is_the_largest_count_whose_idf_reaches_the_bar():
    from emserve.retrieval.bridge import _most_events

    def idf(n: int, df: int) -> float:
        return float(np.log((n - df + 0.5) / (df + 0.5)))

    for n in (2, 10, 60, 2_000, 62_000, 1_000_000):
        for share in (0.6, 0.75):
            bar = share * float(np.log((n - 0.5) / 1.5))
            most = _most_events(n, bar)
            assert most == max((df for df in range(0, min(n, 5_000) + 1) if idf(n, df) >= bar), default=-1)

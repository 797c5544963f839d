"""WindowPlan.log_ranges: the log tokens every layer's window holds (what a retrieval trace reports)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from emserve.retrieval.plan import Anchor, Segment, WindowPlan

LOG, OTHER = "/s/a", "/s/b"


def test_shared_segments_and_anchor_merge_into_ranges():
    plan = WindowPlan.build([1, 2], [Segment(LOG, 0, 4), Segment(LOG, 10, 20), Segment(LOG, 20, 25),
                                     Segment(OTHER, 4, 10)], anchor=Anchor(LOG, 25))
    assert plan.log_ranges(LOG) == ((0, 4), (10, 26))
    assert plan.log_ranges(OTHER) == ((4, 10),)
    assert WindowPlan.build([1]).log_ranges(LOG) == ()


def test_per_layer_segments_report_what_every_layer_holds():
    plan = WindowPlan.build([1], layer_segments=[[Segment(LOG, 0, 8), Segment(LOG, 30, 34)],
                                                 [Segment(LOG, 4, 12), Segment(LOG, 32, 36)]])
    assert plan.log_ranges(LOG) == ((4, 8), (32, 34))


_ranges = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8)), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(layers=st.lists(_ranges, min_size=1, max_size=4), anchor=st.one_of(st.none(), st.integers(0, 70)))
def test_log_ranges_equal_the_tokens_in_every_layer(layers, anchor):
    lists = [[Segment(LOG, a, a + n) for a, n in layer] for layer in layers]
    total = max(sum(len(s) for s in segs) for segs in lists)
    for segs in lists:  # equal totals per layer (a plan rule): pad with another log
        pad = total - sum(len(s) for s in segs)
        if pad:
            segs.append(Segment(OTHER, 0, pad))
    plan = WindowPlan.build([1], layer_segments=lists, anchor=None if anchor is None else Anchor(LOG, anchor))
    want = None
    for segs in lists:
        toks = {t for s in segs if s.log == LOG for t in range(s.start, s.end)}
        toks |= {anchor} if anchor is not None else set()
        want = toks if want is None else want & toks
    got = plan.log_ranges(LOG)
    assert {t for a, b in got for t in range(a, b)} == want
    assert all(a < b for a, b in got) and all(got[i][1] < got[i + 1][0] for i in range(len(got) - 1))

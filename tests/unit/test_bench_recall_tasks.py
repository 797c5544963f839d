"""The recall suite's haystacks (``bench/eval/recall_tasks.py``) and its statistics (``bench/eval/recall.py``), on a
character-level tokenizer: exact lengths, every needle where its question says, look-alike labels,
distinct values, seeded, and the full-attention reference window."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


class CharTok:
    """One token per character (ids = code points < 256)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids: Any) -> str:
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def rt():  # type: ignore[no-untyped-def]
    from bench.eval import recall_tasks
    return recall_tasks


@pytest.fixture(scope="module")
def prose(rt):  # type: ignore[no-untyped-def]
    from bench.eval.eval_tasks import Corpus

    tok = CharTok()
    rng = np.random.default_rng(1)
    words = ["the", "river", "ran", "slowly", "past", "old", "mills", "and", "quiet", "farms", "where", "nobody"]
    text = " ".join(" ".join(rng.choice(words, rng.integers(4, 12))) + "." for _ in range(4000))
    c = object.__new__(Corpus)
    c.tok, c.ids = tok, np.asarray(tok(text)["input_ids"], dtype=np.uint32)
    c.sentence_end = np.zeros(256, dtype=bool)
    c.sentence_end[[ord("."), ord("!"), ord("?")]] = True
    return c


def _text(hs: Any, span: tuple[int, int]) -> str:
    return CharTok().decode(hs.ids[span[0] : span[1]])


def test_prose_haystack_holds_every_needle_its_questions_name(rt, prose) -> None:  # type: ignore[no-untyped-def]
    hs = rt.build(prose, "narrative", 30000, 4, seed=3)
    assert len(hs.ids) == 30000
    assert sorted({q.task for q in hs.questions}) == sorted(rt.PROSE_TASKS)
    assert all(sum(q.task == t for q in hs.questions) == 4 for t in rt.PROSE_TASKS)
    values = [q.expected for q in hs.questions]
    assert len(set(values)) == len(values)
    for q in hs.questions:
        texts = [_text(hs, s) for s in q.spans]
        assert q.expected in texts[-1] and q.prompt_ids == CharTok()(q.prompt)["input_ids"]
        assert sum(q.expected in _text(hs, it.span) for it in hs.items) == 1  # no other needle holds the value
        if q.task == "twohop":
            link, fact = texts
            name = q.prompt.split("did ")[-1].split(" hide")[0] if " did " in q.prompt else q.prompt.split()[1]
            assert name in link and link.split(" chest")[0].split()[-1] in fact
        else:
            label = next(nd["label"] for nd in hs.meta["needles"] if nd["value"] == q.expected)
            assert label in texts[0] and label in q.prompt
        assert 0 < q.depth < 1 and _text(hs, (q.spans[0][0] - 1, q.spans[0][0])) == "."  # after a sentence end
    again = rt.build(prose, "narrative", 30000, 4, seed=3)
    assert again.ids == hs.ids and rt.build(prose, "narrative", 30000, 4, seed=4).ids != hs.ids


def test_heldout_phrasings_share_no_template_with_the_suite(rt, prose) -> None:  # type: ignore[no-untyped-def]
    needles, links, facts, questions = rt.PHRASINGS["suite"]
    h_needles, h_links, h_facts, h_questions = rt.PHRASINGS["heldout"]
    assert set(h_needles) == set(needles) and set(h_questions) == set(questions)
    suite = {*links, *facts, *(t for ts in needles.values() for t in ts), *(t for ts in questions.values() for t in ts)}
    held = [*h_links, *h_facts, *(t for ts in h_needles.values() for t in ts),
            *(t for ts in h_questions.values() for t in ts)]
    assert not suite & set(held)
    hs = rt.build(prose, "narrative", 30000, 4, seed=3, phrasings="heldout")
    assert hs.hid.endswith("-heldout") and rt.build(prose, "narrative", 30000, 4, seed=3).hid == "narrative-30000-s3"
    for q in hs.questions:
        texts = [_text(hs, s) for s in q.spans]
        assert q.expected in texts[-1] and "treasure" not in q.prompt and "chest" not in q.prompt
        if q.task == "twohop":
            assert " box" in texts[0] and " box" in texts[1] and " box" in q.prompt


def test_labels_come_in_look_alike_pairs(rt) -> None:  # type: ignore[no-untyped-def]
    labels = rt._labels(np.random.default_rng(0), 10, set(), " ")
    assert len(set(labels)) == 10
    nouns = [lab.split()[1] for lab in labels]
    assert all(nouns.count(n) == 2 for n in nouns)


def test_noise_haystack_holds_pass_keys_between_noise_groups(rt) -> None:  # type: ignore[no-untyped-def]
    from emserve.server.provision.corpus import PASSKEY_NOISE

    noise = rt.NoiseFiller(CharTok())
    hs = rt.build(noise, rt.NOISE, 20000, 6, seed=0, tasks=("passkey",))
    assert len(hs.ids) == 20000 and [q.task for q in hs.questions] == ["passkey"] * 6
    for q in hs.questions:
        (a, b), = q.spans
        assert "pass key" in _text(hs, (a, b)) and q.expected in _text(hs, (a, b))
        assert _text(hs, (a - len(PASSKEY_NOISE), a)) == PASSKEY_NOISE  # right after a whole noise group
    with pytest.raises(ValueError, match="holds none"):
        rt.build(noise, rt.NOISE, 20000, 6, seed=0, tasks=("kv",))


def test_reference_window_holds_the_needle_and_its_look_alikes(rt, prose) -> None:  # type: ignore[no-untyped-def]
    hs = rt.build(prose, "narrative", 30000, 6, seed=1)
    for q in hs.questions:
        ids = rt.reference_prompt(prose, hs, q, 2048, seed=1)
        text = CharTok().decode(ids)
        assert len(ids) == 2048 and ids[-len(q.prompt_ids):] == q.prompt_ids
        mine = [nd for nd in hs.meta["needles"] if nd["task"] == q.task]
        held = [nd for nd in mine if all(t in text for t in nd["texts"])]
        assert q.expected in [nd["value"] for nd in held] and len(held) == 1 + rt.REFERENCE_DISTRACTORS


def test_wilson_interval_and_summary_rows() -> None:
    from bench.eval import recall
    lo, hi = recall.wilson(8, 10)
    assert (round(lo, 2), round(hi, 2)) == (0.49, 0.94)
    assert recall.wilson(0, 0) == (0.0, 1.0) and recall.wilson(30, 30)[1] == 1.0
    answers = [{"task": "kv", "length": 8192, "system": "emserve", "correct": i < 3, "in_window": i < 4}
               for i in range(5)]
    answers += [{"task": "kv", "length": 8192, "system": "full@2k", "correct": True, "in_window": True}]
    headers, rows = recall.summary(answers)
    assert rows[0][:5] == ["kv", 8192, "emserve", 5, "0.60"] and rows[0][6] == "0.80 (4/5)"
    assert rows[1][2] == "full@2k" and rows[1][6] == "-"


def test_recall_variants_parses_question_overrides_and_measures_window_coverage() -> None:
    import argparse

    from bench.eval import eval_server
    from bench.lab import recall_variants as rv
    assert rv.parse_variant('reach 0={"question_reach": 0}') == ("reach 0", {"question_reach": 0})
    assert rv.parse_variant('g={"_graph_ef": 128}') == ("g", {"_graph_ef": 128})
    assert rv.parse_variant('x={"_exact": true}') == ("x", {"_exact": True})
    for bad in ('{"question_reach": 0}', 'x={"n_mem": 0}', "x=[1]", 'g={"_graph_ef": 0}', 'g={"_graph_ef": "a"}',
                'x={"_exact": 1}', 'x={"_exact": true, "_graph_ef": 64}'):
        with pytest.raises(argparse.ArgumentTypeError):
            rv.parse_variant(bad)
    window = ((0, 10), (20, 30))
    assert eval_server.window_coverage((2, 8), window) == 1.0
    assert eval_server.window_coverage((5, 25), window) == 0.5  # 5..10 and 20..25 of 20 tokens
    assert eval_server.window_coverage((10, 20), window) == 0.0
    answers = [{"variant": v, "hid": "h", "qid": i, "task": "kv", "correct": i < 2, "in_window": i < 3,
                "window": [[0, 10 + (v == "g" and i == 0)]]} for v in ("defaults", "g") for i in range(4)]
    headers, rows = rv.summary({"answers": answers})
    assert headers[-1] == "same window"
    assert rows == [["defaults", "kv", 4, "3/4", "2/4", rows[0][5], "4/4"],
                    ["g", "kv", 4, "3/4", "2/4", rows[1][5], "3/4"]]


def test_recall_goals_judge_the_newest_run_of_each_cell() -> None:
    from bench.eval import eval_report as er
    n = 32768

    def answers(system: str, task: str, right: int, inside: int, total: int = 30) -> list[dict[str, Any]]:
        return [{"system": system, "task": task, "length": n, "correct": i < right, "in_window": i < inside}
                for i in range(total)]

    model = {"name": "smollm2-135m"}
    newest = {"model": model, "complete": True,
              "answers": [a for t in er.RECALL_TASKS for a in answers("emserve", t, 20, 29)]}
    reference = [a for t in er.RECALL_TASKS for a in answers("full@2k", t, 20, 30)]
    older = {"model": model, "complete": True, "answers": answers("emserve", "kv", 0, 0) + reference}
    runs = {er.RECALL_RUNS[0]: newest, er.RECALL_RUNS[1]: older}
    rows = {r[0]: r for r in er.recall_goals(runs)}
    rec = rows["SmolLM2-135M retrieval recall >= 0.95 on every task at 32k"]
    assert "kv 29/30" in rec[1] and rec[2] == "met"  # the newest run's kv cell, not the older one's 0/30
    acc = rows["SmolLM2-135M accuracy on every task >= full attention at 2k, at 32k"]
    assert "kv 20/30 vs 20/30" in acc[1] and acc[2] == "met"  # equal point estimates meet it
    assert rows["SmolLM2-135M retrieval recall >= 0.95 on every task at 128k"][2] == "not measured"
    # one task short of the reference: not met; a quick run judges nothing
    newest["answers"] = [a for a in newest["answers"] if a["task"] != "split"] + answers("emserve", "split", 19, 28)
    rows = {r[0]: r for r in er.recall_goals(runs)}
    assert rows["SmolLM2-135M accuracy on every task >= full attention at 2k, at 32k"][2] == "NOT met"
    assert rows["SmolLM2-135M retrieval recall >= 0.95 on every task at 32k"][2] == "NOT met"  # 28/30 < 0.95
    newest["quick"] = True
    older["quick"] = True
    assert all(r[2] == "not measured" for r in er.recall_goals(runs))


def test_resume_takes_up_a_stopped_run_whose_work_folder_is_gone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A stopped run's results resume on a machine without its work folder: the finished haystacks stay, a
    new folder is made, and the resume entry says the old one was lost; another grid or a finished run is
    refused."""
    import json

    from bench.eval.recall import Run, parse

    args = parse(["--lengths", "1m", "--results-dir", str(tmp_path), "--out", "r", "--workdir", str(tmp_path / "w")])
    config = {"lengths": args.lengths}
    saved = {"name": "r", "complete": False, "config": config, "workdir": str(tmp_path / "gone"), "wall_s": 60.0,
             "haystacks": [{"system": "emserve", "hid": "a"}], "answers": [{"qid": "a1"}]}
    (tmp_path / "r.json").write_text(json.dumps(saved))
    run = Run(args)
    workdir = run.resume(config, args.workdir)
    assert workdir.is_dir() and workdir.parent == tmp_path / "w" and run.res["workdir"] == str(workdir)
    assert run.res["haystacks"] == saved["haystacks"] and run.res["answers"] == saved["answers"]
    (entry,) = run.res["resumed"]
    assert entry["workdir_lost"] is True and entry["haystacks_done"] == 1 and "cores" in entry["machine"]
    assert Run(args).resume(config, args.workdir) and json.loads((tmp_path / "r.json").read_text()) == saved
    with pytest.raises(SystemExit, match="another grid"):
        Run(args).resume({"lengths": [1]}, args.workdir)
    (tmp_path / "r.json").write_text(json.dumps({**saved, "complete": True}))
    with pytest.raises(SystemExit, match="finished run"):
        Run(args).resume(config, args.workdir)



def test_stop_after_below_one_is_refused(capsys) -> None:  # type: ignore[no-untyped-def]
    from bench.eval.recall import parse

    with pytest.raises(SystemExit):
        parse(["--stop-after", "0"])
    assert "--stop-after needs at least 1" in capsys.readouterr().err


def test_a_sized_question_has_exactly_its_tokens_and_ends_with_the_question(prose):  # type: ignore[no-untyped-def]
    from bench.eval.eval_tasks import Question, sized_question

    q = Question("q1", 0.5, "What is the key? The key is", prose.encode("What is the key? The key is"), "1", [(0, 1)])
    for n in (64, 200, len(q.prompt_ids), 10):
        s = sized_question(prose, q, n)
        assert len(s.prompt_ids) == n and s.prompt == CharTok().decode(s.prompt_ids)
        own = min(n, len(q.prompt_ids))
        assert s.prompt_ids[-own:] == q.prompt_ids[-own:]
        assert (s.expected, s.spans) == (q.expected, q.spans) and s.qid == f"q1-{n}t"


def test_a_long_eval_stream_can_be_a_recall_haystack(rt, prose, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``eval.py --stream-source narrative``: the long stream is the recall suite's haystack of that source
    (its needles, each asked at the end), the one ``question_search.py`` rebuilds; ``labelled`` (the
    default) stays the three labelled keys."""
    import argparse

    from bench.eval import eval as ev
    from bench.eval.eval_tasks import build_labelled

    monkeypatch.setattr(rt, "source_filler", lambda tok, name, source: prose)
    args = argparse.Namespace(stream_source="narrative", seed=3)
    got = ev.long_stream(prose, prose.tok, "m", 30_000, args)
    want = rt.build(prose, "narrative", 30_000, 10, 3)
    assert got.hid == want.hid and got.ids == want.ids and len(got.questions) == 50
    assert [q.qid for q in got.questions] == [q.qid for q in want.questions]
    args.stream_source = "labelled"
    labelled = ev.long_stream(prose, prose.tok, "m", 30_000, args)
    assert labelled.ids == build_labelled(prose, 30_000, ev.LABEL_DEPTHS, 3).ids and len(labelled.questions) == 3


def test_answer_starts_scores_each_start_rule_against_the_asked_answers() -> None:
    """bench/lab/answer_starts.py: a rule picks the choice of highest mean (or sum) log-probability over its
    first L tokens; where the asked answer is not the greedy one (another rule chose it) it stays."""
    from bench.lab.answer_starts import pick, summary

    greedy = {"text": " the key of", "logprobs": [-0.5, -0.1, -0.1, -3.0], "correct": False}
    value = {"text": " 12345.", "logprobs": [-1.0, -0.05, -0.05, -0.05], "correct": True}
    row = {"task": "kv", "asked": " the key of", "asked_correct": False, "choices": [greedy, value]}
    assert not pick(row, None)  # plain greedy
    assert not pick(row, ("mean", 2)) and not pick(row, ("sum", 2))  # -0.3 vs -0.525; -0.6 vs -1.05
    assert pick(row, ("mean", 4)) and pick(row, ("sum", 4))  # -0.925 vs -0.2875
    copied = {**row, "asked": " 12345 (copied)", "asked_correct": True}
    assert pick(copied, ("mean", 2))  # another rule chose the start: it stays
    headers, rows = summary({"questions": [row, copied]})
    by = dict(zip(headers, next(r for r in rows if r[0] == "all"), strict=True))
    assert by["n"] == 2 and by["asked"] == 1 and by["greedy"] == 0 and by["mean 4"] == "2 (+1 -0)"
    assert by["mean 2"] == "1 (+0 -0)" and by["any"] == 2
    # support d: mean 6 among the choices the memory supports (gain over the window without it > d), else all
    tail = {"text": " the end of", "logprobs": [-0.1] * 4, "prior_logprobs": [-0.2] * 4, "correct": False}
    held = {"text": " 12345.", "logprobs": [-0.5] * 4, "prior_logprobs": [-3.0] * 4, "correct": True}
    row = {"task": "kv", "asked": " the end of", "asked_correct": False, "choices": [tail, held]}
    assert pick(row, ("support", 2.0)) and not pick(row, ("mean", 6))  # gains 0.1 and 2.5
    assert not pick(row, ("support", 3.0))  # none supported: all weighed
    assert not pick({**row, "choices": [{k: v for k, v in c.items() if k != "prior_logprobs"} for c in (tail, held)]},
                    ("support", 2.0))  # no --prior: mean 6

"""Tables, CSV, plots and ``docs/results.md`` from the evaluation's results files.

    .venv/bin/python -m bench.eval.eval_report  # rewrite plots and docs/results.md from bench/results/eval*.json

``bench/eval/eval.py`` calls :func:`write_outputs` (CSV + plots of one run) and :func:`write_docs` (the
markdown page over every results file present) at the end of each run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.eval.common import RESULTS, ROOT, table

DOCS = ROOT / "docs" / "results.md"
TASK_ORDER = ("passkey", "needle", "multikey", "twohop", "labelled")
SYSTEM_ORDER = ("emserve", "truncation", "infllm", "no-refine", "no-contiguity", "mean-rank", "vanilla")
NEEDLE_TASKS = ("passkey", "needle", "multikey")
CSV_FIELDS = ("system", "task", "length", "context_tokens", "depth", "hid", "qid", "expected", "answer", "correct",
              "coverage", "in_window", "ttft_s", "total_s", "retrieval_s", "search_s", "decode_tok_s", "window_tokens",
              "retrieved_tokens", "retrieved_events")
RECALL_RUNS = ("recall-1m-emserve-span", "recall-1m-passkey-span", "recall-32k-span", "recall-1m-emserve",
               "recall-128k-emserve-stems", "recall-128k-emserve", "recall-128k-baselines", "recall-32k-emserve-stems",
               "recall-32k-emserve-labels",
               "recall-32k-emserve", "recall-32k-baselines", "recall-32k-full-1k-4k", "recall-128k-qwen2.5-0.5b-stems")
"""The recall suite's runs (``bench/eval/recall.py``) the goals are judged on, newest first: a (model, system,
task, length) cell comes from the first of them that has it."""
RECALL_TASKS = ("passkey", "passkey-prose", "kv", "split", "after", "twohop")
RECALL_LENGTHS = (32768, 131072, 1 << 20)
COMMANDS = {
    "eval-quick": ".venv/bin/python -m bench.eval.eval --quick",
    "eval": ".venv/bin/python -m bench.eval.eval --full",
    "eval-128k": ".venv/bin/python -m bench.eval.eval --long-128k",
    "eval-128k-b": ".venv/bin/python -m bench.eval.eval --long-128k --tasks passkey --depths 0.7,0.9 --out eval-128k-b",
    "eval-1m": ".venv/bin/python -m bench.eval.eval --long-1m",
    "eval-2m": "EMSERVE_MEMORY_TABLE_DTYPE=int8 .venv/bin/python -m bench.eval.eval --long-1m --stream-length 2m "
               "--stream-source narrative --systems emserve --server-memory 4GiB --server-arg=--kv-cache-gib=0.5 "
               "--keep --out eval-2m --title '2M-token stream (int8 event table, 4 GiB memory cgroup)'",
    "eval-2m-format4": ".venv/bin/python -m bench.eval.eval --long-1m --stream-length 2m --stream-source narrative "
                       "--systems emserve --server-memory 4GiB --server-arg=--kv-cache-gib=0.5 --keep "
                       "--out eval-2m-format4 --title '2M-token stream (int8 table, a record per event, 4 GiB cgroup)'",
    "eval-perf": ".venv/bin/python -m bench.eval.eval --perf",
    "eval-qwen2.5-0.5b": ".venv/bin/python -m bench.eval.eval --full --model qwen2.5-0.5b --lengths 32768",
    "eval-rank-needle-32k": ".venv/bin/python -m bench.eval.eval --lengths 32768 --tasks needle "
                            "--systems emserve,infllm,mean-rank --one-haystack needle --depths 0.1,0.3,0.5,0.7,0.9 "
                            "--out eval-rank-needle-32k "
                            "--title 'Question ranking A/B at 32k: needle'",
    "eval-rank-passkey-32k": ".venv/bin/python -m bench.eval.eval --lengths 32768 --tasks passkey --systems emserve "
                             "--depths 0.1,0.5,0.9 --out eval-rank-passkey-32k "
                             "--title 'Question ranking at 32k: pass key'",
}


def _order(values: Iterable[Any], order: Sequence[Any]) -> list[Any]:
    vals = set(values)
    return [v for v in order if v in vals] + sorted(v for v in vals if v not in order)


def _k(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _med(xs: Iterable[float | None]) -> float | None:
    v = [float(x) for x in xs if x is not None]
    return statistics.median(v) if v else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def accuracy(answers: Sequence[dict[str, Any]], **where: Any) -> tuple[int, int]:
    sel = [a for a in answers if all(a.get(k) == v for k, v in where.items())]
    return sum(bool(a["correct"]) for a in sel), len(sel)


def _cell(ok: int, n: int) -> str:
    return f"{ok / n:.2f} ({ok}/{n})" if n else "-"


def accuracy_rows(answers: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Rows (length, system) x columns (tasks, all): "acc (correct/n)"."""
    tasks = _order((a["task"] for a in answers), TASK_ORDER)
    rows = []
    for n in sorted({a["length"] for a in answers}):
        for sysname in _order((a["system"] for a in answers if a["length"] == n), SYSTEM_ORDER):
            cells = [_cell(*accuracy(answers, length=n, system=sysname, task=t)) for t in tasks]
            ctx = {a["context_tokens"] for a in answers if a["length"] == n and a["system"] == sysname}
            label = _k(n) + (f" ({', '.join(str(c) for c in sorted(ctx))} tok)" if ctx != {n} else "")
            rows.append([label, sysname, *cells, _cell(*accuracy(answers, length=n, system=sysname))])
    return ["length", "system", *tasks, "all"], rows


def _prefill(res: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The fastest vanilla prefill run at ``n`` tokens (or at native - 1 when ``n`` is the native length)."""
    native = int(res.get("model", {}).get("max_model_len", 0) or 0)
    runs = [p for p in res.get("vanilla", {}).get("prefill", []) if p["tokens"] in (n, min(n, native - 1))]
    return min(runs, key=lambda p: p["seconds"]) if runs else None


def perf_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per (length, system), medians over the run's sessions and questions. Vanilla vLLM: its prefill
    throughput and prefill time (~ its TTFT) at that length; decode ~ (tokens - 1) / (answer - prefill)."""
    hs, answers = res.get("haystacks", []), res.get("answers", [])
    rows = []
    for n in sorted({a["length"] for a in answers}):
        for sysname in _order((a["system"] for a in answers if a["length"] == n), SYSTEM_ORDER):
            h = [r for r in hs if r["length"] == n and r["system"] == sysname]
            a = [r for r in answers if r["length"] == n and r["system"] == sysname]
            if sysname == "vanilla":
                pre = _prefill(res, n)
                dec = [(r["completion_tokens"] - 1) / (r["total_s"] - pre["seconds"]) for r in a
                       if pre and r.get("completion_tokens", 0) > 1 and r["total_s"] > pre["seconds"]]
                rows.append([_k(n), sysname, _fmt(pre["tok_s"] if pre else None), _fmt(pre["seconds"] if pre else None),
                             _fmt(_med(dec)), "-", "-", "-"])
                continue
            rss = _fmt(_med(r["rss_bytes"] / 2**30 for r in h))
            anon = _fmt(_med(r.get("rss_anon_bytes", 0) / 2**30 for r in h))
            rows.append([_k(n), sysname, _fmt(_med(r["ingest_tok_s"] for r in h)), _fmt(_med(r["ttft_s"] for r in a)),
                         _fmt(_med(r.get("decode_tok_s") for r in a)), _fmt(_med(r.get("retrieval_s") for r in a)),
                         _fmt(_med(r["disk_bytes"] / r["length"] / 1024 for r in h)), f"{rss} ({anon})"])
    return ["length", "system", "ingest tok/s", "TTFT s", "decode tok/s", "retrieval s", "disk KiB/token",
            "RSS GiB (anon)"], rows


def stream_rows(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = []
    for st in res.get("streams", []):
        for p in st["points"]:
            a = p["probe"]
            rows.append([st["system"], _k(p["tokens"]), f"{p['segment'][0]}-{p['segment'][1]}",
                         _fmt(p["segment_tok_s"]), _fmt(a["ttft_s"]), _fmt(a.get("decode_tok_s")),
                         _fmt(a.get("retrieval_s")), _fmt(p["disk_bytes_per_token"] / 1024),
                         f"{_fmt(p['rss_bytes'] / 2**30)} ({_fmt(p.get('rss_anon_bytes', 0) / 2**30)})", p["events"],
                         "yes" if a["correct"] else "no"])
    return ["system", "session", "segment", "ingest tok/s", "TTFT s", "decode tok/s", "retrieval s",
            "disk KiB/token", "RSS GiB (anon)", "events", "probe answer correct"], rows


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def print_tables(res: dict[str, Any]) -> None:
    for title, (h, rows) in (("accuracy", accuracy_rows(res.get("answers", []))), ("performance", perf_rows(res)),
                             ("streams", stream_rows(res))):
        if rows:
            print(f"\n{title}\n{table(h, rows)}")
    for p in res.get("vanilla", {}).get("prefill", []):
        print(f"vanilla vLLM prefill {p['tokens']} tokens: {p['tok_s']:.0f} tok/s")


# ------------------------------------------------------------------------------------------ files
def write_csv(res: dict[str, Any], path: Path) -> None:
    rows = list(res.get("answers", []))
    for st in res.get("streams", []):
        rows += st["answers"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def plot_depth(res: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    answers = res.get("answers", [])
    if not answers:
        return False
    systems = _order((a["system"] for a in answers), SYSTEM_ORDER)
    lengths = sorted({a["length"] for a in answers})
    depths = sorted({round(a["depth"], 2) for a in answers})
    size = (2.2 + 0.45 * len(depths) * len(systems), 1.4 + 0.5 * len(lengths))
    fig, axes = plt.subplots(1, len(systems), figsize=size, squeeze=False)
    for ax, sysname in zip(axes[0], systems, strict=True):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for i, n in enumerate(lengths):
            for j, d in enumerate(depths):
                sel = [a for a in answers if a["system"] == sysname and a["length"] == n and round(a["depth"], 2) == d]
                if sel:
                    grid[i, j] = sum(a["correct"] for a in sel) / len(sel)
                    ax.text(j, i, f"{len(sel)}", ha="center", va="center", fontsize=6, color="0.3")
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(sysname, fontsize=9)
        ax.set_xticks(range(len(depths)), [f"{round(d * 100)}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [_k(n) for n in lengths], fontsize=7)
        ax.set_xlabel("depth %", fontsize=8)
    fig.suptitle("accuracy vs depth (all tasks; green 1, red 0, blank: not sampled; numbers: questions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _lines(ax: Any, res: dict[str, Any], key: str) -> None:
    hs, answers = res.get("haystacks", []), res.get("answers", [])
    src = hs if key == "ingest_tok_s" else answers
    for sysname in _order((r["system"] for r in src), SYSTEM_ORDER):
        pts = [(n, _med(r.get(key) for r in src if r["system"] == sysname and r["length"] == n))
               for n in sorted({r["length"] for r in src if r["system"] == sysname})]
        pts = [(n, y) for n, y in pts if y is not None]
        if pts:
            ax.plot([n for n, _ in pts], [y for _, y in pts], marker="o", label=sysname)


def plot_perf(res: dict[str, Any], ingest_path: Path, ttft_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = []
    streams = res.get("streams", [])
    prefill = res.get("vanilla", {}).get("prefill", [])
    for key, path, ylabel in (("ingest_tok_s", ingest_path, "ingest tokens/s"), ("ttft_s", ttft_path, "TTFT s")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        _lines(ax, res, key)
        for st in streams:
            if key == "ingest_tok_s":
                s = st["series"]  # (seconds, tokens); rate over the last ~4 points (~8k tokens)
                xs = [s[i][1] for i in range(1, len(s))]
                ys = [(s[i][1] - s[max(0, i - 4)][1]) / max(1e-9, s[i][0] - s[max(0, i - 4)][0])
                      for i in range(1, len(s))]
                ax.plot(xs, ys, lw=1, label=f"{st['system']} stream ({_k(st['length'])}), last ~8k tokens")
                pts = st["points"]
                ax.plot([p["tokens"] for p in pts], [p["segment_tok_s"] for p in pts], "s", ms=4,
                        label=f"{st['system']} stream, per segment")
            else:
                ax.plot([p["tokens"] for p in st["points"]], [p["probe"]["ttft_s"] for p in st["points"]],
                        marker="s", label=f"{st['system']} stream ({_k(st['length'])})")
        if prefill:
            by_n: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for p in prefill:
                by_n[p["tokens"]].append(p)
            xs = sorted(by_n)
            if key == "ingest_tok_s":
                ax.plot(xs, [max(p["tok_s"] for p in by_n[n]) for n in xs], "k^--", label="vanilla vLLM prefill")
            else:
                ax.plot(xs, [min(p["seconds"] for p in by_n[n]) for n in xs], "k^--", label="vanilla vLLM (prefill)")
        if not ax.lines:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        seen = sorted({int(x) for line in ax.lines for x in np.asarray(line.get_xdata()).ravel()})
        ticks = [x for x in seen if x & (x - 1) == 0 or x == seen[-1]]
        ax.set_xticks(ticks, [_k(x) for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("session length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{ylabel} vs session length ({res.get('model', {}).get('name', '')})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def write_outputs(res: dict[str, Any], name: str, results_dir: Path = RESULTS) -> list[Path]:
    """CSV and plots of one run next to its JSON."""
    out = [results_dir / f"{name}.csv"]
    write_csv(res, out[0])
    depth = results_dir / f"{name}-depth.png"
    if plot_depth(res, depth):
        out.append(depth)
    out += plot_perf(res, results_dir / f"{name}-ingest.png", results_dir / f"{name}-ttft.png")
    return out


# ------------------------------------------------------------------------------------------ goals
def _load(results_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(results_dir.glob("eval*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _acc(runs: dict[str, dict[str, Any]], model: str, tasks: Sequence[str], **where: Any) -> tuple[float | None, str]:
    """Accuracy on ``tasks`` over the non-quick runs that have the cell (else the quick run), and its source."""
    for quick in (False, True):
        ok = n = 0
        src = []
        for name, r in runs.items():
            if r.get("model", {}).get("name") != model or bool(r.get("quick")) != quick:
                continue
            answers = list(r.get("answers", [])) + [a for st in r.get("streams", []) for a in st["answers"]]
            a = b = 0
            for t in tasks:
                x, y = accuracy(answers, task=t, **where)
                a, b = a + x, b + y
            if b:
                ok, n = ok + a, n + b
                src.append(name)
        if n:
            return ok / n, f"{ok}/{n} in {', '.join(src)}"
    return None, "not measured"


def _longest_stream(runs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The emserve stream that reached the most tokens (its run's name), among those with a 16k point; of
    streams as long, the latest run's (``machine.time``)."""
    best: tuple[dict[str, Any] | None, str] = (None, "")
    best_key: tuple[int, str] = (-1, "")
    for name, r in runs.items():
        for st in r.get("streams", []):
            if st["system"] != "emserve" or not any(p["tokens"] == 16384 for p in st["points"]):
                continue
            key = (st["points"][-1]["tokens"], str(r.get("machine", {}).get("time", "")))
            if best[0] is None or key > best_key:
                best, best_key = (st, name), key
    return best


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "NOT met"


STREAM_GOAL = 1 << 21  # #19: the stream goals hold at 2M tokens


def _question_ttft(p: dict[str, Any]) -> float:
    """A point's TTFT of a 64-token question: the median of its timing questions (the probe without them)."""
    ts = [t["ttft_s"] for t in p.get("timing", [])]
    return statistics.median(ts) if ts else p["probe"]["ttft_s"]


def goals(runs: dict[str, dict[str, Any]], model: str = "smollm2-135m") -> list[list[str]]:
    """The performance goals, judged on whatever runs are present ("not measured" otherwise). The stream goals
    (#19) compare the longest stream's last point with its own 16k point, and are met only at 2M tokens or more.
    The accuracy goals are the recall suite's (:func:`recall_goals`); the 1-6-question grids of these runs judge
    none."""
    rows = []
    st, src = _longest_stream(runs)
    names = ["ingest tok/s at 2M >= 0.8x at 16k", "TTFT of a 64-token question at 2M <= 1.5x at 16k",
             "server + engine anonymous RSS at 2M within 1 GiB of 16k"]
    if st is None:
        rows += [[n, "not measured", _verdict(None)] for n in names]
    else:
        p16 = next(p for p in st["points"] if p["tokens"] == 16384)
        last = st["points"][-1]
        at, long_enough = _k(last["tokens"]), last["tokens"] >= STREAM_GOAL
        short = "" if long_enough else "; 2M not reached"
        a, b = last["segment_tok_s"], p16["segment_tok_s"]
        rows.append([names[0], f"at {at}: {a:.0f} vs {b:.0f} tok/s, {a / b:.2f}x ({src}{short})",
                     _verdict(a >= 0.8 * b if long_enough else None)])
        a, b = _question_ttft(last), _question_ttft(p16)
        rows.append([names[1], f"at {at}: {a:.2f} vs {b:.2f} s, {a / b:.2f}x ({src}{short})",
                     _verdict(a <= 1.5 * b if long_enough else None)])
        if "rss_anon_bytes" in last and "rss_anon_bytes" in p16:
            a, b = last["rss_anon_bytes"] / 2**30, p16["rss_anon_bytes"] / 2**30
            rows.append([names[2], f"at {at}: {a:.2f} vs {b:.2f} GiB, +{a - b:.2f} ({src}{short})",
                         _verdict(a - b <= 1.0 if long_enough else None)])
        else:
            rows.append([names[2], "not measured", _verdict(None)])
    found = None
    for name, r in runs.items():
        if r.get("model", {}).get("name") != model:
            continue
        pts = [p["segment_tok_s"] for st in r.get("streams", []) if st["system"] == "emserve" for p in st["points"]
               if p["segment"][0] >= 16384]
        native = int(r.get("model", {}).get("max_model_len", 8192))
        pre = [p["tok_s"] for p in r.get("vanilla", {}).get("prefill", []) if p["tokens"] >= native - 1]
        if pts and pre:
            found = (statistics.median(pts), max(pre), name)
    goal = "steady-state ingest (median over segments past 16k) >= 0.7x vanilla vLLM prefill at native length"
    if found is None:
        rows.append([goal, "not measured", _verdict(None)])
    else:
        steady, pre, src = found
        rows.append([goal, f"{steady:.0f} vs {pre:.0f} tok/s ({src})", _verdict(steady >= 0.7 * pre)])
    return rows


Cells = dict[tuple[str, str, str, int], tuple[list[bool], list[bool], str]]


def _recall_cells(runs: dict[str, dict[str, Any]]) -> Cells:
    """(model, system, task, length) -> (answers right, needed sentences in the window, source run), each
    cell from the first of :data:`RECALL_RUNS` holding it (quick and unfinished runs do not count)."""
    cells: Cells = {}
    for name in RECALL_RUNS:
        r = runs.get(name)
        if r is None or r.get("quick") or not r.get("complete"):
            continue
        model = r.get("model", {}).get("name", "")
        mine: Cells = {}
        for a in r.get("answers", []):
            key = (model, a["system"], a["task"], int(a["length"]))
            if key in cells:
                continue
            right, inside, _ = mine.setdefault(key, ([], [], name))
            right.append(bool(a["correct"]))
            inside.append(bool(a.get("in_window")))
        cells.update(mine)
    return cells


def recall_goals(runs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Issue #21's recall goals on the recall suite's runs (:data:`RECALL_RUNS`; "not measured" where a
    cell is missing). Accuracies are point estimates with their counts."""
    cells = _recall_cells(runs)
    small = "smollm2-135m"

    def cell(model: str, system: str, task: str, n: int) -> tuple[float | None, int, int, str]:
        c = cells.get((model, system, task, n))
        if c is None or not c[0]:
            return None, 0, 0, ""
        return sum(c[0]) / len(c[0]), sum(c[0]), len(c[0]), c[2]

    def rec(task: str, n: int) -> tuple[float | None, str]:
        c = cells.get((small, "emserve", task, n))
        if c is None or not c[1]:
            return None, "-"
        return sum(c[1]) / len(c[1]), f"{sum(c[1])}/{len(c[1])}"

    rows = []
    for n in RECALL_LENGTHS:
        got = [(t, *rec(t, n)) for t in RECALL_TASKS]
        vals = [v for _, v, _ in got]
        src = sorted({cells[(small, "emserve", t, n)][2] for t in RECALL_TASKS if (small, "emserve", t, n) in cells})
        ok = None if any(v is None for v in vals) else all(v >= 0.95 for v in vals if v is not None)
        measured = "not measured" if not src else "; ".join(f"{t} {txt}" for t, _, txt in got) + f" ({', '.join(src)})"
        rows.append([f"SmolLM2-135M retrieval recall >= 0.95 on every task at {_k(n)}", measured, _verdict(ok)])
    for n in RECALL_LENGTHS:
        parts, verdicts, src = [], [], set()
        for t in RECALL_TASKS:
            e, ek, en, es = cell(small, "emserve", t, n)
            f, fk, fn, fs = cell(small, "full@2k", t, n)
            if e is None or f is None:
                parts.append(f"{t} -")
                verdicts.append(None)
                continue
            src |= {es, fs}
            parts.append(f"{t} {ek}/{en} vs {fk}/{fn}")
            verdicts.append(e >= f)
        ok = None if any(v is None for v in verdicts) else all(verdicts)
        measured = "not measured" if not src else "; ".join(parts) + f" ({', '.join(sorted(src))})"
        rows.append([f"SmolLM2-135M accuracy on every task >= full attention at 2k, at {_k(n)}", measured,
                     _verdict(ok)])
    n = 131072
    e, ek, en, es = cell(small, "emserve", "kv", n)
    tr, tk, tn, ts = cell(small, "truncation", "kv", n)
    inf, ik, inn, ins = cell(small, "infllm", "kv", n)
    ok = None if e is None or tr is None or inf is None else e >= tr + 0.30 and e >= inf + 0.15
    measured = "not measured" if ok is None else (f"emserve {ek}/{en}, truncation {tk}/{tn}, InfLLM-style {ik}/{inn} "
                                                  f"({', '.join(sorted({es, ts, ins}))})")
    rows.append(["SmolLM2-135M kv at 128k >= truncation + 30 points and >= InfLLM-style + 15 points", measured,
                 _verdict(ok)])
    parts, verdicts = [], []
    for t in RECALL_TASKS:
        a, ak, an, _ = cell(small, "emserve", t, 1 << 20)
        b, bk, bn, _ = cell(small, "emserve", t, 32768)
        parts.append(f"{t} -" if a is None or b is None else f"{t} {ak}/{an} vs {bk}/{bn}")
        verdicts.append(None if a is None or b is None else a >= b - 0.10)
    ok = None if any(v is None for v in verdicts) else all(verdicts)
    rows.append(["SmolLM2-135M accuracy at 1M within 10 points of 32k on every task",
                 "not measured" if all(v is None for v in verdicts) else "; ".join(parts), _verdict(ok)])
    q, qk, qn, qs = cell("qwen2.5-0.5b", "emserve", "kv", n)
    rows.append(["Qwen2.5-0.5B kv at 128k >= 0.9", "not measured" if q is None else f"{qk}/{qn} ({qs})",
                 _verdict(None if q is None else q >= 0.9)])
    return rows


# ------------------------------------------------------------------------------------------ docs
def _section(name: str, r: dict[str, Any], results_dir: Path, heading: str | None = None) -> list[str]:
    rel = Path("..") / results_dir.relative_to(ROOT) if results_dir.is_relative_to(ROOT) else results_dir
    m, mach = r.get("model", {}), r.get("machine", {})
    vers = ", ".join(f"{k} {v}" for k, v in (mach.get("versions") or {}).items() if v)
    out = [f"## {heading or r.get('title', name)}", "",
           f"`{COMMANDS.get(name, r.get('command', ''))}`", "",
           f"Run {mach.get('time', '?')}: {r.get('command', '')}; wall time {r.get('wall_s', 0) / 60:.1f} min; "
           f"model {m.get('name')} ({m.get('max_model_len')} native context); {mach.get('cores')} cores "
           f"({mach.get('cpu')}; {' '.join(mach.get('cpu_flags', []))}); {vers}; git {r.get('git', '?')}.", ""]
    if not r.get("complete", True):
        out += [f"**Partial run**: stopped before its end ({len(r.get('haystacks', []))} sessions done); cells and "
                "systems missing below (e.g. vanilla, which runs last) were not measured.", ""]
    if r.get("resumed"):
        pr = r["resumed"]
        gaps = [f"{st['unmeasured'][0]}-{st['unmeasured'][1]}" for st in r.get("streams", []) if st.get("unmeasured")]
        out += [f"**Resumed run**: the stream was stopped and resumed on its kept session (first part: run "
                f"{pr.get('time')}, git {pr.get('git')}, {(pr.get('wall_s') or 0) / 60:.1f} min); tokens "
                f"{', '.join(gaps) or '-'} were ingested between its last saved checkpoint and the stop, unmeasured; "
                "the next segment below starts where the resumed run did.", ""]
    if r.get("load_avg_start"):
        out += [f"Load average (1 / 5 / 15 min) at the start {' / '.join(f'{x:.1f}' for x in r['load_avg_start'])}, "
                f"at the end {' / '.join(f'{x:.1f}' for x in r.get('load_avg_end', []))} (the machine's 2 cores "
                "may be shared: timings are of this run only).", ""]
    if sampling(r):
        out += [sampling(r), ""]
    h, rows = accuracy_rows(r.get("answers", []) + [a for st in r.get("streams", []) for a in st["answers"]])
    if rows:
        out += ["Accuracy (correct / questions):", "", markdown(h, rows), ""]
    h, rows = perf_rows(r)
    if rows:
        out += ["Performance (medians over the run's sessions and questions; ingest with "
                f"{r.get('config', {}).get('concurrency', 1)} session(s) at a time; TTFT: the question's first "
                "token, probe step and retrieval included; retrieval s: probe step + retrieval + planning; RSS: "
                "server + engine core after the ingest, file-backed pages included (anon: without); vanilla: its "
                "chunked-prefill throughput and prefill time at that length):", "", markdown(h, rows), ""]
    h, rows = stream_rows(r)
    if rows:
        out += ["Long streams (one session, measured at each length; TTFT of a question there):", "",
                markdown(h, rows), ""]
    pre = r.get("vanilla", {}).get("prefill", [])
    if pre:
        out += ["Vanilla vLLM prefill (chunked, 512-token chunks): " + ", ".join(
            f"{p['tokens']} tokens {p['tok_s']:.0f} tok/s" for p in pre), ""]
    plots = (("depth", "accuracy vs depth"), ("ingest", "ingest tok/s vs length"), ("ttft", "TTFT vs length"))
    for suffix, what in plots:
        if (results_dir / f"{name}-{suffix}.png").exists():
            out += [f"![{what}]({rel / f'{name}-{suffix}.png'})", ""]
    out += [f"Data: [{name}.json]({rel / f'{name}.json'}), [{name}.csv]({rel / f'{name}.csv'}).", ""]
    return out


def current_protocol(r: dict[str, Any]) -> bool:
    """The run used the literature's pass-key haystack and the question window (runs since both)."""
    return bool(r.get("config", {}).get("passkey_haystack") == "noise")


def sampling(r: dict[str, Any]) -> str:
    """The run's grid in words (from its config)."""
    c = r.get("config", {})
    if not c.get("lengths"):
        return ""
    caps = c.get("depth_cap") or {}
    txt = (f"Grid: lengths {', '.join(_k(int(n)) for n in c['lengths'])}; tasks {', '.join(c.get('tasks', []))}; "
           f"depths {', '.join(f'{round(d * 100)}%' for d in c.get('depths', []))}")
    if caps:
        txt += ("; depths per task at most " + ", ".join(f"{v} at {_k(int(k))}" for k, v in caps.items())
                + " (every s-th depth, offset rotated by task: the tasks of a length together cover them all)")
    if c.get("one_haystack"):
        txt += (f"; {', '.join(c['one_haystack'])}: every depth in one haystack (a needle with its own key at "
                "each, asked one by one: the other needles are distractors)")
    txt += "; multikey: up to 4 keys per haystack, each asked; one question per task and depth (seed "
    txt += f"{c.get('seed', 0)})"
    abl = [s for s in c.get("systems", []) if s in ("no-refine", "no-contiguity", "mean-rank")]
    if abl and (c.get("ablation_min_length") or set(c.get("ablation_tasks", [])) != set(c.get("tasks", []))):
        txt += (f"; {', '.join(abl)} only at >= {_k(int(c.get('ablation_min_length', 0)))} on "
                f"{', '.join(c.get('ablation_tasks', []))}")
    if "passkey" in c.get("tasks", []) and not current_protocol(r):
        txt += ("; passkey here in **prose** (this run predates the pass-key haystack: a key hidden in a story, "
                "which SmolLM2-135M misses even with full attention)")
    return txt + "."


def write_docs(results_dir: Path = RESULTS, path: Path = DOCS) -> Path:
    runs = _load(results_dir)
    lines = ["# Long-context evaluation results", "",
             "Generated by `bench/eval/eval.py` (`bench/eval/eval_report.py` rewrites this page from "
             "`bench/results/eval*.json`). Every number comes from a run through a real `emserve serve` "
             "process driven by the Python client; the full-attention baseline is vanilla vLLM on the same model "
             "in its own process, run after the server stopped. Haystacks, tasks, systems and sampling: "
             "the docstrings of `bench/eval/eval.py`, `bench/eval/eval_tasks.py`, `bench/eval/eval_server.py`.", "",
             "Systems (one model, one machine): **emserve** (default memory: sink + retrieved events + local "
             "window; a question's window is sink + 256 retrieved tokens + the last 64 tokens in runs since the "
             "question window, see `MemoryConfig.question_n_local`; since commit f62d6c5 events close as soon as "
             "their boundaries are final, so a question can retrieve the recent ones too: before it the ~1k "
             "tokens before its last 64 were in no question window, which no depth of `eval-passkey-32k` "
             "touches), **truncation** (sink + local window only, "
             "`n_mem` 0 and the local window grown by the same 1024 tokens; a question sees that whole window), "
             "**infllm** (InfLLM-style: uniform 128-token blocks, similarity retrieval only, same budgets and "
             "question window as emserve), **no-refine** / **no-contiguity** (emserve without boundary refinement "
             "/ without the contiguity buffer), **mean-rank** (emserve ranking a question's events by the mean "
             "score of its last 4 query tokens: what every run before `MemoryConfig.question_rank` did, i.e. "
             "every run on this page but `eval-rank-*`; since then a question's last 64 tokens each rank the "
             "events and the rankings are interleaved, `bench/results/question_queries.md`), **vanilla** (full "
             "attention on vanilla vLLM, only where the haystack fits the native context). Tasks: **passkey** (a "
             "5-digit pass key in the literature's pass-key haystack: an instruction, then filler sentences "
             "repeated; the other tasks hide their sentences in prose), "
             "**needle** (one key-value sentence, 7-digit value), **multikey** (4 key-value sentences, "
             "each asked), **twohop** (a link fact and a value fact half the haystack apart, 2 distractor values: "
             "chance is 1/3 for a model that picks a code), **labelled** (the 1M / perf stream's three labelled "
             "pass keys at 10/50/90%). A question is correct when the expected value is in the greedy answer (10 "
             "tokens). Depth: where the needed sentence sits (0: first tokens, in the sink; 1: last tokens, in the"
             " local window).", "",
             "Reproduce:", ""]
    lines += [f"* `{cmd}` -> `bench/results/{name}.*`" for name, cmd in COMMANDS.items()]
    current = {k: r for k, r in runs.items() if current_protocol(r)}
    recall_runs = {}
    for name in RECALL_RUNS:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            recall_runs[name] = json.loads((results_dir / f"{name}.json").read_text())
    lines += ["", "## Goals", "",
              "Recall (issue #21) is judged on the recall suite (`bench/eval/recall.py`, 30 questions per task and "
              f"length; runs {', '.join(recall_runs) or 'none yet'}; details in `docs/recall.md`); the "
              "1-6-question grids on this page judge no goal. Performance is judged on the runs of the current "
              f"protocol ({', '.join(current) or 'none yet'}).", "",
              markdown(["goal", "measured", "verdict"], recall_goals(recall_runs) + goals(current)), ""]
    order = [n for n in COMMANDS if n in runs] + [n for n in runs if n not in COMMANDS]
    titles = Counter(r.get("title", n) for n, r in runs.items())
    for name in order:
        title = runs[name].get("title", name)
        lines += _section(name, runs[name], results_dir, f"{title} ({name})" if titles[title] > 1 else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    for name, r in _load(RESULTS).items():
        write_outputs(r, name)
    print("wrote", write_docs())


if __name__ == "__main__":
    main()

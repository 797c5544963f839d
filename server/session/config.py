"""A session's memory settings: one tree (:class:`MemoryConfig`), the flat names the API, the environment
and old session files give its settings by (:data:`SETTINGS`), and how a saved session's are read back.

The tree has three parts, each the config of the code that uses it:

* ``segmenter``: :class:`~emserve.segmenter.SegmenterConfig` (where events begin and end);
* ``retrieval``: :class:`~emserve.retrieval.config.RetrievalConfig` (the windows, how events are scored
  and selected, the indexes);
* ``question``: :class:`QuestionRules` (a question's query tokens, lexical rules and answer start; only a
  session has them).

Every default is defined once, in its part's class. The session's tree differs from those defaults in three
places only: ``segmenter.close_lag`` (events close as soon as their boundaries are final, so that a
question with a short local window can retrieve the recent ones; ingestion steps still retrieve only
events that have left their local window), ``segmenter.max_event_span`` (``max_block_size``: a stretch with
no surprise boundary is cut every ``max_block_size`` tokens as it is read, so the tokens in no event yet,
which a question reads whole, stay few; see :func:`_session_segmenter`)
and ``retrieval.max_window`` (the model's context, set when a session binds the config to its engine:
:meth:`MemoryConfig.bound`).

The flat names (``n_local``, ``question_copy``, ...) are the public vocabulary: the proto's
``MemoryConfig`` fields, ``EMSERVE_MEMORY_<NAME>``, the benchmarks' overrides and the ``session.json`` of
layout versions 1 and 2. Each names its place in the tree in :data:`SETTINGS`, the one mapping; a setting
of two libraries is one flat name (``n_init``, ``n_local``), and ``min_block_size`` sets the close lag too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.errors import ConfigError
from emserve.segmenter import SegmenterConfig

MAX_CONTRAST = 10.0
"""The largest ``QuestionRules.contrast``."""
MAX_SUPPORT = 20.0
"""The largest ``QuestionRules.lookahead_support`` (nats per token)."""


@dataclass(frozen=True, kw_only=True)
class QuestionRules:
    """How a session asks its memory a question and starts the answer, beyond the window the retrieval
    part plans (:mod:`emserve.server.session.question`, :mod:`emserve.server.session.answer`). Validated on
    construction."""

    query_tokens: int = 64
    """A question retrieves with the queries of its last this-many tokens, each scored on its own
    (centered, standardized; ``emserve.retrieval.queries``) and ranked by ``retrieval.question_rank``; 0:
    its mean query summary."""
    content_queries: bool = False
    """A question ranks the events with the query tokens whose text holds a letter or a digit only
    (:func:`~emserve.server.session.words.content_rows`): a newline or a question mark names nothing
    to look up."""
    lexical: int = 2
    """A question's best lexical matches (events holding the rare words it names, at least half the best
    match's score; :mod:`emserve.retrieval.lexical`), at most this many, go first in its ranking, each
    with its neighbours; 0: the attention scores alone rank."""
    bridge: bool = True
    """A question's first lexical match may name the thing its asked fact is stated about elsewhere
    ("Maria hid the treasure in the cobalt chest"; "The cobalt chest is locked with the code ..."): the
    passage joining a rare word of that match to a rare word the question asks for and the match lacks
    goes second in its ranking, with its neighbours (:func:`emserve.retrieval.bridge.bridge_hit`). Needs
    ``lexical``."""
    contrast: float = 0.0
    """``alpha`` > 0: a greedy answer's first token is chosen by contrast with what the model answers to
    the question alone (:mod:`emserve.server.contrast`); 0: plain greedy. Costs two one-token engine
    requests before the answer."""
    copy: int = 3
    """A greedy answer starts with the word that followed the question's last words where its window says
    them verbatim (:func:`emserve.retrieval.lexical.continuation`: the longest such run, at least this
    many tokens), token by token as long as the model gives each at least
    :data:`~emserve.server.session.answer.COPY_PLAUSIBLE`; the answer goes on greedily after it. A
    question that restates a fact's lead-in ("The pass key is") then answers with the fact, not with a
    continuation the model prefers (" the pass key."), and copies its digits as written. 0: off. Costs
    one engine request (the question and the word) when a run is found."""
    lookahead: int = 6
    """A greedy answer starts with the one of the model's most likely first tokens
    (:data:`~emserve.server.session.answer.LOOKAHEAD_CHOICES`; stop tokens aside) whose first this-many
    tokens, the token and its greedy continuation, have the highest mean log-probability; the answer goes
    on greedily after them. A start the model reads on with confidence (a value copied from the window)
    wins over a first token it slightly prefers but cannot continue (a paragraph break, " the ..." said
    again from the question). 0 or 1: plain greedy. Applies where ``copy`` did not choose the first tokens
    and ``contrast`` is off; ``echo`` then watches the answer it starts. Costs, before the first token, a
    request of this-many tokens (the greedy start) and, run together after it, one of this-many less one
    for each other first token that could still win
    (:func:`~emserve.server.session.answer.lookahead_start`)."""
    lookahead_support: float = 2.0
    """A start of ``lookahead`` is weighed only if the retrieved memory supports it: its tokens' mean
    log-probability in the question's window exceeds, by more than this many nats, their mean
    log-probability in the window without its retrieved events (the sink, the local tail and the question:
    what the recent text alone says); where no start is, all are weighed. A continuation of the local tail
    (" one of the top ten global health threats", the document's last sentence) or the question said again
    is then not the answer while a start the memory holds is. 0: off. Costs, before the first token, one
    short request for the greedy start (the window without memory), and where that start is not supported,
    each other first token followed and weighed the same way."""
    echo: int = 6
    """A greedy answer whose first this-many content tokens are all words of the question restates it
    (:func:`emserve.retrieval.verbatim.restates`: " the pass key of the amber door"); it is decided again:
    the model's next most likely first tokens (:data:`~emserve.server.session.answer.ECHO_CHOICES`), each
    followed greedily, in their order, and the first that the window says in part
    (:func:`~emserve.retrieval.verbatim.grounded`: a digit, a name it holds) starts the answer instead;
    none: the answer stays as it was. Answers that name anything else stream as they are; while an
    answer's first tokens are all question words it is held back (at most this many content tokens).
    Applies where no other rule chose the first tokens (``copy``, ``lookahead``, ``contrast``). 0: off. Costs, for an
    echo only, one one-token request and up to ``ECHO_CHOICES - 1`` short ones."""

    def __post_init__(self) -> None:
        for name in ("query_tokens", "lexical", "copy", "lookahead", "echo"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"question_{name} must be an int >= 0 (0: off), got {value!r}")
        if not 0 <= self.lookahead_support <= MAX_SUPPORT:  # NaN fails too
            raise ConfigError(f"question_lookahead_support must be in [0, {MAX_SUPPORT:g}], "
                              f"got {self.lookahead_support}")
        if not 0 <= self.contrast <= MAX_CONTRAST:  # NaN fails too
            raise ConfigError(f"question_contrast must be in [0, {MAX_CONTRAST:g}], got {self.contrast}")


def _places(part: str, *names: str) -> tuple[tuple[str, str], ...]:
    return tuple((part, n) for n in names)


SETTINGS: dict[str, tuple[tuple[str, str], ...]] = {
    # the windows: one setting of both libraries
    "n_init": (("retrieval", "n_init"), ("segmenter", "n_init")),
    "n_local": (("retrieval", "n_local"), ("segmenter", "n_local")),
    **{n: _places("retrieval", n) for n in ("n_mem", "exc_block_size")},
    # event boundaries; an event closes as soon as its boundaries are final, and a stretch with no surprise
    # boundary is cut every max_block_size tokens as it is read
    "min_block_size": (("segmenter", "min_block_size"), ("segmenter", "close_lag")),
    "max_block_size": (("segmenter", "max_block_size"), ("segmenter", "max_event_span")),
    **{n: _places("segmenter", n) for n in ("surprisal_threshold_gamma", "similarity_metric", "splitter")},
    # scoring and selection
    **{n: _places("retrieval", n) for n in ("repr_topk", "repr_proxy", "table_dtype", "use_contiguity_buffer",
                                            "contiguity_buffer_size", "per_layer", "shared_score_layers",
                                            "center_queries", "standardize_queries")},
    # a question: its window and ranking (retrieval), its query tokens and rules (question)
    **{n: _places("retrieval", n) for n in ("question_rank", "interleave_stats", "question_neighbours",
                                            "question_reach", "question_parts", "question_contiguity",
                                            "question_n_init", "question_memory_last", "question_n_local",
                                            "question_n_mem")},
    **{f"question_{n}": _places("question", n) for n in ("query_tokens", "content_queries", "lexical", "bridge",
                                                         "contrast", "copy", "lookahead", "lookahead_support",
                                                         "echo")},
}
"""Each flat setting name and the places in the tree it sets (the first is where it is read)."""


def _session_segmenter() -> SegmenterConfig:
    """The segmenter's defaults with a session's close lag (``min_block_size``) and event span
    (``max_block_size``).

    A question's window reads whole the tokens between the last closed event and its local window (the
    remainder, ``retrieval/planner.py``): they are in no event yet, so no retrieval can bring them. With
    the span at ``max_block_size`` a stretch with no surprise boundary is cut as it is read, so at most
    ``1.5 * max_block_size + close_lag`` tokens are in no event after any step (the pieces are those
    ``split_even`` would cut the stretch into anyway). Why: ``docs/recall.md``, rule 18."""
    retrieval, segmenter = RetrievalConfig(), SegmenterConfig()
    return SegmenterConfig(n_init=retrieval.n_init, n_local=retrieval.n_local, close_lag=segmenter.min_block_size,
                           max_event_span=segmenter.max_block_size)


PARTS: dict[str, type] = {"segmenter": SegmenterConfig, "retrieval": RetrievalConfig, "question": QuestionRules}
"""The tree's parts: each name and the class of its config."""


@dataclass(frozen=True)
class MemoryConfig:
    """A session's memory settings: the segmenter's, the retrieval's and the question's (module doc).
    Defaults are sized for SmolLM2-135M (8k context). Validated on construction: each part by its own
    class, and the settings two parts share agree."""

    segmenter: SegmenterConfig = field(default_factory=_session_segmenter)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    question: QuestionRules = field(default_factory=QuestionRules)

    def __post_init__(self) -> None:
        for name in ("n_init", "n_local"):
            seg, ret = getattr(self.segmenter, name), getattr(self.retrieval, name)
            if seg != ret:
                raise ConfigError(f"{name}: the segmenter's ({seg}) and the retrieval's ({ret}) must be one value")

    # ------------------------------------------------------------------ the flat names
    @classmethod
    def of(cls, **settings: Any) -> MemoryConfig:
        """The defaults with ``settings`` (flat names, :data:`SETTINGS`)."""
        return cls().with_settings(**settings)

    def with_settings(self, **settings: Any) -> MemoryConfig:
        """This config with ``settings`` (flat names) changed; raises :class:`ConfigError` for an unknown
        name, and the parts' errors for an invalid value."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown memory setting(s) {', '.join(unknown)}")
        changes: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for name, value in settings.items():
            for part, attr in SETTINGS[name]:
                changes[part][attr] = value
        parts = {}
        for part in ("retrieval", "segmenter", "question"):  # the windows' own rules ("n_local >= 1") first
            ch = changes[part]
            parts[part] = dataclasses.replace(getattr(self, part), **ch) if ch else getattr(self, part)
        return MemoryConfig(**parts)

    def setting(self, name: str) -> Any:
        """The value of the flat setting ``name``."""
        part, attr = SETTINGS[name][0]
        return getattr(getattr(self, part), attr)

    def settings(self) -> dict[str, Any]:
        """Every flat setting and its value (what the API reports)."""
        return {name: self.setting(name) for name in SETTINGS}

    @staticmethod
    def setting_type(name: str) -> str:
        """The annotation of the flat setting ``name`` (a string: annotations are lazy), e.g. ``"int | None"``."""
        part, attr = SETTINGS[name][0]
        return str({f.name: f.type for f in dataclasses.fields(PARTS[part])}[attr])

    # ------------------------------------------------------------------ binding and the libraries
    def bound(self, max_window: int) -> MemoryConfig:
        """This config for a model whose context is ``max_window`` tokens (``retrieval.max_window``);
        raises :class:`ConfigError` when its windows do not fit."""
        if self.retrieval.max_window == max_window:
            return self
        return dataclasses.replace(self, retrieval=dataclasses.replace(self.retrieval, max_window=max_window))

    # ------------------------------------------------------------------ session.json
    def to_saved(self) -> dict[str, Any]:
        """The tree as ``session.json`` (layout 3) holds it: every field of every part."""
        return {part: dataclasses.asdict(getattr(self, part)) for part in PARTS}

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], version: int) -> MemoryConfig:
        """The config a ``session.json`` of layout ``version`` holds (read through
        :func:`~emserve.server.session.state.read_state`).

        * Layout 3: the tree, every field of every part; a field a part lacks was added after the session
          was saved and takes the value it ran with (:data:`ADDED_TO_TREE`).
        * Layouts 1 and 2: the flat settings. A setting the file lacks was added after the session was
          created and takes the value the session ran with (:data:`SAVED_BEFORE`), not today's default;
          the fields no flat name sets take their defaults, as they did then, but those whose default
          has changed since (:data:`FLAT_SEGMENTER`).

        Raises :class:`ConfigError` naming a field this code does not know (a damaged file, or one a
        newer emserve wrote), or one missing that those tables do not name."""
        if version >= 3:
            parts = {}
            for part in PARTS:
                values = dict(saved.get(part, {}))
                known = {f.name for f in dataclasses.fields(PARTS[part])}
                unknown = sorted(set(values) - known)
                if unknown:
                    raise ConfigError(f"unknown {part} setting(s) {', '.join(unknown)}")
                absent = {f: v for f, v in ADDED_TO_TREE.get(part, {}).items() if f not in values}
                missing = sorted(known - set(values) - set(absent))
                if missing:
                    raise ConfigError(f"{part} setting(s) {', '.join(missing)} missing")
                values.update(absent)
                if isinstance(values.get("refine_layers"), list):  # a tuple in the tree, a list in JSON
                    values["refine_layers"] = tuple(values["refine_layers"])
                parts[part] = PARTS[part](**values)
            unknown_parts = sorted(set(saved) - set(PARTS))
            if unknown_parts:
                raise ConfigError(f"unknown memory part(s) {', '.join(unknown_parts)}")
            return cls(**parts)
        missing = sorted(set(SETTINGS) - set(saved) - set(SAVED_BEFORE))
        if missing:
            raise ConfigError(f"memory setting(s) {', '.join(missing)} missing")
        cfg = cls.of(**{**SAVED_BEFORE, **saved})
        return dataclasses.replace(cfg, segmenter=dataclasses.replace(cfg.segmenter, **FLAT_SEGMENTER))


SAVED_BEFORE: dict[str, Any] = {
    "question_rank": "mean",
    "question_content_queries": False,
    "question_neighbours": 0,
    "question_contiguity": True,
    "question_n_init": None,
    "question_memory_last": False,
    "question_lexical": 0,
    "question_reach": 0,
    "question_copy": 0,
    "question_bridge": False,
    "question_parts": 0,
    "question_echo": 0,
    "question_lookahead": 0,
    "question_lookahead_support": 0.0,
    "table_dtype": "float32",
}
"""Values of the flat settings added after the first sessions were saved, as those sessions behave
(:meth:`MemoryConfig.from_saved`, layouts 1 and 2)."""

FLAT_SEGMENTER: dict[str, Any] = {"max_event_span": 512}
"""Segmenter fields no flat name sets whose session default changed after layouts 1 and 2, as those
sessions ran (:meth:`MemoryConfig.from_saved`): their pending events keep the span they were cut with."""

ADDED_TO_TREE: dict[str, dict[str, Any]] = {"retrieval": {"table_dtype": "float32"},
                                            "question": {"echo": 0, "lookahead": 0, "lookahead_support": 0.0}}
"""Per part, the values of the fields added after layout 3 (``session.json`` holding the tree) as the
sessions saved before them behave (:meth:`MemoryConfig.from_saved`). A field added to a part's class
needs its entry here, or the sessions saved before it do not open."""

"""A session's memory settings (``MemoryConfig``) and how a saved session's are read back.

The defaults are the product's (sized for SmolLM2-135M, 8k context) and each is defined once: a field
the libraries' configs (:class:`~emserve.segmenter.SegmenterConfig`,
:class:`~emserve.retrieval.planner.RetrievalConfig`) also have takes their default, and the fields only a
session has (the question's lexical rules, copy, contrast, query tokens) are defined here. The libraries'
configs are derived from one of these by :meth:`MemoryConfig.segmenter` and :meth:`MemoryConfig.retrieval`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from emserve.retrieval.errors import ConfigError
from emserve.retrieval.planner import RetrievalConfig
from emserve.segmenter import SegmenterConfig

_SEGMENTER = SegmenterConfig()
_RETRIEVAL = RetrievalConfig()

MAX_CONTRAST = 10.0
"""The largest ``MemoryConfig.question_contrast``."""


@dataclass(frozen=True)
class MemoryConfig:
    """Per-session memory knobs (EM-LLM names). Defaults are sized for SmolLM2-135M (8k context)."""

    n_init: int = _RETRIEVAL.n_init
    n_local: int = _RETRIEVAL.n_local
    n_mem: int = _RETRIEVAL.n_mem
    exc_block_size: int = _RETRIEVAL.exc_block_size
    min_block_size: int = _SEGMENTER.min_block_size
    max_block_size: int = _SEGMENTER.max_block_size
    surprisal_threshold_gamma: float = _SEGMENTER.surprisal_threshold_gamma
    """A boundary where a token's surprise exceeds mean + gamma x std of the recent window (EM-LLM's 1.0;
    why not the 3.0 the seam benchmark prefers: docs/decisions.md)."""
    similarity_metric: str = _SEGMENTER.similarity_metric
    splitter: str = _SEGMENTER.splitter
    repr_topk: int = _RETRIEVAL.repr_topk
    repr_proxy: str = _RETRIEVAL.repr_proxy
    use_contiguity_buffer: bool = _RETRIEVAL.use_contiguity_buffer
    contiguity_buffer_size: float = _RETRIEVAL.contiguity_buffer_size
    per_layer: bool = _RETRIEVAL.per_layer
    """False (default): one selection for all layers, scored on the first ``shared_score_layers`` of
    them; True: each layer selects its own events (EM-LLM)."""
    shared_score_layers: float = _RETRIEVAL.shared_score_layers
    center_queries: bool = _RETRIEVAL.center_queries
    standardize_queries: bool = _RETRIEVAL.standardize_queries
    question_query_tokens: int = 64
    """A question retrieves with the queries of its last this-many tokens, each scored on its own
    (centered, standardized; ``emserve.retrieval.queries``) and ranked by ``question_rank``; 0: its mean
    query summary."""
    question_rank: str = _RETRIEVAL.question_rank
    """``"interleave"``: each question token ranks the events by its own score and their lists are
    interleaved (``Retriever.retrieve``); ``"mean"``: by the tokens' mean score (sessions saved before
    this field keep it). Exact scoring costs every query token (``question_query_tokens``) per event."""
    question_content_queries: bool = False
    """A question ranks the events with the query tokens whose text holds a letter or a digit only
    (:func:`content_rows`): a newline or a question mark names nothing to look up."""
    question_lexical: int = 2
    """A question's best lexical matches (events holding the rare words it names, at least half the
    best match's score; :mod:`emserve.retrieval.lexical`), at most this many, go first in its ranking,
    each with its neighbours; 0: the attention scores alone rank."""
    question_bridge: bool = True
    """A question's first lexical match may name the thing its asked fact is stated about elsewhere
    ("Maria hid the treasure in the cobalt chest"; "The cobalt chest is locked with the code ..."): the
    passage joining a rare word of that match to a rare word the question asks for and the match lacks
    goes second in its ranking, with its neighbours (:func:`emserve.retrieval.bridge.bridge_hit`).
    Needs ``question_lexical``."""
    question_neighbours: int = _RETRIEVAL.question_neighbours
    """A question's hits bring this many temporal neighbours each side, before any lower-ranked event
    (``RetrievalConfig``): a value is often cut from the words that name it, and a hit read in its
    passage beats more hits read as fragments (docs/recall.md, rule 7)."""
    question_reach: int = _RETRIEVAL.question_reach
    """A question's hits also bring the neighbours that start or end within this many tokens of them
    (``RetrievalConfig``): ``question_neighbours`` events each side at least, more where they are short."""
    question_parts: int = _RETRIEVAL.question_parts
    """A question's hits' neighbours are read in parts of this many tokens, nearest the hit first, each only
    as far as ``question_reach`` (``RetrievalConfig``): a long event beside a hit gives its near text, not
    all of it, and does not keep the short events on the other side out (docs/recall.md, rule 13); 0:
    whole events, nearest first."""
    question_contiguity: bool = _RETRIEVAL.question_contiguity
    """A question also uses ingestion's contiguity buffer (``RetrievalConfig``); off: its neighbours
    come from ``question_neighbours`` and the whole budget follows the question's own ranking."""
    question_n_init: int | None = _RETRIEVAL.question_n_init
    """A question's sink tokens (``RetrievalConfig``; None: ``n_init``). 0: the question's window starts
    with its retrieved events; the stream's first tokens are not in it."""
    question_memory_last: bool = _RETRIEVAL.question_memory_last
    """A question's retrieved events go after the local window, right before the question (``RetrievalConfig``)."""
    question_contrast: float = 0.0
    """``alpha`` > 0: a greedy answer's first token is chosen by contrast with what the model answers to the
    question alone (:mod:`emserve.server.contrast`); 0 (default): plain greedy. Off: it turned the demo's
    " the pass key." into the key but picked words over the value on the recall suite (docs/recall.md,
    "Tried and not kept"). Costs two one-token engine requests before the answer."""
    question_copy: int = 3
    """A greedy answer starts with the word that followed the question's last words where its window says
    them verbatim (:func:`emserve.retrieval.lexical.continuation`: the longest such run, at least this
    many tokens), token by token as long as the model gives each at least
    :data:`~emserve.server.session.question.COPY_PLAUSIBLE`; the answer goes on greedily after it. A
    question that restates a fact's lead-in ("The pass key is") then answers with the fact, not with a
    continuation the model prefers (" the pass key."), and copies its digits as written. 0: off. Costs one
    engine request (the question and the word) when a run is found."""
    question_n_local: int | None = _RETRIEVAL.question_n_local
    question_n_mem: int | None = _RETRIEVAL.question_n_mem
    """A question's window: sink + ``question_n_mem`` retrieved tokens + the last ``question_n_local``
    tokens (``RetrievalConfig``; None: the ingestion window's ``n_local`` / ``n_mem``, EM-LLM). Events
    close as soon as their boundaries are final (``SegmenterConfig.close_lag``), so the recent ones are
    retrievable by a question too; the tokens after the last closed event are in the window."""

    def __post_init__(self) -> None:
        if self.question_copy < 0:
            raise ConfigError(f"question_copy must be >= 0 (0: off), got {self.question_copy}")
        if not 0 <= self.question_contrast <= MAX_CONTRAST:  # NaN fails too
            raise ConfigError(f"question_contrast must be in [0, {MAX_CONTRAST:g}], got {self.question_contrast}")

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> MemoryConfig:
        """The config a ``session.json`` describes (its ``"config"`` object; read through
        :func:`~emserve.server.session.state.read_state`). A field the file lacks was added after the
        session was created and takes the value the session ran with (:data:`SAVED_BEFORE`), not today's
        default; a field the file lacks that :data:`SAVED_BEFORE` does not name, or one this code does not
        know, raises :class:`ConfigError` naming it (the file is damaged, or written by a newer emserve)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - fields)
        if unknown:
            raise ConfigError(f"unknown memory setting(s) {', '.join(unknown)}")
        missing = sorted(fields - set(saved) - set(SAVED_BEFORE))
        if missing:
            raise ConfigError(f"memory setting(s) {', '.join(missing)} missing")
        return cls(**{**SAVED_BEFORE, **saved})

    def segmenter(self) -> SegmenterConfig:
        return SegmenterConfig(
            n_init=self.n_init,
            n_local=self.n_local,
            # events enter the table (and the index) as soon as their boundaries are final, so that a
            # question with a short local window can retrieve the recent ones; ingestion steps still
            # retrieve only events that have left their local window (the planner): same plans.
            close_lag=self.min_block_size,
            surprisal_threshold_gamma=self.surprisal_threshold_gamma,
            min_block_size=self.min_block_size,
            max_block_size=self.max_block_size,
            splitter=self.splitter,  # type: ignore[arg-type]
            similarity_metric=self.similarity_metric,  # type: ignore[arg-type]
        )

    def retrieval(self, max_window: int) -> RetrievalConfig:
        return RetrievalConfig(
            n_init=self.n_init,
            n_local=self.n_local,
            n_mem=self.n_mem,
            exc_block_size=self.exc_block_size,
            repr_topk=self.repr_topk,
            repr_proxy=self.repr_proxy,  # type: ignore[arg-type]
            use_contiguity_buffer=self.use_contiguity_buffer,
            contiguity_buffer_size=self.contiguity_buffer_size,
            per_layer=self.per_layer,
            shared_score_layers=self.shared_score_layers,
            center_queries=self.center_queries,
            standardize_queries=self.standardize_queries,
            question_n_local=self.question_n_local,
            question_n_mem=self.question_n_mem,
            question_rank=self.question_rank,  # type: ignore[arg-type]
            question_neighbours=self.question_neighbours,
            question_reach=self.question_reach,
            question_parts=self.question_parts,
            question_contiguity=self.question_contiguity,
            question_memory_last=self.question_memory_last,
            question_n_init=self.question_n_init,
            max_window=max_window,
        )


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
}
"""Values of the fields added after the first sessions were saved, as those sessions behave
(:meth:`MemoryConfig.from_saved`)."""

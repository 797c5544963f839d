"""A session's retrieval and window settings (:class:`RetrievalConfig`), the one place they are defined.

Rules:

* Every default here is the product's; EM-LLM's value is named in the field's docstring where it differs.
* The retrieval code takes this object (the :class:`~emserve.retrieval.retriever.Retriever`, the
  :class:`~emserve.retrieval.planner.WindowPlanner`, :class:`~emserve.retrieval.memory.EpisodicMemory`),
  not its fields one by one. A session's ``MemoryConfig`` holds one as its ``retrieval`` part.
* Construction validates every field and names the first broken rule (:class:`ConfigError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from emserve.retrieval.errors import ConfigError
from emserve.retrieval.index import IndexParams
from emserve.retrieval.representatives import REPR_PROXIES, ReprProxy

Rank = Literal["mean", "interleave"]
"""How a question's query tokens rank the events: their mean score, or each token by its own, interleaved."""
RANKS: tuple[Rank, ...] = ("mean", "interleave")
InterleaveStats = Literal["scored", "sample"]
"""Where :func:`~emserve.retrieval.retriever.interleave` takes each query token's score statistics."""
INTERLEAVE_STATS: tuple[InterleaveStats, ...] = ("scored", "sample")
TableDtype = Literal["auto", "float32", "int8"]
"""How the event table stores representatives (``events``); ``"auto"`` resolves per selection
(:attr:`RetrievalConfig.table_storage`)."""
TABLE_DTYPES: tuple[TableDtype, ...] = ("auto", "float32", "int8")


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    """Retrieval and window settings of a session (EM-LLM's names where they mean the same).

    The defaults are the product's, sized for SmolLM2-135M (8k context), and the only ones: a session's
    ``MemoryConfig`` holds one of these as its ``retrieval`` part. Where EM-LLM's value differs, the field says it."""

    n_init: int = 128
    """Sink tokens: the first ``n_init`` tokens of the stream, in every window."""
    n_local: int = 1024
    """Local window: the ``n_local`` tokens just before the new tokens (the last one is the anchor;
    EM-LLM: 4096)."""
    n_mem: int = 1024
    """Memory budget: retrieved event tokens per layer per step (never exceeded; EM-LLM: 2048)."""
    exc_block_size: int = 512
    """Tokens computed per step (the chunk size of ingestion and of re-planning while generating)."""
    question_n_local: int | None = 64
    """A question's local window (``plan_step(question=True)``): its last ``question_n_local`` tokens;
    the events that end before it are retrievable, the tokens between the last of them and it are
    the remainder. None: the same as ingestion (EM-LLM). See the module docstring."""
    question_n_mem: int | None = 160
    """A question's memory budget (at most ``n_mem``: a question's window is never larger than a
    step's); None: ``n_mem`` (EM-LLM)."""
    question_rank: Rank = "interleave"
    """How a question's query tokens rank the events (``Retriever.retrieve``): their mean score, or
    each token by its own scores, interleaved. Ingestion steps rank by the mean."""
    interleave_stats: InterleaveStats = "sample"
    """How an interleaved ranking orders the query tokens within a round, by how far each token's best
    event stands out of its scores (``(max - mean) / std``): the mean and spread over the query sample's
    events (``"sample"``, ``query_sample``: the same events on every path, so an approximate search ranks
    its candidates as the exact one would), or over the events scored (``"scored"``:
    every event on the exact path, the graph's candidates otherwise, so the order moves with them)."""
    question_neighbours: int = 6
    """A question's similarity hits bring their temporal neighbours, this many events each side,
    before any lower-ranked event (``Retriever.retrieve``; 0: none, EM-LLM)."""
    question_reach: int = 96
    """...and, beyond those, the neighbours that start or end within this many tokens of the hit
    (``Retriever.retrieve``; 0: ``question_neighbours`` alone)."""
    question_parts: int = 16
    """With ``question_reach``: a hit's neighbours are read in parts of this many tokens, nearest the
    hit first, each only as far as the reach (``Retriever.retrieve``); 0: whole events, nearest first."""
    question_contiguity: bool = False
    """A question uses the contiguity buffer (EM-LLM); False: its share goes to the rank walk, and the
    buffer is left as ingestion left it."""
    question_n_init: int | None = 0
    """A question's sink: the first ``question_n_init`` tokens of the stream (at most ``n_init``; the
    tokens between it and ``n_init`` are then out of the question's window). None: ``n_init`` (EM-LLM)."""
    question_memory_last: bool = False
    """A question's window puts the retrieved events after the local window, before the stream's last
    token (the anchor) and the question: ``[ sink | remainder + local | retrieved events | last token ] +
    question`` (a question's first tokens may need their surprise: ``question_copy``). False: the
    ingestion order (retrieved events before the remainder)."""
    repr_topk: int = 4
    """Keys per event: kept as separate vectors (``"topk"``) or averaged (EM-LLM, attention top-k)."""
    repr_proxy: ReprProxy = "tokens"
    """Representative when attention scores are not available (see ``representatives``). ``"tokens"``
    (the default) keeps the same tokens in every layer, and a shared selection then scores the best token
    across the scoring layers (token-level MaxSim; on the CPU one graph over token vectors serves it);
    ``"topk"`` keeps each layer's own largest-norm keys, scored per layer and summed (one graph per
    scoring layer). A session keeps the proxy it was created with."""
    table_dtype: TableDtype = "auto"
    """How the event table stores representatives: ``"int8"`` rounds each vector's kv heads to int8 with a
    scale each (0.27x the table's bytes; ``events``, int8 tables), read back as float32. Only a token-level
    selection (``token_level``: it reads the table in blocks) may use it. ``"auto"`` (the default): int8
    for a token-level selection, float32 otherwise (:attr:`table_storage`; kept as ``"auto"`` so that
    changing the proxy changes the storage with it). A session keeps its table's."""
    use_contiguity_buffer: bool = True
    """Add temporal neighbours of similarity hits through a per-layer FIFO buffer."""
    contiguity_buffer_size: float = 0.3
    """Share of the budget for the contiguity buffer (``< 1``: fraction; ``>= 1``: tokens)."""
    per_layer: bool = False
    """Retrieve per layer (EM-LLM); False: one list for all layers, scored by the sum over the
    scoring layers (``shared_score_layers``)."""
    shared_score_layers: float = 2 / 3
    """A shared selection sums the scores of the first ``round(f * num_layers)`` layers (``queries``)."""
    shared_rescore_factor: float = 0.0
    """Bounded rescoring of a shared selection's HNSW candidates (``retriever``): only the best by an
    upper bound, covering this many times the budget (+ contiguity share), are scored exactly; 0 (the
    default): every candidate of the union is. Faster at scale, lower recall vs exact (measured in
    ``bench/eval/retrieval_index.py``)."""
    shared_search_vectors: int = 128
    """HNSW vectors per (layer, query vector) list of the bounded rescoring."""
    center_queries: bool = True
    """Score with queries minus the stream's mean query (``queries``: the needle is found without it
    in a fraction of the layers only)."""
    standardize_queries: bool = True
    """Scale each query vector (per layer) to unit score spread over a sample of the events."""
    query_sample: int = 256
    """Events sampled (evenly spaced) to estimate that spread."""
    max_window: int | None = None
    """The model's native context: every window position stays below it. None: not known yet (a session
    sets its engine's); a planner needs it."""
    hnsw_m: int = 16
    """HNSW graph degree (hnswlib ``M``)."""
    hnsw_ef_construction: int = 200
    """HNSW build beam width."""
    hnsw_ef: int = 64
    """HNSW query beam width."""
    exact_search_threshold: int = 16384
    """Below this many events (about 180k tokens of SmolLM2 at ~11 tokens per event), search is
    exact; the HNSW indexes are built from half of it on (``index``: lazy build, and why)."""
    index_save_min_events: int = 256
    """Auto-save the indexes after at least this many new events ..."""
    index_save_fraction: float = 0.25
    """... that are also at least this fraction of the saved ones."""
    index_threads: int = 0
    """hnswlib threads for adds (0: one per CPU core, at most 4)."""

    def __post_init__(self) -> None:
        for name, least in (("n_init", 0), ("n_local", 1), ("n_mem", 0), ("exc_block_size", 1),
                            ("question_n_local", 1), ("question_n_mem", 0)):
            value = getattr(self, name)
            if value is not None and value < least:  # the one broken rule, not the list of all of them
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        if self.repr_topk < 1:
            raise ConfigError(f"repr_topk must be >= 1, got {self.repr_topk}")
        if self.repr_proxy not in REPR_PROXIES:
            raise ConfigError(f"repr_proxy must be one of {REPR_PROXIES}, got {self.repr_proxy!r}")
        if self.table_dtype not in TABLE_DTYPES:
            raise ConfigError(f"table_dtype must be one of {TABLE_DTYPES}, got {self.table_dtype!r}")
        if self.table_dtype == "int8" and not self.token_level:
            raise ConfigError("table_dtype 'int8' needs the token-level selection (repr_proxy 'tokens', "
                              "repr_topk > 1, per_layer off)")
        if not (self.shared_rescore_factor >= 0 and self.shared_search_vectors >= 1):
            raise ConfigError("need shared_rescore_factor >= 0 and shared_search_vectors >= 1")
        if not 0 < self.shared_score_layers <= 1:
            raise ConfigError(f"shared_score_layers must be in (0, 1], got {self.shared_score_layers}")
        if self.query_sample < 2:
            raise ConfigError(f"query_sample must be >= 2, got {self.query_sample}")
        if self.question_n_init is not None and self.question_n_init < 0:
            raise ConfigError(f"question_n_init must be >= 0 (or None), got {self.question_n_init}")
        if self.question_neighbours < 0:
            raise ConfigError(f"question_neighbours must be >= 0, got {self.question_neighbours}")
        if self.question_reach < 0:
            raise ConfigError(f"question_reach must be >= 0, got {self.question_reach}")
        if self.question_parts < 0:
            raise ConfigError(f"question_parts must be >= 0 (0: whole events), got {self.question_parts}")
        if self.question_rank not in RANKS:
            raise ConfigError(f"question_rank must be one of {RANKS}, got {self.question_rank!r}")
        if self.interleave_stats not in INTERLEAVE_STATS:
            raise ConfigError(f"interleave_stats must be one of {INTERLEAVE_STATS}, got {self.interleave_stats!r}")
        if not self.contiguity_buffer_size >= 0:
            raise ConfigError(f"contiguity_buffer_size must be >= 0, got {self.contiguity_buffer_size}")
        need = self.n_init + self.n_mem + self.n_local + self.exc_block_size + 1
        if self.max_window is not None and need > self.max_window:
            raise ConfigError(
                f"n_init + n_mem + n_local + exc_block_size + 1 = {need} exceeds max_window {self.max_window}"
            )
        self.index_params()  # validates the index fields

    @property
    def table_storage(self) -> Literal["float32", "int8"]:
        """The dtype a new event table stores: ``table_dtype``, with ``"auto"`` resolved (int8 for a
        token-level selection, float32 for the per-layer scores, which read rows one by one)."""
        if self.table_dtype == "auto":
            return "int8" if self.token_level else "float32"
        return self.table_dtype

    @property
    def token_level(self) -> bool:
        """A shared selection scores by the token-level MaxSim (``queries``, 4.): ``"tokens"``
        representatives, more than one per event."""
        return self.repr_proxy == "tokens" and self.repr_topk > 1 and not self.per_layer

    def score_layers(self, num_layers: int) -> range:
        """The layers a shared selection is scored on."""
        return range(max(1, round(self.shared_score_layers * num_layers)))

    def indexed_layers(self, num_layers: int) -> range:
        """The layers that get an HNSW index: all for per-layer selection, else the scoring layers
        (the only ones a shared selection searches)."""
        return range(num_layers) if self.per_layer else self.score_layers(num_layers)

    def index_params(self) -> IndexParams:
        return IndexParams(
            m=self.hnsw_m,
            ef_construction=self.hnsw_ef_construction,
            ef=self.hnsw_ef,
            exact_threshold=self.exact_search_threshold,
            save_min_events=self.index_save_min_events,
            save_fraction=self.index_save_fraction,
            num_threads=self.index_threads,
        )

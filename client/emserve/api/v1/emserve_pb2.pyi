import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    STOP: _ClassVar[FinishReason]
    LENGTH: _ClassVar[FinishReason]

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SIMILARITY: _ClassVar[Source]
    CONTIGUITY: _ClassVar[Source]
    LEXICAL: _ClassVar[Source]
FINISH_REASON_UNSPECIFIED: FinishReason
STOP: FinishReason
LENGTH: FinishReason
SOURCE_UNSPECIFIED: Source
SIMILARITY: Source
CONTIGUITY: Source
LEXICAL: Source

class MemoryConfig(_message.Message):
    __slots__ = ("n_init", "n_local", "n_mem", "exc_block_size", "min_block_size", "max_block_size", "surprisal_threshold_gamma", "similarity_metric", "splitter", "repr_topk", "use_contiguity_buffer", "contiguity_buffer_size", "per_layer", "question_n_local", "question_n_mem", "question_query_tokens", "question_rank", "question_n_init", "question_neighbours", "question_contiguity", "question_lexical", "question_reach", "question_contrast", "question_copy", "question_bridge", "question_parts", "question_echo", "question_lookahead", "question_lookahead_support")
    N_INIT_FIELD_NUMBER: _ClassVar[int]
    N_LOCAL_FIELD_NUMBER: _ClassVar[int]
    N_MEM_FIELD_NUMBER: _ClassVar[int]
    EXC_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SURPRISAL_THRESHOLD_GAMMA_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_METRIC_FIELD_NUMBER: _ClassVar[int]
    SPLITTER_FIELD_NUMBER: _ClassVar[int]
    REPR_TOPK_FIELD_NUMBER: _ClassVar[int]
    USE_CONTIGUITY_BUFFER_FIELD_NUMBER: _ClassVar[int]
    CONTIGUITY_BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    QUESTION_N_LOCAL_FIELD_NUMBER: _ClassVar[int]
    QUESTION_N_MEM_FIELD_NUMBER: _ClassVar[int]
    QUESTION_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_RANK_FIELD_NUMBER: _ClassVar[int]
    QUESTION_N_INIT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_CONTIGUITY_FIELD_NUMBER: _ClassVar[int]
    QUESTION_LEXICAL_FIELD_NUMBER: _ClassVar[int]
    QUESTION_REACH_FIELD_NUMBER: _ClassVar[int]
    QUESTION_CONTRAST_FIELD_NUMBER: _ClassVar[int]
    QUESTION_COPY_FIELD_NUMBER: _ClassVar[int]
    QUESTION_BRIDGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_PARTS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ECHO_FIELD_NUMBER: _ClassVar[int]
    QUESTION_LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    QUESTION_LOOKAHEAD_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    n_init: int
    n_local: int
    n_mem: int
    exc_block_size: int
    min_block_size: int
    max_block_size: int
    surprisal_threshold_gamma: float
    similarity_metric: str
    splitter: str
    repr_topk: int
    use_contiguity_buffer: bool
    contiguity_buffer_size: float
    per_layer: bool
    question_n_local: int
    question_n_mem: int
    question_query_tokens: int
    question_rank: str
    question_n_init: int
    question_neighbours: int
    question_contiguity: bool
    question_lexical: int
    question_reach: int
    question_contrast: float
    question_copy: int
    question_bridge: bool
    question_parts: int
    question_echo: int
    question_lookahead: int
    question_lookahead_support: float
    def __init__(self, n_init: _Optional[int] = ..., n_local: _Optional[int] = ..., n_mem: _Optional[int] = ..., exc_block_size: _Optional[int] = ..., min_block_size: _Optional[int] = ..., max_block_size: _Optional[int] = ..., surprisal_threshold_gamma: _Optional[float] = ..., similarity_metric: _Optional[str] = ..., splitter: _Optional[str] = ..., repr_topk: _Optional[int] = ..., use_contiguity_buffer: _Optional[bool] = ..., contiguity_buffer_size: _Optional[float] = ..., per_layer: _Optional[bool] = ..., question_n_local: _Optional[int] = ..., question_n_mem: _Optional[int] = ..., question_query_tokens: _Optional[int] = ..., question_rank: _Optional[str] = ..., question_n_init: _Optional[int] = ..., question_neighbours: _Optional[int] = ..., question_contiguity: _Optional[bool] = ..., question_lexical: _Optional[int] = ..., question_reach: _Optional[int] = ..., question_contrast: _Optional[float] = ..., question_copy: _Optional[int] = ..., question_bridge: _Optional[bool] = ..., question_parts: _Optional[int] = ..., question_echo: _Optional[int] = ..., question_lookahead: _Optional[int] = ..., question_lookahead_support: _Optional[float] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "model", "model_path", "max_model_len", "vocab_size", "num_layers", "backend", "ready", "default_memory", "max_sessions", "max_message_bytes", "max_inflight_messages", "max_session_tokens", "eos_token_ids", "max_session_disk_bytes", "max_disk_bytes", "max_message_tokens")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MEMORY_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    model_path: str
    max_model_len: int
    vocab_size: int
    num_layers: int
    backend: str
    ready: bool
    default_memory: MemoryConfig
    max_sessions: int
    max_message_bytes: int
    max_inflight_messages: int
    max_session_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_session_disk_bytes: int
    max_disk_bytes: int
    max_message_tokens: int
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., model_path: _Optional[str] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., backend: _Optional[str] = ..., ready: _Optional[bool] = ..., default_memory: _Optional[_Union[MemoryConfig, _Mapping]] = ..., max_sessions: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_inflight_messages: _Optional[int] = ..., max_session_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_session_disk_bytes: _Optional[int] = ..., max_disk_bytes: _Optional[int] = ..., max_message_tokens: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "memory", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    memory: MemoryConfig
    labels: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., memory: _Optional[_Union[MemoryConfig, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "create_time", "state", "num_tokens", "num_events", "event_tokens", "memory", "disk_bytes", "writer_attached", "labels", "surprise")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Session.State]
        ACTIVE: _ClassVar[Session.State]
        FINISHED: _ClassVar[Session.State]
    STATE_UNSPECIFIED: Session.State
    ACTIVE: Session.State
    FINISHED: Session.State
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITER_ATTACHED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SURPRISE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    create_time: _timestamp_pb2.Timestamp
    state: Session.State
    num_tokens: int
    num_events: int
    event_tokens: int
    memory: MemoryConfig
    disk_bytes: int
    writer_attached: bool
    labels: _containers.ScalarMap[str, str]
    surprise: SurpriseStats
    def __init__(self, session_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[Session.State, str]] = ..., num_tokens: _Optional[int] = ..., num_events: _Optional[int] = ..., event_tokens: _Optional[int] = ..., memory: _Optional[_Union[MemoryConfig, _Mapping]] = ..., disk_bytes: _Optional[int] = ..., writer_attached: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., surprise: _Optional[_Union[SurpriseStats, _Mapping]] = ...) -> None: ...

class SurpriseStats(_message.Message):
    __slots__ = ("mean", "std", "min", "max")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    min: float
    max: float
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("session_id", "offset", "text", "tokens", "flush", "finish")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    offset: int
    text: str
    tokens: TokenIds
    flush: bool
    finish: bool
    def __init__(self, session_id: _Optional[str] = ..., offset: _Optional[int] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., flush: _Optional[bool] = ..., finish: _Optional[bool] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("ready", "ack")
    READY_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ready: IngestReady
    ack: IngestAck
    def __init__(self, ready: _Optional[_Union[IngestReady, _Mapping]] = ..., ack: _Optional[_Union[IngestAck, _Mapping]] = ...) -> None: ...

class IngestReady(_message.Message):
    __slots__ = ("committed_offset", "chunk_tokens", "max_inflight_messages", "max_message_bytes", "max_message_tokens")
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    committed_offset: int
    chunk_tokens: int
    max_inflight_messages: int
    max_message_bytes: int
    max_message_tokens: int
    def __init__(self, committed_offset: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., max_inflight_messages: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_message_tokens: _Optional[int] = ...) -> None: ...

class IngestAck(_message.Message):
    __slots__ = ("committed_offset", "received_offset", "receipt", "num_events", "finished")
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    NUM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    committed_offset: int
    received_offset: int
    receipt: MessageReceipt
    num_events: int
    finished: bool
    def __init__(self, committed_offset: _Optional[int] = ..., received_offset: _Optional[int] = ..., receipt: _Optional[_Union[MessageReceipt, _Mapping]] = ..., num_events: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class MessageReceipt(_message.Message):
    __slots__ = ("index", "start", "end", "skipped")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    index: int
    start: int
    end: int
    skipped: int
    def __init__(self, index: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "prompt_tokens", "sampling", "chat_template", "include_trace", "remember", "request_id", "preview_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TRACE_FIELD_NUMBER: _ClassVar[int]
    REMEMBER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: str
    prompt_tokens: TokenIds
    sampling: SamplingParams
    chat_template: bool
    include_trace: bool
    remember: bool
    request_id: str
    preview_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., chat_template: _Optional[bool] = ..., include_trace: _Optional[bool] = ..., remember: _Optional[bool] = ..., request_id: _Optional[str] = ..., preview_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "complete")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    chunk: GenerateChunk
    complete: GenerateComplete
    def __init__(self, chunk: _Optional[_Union[GenerateChunk, _Mapping]] = ..., complete: _Optional[_Union[GenerateComplete, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateComplete(_message.Message):
    __slots__ = ("finish_reason", "stop_string", "token_ids", "text", "usage", "timings", "trace", "committed_offset")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    stop_string: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    usage: Usage
    timings: Timings
    trace: RetrievalTrace
    committed_offset: int
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_string: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., trace: _Optional[_Union[RetrievalTrace, _Mapping]] = ..., committed_offset: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "memory_tokens", "window_tokens", "retrieved_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    memory_tokens: int
    window_tokens: int
    retrieved_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., memory_tokens: _Optional[int] = ..., window_tokens: _Optional[int] = ..., retrieved_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("wait_s", "retrieval_s", "first_token_s", "total_s", "tokens_per_s", "probe_s")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PROBE_S_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    retrieval_s: float
    first_token_s: float
    total_s: float
    tokens_per_s: float
    probe_s: float
    def __init__(self, wait_s: _Optional[float] = ..., retrieval_s: _Optional[float] = ..., first_token_s: _Optional[float] = ..., total_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., probe_s: _Optional[float] = ...) -> None: ...

class RetrievalTrace(_message.Message):
    __slots__ = ("budget", "num_events", "memory_tokens", "shared", "exact", "events", "layers", "window")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    NUM_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    budget: int
    num_events: int
    memory_tokens: int
    shared: bool
    exact: bool
    events: _containers.RepeatedCompositeFieldContainer[TracedEvent]
    layers: _containers.RepeatedCompositeFieldContainer[LayerSelection]
    window: _containers.RepeatedCompositeFieldContainer[TokenRange]
    def __init__(self, budget: _Optional[int] = ..., num_events: _Optional[int] = ..., memory_tokens: _Optional[int] = ..., shared: _Optional[bool] = ..., exact: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[TracedEvent, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerSelection, _Mapping]]] = ..., window: _Optional[_Iterable[_Union[TokenRange, _Mapping]]] = ...) -> None: ...

class TokenRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class TracedEvent(_message.Message):
    __slots__ = ("id", "start", "end", "preview", "layers", "similarity_layers", "contiguity_layers", "max_score", "mean_score", "lexical_layers")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CONTIGUITY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: int
    end: int
    preview: str
    layers: int
    similarity_layers: int
    contiguity_layers: int
    max_score: float
    mean_score: float
    lexical_layers: int
    def __init__(self, id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., preview: _Optional[str] = ..., layers: _Optional[int] = ..., similarity_layers: _Optional[int] = ..., contiguity_layers: _Optional[int] = ..., max_score: _Optional[float] = ..., mean_score: _Optional[float] = ..., lexical_layers: _Optional[int] = ...) -> None: ...

class LayerSelection(_message.Message):
    __slots__ = ("layer", "events")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    events: _containers.RepeatedCompositeFieldContainer[SelectedEvent]
    def __init__(self, layer: _Optional[int] = ..., events: _Optional[_Iterable[_Union[SelectedEvent, _Mapping]]] = ...) -> None: ...

class SelectedEvent(_message.Message):
    __slots__ = ("id", "start", "end", "score", "source", "truncated")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: int
    end: int
    score: float
    source: Source
    truncated: bool
    def __init__(self, id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., score: _Optional[float] = ..., source: _Optional[_Union[Source, str]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("session_id", "page_size", "page_token", "include_preview", "preview_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    page_size: int
    page_token: str
    include_preview: bool
    preview_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_preview: _Optional[bool] = ..., preview_tokens: _Optional[int] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token", "total_events", "num_tokens")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EVENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_page_token: str
    total_events: int
    num_tokens: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_events: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "start", "end", "size", "boundary_surprise", "mean_surprise", "max_surprise", "preview")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_SURPRISE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SURPRISE_FIELD_NUMBER: _ClassVar[int]
    MAX_SURPRISE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: int
    end: int
    size: int
    boundary_surprise: float
    mean_surprise: float
    max_surprise: float
    preview: str
    def __init__(self, id: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., size: _Optional[int] = ..., boundary_surprise: _Optional[float] = ..., mean_surprise: _Optional[float] = ..., max_surprise: _Optional[float] = ..., preview: _Optional[str] = ...) -> None: ...

class GetSurpriseRequest(_message.Message):
    __slots__ = ("session_id", "start", "end", "stride")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    end: int
    stride: int
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class SurpriseCurve(_message.Message):
    __slots__ = ("start", "end", "stride", "surprise", "max_surprise", "boundaries")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    SURPRISE_FIELD_NUMBER: _ClassVar[int]
    MAX_SURPRISE_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    stride: int
    surprise: _containers.RepeatedScalarFieldContainer[float]
    max_surprise: _containers.RepeatedScalarFieldContainer[float]
    boundaries: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., stride: _Optional[int] = ..., surprise: _Optional[_Iterable[float]] = ..., max_surprise: _Optional[_Iterable[float]] = ..., boundaries: _Optional[_Iterable[int]] = ...) -> None: ...

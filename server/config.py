"""Server configuration: one frozen dataclass, built from defaults < ``EMSERVE_*`` environment < flags.

Environment variables (all optional)::

    EMSERVE_HOME                 models, texts and (by default) sessions; default ~/.cache/emserve
    EMSERVE_MODEL_SOURCES        where an embedded model's fetched GGUF is looked for first and fetched to
    EMSERVE_HOST, EMSERVE_PORT   listen address (default 127.0.0.1:50051)
    EMSERVE_SESSIONS_DIR         default $EMSERVE_HOME/sessions
    EMSERVE_MODEL                smollm2-135m (default), qwen2.5-0.5b, or an HF folder
    EMSERVE_BACKEND              vllm (default) | reference
    EMSERVE_DTYPE                compute dtype (default auto: bfloat16 where native, else float32)
    EMSERVE_KV_CACHE_GIB         vLLM KV cache (default 2)
    EMSERVE_MAX_MODEL_LEN        default: the model's context
    EMSERVE_MAX_SESSIONS         default 256
    EMSERVE_MAX_OPEN_SESSIONS    sessions kept open in memory (LRU), default 32
    EMSERVE_MAX_MESSAGE_BYTES    largest gRPC message, default 4 MiB
    EMSERVE_MAX_MESSAGE_TOKENS   most tokens of one Ingest message, default 65536; 0: no limit
    EMSERVE_MAX_INFLIGHT         ingest messages a client may send ahead of their receipts, default 8
    EMSERVE_MAX_SESSION_TOKENS   0 (default): unlimited
    EMSERVE_DETERMINISTIC        1: one session step at a time in the engine (results independent of traffic)
    EMSERVE_MAX_SESSION_DISK_GIB disk quota of one session, GiB; 0 (default): none
    EMSERVE_MAX_DISK_GIB         disk quota of all sessions together, GiB; 0 (default): none
    EMSERVE_AUTH_TOKEN           when set, calls need ``authorization: Bearer <token>``
    EMSERVE_GRACE_S              graceful-shutdown grace period, default 30
    EMSERVE_METRICS_PORT         Prometheus /metrics port (default: none, no metrics); 0: any free port
    EMSERVE_LOG_FORMAT           text (default) | json (``emserve.server.logs``)
    EMSERVE_LOG_LEVEL            WARNING (default) | INFO (a line per call) | DEBUG (a line per step)
    EMSERVE_HOST_BLAS_THREADS    BLAS threads of the server process's own numpy work, default 1; 0: the library's
    EMSERVE_MEMORY_<NAME>        a memory setting's default (its flat name), e.g. EMSERVE_MEMORY_N_LOCAL=2048
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emserve.retrieval.errors import ConfigError
from emserve.server.engine.config import EngineConfig
from emserve.server.session import SETTINGS, MemoryConfig

ENV_PREFIX = "EMSERVE_"
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process needs. Validated on construction."""

    engine: EngineConfig
    """The engine. ``engine.model`` may be a model spec (``smollm2-135m``); it is resolved to a
    folder when the server starts (``emserve.server.provision.models.resolve_model``)."""

    sessions_dir: Path
    """One subdirectory per session (a session is its directory)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    """0: any free port (tests); the bound port is returned by ``create_server``."""

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Default memory settings of new sessions (a CreateSession may override each field)."""

    retrieval_device: str = "auto"
    """Where a session's retrieval scores its events (shared selection): ``auto`` (a GPU when torch sees
    one, else the CPU), ``cpu`` (exact, then HNSW graphs past ``exact_search_threshold`` events) or a
    torch device (``cuda``, ``cuda:1``). On a GPU every event is scored exactly at every step and no HNSW
    graph is kept (``emserve.retrieval.device_scorer``); the scoring layers' representatives take
    ~2.8 KB of GPU memory per token of session (float16), beside vLLM's ``gpu_memory_utilization``."""

    retrieval_device_gib: float = 0.0
    """Device memory the open sessions' retrieval mirrors may hold together, GiB (0: no limit): beyond it
    idle sessions are closed, least recently used first (reopening one recomputes its mirror from its
    KV log). Size it from what vLLM leaves (``1 - gpu_memory_utilization`` of the GPU, less the CUDA
    context). With or without it, a step or an open that runs out of device memory closes the idle
    sessions' mirrors (an open is then retried; a step answers RESOURCE_EXHAUSTED and its session
    reopens from disk on the next call)."""

    max_sessions: int = 256
    """Sessions on disk; CreateSession beyond it fails with RESOURCE_EXHAUSTED."""

    max_open_sessions: int = 32
    """Sessions kept open (file handles, indexes in RAM); idle ones beyond it are closed (LRU)."""

    max_message_bytes: int = 4 << 20
    """Largest gRPC message either way (bigger ones: RESOURCE_EXHAUSTED)."""

    max_inflight_messages: int = 8
    """Ingest flow control: messages a client may send ahead of their receipts (advertised)."""

    max_message_tokens: int = 65536
    """Most tokens of one Ingest message, its text tokenized (0: no limit): beyond it RESOURCE_EXHAUSTED
    (QuotaFailure ``message_tokens``), so that the work one message asks for is bounded. The Python client
    sends 8192-character or 2048-token pieces."""

    max_session_tokens: int = 0
    """Longest session in tokens; 0: unlimited. Ingest beyond it: RESOURCE_EXHAUSTED."""

    max_session_disk_gib: float = 0.0
    """Disk quota of one session, GiB (0: none): a step that would take the session past it is refused
    with RESOURCE_EXHAUSTED (QuotaFailure ``session_disk``) before it writes (:mod:`emserve.server.quota`)."""

    max_disk_gib: float = 0.0
    """Disk quota of all sessions together, GiB (0: none; QuotaFailure ``disk``). Set it below the volume's
    size so that the quota, not a full disk, stops ingestion."""

    auth_token: str | None = None
    """When set, every call but health and reflection needs ``authorization: Bearer <token>``."""

    tenants_file: str | None = None
    """JSON ``{"tenant": "token", ...}``: each token's calls see only its tenant's sessions
    (:mod:`emserve.server.tenants`); ``auth_token``, if set too, is the unnamed tenant's."""

    tls_cert: str | None = None
    """PEM certificate chain of the gRPC port (with ``tls_key``): the port then speaks TLS only."""

    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""

    tls_client_ca: str | None = None
    """PEM CA certificates: with it, clients must present a certificate one of them signed (mutual TLS)."""

    health_port: int | None = None
    """A plaintext port serving grpc.health.v1 alone, for probes that cannot speak (mutual) TLS; None:
    none; 0: any free port (tests)."""

    openai_port: int | None = None
    """Serve the OpenAI-compatible HTTP endpoint (``emserve.server.rpc.openai_api``) on this port, on the
    same address; None: none; 0: any free port (tests)."""

    metrics_port: int | None = None
    """Serve Prometheus metrics on ``http://host:metrics_port/metrics`` (``emserve.server.metrics``;
    vLLM's engine statistics on too). None: no metrics endpoint; 0: any free port (tests)."""

    host_blas_threads: int = 1
    """BLAS threads of the server process's own numpy work (retrieval's matrix products; the engine's
    processes keep theirs): set once at start (:mod:`emserve.server.threads`); 0 leaves the library's
    default (a thread per core)."""

    grace_s: float = 30.0
    """On SIGTERM: stop accepting calls, let in-flight ones finish for this long, then cancel them
    (committing steps always finish), checkpoint every open session and exit."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.max_sessions < 1 or self.max_open_sessions < 1:
            raise ConfigError("max_sessions and max_open_sessions must be >= 1")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be >= 1024")
        if self.max_inflight_messages < 1:
            raise ConfigError("max_inflight_messages must be >= 1")
        if self.max_session_tokens < 0 or self.max_message_tokens < 0 or self.grace_s < 0:
            raise ConfigError("max_session_tokens, max_message_tokens and grace_s must be >= 0")
        if self.host_blas_threads < 0:
            raise ConfigError(f"host_blas_threads must be >= 0 (0: the library's), got {self.host_blas_threads}")
        if self.engine.backend not in ("vllm", "reference"):
            raise ConfigError(f"backend must be 'vllm' or 'reference', got {self.engine.backend!r}")
        if self.engine.dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"dtype must be bfloat16, float32 or float16, got {self.engine.dtype!r}")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ConfigError("auth_token must not be blank (unset it instead)")
        if self.tenants_file is not None:
            from emserve.server.tenants import load_tenants

            load_tenants(self.tenants_file, self.auth_token)  # raises ConfigError on a bad file
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"{name}: cannot read {path!r}")
        if self.openai_port is not None and not 0 <= self.openai_port < 65536:
            raise ConfigError(f"openai_port must be in 0..65535, got {self.openai_port}")
        if self.health_port is not None and not 0 <= self.health_port < 65536:
            raise ConfigError(f"health_port must be in 0..65535, got {self.health_port}")
        for name in ("max_session_disk_gib", "max_disk_gib"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be >= 0 (0: no quota), got {getattr(self, name)}")
        if not self.retrieval_device_gib >= 0:
            raise ConfigError(f"retrieval_device_gib must be >= 0, got {self.retrieval_device_gib}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.retrieval_device):
            raise ConfigError(f"retrieval_device must be auto, cpu, cuda or cuda:N, got {self.retrieval_device!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _emserve_home(env: Mapping[str, str]) -> Path:
    if env.get("EMSERVE_HOME"):
        return Path(env["EMSERVE_HOME"]).expanduser()
    from emserve.server.provision.models import emserve_home

    return emserve_home()


def _coerce(value: str, kind: str, name: str) -> Any:
    """Parse an environment value for a field annotated ``kind`` (a string: annotations are lazy)."""
    optional = kind.endswith("| None")
    base = kind.removesuffix("| None").strip()
    if optional and value.strip().lower() in ("", "none", "off"):
        return None
    try:
        if base == "bool":
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base == "int":
            return int(value)
        if base == "float":
            return float(value)
        return value  # str, Literal[...] (validated by the dataclass that receives it)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a valid {base}") from None


def _memory_from_env(env: Mapping[str, str], base: MemoryConfig) -> MemoryConfig:
    changes = {}
    for name in SETTINGS:
        key = f"{ENV_PREFIX}MEMORY_{name.upper()}"
        if key in env:
            changes[name] = _coerce(env[key], MemoryConfig.setting_type(name), key)
    return base.with_settings(**changes)


def build_config(overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Defaults < ``EMSERVE_*`` environment < ``overrides`` (CLI flags; ``None`` values are ignored).

    Override keys: the ServerConfig field names, plus the engine's ``model``, ``backend``, ``dtype``,
    ``kv_cache_gib``, ``max_model_len``, ``max_num_seqs``, ``ingest_slots``, ``deterministic``,
    ``max_num_batched_tokens``, ``long_prefill_token_threshold``, and ``memory``
    (a dict of MemoryConfig fields).
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    server_fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    engine_fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    engine_keys = ("model", "backend", "dtype", "kv_cache_gib", "max_model_len", "max_num_seqs", "ingest_slots",
                   "deterministic", "max_num_batched_tokens", "long_prefill_token_threshold")
    values: dict[str, Any] = {}
    engine: dict[str, Any] = {"model": "smollm2-135m"}
    for name in ("host", "port", "max_sessions", "max_open_sessions", "max_message_bytes", "max_message_tokens",
                 "max_session_tokens", "max_session_disk_gib", "max_disk_gib", "auth_token", "grace_s",
                 "retrieval_device", "retrieval_device_gib",
                 "metrics_port", "tls_cert", "tls_key", "tls_client_ca", "health_port", "tenants_file", "openai_port",
                 "host_blas_threads"):
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _coerce(env[key], str(server_fields[name].type), key)
    if f"{ENV_PREFIX}MAX_INFLIGHT" in env:
        values["max_inflight_messages"] = _coerce(env[f"{ENV_PREFIX}MAX_INFLIGHT"], "int", "EMSERVE_MAX_INFLIGHT")
    if f"{ENV_PREFIX}SESSIONS_DIR" in env:
        values["sessions_dir"] = Path(env[f"{ENV_PREFIX}SESSIONS_DIR"]).expanduser()
    for name in engine_keys:
        key = ENV_PREFIX + name.upper()
        if key in env:
            engine[name] = _coerce(env[key], str(engine_fields[name].type), key)
    memory = _memory_from_env(env, MemoryConfig())

    for k, v in flags.items():
        if k in engine_keys:
            engine[k] = v
        elif k == "memory":
            memory = memory.with_settings(**dict(v))
        elif k == "sessions_dir":
            values[k] = Path(v).expanduser()
        elif k == "metrics_port" and v == "off":  # the flag's way to override EMSERVE_METRICS_PORT
            values[k] = None
        elif k in server_fields and k != "engine":
            values[k] = v
        else:
            raise ConfigError(f"unknown setting {k!r}")
    if "sessions_dir" not in values:
        values["sessions_dir"] = _emserve_home(env) / "sessions"
    if engine.get("backend") == "reference" and "dtype" not in engine:
        engine["dtype"] = "float32"
    try:
        eng = EngineConfig(**engine)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return ServerConfig(engine=eng, memory=memory, **values)

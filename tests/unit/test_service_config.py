"""ServerConfig: defaults < EMSERVE_* environment < flags; validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from emserve.server.config import ServerConfig, build_config
from emserve.server.engine.config import ConfigError, EngineConfig


def test_defaults(tmp_path: Path) -> None:
    cfg = build_config(env={"EMSERVE_HOME": str(tmp_path)})
    assert (cfg.host, cfg.port) == ("127.0.0.1", 50051)
    assert cfg.sessions_dir == tmp_path / "sessions"
    assert cfg.engine.model == "smollm2-135m" and cfg.engine.backend == "vllm"
    assert cfg.auth_token is None and cfg.max_session_tokens == 0
    assert cfg.memory.retrieval.n_local == 1024
    assert cfg.retrieval_device == "auto"
    assert cfg.host_blas_threads == 1


def test_env_then_flags(tmp_path: Path) -> None:
    env = {
        "EMSERVE_HOME": str(tmp_path), "EMSERVE_PORT": "6000", "EMSERVE_HOST": "0.0.0.0",
        "EMSERVE_MAX_SESSIONS": "7", "EMSERVE_AUTH_TOKEN": "s3cret", "EMSERVE_BACKEND": "reference",
        "EMSERVE_MEMORY_N_LOCAL": "512", "EMSERVE_MEMORY_PER_LAYER": "false", "EMSERVE_MAX_INFLIGHT": "3",
        "EMSERVE_SESSIONS_DIR": str(tmp_path / "elsewhere"), "EMSERVE_MAX_MODEL_LEN": "none",
        "EMSERVE_RETRIEVAL_DEVICE": "cpu", "EMSERVE_RETRIEVAL_DEVICE_GIB": "6.5", "EMSERVE_HOST_BLAS_THREADS": "0",
    }
    cfg = build_config(env=env)
    assert (cfg.host, cfg.port, cfg.max_sessions, cfg.auth_token) == ("0.0.0.0", 6000, 7, "s3cret")
    assert cfg.engine.backend == "reference" and cfg.engine.dtype == "float32"  # reference defaults to fp32
    assert cfg.memory.retrieval.n_local == 512 and cfg.memory.retrieval.per_layer is False
    assert cfg.max_inflight_messages == 3 and cfg.sessions_dir == tmp_path / "elsewhere"
    assert cfg.engine.max_model_len is None and cfg.retrieval_device == "cpu" and cfg.retrieval_device_gib == 6.5
    assert cfg.host_blas_threads == 0
    cfg = build_config({"port": 0, "max_sessions": None, "memory": {"n_mem": 256}, "model": "/m"}, env=env)
    assert cfg.port == 0 and cfg.max_sessions == 7  # None flags do not override
    assert cfg.memory.retrieval.n_mem == 256 and cfg.memory.retrieval.n_local == 512 and cfg.engine.model == "/m"


@pytest.mark.parametrize(
    ("overrides", "env"),
    [
        ({"port": 70000}, {}),
        ({"max_sessions": 0}, {}),
        ({"auth_token": "  "}, {}),
        ({}, {"EMSERVE_PORT": "eighty"}),
        ({}, {"EMSERVE_MEMORY_PER_LAYER": "maybe"}),
        ({"bogus": 1}, {}),
        ({"backend": "tgi"}, {}),
        ({"retrieval_device": "gpu"}, {}),
        ({}, {"EMSERVE_RETRIEVAL_DEVICE": "cuda:x"}),
        ({"retrieval_device_gib": -1.0}, {}),
        ({"host_blas_threads": -1}, {}),
        ({}, {"EMSERVE_HOST_BLAS_THREADS": "two"}),
    ],
)
def test_invalid(tmp_path: Path, overrides: dict, env: dict) -> None:
    with pytest.raises((ConfigError, ValueError)):
        build_config(overrides, env={"EMSERVE_HOME": str(tmp_path), **env})


def test_frozen(tmp_path: Path) -> None:
    cfg = ServerConfig(engine=EngineConfig(model="x"), sessions_dir=tmp_path)
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]
    assert cfg.address == "127.0.0.1:50051"


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_it():
    import torch

    from emserve.server.engine.config import auto_dtype

    if torch.version.cuda is not None:
        assert auto_dtype("flags : fpu avx2") == "bfloat16"  # a GPU build computes in bf16 everywhere
        return
    assert auto_dtype("processor : 0\nflags\t\t: fpu sse avx2 fma\n") == "float32"
    assert auto_dtype("flags : fpu avx2 avx512f avx512_bf16\n") == "bfloat16"
    assert auto_dtype("flags : fpu amx_bf16 amx_tile\n") == "bfloat16"
    assert auto_dtype("") == "float32"
    assert EngineConfig(model="x").dtype in ("bfloat16", "float32")  # resolved on construction
    assert EngineConfig(model="x", dtype="bfloat16").dtype == "bfloat16"


def test_ingest_slots_default_to_one_on_a_cpu_and_reach_the_engine_admission(tmp_path: Path) -> None:
    import torch

    from emserve.server.engine.admission import Admission
    from emserve.server.engine.config import auto_ingest_slots

    cpu_only = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
    assert auto_ingest_slots() == (1 if cpu_only else 0)
    env = {"EMSERVE_SESSIONS_DIR": str(tmp_path)}
    assert build_config({}, env=env).engine.ingest_slots == auto_ingest_slots()
    assert build_config({}, env={**env, "EMSERVE_INGEST_SLOTS": "3"}).engine.ingest_slots == 3
    assert build_config({"ingest_slots": 0}, env={**env, "EMSERVE_INGEST_SLOTS": "3"}).engine.ingest_slots == 0
    with pytest.raises(ConfigError):
        build_config({"ingest_slots": -1}, env=env)
    assert Admission(build_config({"ingest_slots": 2}, env=env).engine.ingest_slots or 0).ingest_slots == 2


def test_iteration_budget_reaches_the_engine_config(tmp_path: Path) -> None:
    env = {"EMSERVE_SESSIONS_DIR": str(tmp_path)}
    import torch

    from emserve.server.engine.config import auto_iteration_budget

    cpu_only = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
    assert auto_iteration_budget() == ((256, 64) if cpu_only else (0, 0))
    eng = build_config({}, env=env).engine
    assert (eng.max_num_batched_tokens, eng.long_prefill_token_threshold) == auto_iteration_budget()
    eng = build_config({"max_num_batched_tokens": 0, "long_prefill_token_threshold": 0}, env=env).engine
    assert (eng.max_num_batched_tokens, eng.long_prefill_token_threshold) == (0, 0)
    env2 = {**env, "EMSERVE_MAX_NUM_BATCHED_TOKENS": "128", "EMSERVE_LONG_PREFILL_TOKEN_THRESHOLD": "64"}
    eng = build_config({}, env=env2).engine
    assert (eng.max_num_batched_tokens, eng.long_prefill_token_threshold) == (128, 64)
    eng = build_config({"long_prefill_token_threshold": 32}, env=env2).engine
    assert eng.long_prefill_token_threshold == 32
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        build_config({"max_num_batched_tokens": 8, "max_num_seqs": 16}, env=env)
    with pytest.raises(ConfigError, match="long_prefill_token_threshold"):
        build_config({"long_prefill_token_threshold": -1}, env=env)
    with pytest.raises(ConfigError, match="long_prefill_token_threshold"):
        build_config({"long_prefill_token_threshold": 4096, "max_model_len": 2048}, env=env)


def test_deterministic_mode_reaches_the_engine_admission(tmp_path: Path, tiny_model_dir: Path) -> None:
    from emserve.server.app import build_engine

    env = {"EMSERVE_SESSIONS_DIR": str(tmp_path)}
    assert build_config({}, env=env).engine.deterministic is False
    assert build_config({}, env={**env, "EMSERVE_DETERMINISTIC": "1"}).engine.deterministic is True
    cfg = build_config({"deterministic": True, "backend": "reference", "model": str(tiny_model_dir)}, env=env)
    engine, _ = build_engine(cfg, lambda line: None)
    assert engine.admission.serial is True
    engine, _ = build_engine(build_config({"backend": "reference", "model": str(tiny_model_dir)}, env=env),
                             lambda line: None)
    assert engine.admission.serial is False


def test_a_status_line_to_a_closed_stdout_is_lost_not_raised(monkeypatch):
    """The server's status lines go to stdout; when the reader of that pipe has exited, printing raises
    BrokenPipeError. ``announce_line`` loses the line so the server's start or shutdown goes on."""
    import sys

    from emserve.server.app import announce_line

    class Gone:
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    announce_line("emserve stopped")  # no exception


def test_kv_cache_bytes_takes_fractions_of_a_gib():
    from emserve.server.engine.config import kv_cache_bytes

    assert kv_cache_bytes(2) == 2 << 30
    assert kv_cache_bytes(0.25) == 1 << 28
    with pytest.raises(ConfigError):
        kv_cache_bytes(0)

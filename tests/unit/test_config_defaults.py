"""Every memory default is defined once: a session's MemoryConfig takes the libraries' defaults, the
libraries agree where they share a setting, and the server reports exactly those defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emserve.api.v1 import emserve_pb2 as pb
from emserve.retrieval.planner import RetrievalConfig
from emserve.segmenter import SegmenterConfig
from emserve.server.config import build_config
from emserve.server.rpc.service import memory_to_pb
from emserve.server.session import MemoryConfig


def _defaults(cls: type) -> dict[str, object]:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def test_a_session_takes_the_libraries_defaults() -> None:
    memory, segmenter, retrieval = _defaults(MemoryConfig), _defaults(SegmenterConfig), _defaults(RetrievalConfig)
    shared = [n for n in memory if n in segmenter or n in retrieval]
    assert len(shared) >= 25  # the windows, the segmenter's, the retrieval and question-window settings
    for name in shared:
        library = retrieval[name] if name in retrieval else segmenter[name]
        assert memory[name] == library, name
    for name in set(segmenter) & set(retrieval):  # n_init, n_local: one setting, two libraries
        assert segmenter[name] == retrieval[name], name


def test_the_derived_library_configs_are_the_libraries_defaults() -> None:
    """MemoryConfig.segmenter() / .retrieval() of the defaults differ from the libraries' defaults only in
    what the session decides: the close lag (events close as soon as their boundaries are final) and
    the engine's window."""
    seg = dataclasses.asdict(MemoryConfig().segmenter())
    assert {k for k, v in seg.items() if v != getattr(SegmenterConfig(), k)} == {"close_lag"}
    ret = dataclasses.asdict(MemoryConfig().retrieval(RetrievalConfig().max_window))
    assert {k for k, v in ret.items() if v != getattr(RetrievalConfig(), k)} == set()


def test_the_server_reports_the_defaults_it_uses(tmp_path: Path) -> None:
    """GetServerInfo.default_memory is memory_to_pb of the server's MemoryConfig: with no EMSERVE_MEMORY_*
    setting, every proto field is the config tree's default."""
    cfg = build_config(env={"EMSERVE_HOME": str(tmp_path)})
    assert cfg.memory == MemoryConfig()
    reported = memory_to_pb(cfg.memory)
    fields = [f.name for f in pb.MemoryConfig.DESCRIPTOR.fields]
    assert {f.name for f, _ in reported.ListFields()} == set(fields)
    for name in fields:
        value = getattr(MemoryConfig(), name)
        assert getattr(reported, name) == (pytest.approx(value) if isinstance(value, float) else value), name

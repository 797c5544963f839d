"""Every memory default is defined once: a session's config tree is the libraries' own configs (their
defaults) and the question's rules, the flat names map onto it one to one, and the server reports
exactly those defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from emserve.api.v1 import emserve_pb2 as pb
from emserve.retrieval.config import RetrievalConfig
from emserve.retrieval.errors import ConfigError
from emserve.segmenter import OnlineSegmenter, SegmenterConfig
from emserve.server.config import build_config
from emserve.server.rpc.service import memory_to_pb
from emserve.server.session import SETTINGS, MemoryConfig, QuestionRules


def _changed(part: object, cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if getattr(part, f.name) != getattr(cls(), f.name)}


def test_the_tree_is_the_libraries_defaults() -> None:
    """The session's parts differ from their classes' defaults only in what the session decides: the
    close lag (events close as soon as their boundaries are final) and the event span (a stretch with no
    surprise boundary is cut every ``max_block_size`` tokens as it is read); the model's window is set
    when a session binds the config (``bound``)."""
    cfg = MemoryConfig()
    assert _changed(cfg.segmenter, SegmenterConfig) == {"close_lag", "max_event_span"}
    assert cfg.segmenter.close_lag == SegmenterConfig().min_block_size
    assert cfg.segmenter.max_event_span == SegmenterConfig().max_block_size
    assert _changed(cfg.retrieval, RetrievalConfig) == set() and cfg.retrieval.max_window is None
    assert cfg.question == QuestionRules()
    assert cfg.bound(8192).retrieval.max_window == 8192
    for name in ("n_init", "n_local"):  # one setting, two libraries
        assert getattr(SegmenterConfig(), name) == getattr(RetrievalConfig(), name), name


def _most_pending(cfg: SegmenterConfig, n: int, step: int) -> int:
    """The most tokens in no closed event after any step of a stream with no surprise boundary."""
    seg = OnlineSegmenter(cfg)
    keys = torch.randn(2, n, 3, 8, generator=torch.Generator().manual_seed(0))
    most = 0
    for a in range(0, n, step):
        seg.feed(np.zeros(min(step, n - a)), lambda s, e: keys[:, s:e])
        most = max(most, seg.tokens_seen - seg.closed_until)
    return most


def test_a_quiet_stretch_leaves_few_tokens_in_no_event() -> None:
    """A session cuts a stretch with no surprise boundary every ``max_block_size`` tokens as it is read, so
    after any ingestion step at most ``1.5 * max_block_size + close_lag`` tokens are in no event (a
    question's remainder, which it reads whole); with EM-LLM's span of 512 it is more."""
    cfg = MemoryConfig().segmenter
    bound = 3 * cfg.max_block_size // 2 + cfg.lag
    assert _most_pending(cfg, 4096, 512) <= bound
    assert _most_pending(dataclasses.replace(cfg, max_event_span=512), 4096, 512) > bound
    small = MemoryConfig.of(max_block_size=32, min_block_size=4).segmenter  # the flat name sets the span
    assert small.max_event_span == 32 and _most_pending(small, 1024, 64) <= 3 * 32 // 2 + 4


def test_every_flat_setting_names_one_place_and_every_place_is_named_once() -> None:
    """SETTINGS is the one mapping between the flat names (the proto's, the environment's) and the tree:
    each name sets existing fields, each field is set by at most one name, and every field of the
    question part has a name (only a session has them, so nothing else sets them)."""
    parts = {"segmenter": SegmenterConfig, "retrieval": RetrievalConfig, "question": QuestionRules}
    seen: dict[tuple[str, str], str] = {}
    for name, places in SETTINGS.items():
        for part, attr in places:
            assert attr in {f.name for f in dataclasses.fields(parts[part])}, (name, part, attr)
            assert (part, attr) not in seen, f"{part}.{attr} set by {seen.get((part, attr))} and {name}"
            seen[(part, attr)] = name
    assert {("question", f.name) for f in dataclasses.fields(QuestionRules)} <= set(seen)
    cfg = MemoryConfig.of(n_local=512, min_block_size=4, question_copy=0, question_rank="mean")
    assert (cfg.retrieval.n_local, cfg.segmenter.n_local) == (512, 512)
    assert (cfg.segmenter.min_block_size, cfg.segmenter.close_lag) == (4, 4)
    assert cfg.question.copy == 0 and cfg.retrieval.question_rank == "mean"
    assert MemoryConfig.of(**cfg.settings()) == cfg
    with pytest.raises(ConfigError, match="unknown memory setting.*n_lokal"):
        MemoryConfig.of(n_lokal=512)
    with pytest.raises(ConfigError, match="question_copy"):
        MemoryConfig.of(question_copy=-1)


def test_the_server_reports_the_defaults_it_uses(tmp_path: Path) -> None:
    """GetServerInfo.default_memory is memory_to_pb of the server's MemoryConfig: with no EMSERVE_MEMORY_*
    setting, every proto field is the config tree's default, and every proto field is a flat setting."""
    cfg = build_config(env={"EMSERVE_HOME": str(tmp_path)})
    assert cfg.memory == MemoryConfig()
    reported = memory_to_pb(cfg.memory)
    fields = [f.name for f in pb.MemoryConfig.DESCRIPTOR.fields]
    assert set(fields) <= set(SETTINGS)
    assert {f.name for f, _ in reported.ListFields()} == set(fields)
    for name in fields:
        value = MemoryConfig().setting(name)
        assert getattr(reported, name) == (pytest.approx(value) if isinstance(value, float) else value), name

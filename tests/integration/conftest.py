"""Fixtures of the tests that serve the tiny random model on the HF reference engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_harness import WatchedEngine

from emserve.server.engine.reference import ReferenceEngine


@pytest.fixture(scope="module")
def ref_engine(tiny_model_dir: Path) -> ReferenceEngine:
    """One reference engine per test module (loading it is the slow part; it holds no session state)."""
    return ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)


@pytest.fixture
def engine(ref_engine: ReferenceEngine) -> WatchedEngine:
    """The module's reference engine behind a fresh :class:`WatchedEngine` (its counters start at 0)."""
    return WatchedEngine(ref_engine)

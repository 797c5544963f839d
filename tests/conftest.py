"""Shared fixtures: tiny random-weight models (built once per test session, offline, ~1 s each).

The ``slow`` marker (real model / vLLM engine) is registered in pyproject.toml.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tinymodel import make_tiny_llama  # noqa: E402  (tests/ is on sys.path: rootdir conftest)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, 4 heads / 2 KV heads, head_dim 32, vocab 512)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (same sizes, q/k/v biases, rope_theta 1e6)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")

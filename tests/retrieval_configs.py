"""Retrieval settings the library tests build retrievers with."""

from __future__ import annotations

from typing import Any

from emserve.retrieval.config import RetrievalConfig


def raw(**fields: Any) -> RetrievalConfig:
    """EM-LLM's scoring (a list per layer, raw queries: no centering, no standardization; a shared
    selection, where asked for, sums every layer) with ``fields`` on top: what the retriever's rules are
    tested on. Sessions use :class:`RetrievalConfig`'s defaults."""
    return RetrievalConfig(**{"per_layer": True, "center_queries": False, "standardize_queries": False,
                              "shared_score_layers": 1.0, **fields})

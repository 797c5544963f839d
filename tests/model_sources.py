"""Skip markers for the tests that load a real embedded model: skipped only where its sources are not here
(no fetched folder, no installed wheel). ``make setup`` fetches the default model's, so CI runs them."""

from __future__ import annotations

import pytest

from emserve.server.provision.models import DEFAULT_MODEL, EMBEDDED_MODELS, emserve_home, find_sources


def _missing(name: str) -> bool:
    return find_sources(EMBEDDED_MODELS[name], emserve_home()) is None


NEEDS_DEFAULT_MODEL = pytest.mark.skipif(
    _missing(DEFAULT_MODEL), reason=f"the sources of {DEFAULT_MODEL} are not here (make setup fetches them)"
)
NEEDS_QWEN = pytest.mark.skipif(
    _missing("qwen2.5-0.5b"),
    reason="the sources of qwen2.5-0.5b are not here (models fetch --model qwen2.5-0.5b)",
)

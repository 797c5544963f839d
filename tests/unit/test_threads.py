"""The server process's BLAS threads (emserve.server.threads)."""

from __future__ import annotations

import numpy as np
import pytest

from emserve.server.threads import blas_threads, limit_blas_threads


@pytest.fixture
def restore_blas():
    before = blas_threads()
    yield
    limit_blas_threads(max(before.values(), default=1))


def test_numpy_has_a_blas_whose_threads_can_be_set(restore_blas) -> None:
    assert blas_threads(), "numpy's BLAS not found by threadpoolctl"
    limit_blas_threads(2)
    assert set(blas_threads().values()) == {2}
    before = limit_blas_threads(1)
    assert set(before.values()) == {2} and set(blas_threads().values()) == {1}
    a = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    assert np.allclose(a @ a.T, (a.astype(np.float64) @ a.T.astype(np.float64)), atol=1e-3)  # still computes


def test_zero_leaves_the_library_alone_and_negatives_are_refused(restore_blas) -> None:
    limit_blas_threads(2)
    assert limit_blas_threads(0) == {}
    assert set(blas_threads().values()) == {2}
    with pytest.raises(ValueError, match=">= 0"):
        limit_blas_threads(-1)

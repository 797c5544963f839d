"""The server process's own BLAS threads: numpy's matrix products of retrieval (query standardization,
exact scoring), not the engine's, which runs in vLLM's processes with its own threads.

Rule: the server process runs its BLAS on ``ServerConfig.host_blas_threads`` threads (default 1), set once
when the server starts (:func:`limit_blas_threads`). Its products are small (a question's 64 query tokens
against a 256-event sample, per scoring layer) and run beside the engine, which keeps every core busy
during ingestion: a BLAS pool of one thread per core then waits on threads the engine holds, and an idle
pool wakes slowly (measured: docs/status.md, Retrieval).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def limit_blas_threads(threads: int) -> dict[str, int]:
    """Run this process's BLAS libraries loaded by now (numpy's OpenBLAS, MKL, BLIS) on ``threads`` threads
    from now on; 0 leaves them as they are. Returns each library's thread count before (empty: nothing changed, or
    threadpoolctl found no BLAS). Process-wide: call it once, before serving, from the main thread (OpenBLAS
    0.3.30 ignores a later call from another thread once the main thread has set its count)."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: the library's default), got {threads}")
    if threads == 0:
        return {}
    from threadpoolctl import ThreadpoolController

    before = blas_threads()
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        lib.set_num_threads(threads)  # kept (a threadpoolctl limiter would be undone when it ends)
    if before:
        logger.info("BLAS threads of the server process: now %s (were %s)", blas_threads(), before)
    return before


def blas_threads() -> dict[str, int]:
    """Each BLAS library of this process and its thread count now."""
    from threadpoolctl import threadpool_info

    return {f"{i['internal_api']}:{i['prefix']}": int(i["num_threads"]) for i in threadpool_info()
            if i.get("user_api") == "blas"}

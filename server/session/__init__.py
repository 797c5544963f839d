"""Sessions: one stream's memory loop (:class:`Session`) and the server's set of them
(:class:`~emserve.server.session.manager.SessionManager`).

Modules: ``session`` (the step loop, its crash-consistent files, an answer's streaming), ``question`` (a
question's window and its answer's first tokens), ``manager`` (open, lease, close LRU, delete, recover),
``config`` (``MemoryConfig``: the settings tree and their flat names), ``state`` (a session directory's files, read
without opening it), ``keys`` (the segmenter's de-rotated keys), ``words`` (the model's words, for the
lexical rules).

May import: the libraries (``emserve.segmenter``, ``emserve.retrieval``), the engine
(``emserve.server.engine``) and the server's leaf modules (``errors``, ``report``, ``logs``, ``quota``,
``tenants``, ``contrast``); not the RPC layer (``emserve.server.rpc``),
the process (``app``, ``cli``), vLLM nor gRPC (``tests/unit/test_structure.py``).
"""

from __future__ import annotations

from emserve.server.session.config import MAX_CONTRAST, SAVED_BEFORE, SETTINGS, MemoryConfig, QuestionRules
from emserve.server.session.session import AppendResult, AskResult, OnPlan, Session
from emserve.server.session.state import (
    LOG_DIR,
    SESSION_FILE,
    STATE_VERSION,
    SURPRISE_FILE,
    SavedState,
    SessionError,
    SessionStats,
    needs_recovery,
    read_state,
    session_stats,
)

__all__ = [
    "LOG_DIR",
    "MAX_CONTRAST",
    "SAVED_BEFORE",
    "SETTINGS",
    "SESSION_FILE",
    "STATE_VERSION",
    "SURPRISE_FILE",
    "AppendResult",
    "AskResult",
    "MemoryConfig",
    "OnPlan",
    "QuestionRules",
    "SavedState",
    "Session",
    "SessionError",
    "SessionStats",
    "needs_recovery",
    "read_state",
    "session_stats",
]

"""SessionManager: the server's sessions — a directory each, opened lazily, leased, closed LRU.

Contract
--------
* Owned by the server process; all methods run on its event loop (blocking file work goes to
  worker threads). The manager is the only code that opens, creates, closes or deletes a
  :class:`~emserve.server.session.Session`.
* Layout under ``root``::

      <session_id>/meta.json     id, create time, state (active | finished), labels, data folder
      <session_id>/<data>/       the Session directory (session.json, log/, surprise.f32)

  The data folder has a fresh name per incarnation, so a session deleted and created again under
  the same id never reuses a path (engines cache open log files by path). Folders without
  ``meta.json`` (a crash during create) and names starting with "." (deletions in progress) are
  not sessions; :meth:`SessionManager.recover` (at server start, before readiness) removes the latter
  and repairs every session whose files hold a step its saved state does not (a crash).
* A session is used through :meth:`lease` (opens it if needed; a leased session is never closed).
  At most ``max_open`` idle sessions stay open; the least recently used idle ones are closed.
* One *writer* per session (an ingest stream, or a Generate that remembers): :meth:`attach`.
  A writer's last commit may still run after its stream is gone (commits are shielded from
  cancellation); the next writer waits for it, so offsets never go stale.
* A session whose step failed after its engine step was logged (``Session.failed``) is closed once no
  call uses it; the next lease reopens it from its files. Out of retrieval device memory
  (``DeviceMemoryError``) the idle sessions holding device mirrors are closed too, and an open that
  ran out is tried once more after that.

Size: the manager's lifecycle rules (open, lease, close LRU, delete, recover) share one table of
entries and one set of invariants, and are read together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from emserve.retrieval.errors import ConfigError, DeviceMemoryError, PlanError
from emserve.segmenter.errors import SegmenterError
from emserve.server.engine.base import Engine
from emserve.server.errors import (
    InvalidArgument,
    LimitExceeded,
    SessionBusy,
    SessionExists,
    SessionFinished,
    SessionNotFound,
)
from emserve.server.quota import DiskQuota
from emserve.server.report import StepReport
from emserve.server.session.config import MemoryConfig
from emserve.server.session.session import Session
from emserve.server.session.state import SessionError, SessionStats, needs_recovery, read_state, session_stats
from emserve.server.tenants import TENANT_NAME, current_tenant, folder_name, split_folder

logger = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
META_FILE = "meta.json"
ACTIVE, FINISHED = "active", "finished"
_T = TypeVar("_T")


@dataclass
class SessionMeta:
    session_id: str
    create_time: float
    data: str
    state: str = ACTIVE
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> SessionMeta:
        raw = json.loads((folder / META_FILE).read_text())
        return cls(raw["session_id"], float(raw["create_time"]), raw["data"], raw.get("state", ACTIVE),
                   dict(raw.get("labels", {})))

    def write(self, folder: Path) -> None:
        tmp = folder / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self)))
        os.replace(tmp, folder / META_FILE)


@dataclass(frozen=True)
class SessionInfo:
    """What GetSession / ListSessions report."""

    session_id: str
    create_time: float
    finished: bool
    labels: Mapping[str, str]
    memory: MemoryConfig
    stats: SessionStats
    writer: str | None


@dataclass
class Entry:
    """An open session and its server-side bookkeeping."""

    meta: SessionMeta
    folder: Path
    session: Session
    refs: int = 0
    writer: str | None = None
    commit: asyncio.Task[Any] | None = None
    last_used: float = field(default_factory=time.monotonic)
    quota: DiskQuota | None = None

    @property
    def session_id(self) -> str:
        return self.meta.session_id

    @property
    def key(self) -> str:
        """The session's folder name: its id, prefixed by its tenant's name if it has one."""
        return self.folder.name

    @property
    def finished(self) -> bool:
        return self.meta.state == FINISHED

    @property
    def idle(self) -> bool:
        """No call uses it, no writer holds it, no commit runs: it may be closed."""
        return self.refs == 0 and self.writer is None and (self.commit is None or self.commit.done())

    async def run_commit(self, work: Callable[[], Awaitable[_T]], tokens: int = 0) -> _T:
        """Run ``work`` (a step that writes ``tokens`` more tokens into the session) to completion even if
        the caller is cancelled: a cancelled caller gets CancelledError at once, the step finishes in the
        background and the next writer waits for it (:meth:`SessionManager.attach`). A step the disk
        quota does not admit raises LimitExceeded before it starts (:mod:`emserve.server.quota`);
        ``tokens`` 0: admitted by the caller already (the session's usage is measured afterwards anyway)."""
        quota = self.quota
        if quota is not None and quota.enabled:
            quota.admit(self.folder, self.session.num_tokens, tokens)

            async def measured() -> _T:
                try:
                    return await work()
                finally:
                    await quota.refresh(self.folder)

            task: asyncio.Task[_T] = asyncio.ensure_future(measured())
        else:
            task = asyncio.ensure_future(work())
        self.commit = task
        return await asyncio.shield(task)

    def mark_finished(self) -> None:
        self.meta.state = FINISHED
        self.meta.write(self.folder)


def check_session_id(session_id: str, field_name: str = "session_id") -> str:
    if not SESSION_ID.fullmatch(session_id or ""):  # fullmatch: `$` alone accepts a trailing newline
        shown = repr(session_id[:64]) + ("..." if len(session_id or "") > 64 else "")
        raise InvalidArgument(field_name, f"session id {shown} must match {SESSION_ID.pattern}")
    return session_id


QUESTION_LIMITS = (("question_n_mem", "n_mem"), ("question_n_init", "n_init"))
"""A question's memory and sink, and the ingestion window's field each is bounded by."""


def question_within(cfg: MemoryConfig) -> MemoryConfig:
    """``cfg`` with a question's memory and sink at most the ingestion window's (``question_n_mem`` <=
    ``n_mem``, ``question_n_init`` <= ``n_init``): the values a question uses, so that they are the ones
    reported."""
    over: dict[str, int] = {}
    for q_field, window_field in QUESTION_LIMITS:
        q_value, limit = cfg.setting(q_field), cfg.setting(window_field)
        if q_value is not None and q_value > limit:
            over[q_field] = limit
    return cfg.with_settings(**over) if over else cfg


_CONFIG_ERRORS = (ConfigError, SegmenterError, PlanError, ValueError, TypeError)
"""What an invalid memory config raises while it is built and checked (:meth:`SessionManager.memory_config`)."""


class SessionManager:
    def __init__(self, root: str | os.PathLike[str], engine: Engine, defaults: MemoryConfig, *,
                 max_sessions: int = 256, max_open: int = 32, score_device: str | None = "auto",
                 device_budget: int = 0, quota: DiskQuota | None = None) -> None:
        self.root = Path(root)
        self.quota = quota or DiskQuota()
        """Disk quotas of the sessions' writing steps (:mod:`emserve.server.quota`); none by default."""
        self.score_device = score_device
        self.device_budget = device_budget
        """Bytes of device memory the open sessions' retrieval mirrors may hold (0: no limit); beyond it
        idle sessions are closed, least recently used first."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.defaults = question_within(defaults)
        self.max_sessions = max_sessions
        self.max_open = max_open
        self._open: dict[str, Entry] = {}
        self._lock = asyncio.Lock()  # create / open / close / delete
        self.observers: list[Callable[[StepReport], None]] = []
        """Called with every step report of every session (:meth:`report`): metrics, logs."""

    def report(self, *reports: StepReport) -> None:
        """Hand the step reports of a call to the observers (on the event loop; they must be cheap)."""
        for r in reports:
            for observe in self.observers:
                observe(r)

    # ------------------------------------------------------------------ lookup
    # Sessions are found by *key*, their folder's name: the id for the tenant "", "<tenant>~<id>" for a
    # named tenant (emserve.server.tenants); a call only ever names the sessions of its own tenant.
    def _key(self, session_id: str) -> str:
        return folder_name(check_session_id(session_id), current_tenant())

    def _meta(self, key: str) -> SessionMeta:
        try:
            return SessionMeta.read(self.root / key)
        except FileNotFoundError:
            raise SessionNotFound(split_folder(key)[1]) from None

    def _keys(self) -> list[str]:
        """Every session's key, of every tenant."""
        out = []
        for p in self.root.iterdir():
            tenant, sid = split_folder(p.name)
            if SESSION_ID.fullmatch(sid) and (not tenant or TENANT_NAME.fullmatch(tenant)) and (p / META_FILE).exists():
                out.append(p.name)
        return sorted(out)

    def session_ids(self) -> list[str]:
        """The ids of the current tenant's sessions."""
        tenant = current_tenant()
        return sorted(sid for t, sid in map(split_folder, self._keys()) if t == tenant)

    def stored_count(self) -> int:
        """Sessions on disk, of every tenant."""
        return len(self._keys())

    def info(self, session_id: str) -> SessionInfo:
        key = self._key(session_id)
        entry = self._open.get(key)
        meta = entry.meta if entry is not None else self._meta(key)
        folder = self.root / key
        data = folder / meta.data
        try:
            memory = read_state(data).config.bound(self.engine.info.max_model_len)
        except SessionError as e:  # not saved yet (a create in flight), or damaged: opening it says why
            logger.warning("session %s: %s; reporting the server's default memory settings", session_id, e)
            memory = self.defaults
        return SessionInfo(meta.session_id, meta.create_time, meta.state == FINISHED, dict(meta.labels), memory,
                           session_stats(data), entry.writer if entry is not None else None)

    def list(self, after: str = "", limit: int = 100) -> tuple[list[SessionInfo], str]:
        """Sessions with ids > ``after`` (at most ``limit``) and the id to continue after ("" at the end)."""
        ids = [i for i in self.session_ids() if i > after]
        page = ids[:limit]
        out = []
        for i in page:
            with contextlib.suppress(SessionNotFound, FileNotFoundError):  # deleted meanwhile
                out.append(self.info(i))
        return out, (page[-1] if len(ids) > limit else "")

    @property
    def open_count(self) -> int:
        return len(self._open)

    def active_count(self) -> int:
        """Open sessions with a call in progress."""
        return sum(1 for e in list(self._open.values()) if not e.idle)

    # ------------------------------------------------------------------ start
    async def recover(self) -> tuple[int, int]:
        """Repair what a crash left, before the server takes calls: removes the folders of deletions that
        were interrupted (``.deleted-*``) and opens (then closes) every session whose files hold a step
        its saved state does not (:func:`~emserve.server.session.needs_recovery`), so that GetSession
        and ListSessions tell the truth at once, not after the session's next use. Returns (leftover
        folders removed, sessions repaired)."""
        removed = 0
        if self.quota.enabled:
            await asyncio.to_thread(self.quota.scan, [self.root / k for k in self._keys()])
        for p in sorted(self.root.glob(".deleted-*")):
            await asyncio.to_thread(shutil.rmtree, p, True)
            removed += not p.exists()
        repaired = 0
        for sid in self._keys():
            with contextlib.suppress(FileNotFoundError, SessionNotFound):
                data = self.root / sid / self._meta(sid).data
                if await asyncio.to_thread(needs_recovery, data):
                    try:
                        session = await asyncio.to_thread(Session.open, data, self.engine,
                                                          score_device=self.score_device)
                    except Exception:  # a corrupt session: its own calls report it (DATA_LOSS), the rest serve
                        logger.exception("session %s could not be repaired", sid)
                        continue
                    await asyncio.to_thread(session.close)
                    repaired += 1
        if removed or repaired:
            logger.info("recovered: %d interrupted deletions removed, %d sessions repaired", removed, repaired)
        return removed, repaired

    # ------------------------------------------------------------------ create / delete
    def memory_config(self, overrides: Mapping[str, Any]) -> MemoryConfig:
        """The defaults with ``overrides``. A question's memory and sink are at most the ingestion
        window's: a ``question_n_mem`` / ``question_n_init`` given above ``n_mem`` / ``n_init`` is
        INVALID_ARGUMENT; a default one above them takes their value (and is reported as it is used).
        An invalid config is INVALID_ARGUMENT naming one field, ``memory.<name>``: the first override
        (in field order) with which the defaults stop being valid."""
        over = dict(overrides)
        for q_field, window_field in QUESTION_LIMITS:  # given ones must fit; defaults are fitted below
            q_value = over.get(q_field)
            limit = over.get(window_field, self.defaults.setting(window_field))
            if isinstance(q_value, int) and isinstance(limit, int) and q_value > limit:
                raise InvalidArgument(f"memory.{q_field}",
                                      f"{q_field} ({q_value}) must be at most {window_field} ({limit})")
        try:
            return self._checked(over)
        except _CONFIG_ERRORS as e:
            names = list(over)
            broken = next((n for i, n in enumerate(names) if not self._valid({k: over[k] for k in names[: i + 1]})), "")
            raise InvalidArgument(f"memory.{broken}" if broken else "memory",
                                  f"invalid memory settings: {e}") from None

    def _checked(self, over: Mapping[str, Any]) -> MemoryConfig:
        return question_within(self.defaults.with_settings(**over)).bound(self.engine.info.max_model_len)

    def _valid(self, over: Mapping[str, Any]) -> bool:
        try:
            self._checked(over)
        except _CONFIG_ERRORS:
            return False
        return True

    async def create(self, session_id: str | None, overrides: Mapping[str, Any] | None = None,
                     labels: Mapping[str, str] | None = None) -> SessionInfo:
        sid = check_session_id(session_id) if session_id else f"s-{uuid.uuid4().hex[:16]}"
        key = folder_name(sid, current_tenant())
        cfg = self.memory_config(overrides or {})
        async with self._lock:
            if self.stored_count() >= self.max_sessions:
                raise LimitExceeded("sessions", f"the server holds its maximum of {self.max_sessions} sessions; "
                                    "delete some first", limit=self.max_sessions)
            folder = self.root / key
            if (folder / META_FILE).exists():
                raise SessionExists(sid)
            if folder.exists():  # a create that crashed before writing meta.json
                await asyncio.to_thread(shutil.rmtree, folder, True)
            folder.mkdir(parents=True)
            meta = SessionMeta(sid, time.time(), f"data-{uuid.uuid4().hex[:8]}", ACTIVE, dict(labels or {}))
            try:
                session = await asyncio.to_thread(Session.create, folder / meta.data, self.engine, cfg,
                                                score_device=self.score_device)
            except Exception:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            meta.write(folder)
            self._open[key] = Entry(meta, folder, session, quota=self.quota)
            await self.quota.refresh(folder)
            await self._evict(keep=key)
        return self.info(sid)

    async def delete(self, session_id: str) -> None:
        key = self._key(session_id)
        async with self._lock:
            entry = self._open.get(key)
            folder = self.root / key
            meta = entry.meta if entry is not None else self._meta(key)
            if entry is not None:
                if entry.writer is not None or entry.refs > 0:
                    raise SessionBusy(session_id, entry.writer or "a call in progress")
                if entry.commit is not None and not entry.commit.done():
                    raise SessionBusy(session_id, "a commit in progress")
                await self._close(entry, checkpoint=False)  # deleted next: nothing to persist (a full disk)
            trash = self.root / f".deleted-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(folder, trash)
            self.quota.forget(key)
            self.engine.release_log(str(folder / meta.data / "log"))
        await asyncio.to_thread(shutil.rmtree, trash, True)

    # ------------------------------------------------------------------ leases
    @contextlib.asynccontextmanager
    async def lease(self, session_id: str) -> AsyncIterator[Entry]:
        """The open session ``session_id`` (of the call's tenant), kept open while the context lasts."""
        key = self._key(session_id)
        entry = self._open.get(key)
        if entry is not None and entry.session.failed is not None:
            await self._drop_failed(entry)
            entry = self._open.get(key)
        if entry is None:
            entry = await self._open_entry(key)
        entry.refs += 1
        entry.last_used = time.monotonic()
        try:
            yield entry
        finally:
            entry.refs -= 1
            entry.last_used = time.monotonic()
            if entry.session.failed is not None:
                try:
                    await self._drop_failed(entry)
                except Exception:  # noqa: BLE001 - the call's own error is what the client sees
                    logger.exception("closing session %s after its failed step failed", session_id)
            if self.device_budget > 0 and self.device_bytes() > self.device_budget:  # its mirror grew
                try:
                    async with self._lock:
                        await self._evict(keep=key)
                except Exception:  # noqa: BLE001 - the call itself succeeded
                    logger.exception("closing idle sessions over the device memory budget failed")

    async def _open_entry(self, key: str) -> Entry:
        async with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                return entry
            meta = self._meta(key)
            folder = self.root / key
            t0 = time.perf_counter()
            try:
                session = await asyncio.to_thread(Session.open, folder / meta.data, self.engine,
                                                    score_device=self.score_device)
            except DeviceMemoryError:
                if not await self._free_device(keep=key):
                    raise
                session = await asyncio.to_thread(Session.open, folder / meta.data, self.engine,
                                                    score_device=self.score_device)
            logger.info("opened session %s (%d tokens) in %.2f s", key, session.num_tokens,
                        time.perf_counter() - t0)
            entry = self._open[key] = Entry(meta, folder, session, quota=self.quota)
            await self._evict(keep=key)
            return entry

    @contextlib.asynccontextmanager
    async def attach(self, entry: Entry, holder: str, *, ingest: bool = True) -> AsyncIterator[Entry]:
        """Make ``holder`` the session's only writer while the context lasts.

        Raises SessionBusy when another writer holds it, SessionFinished when ``ingest`` and the
        session is finished. Waits for the previous writer's last commit before yielding.
        """
        if entry.writer is not None:
            raise SessionBusy(entry.session_id, entry.writer)
        if ingest and entry.finished:
            raise SessionFinished(entry.session_id)
        entry.writer = holder
        try:
            if entry.commit is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(entry.commit)
            yield entry
        finally:
            entry.writer = None

    # ------------------------------------------------------------------ closing
    async def _evict(self, keep: str) -> None:
        """Close idle sessions but ``keep``, least recently used first, while more than ``max_open``
        are open."""
        idle = self._idle(keep)
        excess = len(self._open) - self.max_open
        for entry in idle[: max(0, excess)]:
            await self._close_idle(entry)
        if self.device_budget > 0:
            used = self.device_bytes()
            for entry in idle[max(0, excess):]:
                if used <= self.device_budget:
                    break
                used -= entry.session.device_bytes
                await self._close_idle(entry)
            if used > self.device_budget:
                logger.warning("open sessions hold %.2f GiB of device memory for retrieval, over the budget of "
                               "%.2f GiB, and none of the others is idle", used / 2**30, self.device_budget / 2**30)

    async def _close_idle(self, entry: Entry) -> None:
        """Close an idle session to make room. Its files are closed even when its checkpoint fails (an
        ``OSError``, e.g. a full disk): that is logged, not raised to the call that needed the room, since
        the indexes catch up with the table when the session reopens, as after a crash."""
        try:
            await self._close(entry)
        except OSError as e:
            logger.warning("session %s closed without its index checkpoint (%s); its indexes catch up when it "
                           "reopens", entry.session_id, e)

    def _idle(self, keep: str | None) -> Sequence[Entry]:  # (`list` is a method here)
        """The idle open sessions but ``keep``, least recently used first."""
        return sorted((e for e in self._open.values() if e.idle and e.key != keep), key=lambda e: e.last_used)

    async def _drop_failed(self, entry: Entry) -> None:
        """Close a session whose step failed once no call uses it: the next lease reopens it from disk,
        replaying its files as after a crash (``Session.failed``)."""
        async with self._lock:
            if self._open.get(entry.key) is not entry or not entry.idle:
                return
            failed = entry.session.failed
            logger.warning("session %s: a step failed (%s: %s); closing it, the next call reopens it from disk",
                           entry.session_id, type(failed).__name__, failed)
            await self._close(entry)
            if isinstance(failed, DeviceMemoryError):
                await self._free_device(keep=None)

    async def _free_device(self, keep: str | None) -> bool:
        """Out of retrieval device memory: close every idle session holding a device mirror (but ``keep``),
        least recently used first; they reopen on their next call. Returns whether any was closed."""
        idle = [e for e in self._idle(keep) if e.session.device_bytes > 0]
        freed = sum(e.session.device_bytes for e in idle)
        for entry in idle:
            await self._close(entry)
        logger.warning("out of retrieval device memory: closed %d idle sessions (%.2f GiB of mirrors); "
                       "--retrieval-device-gib caps what open sessions hold", len(idle), freed / 2**30)
        return bool(idle)

    def device_bytes(self) -> int:
        """Device memory held by the open sessions' retrieval mirrors."""
        return sum(e.session.device_bytes for e in list(self._open.values()))  # list: read from other threads

    async def _close(self, entry: Entry, *, checkpoint: bool = True) -> None:
        self._open.pop(entry.key, None)
        await asyncio.to_thread(functools.partial(entry.session.close, checkpoint=checkpoint))

    async def wait_commits(self) -> None:
        """Wait for every in-flight commit (graceful shutdown)."""
        tasks = [e.commit for e in self._open.values() if e.commit is not None and not e.commit.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close_all(self) -> None:
        """Checkpoint and close every open session (after :meth:`wait_commits`)."""
        await self.wait_commits()
        async with self._lock:
            for entry in list(self._open.values()):
                try:
                    await self._close(entry)
                except Exception:  # noqa: BLE001 - close the others anyway
                    logger.exception("closing session %s failed", entry.session_id)

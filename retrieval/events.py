"""The event table: every closed event of a session, with its representative vectors.

Contract
--------
* An **event** is a token range ``[start, end)`` of the session's KV log. Ids are dense
  ``0 .. n-1`` in temporal order (``end[i] <= start[i+1]``). Closed events are immutable.
* One **writer** per table (the session's server-side store). Readers in the same process share the
  object; other processes may open the directory read-only and :meth:`EventTable.refresh`.
* Files (raw, little-endian), in the session directory next to the KV log::

      events.json            {"version", "num_layers", "dim", "vectors", "layers"}   written once, atomically
      events.i64             int64 [n, 2]                      (start, end) per event
      reps_LLL.f32           float32 [capacity, dim]           representative of each event, layer LLL

  A row may hold several vectors of ``vector_dim = dim // vectors`` values each (an event kept as
  ``vectors`` separate keys, scored by the best of them; ``representatives``). ``vectors`` is
  optional in the header (1 when absent).

* **Stored layers.** A table stores the representatives of ``layers`` (a subset of the model's
  ``0 .. num_layers-1``; the ones its retrieval scores: a shared selection reads only its scoring
  layers) and has no file for the others; reading one of those is an error. Format 1 (no ``layers``
  in the header) stores every layer; a table of fewer layers is written as format 2, so a build that
  knows only format 1 refuses it instead of taking the missing files for a torn table.

      reps.count             int64: events 0 .. k-1 have representatives on disk   (optional)

* **int8 tables** (format 3, header ``"dtype": "int8"``, ``"groups": G``): each row is rounded to int8 in
  ``G`` equal groups of values (a session's: one per vector and kv head), each with its scale
  ``max |x| / 127`` (values ``round(x / scale)``, so a group's largest value is exact)::

      reps_LLL.q8            [capacity] rows of: float32 [G] scales, int8 [dim] values (padded to 4 bytes)

  Readers get float32 back (``scale * value``): :meth:`EventTable.rows`, :meth:`EventTable.reps_of` and
  :meth:`EventTable.reps`. A row is ``4 G + dim`` bytes instead of ``4 dim`` (0.27x for 64-value
  groups). :meth:`EventTable.quantized` gives what a table returns for rows written to it, so that a copy
  kept elsewhere (a GPU mirror) holds the same values. Format 3 is refused by builds that know only 1
  and 2.

* **Event-major int8 tables** (format 4, header ``"layout": "event"``; what :meth:`EventTable.create`
  writes for int8 unless told otherwise): the same rows, all stored layers of an event side by side in
  one file::

      reps.q8                [capacity] records of: [len(layers)] int8 rows (as above)

  A rescoring reads whole events (every scoring layer of a few thousand candidates scattered over the
  session): one contiguous record per event instead of a row in each layer's file, so a cold read of a
  candidate is one run of pages, not ``len(layers)`` scattered pages. A layer's rows are a strided view
  of the file. Format 3 tables (a file per layer) are still read and written. Format 4 is refused by
  builds that know only 1 to 3.

* **Representatives are derived data** (a function of the KV log and the event's range). A writer that
  keeps them elsewhere (``append(bounds, None)``: GPU scoring mirrors them in device memory) stores
  only the records; ``reps.count`` then says how many leading events have rows on disk (written once,
  atomically, before the first such record). Absent: every committed event has its rows (the
  original invariant). :meth:`write_reps` fills the missing rows (recomputed from the log by
  ``EpisodicMemory`` when a CPU writer opens such a table) and removes ``reps.count`` once all are
  there. :meth:`reps` refuses while rows are missing; :meth:`stored_reps` reads the stored prefix.

* Commit protocol: :meth:`EventTable.append` writes the representatives of every layer first, then
  the ``(start, end)`` records. The committed count is ``size(events.i64) // 16``. Representative
  files are preallocated by doubling (``capacity >= n``), so readers map them once per growth, not
  once per append; rows at or beyond ``n`` are garbage and never read.
* Crash recovery (open for writing): a torn record (file size not a multiple of 16), a record that
  breaks the ordering invariant, or a record whose representatives are not all on disk (beyond
  ``reps.count`` when present: the rows are not expected there) ends the table there; everything
  after it is truncated. The table reopens without any rebuild.
* Threads: the writer may append while readers of the same object, in other threads, read the
  bounds and the length: both are published together, as one ``(bounds, n)`` pair replaced after
  the rows are in place, so a reader sees a whole table, before or after an append.
* Resident memory: the ``(start, end)`` arrays (16 bytes per event). Representatives stay in the
  memory-mapped files (page cache), read per query.
* Disk: 16 bytes per event, plus ``len(layers) x dim x 4`` bytes per event with representatives
  (int8: ``len(layers) x (4 G + dim)``, with ``dim`` padded to 4 bytes).

Size: one on-disk format (two header versions, the rows kept elsewhere, crash recovery), read and written
here only; most of the length is its contract and the checks that keep it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emserve.retrieval.errors import EventTableError
from emserve.retrieval.mapping import Mapping, map_file

HEADER_FILE = "events.json"
RECORDS_FILE = "events.i64"
REPS_COUNT_FILE = "reps.count"
FORMAT_VERSION = 2
"""Format of a table of a subset of the layers (format 1: every layer, the only one older builds read)."""
ALL_LAYERS_VERSION = 1
INT8_VERSION = 3
"""Format of an int8 table with a file per layer."""
EVENT_MAJOR_VERSION = 4
"""Format of an int8 table with one record per event (every stored layer side by side)."""
EVENT_MAJOR_FILE = "reps.q8"
VERSIONS = (ALL_LAYERS_VERSION, FORMAT_VERSION, INT8_VERSION, EVENT_MAJOR_VERSION)
DTYPES = ("float32", "int8")
"""How a table stores its representatives."""
_RECORD = 16  # two int64
_MIN_CAPACITY = 64


def _reps_file(layer: int, dtype: str = "float32") -> str:
    return f"reps_{layer:03d}.{'q8' if dtype == 'int8' else 'f32'}"


def _pad4(n: int) -> int:
    return -(-n // 4) * 4


def quantize_rows(x: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``x [n, dim]`` float32 as int8 in ``groups`` equal groups per row: (scales float32 ``[n, groups]``,
    values int8 ``[n, dim]``); a group's scale is ``max |x| / 127`` (0 for an all-zero group)."""
    n, dim = x.shape
    g = np.asarray(x, np.float32).reshape(n, groups, dim // groups)
    scale = (np.abs(g).max(axis=2) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    values = np.clip(np.rint(g / safe[:, :, None]), -127, 127).astype(np.int8)
    return scale, values.reshape(n, dim)


def dequantize_rows(scales: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The float32 ``[n, dim]`` rows of :func:`quantize_rows`' output."""
    n, dim = values.shape
    groups = scales.shape[1]
    out = values.reshape(n, groups, dim // groups).astype(np.float32)
    out *= scales[:, :, None]
    return out.reshape(n, dim)


def _stored_layers(num_layers: int, layers: Sequence[int] | None) -> tuple[int, ...]:
    """``layers`` checked and sorted (None: every layer)."""
    if layers is None:
        return tuple(range(num_layers))
    out = tuple(sorted({int(x) for x in layers}))
    if not out or not all(0 <= x < num_layers for x in out):
        raise EventTableError(f"stored layers must be a non-empty subset of 0 .. {num_layers - 1}, got {list(layers)}")
    return out


def _check_dtype(dim: int, dtype: str, groups: int, event_major: bool = False) -> None:
    if dtype not in DTYPES:
        raise EventTableError(f"table dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "int8" and (groups < 1 or dim % groups):
        raise EventTableError(f"an int8 row of {dim} values cannot have {groups} scale groups")
    if event_major and dtype != "int8":
        raise EventTableError("only an int8 table is stored event-major")


def _span(layers: Sequence[int]) -> str:
    """``0-19`` for a contiguous run, else the list."""
    ls = list(layers)
    return f"{ls[0]}-{ls[-1]}" if ls and ls == list(range(ls[0], ls[-1] + 1)) else str(ls)


class EventTable:
    """Closed events of one session. Not thread-safe for writing; one writer."""

    def __init__(self, path: str | os.PathLike[str], num_layers: int, dim: int, *, writable: bool,
                 fsync: bool = False, vectors: int = 1, layers: Sequence[int] | None = None,
                 dtype: str = "float32", groups: int = 1, event_major: bool = False) -> None:
        self.path = Path(path)
        self.num_layers = num_layers
        self.dim = dim
        self.vectors = vectors
        if vectors < 1 or dim % vectors:
            raise EventTableError(f"row width {dim} is not a multiple of {vectors} vectors")
        _check_dtype(dim, dtype, groups, event_major)
        self.dtype = dtype
        """``"float32"`` or ``"int8"`` (module docstring)."""
        self.groups = groups if dtype == "int8" else 1
        """Scale groups per row of an int8 table (1 for float32)."""
        self.layers: tuple[int, ...] = _stored_layers(num_layers, layers)
        """The layers whose representatives the table stores (ascending)."""
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self.event_major = event_major
        """Format 4: one record per event holding every stored layer's row (module docstring)."""
        self.writable = writable
        self.fsync = fsync
        # (bounds [capacity, 2], n): rows < n valid; replaced as one pair, after the rows are in place
        self._view: tuple[np.ndarray, int] = (np.zeros((0, 2), np.int64), 0)
        self._maps: dict[str, tuple[Mapping, int]] = {}  # (mapping, rows) per representatives file
        self._fds: dict[str, int] = {}
        self._capacity = 0
        self._reps_count: int | None = None  # events with rows on disk; None: all of them (no reps.count)
        if writable:
            self._recover()
        self.refresh()

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | os.PathLike[str], num_layers: int, dim: int, *,
               fsync: bool = False, vectors: int = 1, layers: Sequence[int] | None = None,
               dtype: str = "float32", groups: int = 1, event_major: bool | None = None) -> EventTable:
        """A new table storing the representatives of ``layers`` (None: every layer), as ``dtype``
        (``"int8"``: in ``groups`` scale groups per row). ``event_major``: one record per event (format
        4); None: for int8 (format 3, a file per layer, is what older builds wrote)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if (p / HEADER_FILE).exists():
            raise EventTableError(f"an event table already exists at {p}")
        if num_layers <= 0 or dim <= 0 or vectors < 1 or dim % vectors:
            raise EventTableError(f"bad event table shape: {num_layers} layers, dim {dim}, {vectors} vectors")
        event_major = dtype == "int8" if event_major is None else event_major
        _check_dtype(dim, dtype, groups, event_major)
        stored = _stored_layers(num_layers, layers)
        head: dict[str, object] = {"version": ALL_LAYERS_VERSION, "num_layers": num_layers, "dim": dim,
                                   "vectors": vectors}
        if dtype == "int8":
            head.update(version=INT8_VERSION, layers=list(stored), dtype=dtype, groups=groups)
            if event_major:
                head.update(version=EVENT_MAJOR_VERSION, layout="event")
        elif len(stored) < num_layers:
            head.update(version=FORMAT_VERSION, layers=list(stored))
        tmp = p / (HEADER_FILE + ".tmp")
        tmp.write_text(json.dumps(head))
        os.replace(tmp, p / HEADER_FILE)
        return cls(p, num_layers, dim, writable=True, fsync=fsync, vectors=vectors, layers=stored,
                   dtype=dtype, groups=groups, event_major=event_major)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False, fsync: bool = False) -> EventTable:
        p = Path(path)
        try:
            head = json.loads((p / HEADER_FILE).read_text())
        except FileNotFoundError:
            raise EventTableError(f"no event table at {p}") from None
        version = head.get("version")
        if version not in VERSIONS:
            raise EventTableError(f"event table at {p} has format {version}, need one of {VERSIONS}")
        layers = head.get("layers") if version != ALL_LAYERS_VERSION else None
        int8 = version in (INT8_VERSION, EVENT_MAJOR_VERSION)
        if int8 and head.get("dtype") != "int8":
            raise EventTableError(f"event table at {p}: format {version} with dtype {head.get('dtype')!r}")
        if (version == EVENT_MAJOR_VERSION) != (head.get("layout") == "event"):
            raise EventTableError(f"event table at {p}: format {version} with layout {head.get('layout')!r}")
        return cls(p, int(head["num_layers"]), int(head["dim"]), writable=writable, fsync=fsync,
                   vectors=int(head.get("vectors", 1)), layers=layers, dtype="int8" if int8 else "float32",
                   groups=int(head.get("groups", 1)), event_major=version == EVENT_MAJOR_VERSION)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], num_layers: int, dim: int, *,
                       fsync: bool = False, vectors: int = 1, layers: Sequence[int] | None = None,
                       dtype: str = "float32", groups: int = 1) -> EventTable:
        """The table at ``path``, or a new one storing ``layers`` as ``dtype``. An existing table must have
        the shape and the dtype and store at least ``layers`` (e.g. a format 1 table of every layer); it
        keeps the ones it has."""
        p = Path(path)
        if (p / HEADER_FILE).exists():
            table = cls.open(p, writable=True, fsync=fsync)
            need = _stored_layers(num_layers, layers)
            want_groups = groups if dtype == "int8" else 1
            if (table.num_layers, table.dim, table.vectors, table.dtype, table.groups) \
                    != (num_layers, dim, vectors, dtype, want_groups) or not set(need) <= set(table.layers):
                table.close()
                raise EventTableError(
                    f"event table at {p} has {table.num_layers} layers x dim {table.dim} {table.dtype} "
                    f"({table.vectors} vectors; layers {_span(table.layers)} stored), need {num_layers} x {dim} "
                    f"{dtype} ({vectors} vectors; layers {_span(need)})"
                )
            return table
        return cls.create(p, num_layers, dim, fsync=fsync, vectors=vectors, layers=layers, dtype=dtype,
                          groups=groups)

    @property
    def vector_dim(self) -> int:
        """Values per vector (``dim // vectors``)."""
        return self.dim // self.vectors

    @property
    def _row_bytes(self) -> int:
        return 4 * self.groups + _pad4(self.dim) if self.dtype == "int8" else self.dim * 4

    @property
    def _stride(self) -> int:
        """Bytes per event in a representatives file (every stored layer's row in an event-major one)."""
        return self._row_bytes * (len(self.layers) if self.event_major else 1)

    def _file(self, layer: int) -> str:
        return EVENT_MAJOR_FILE if self.event_major else _reps_file(layer, self.dtype)

    @property
    def _files(self) -> list[str]:
        """The representatives files, each once."""
        return [EVENT_MAJOR_FILE] if self.event_major else [self._file(layer) for layer in self.layers]

    def _valid_prefix(self, bounds: np.ndarray) -> int:
        """Length of the longest prefix of records that satisfies the table invariants."""
        n = bounds.shape[0]
        if n == 0:
            return 0
        ok = (bounds[:, 0] >= 0) & (bounds[:, 0] < bounds[:, 1])
        ok[1:] &= bounds[1:, 0] >= bounds[:-1, 1]
        bad = np.flatnonzero(~ok)
        return int(bad[0]) if bad.size else n

    def _recover(self) -> None:
        rec = self.path / RECORDS_FILE
        size = rec.stat().st_size if rec.exists() else 0
        raw = np.fromfile(rec, dtype="<i8", count=(size // _RECORD) * 2) if size else np.zeros(0, np.int64)
        n = self._valid_prefix(raw.reshape(-1, 2))
        stored = saved = self._read_reps_count()
        for name in self._files:
            f = self.path / name
            rows = (f.stat().st_size if f.exists() else 0) // self._stride
            if stored is None:
                n = min(n, rows)
            else:  # rows are expected below reps.count only
                stored = min(stored, rows)
        if stored is not None:
            stored = min(stored, n)
            count = None if stored >= n else stored  # every record has its rows: no file
            if count != saved:  # a reader's open, or one on a full disk, writes nothing it need not
                self._write_reps_count(count)
            else:
                self._reps_count = count
        fd = os.open(rec, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, n * _RECORD)
        os.lseek(fd, 0, os.SEEK_END)
        self._fds[RECORDS_FILE] = fd
        self._capacity = max(_MIN_CAPACITY, 1 << max(n - 1, 0).bit_length())
        for name in self._files:
            fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(fd).st_size < self._capacity * self._stride:
                os.ftruncate(fd, self._capacity * self._stride)
            self._fds[name] = fd

    def _read_reps_count(self) -> int | None:
        try:
            raw = (self.path / REPS_COUNT_FILE).read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) != 8:
            raise EventTableError(f"{self.path / REPS_COUNT_FILE} is damaged ({len(raw)} bytes)")
        return int(np.frombuffer(raw, "<i8")[0])

    def _write_reps_count(self, k: int | None) -> None:
        """Persist ``reps.count`` (atomically), or remove it (None: every event has its rows)."""
        f = self.path / REPS_COUNT_FILE
        if k is None:
            f.unlink(missing_ok=True)
        else:
            tmp = f.with_name(f.name + ".tmp")
            with open(tmp, "wb") as out:
                out.write(np.int64(k).astype("<i8").tobytes())
                if self.fsync:
                    os.fsync(out.fileno())
            os.replace(tmp, f)
        self._reps_count = k

    @property
    def reps_count(self) -> int:
        """Events ``0 .. reps_count-1`` have representatives on disk (readers: as of the last refresh)."""
        return len(self) if self._reps_count is None else min(self._reps_count, len(self))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps = {}

    def __enter__(self) -> EventTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ length / bounds
    def __len__(self) -> int:
        return self._view[1]

    def refresh(self) -> int:
        """Re-read the committed records (readers; the writer is always current). Returns ``n``."""
        if not self.writable:
            self._reps_count = self._read_reps_count()
        rec = self.path / RECORDS_FILE
        size = rec.stat().st_size if rec.exists() else 0
        n = size // _RECORD
        bounds, have = self._view
        if n != have or bounds.shape[0] < n:
            raw = np.fromfile(rec, dtype="<i8", count=n * 2).reshape(-1, 2) if n else np.zeros((0, 2), "<i8")
            n = min(n, self._valid_prefix(raw))
            self._view = (np.array(raw[:n], dtype=np.int64), n)
        return len(self)

    @property
    def starts(self) -> np.ndarray:
        """int64 [n] (a view; do not modify)."""
        b, n = self._view
        return b[:n, 0]

    @property
    def ends(self) -> np.ndarray:
        """int64 [n] (a view; do not modify)."""
        b, n = self._view
        return b[:n, 1]

    @property
    def sizes(self) -> np.ndarray:
        """int64 [n]: tokens per event."""
        b, n = self._view
        return b[:n, 1] - b[:n, 0]

    def bounds(self, event_id: int) -> tuple[int, int]:
        b, n = self._view
        if not 0 <= event_id < n:
            raise EventTableError(f"event {event_id} outside table of {n} events")
        s, e = b[event_id]
        return int(s), int(e)

    @property
    def end_offset(self) -> int:
        """End of the last event (0 when empty)."""
        b, n = self._view
        return int(b[n - 1, 1]) if n else 0

    def count_ending_by(self, offset: int) -> int:
        """Number of events with ``end <= offset`` (a prefix of the table, ids ``0 .. m-1``)."""
        return int(np.searchsorted(self.ends, offset, side="right"))

    # ------------------------------------------------------------------ append (writer)
    def append(self, bounds: Sequence[tuple[int, int]] | np.ndarray, reps: np.ndarray | None) -> int:
        """Append E events: ``bounds [E, 2]`` (start, end) and ``reps [E, len(layers), dim]``, or None to
        store no representatives (module docstring; then every later append stores none until
        :meth:`write_reps` has filled them in).

        Returns the id of the first appended event.
        """
        if not self.writable:
            raise EventTableError(f"event table at {self.path} is open read-only")
        b = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
        e = b.shape[0]
        r = None if reps is None else np.asarray(reps, dtype=np.float32)
        if r is not None and r.shape != (e, len(self.layers), self.dim):
            raise EventTableError(f"reps must be [{e}, {len(self.layers)}, {self.dim}] (layers "
                                  f"{_span(self.layers)}), got {r.shape}")
        if e == 0:
            return len(self)
        prev_end = self.end_offset
        if self._valid_prefix(b) != e or b[0, 0] < prev_end:
            raise EventTableError(f"events must be non-empty, ordered and after {prev_end}: {b.tolist()}")
        bounds, first = self._view
        if r is None:
            if self._reps_count is None:
                self._write_reps_count(first)  # before the first record without rows
        else:
            if self.reps_count < first:
                raise EventTableError(f"events {self.reps_count} .. {first - 1} have no representatives on disk: "
                                      "write_reps them before appending events with representatives")
            self._write_rows(first, r)
            if self._reps_count is not None:  # rows 0 .. first+e-1 are all on disk again
                self._write_reps_count(None)
        fd = self._fds[RECORDS_FILE]
        view = memoryview(b.astype("<i8").tobytes())
        while view:
            view = view[os.write(fd, view):]
        if self.fsync:
            os.fsync(fd)
        if bounds.shape[0] < first + e:
            grown = np.zeros((max(_MIN_CAPACITY, 2 * (first + e)), 2), np.int64)
            grown[:first] = bounds[:first]
            bounds = grown
        bounds[first:first + e] = b
        self._view = (bounds, first + e)
        return first

    def _write_rows(self, first: int, r: np.ndarray) -> None:
        if not np.isfinite(r).all():
            raise EventTableError("representatives contain NaN or inf")
        self._reserve(first + r.shape[0])
        if self.event_major:  # [E, layers, dim] -> E records of every layer's row, one write
            data = self._encode(np.ascontiguousarray(r, dtype=np.float32).reshape(-1, self.dim))
            os.pwrite(self._fds[EVENT_MAJOR_FILE], data, first * self._stride)
        else:
            for i, layer in enumerate(self.layers):
                data = self._encode(np.ascontiguousarray(r[:, i, :], dtype=np.float32))
                os.pwrite(self._fds[self._file(layer)], data, first * self._row_bytes)
        if self.fsync:
            for name in self._files:
                os.fsync(self._fds[name])

    def _encode(self, rows: np.ndarray) -> bytes:
        """``rows [n, dim]`` float32 as the file stores them."""
        if self.dtype != "int8":
            return rows.astype("<f4", copy=False).tobytes()
        scales, values = quantize_rows(rows, self.groups)
        out = np.zeros((rows.shape[0], self._row_bytes), np.uint8)
        out[:, : 4 * self.groups] = scales.astype("<f4").view(np.uint8)
        out[:, 4 * self.groups: 4 * self.groups + self.dim] = values.view(np.uint8)
        return out.tobytes()

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        """Mapped rows (:meth:`_mapped`) as float32 ``[n, dim]``: decoded from an int8 table's ``[n, row_bytes]``
        bytes, a float32 table's as they are."""
        if self.dtype != "int8":
            return raw
        g = 4 * self.groups
        scales = np.ascontiguousarray(raw[:, :g]).view("<f4")
        values = np.ascontiguousarray(raw[:, g: g + self.dim]).view(np.int8)
        return dequantize_rows(scales, values)

    def quantized(self, reps: np.ndarray) -> np.ndarray:
        """The float32 values this table gives back for representatives ``reps [..., dim]`` written to it
        (``reps`` itself for a float32 table)."""
        r = np.asarray(reps, np.float32)
        if self.dtype != "int8":
            return r
        flat = r.reshape(-1, self.dim)
        return dequantize_rows(*quantize_rows(flat, self.groups)).reshape(r.shape)

    def write_reps(self, first: int, reps: np.ndarray) -> None:
        """Store the missing representatives of events ``first .. first+E-1`` (``first == reps_count``;
        ``reps [E, len(layers), dim]``). Once every event has its rows, ``reps.count`` is removed."""
        if not self.writable:
            raise EventTableError(f"event table at {self.path} is open read-only")
        r = np.asarray(reps, dtype=np.float32)
        n = len(self)
        if first != self.reps_count or r.ndim != 3 or r.shape[1:] != (len(self.layers), self.dim) \
                or first + r.shape[0] > n:
            raise EventTableError(f"write_reps({first}, {r.shape}): need rows from {self.reps_count}, "
                                  f"[E, {len(self.layers)}, {self.dim}], within {n} events")
        self._write_rows(first, r)
        done = first + r.shape[0]
        self._write_reps_count(None if done >= n else done)

    def _reserve(self, n: int) -> None:
        if n <= self._capacity:
            return
        cap = self._capacity
        while cap < n:
            cap *= 2
        for name in self._files:
            os.ftruncate(self._fds[name], cap * self._stride)
        self._capacity = cap

    def truncate(self, n: int) -> None:
        """Drop events ``n ..`` (used when the KV log turned out shorter than the table after a crash)."""
        if not self.writable:
            raise EventTableError(f"event table at {self.path} is open read-only")
        if not 0 <= n <= len(self):
            raise EventTableError(f"cannot truncate {len(self)} events to {n}")
        os.ftruncate(self._fds[RECORDS_FILE], n * _RECORD)
        os.lseek(self._fds[RECORDS_FILE], 0, os.SEEK_END)
        self._view = (self._view[0], n)
        if self._reps_count is not None and self._reps_count > n:
            self._write_reps_count(n)

    # ------------------------------------------------------------------ representatives (read)
    def reps(self, layer: int) -> np.ndarray:
        """float32 ``[n, dim]``: layer ``layer``'s representatives, a read-only memory-mapped view (an int8
        table: a decoded copy of the whole layer; read parts of it with :meth:`rows`)."""
        self._check_rows()
        return self.stored_reps(layer)

    def rows(self, layer: int, lo: int, hi: int) -> np.ndarray:
        """float32 ``[hi - lo, dim]``: events ``lo .. hi-1``'s representatives of one layer (a view of the
        mapping, or a decoded copy for an int8 table)."""
        self._check_rows()
        return self.stored_rows(layer, lo, hi)

    def _check_rows(self) -> None:
        if self.reps_count < len(self):
            raise EventTableError(f"events {self.reps_count} .. {len(self) - 1} of {self.path} have no "
                                  "representatives on disk (kept in device memory by their writer)")

    def _mapped(self, layer: int) -> np.ndarray:
        """The mapped rows on disk, ``[reps_count, dim]`` float32 (``[reps_count, row_bytes]`` uint8: int8)."""
        held = self._mapping(layer)
        if held is None:
            int8 = self.dtype == "int8"
            return np.zeros((0, self._row_bytes if int8 else self.dim), np.uint8 if int8 else np.float32)
        rows = held.array[:self.reps_count]
        return np.asarray(rows[:, self._slot[layer]] if self.event_major else rows)  # a layer: strided

    def prefetch(self, layers: Sequence[int], ids: np.ndarray | Sequence[int]) -> None:
        """Start reading the stored rows of events ``ids`` in ``layers`` into the page cache, without
        waiting (``Mapping.willneed``): a rescoring's reads of candidates scattered over a long session
        then find their pages read or in flight, not a page (or a readahead window) per fault. Ids past
        the stored rows are ignored."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < self.reps_count)]
        if ids.size == 0:
            return
        brk = np.flatnonzero(np.diff(ids) > 1) + 1  # runs of consecutive events: one span each
        spans = list(zip(ids[np.r_[0, brk]].tolist(), (ids[np.r_[brk - 1, ids.size - 1]] + 1).tolist(), strict=True))
        for layer in {self._file(lay): lay for lay in layers}.values():  # each file once
            held = self._mapping(layer)
            if held is not None:
                held.willneed(spans)

    def _mapping(self, layer: int) -> Mapping | None:
        """The mapping of ``layer``'s representatives file, covering at least ``reps_count`` events (None
        while there are none): ``[rows, dim]`` float32, ``[rows, row_bytes]`` uint8 (int8), or
        ``[rows, len(layers), row_bytes]`` (event-major)."""
        if layer not in self._slot:
            raise EventTableError(f"layer {layer} has no representatives in {self.path} (it stores layers "
                                  f"{_span(self.layers)})")
        n = self.reps_count
        if n == 0:
            return None
        name = self._file(layer)
        held = self._maps.get(name)
        if held is None or held[1] < n:
            path = self.path / name
            rows = os.stat(path).st_size // self._stride
            if rows < n:
                raise EventTableError(f"{path} holds {rows} rows, table has {n} events")
            if self.event_major:
                held = (map_file(path, "u1", (rows, len(self.layers), self._row_bytes)), rows)
            elif self.dtype == "int8":
                held = (map_file(path, "u1", (rows, self._row_bytes)), rows)
            else:
                held = (map_file(path, "<f4", (rows, self.dim)), rows)
            self._maps[name] = held
        return held[0]

    def stored_reps(self, layer: int) -> np.ndarray:
        """float32 ``[reps_count, dim]``: the representatives on disk (as :meth:`reps`)."""
        return self._decode(self._mapped(layer))

    def stored_rows(self, layer: int, lo: int, hi: int) -> np.ndarray:
        """float32 ``[hi - lo, dim]`` of the representatives on disk (as :meth:`rows`, within ``reps_count``)."""
        if not 0 <= lo <= hi <= self.reps_count:
            raise EventTableError(f"rows {lo} .. {hi - 1} outside the {self.reps_count} stored in {self.path}")
        return self._decode(self._mapped(layer)[lo:hi])

    def reps_of(self, layer: int, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 ``[len(ids), dim]`` copy of some events' representatives of one layer."""
        self._check_rows()
        return self._decode(self._mapped(layer)[np.asarray(ids, dtype=np.int64)])

    def disk_bytes(self) -> int:
        names = [HEADER_FILE, RECORDS_FILE, REPS_COUNT_FILE, *self._files]
        # allocated blocks, not apparent size: representative files are preallocated sparsely
        return sum((self.path / n).stat().st_blocks * 512 for n in names if (self.path / n).exists())

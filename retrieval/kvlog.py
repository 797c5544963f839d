"""The KV log: a session's append-only, memory-mapped record of every token it has seen.

Contract
--------
* One **writer** at a time per log: the vLLM engine-core process (the EM connector) or the reference
  engine. Any number of **readers**, in any process, map the same files and see appended data after
  :meth:`KVLog.refresh` without copies.
* Files in the log directory (raw, little-endian, token-major)::

      layout.json                  num_layers, num_kv_heads, head_dim, dtype
      tokens.i32                   int32 [n]          token ids
      positions.i32                int32 [n]          RoPE position each key was computed at
      k_LLL.bin / v_LLL.bin        dtype [n, H, D]    post-RoPE keys / values of layer LLL

* Commit protocol: an append writes K/V of every layer, then positions, then token ids. The
  committed length is ``size(tokens.i32) / 4``, so a reader never sees a token whose K/V is
  incomplete. Opening for writing truncates any torn tail beyond the committed length.
* Durability: a returned :meth:`append` survives a crash of the writing *process* (data is in the
  page cache). With ``fsync=True`` every append is also fsynced (survives power loss; costs one
  fsync per file per append).

Keys are stored exactly as the engine cached them (post-RoPE at ``positions``); a reader that places
a token at another position re-rotates by the difference (see ``emserve.server.engine.rope``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from emserve.retrieval.errors import LogError
from emserve.retrieval.mapping import Mapping, map_file

# name -> (torch dtype, numpy storage dtype of the same width)
_DTYPES: dict[str, tuple[torch.dtype, type[np.generic]]] = {
    "bfloat16": (torch.bfloat16, np.int16),
    "float16": (torch.float16, np.float16),
    "float32": (torch.float32, np.float32),
}
LAYOUT_FILE = "layout.json"
TOKENS_FILE = "tokens.i32"
POSITIONS_FILE = "positions.i32"


def dtype_name(dtype: torch.dtype) -> str:
    for name, (td, _) in _DTYPES.items():
        if td == dtype:
            return name
    raise LogError(f"unsupported KV log dtype {dtype}; use one of {sorted(_DTYPES)}")


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise LogError(f"unsupported KV log dtype {self.dtype!r}; use one of {sorted(_DTYPES)}")
        if min(self.num_layers, self.num_kv_heads, self.head_dim) <= 0:
            raise LogError(f"bad KV layout {self}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype][0]

    @property
    def np_dtype(self) -> type[np.generic]:
        return _DTYPES[self.dtype][1]

    @property
    def row_shape(self) -> tuple[int, int]:
        return (self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token over all layers (the raw KV size)."""
        elem = np.dtype(self.np_dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def _kfile(layer: int) -> str:
    return f"k_{layer:03d}.bin"


def _vfile(layer: int) -> str:
    return f"v_{layer:03d}.bin"


class KVLog:
    """An open KV log (reader or writer). Not thread-safe; give each thread its own reader."""

    def __init__(self, path: str | os.PathLike[str], layout: KVLayout, *, writable: bool, fsync: bool) -> None:
        self.path = Path(path)
        self.layout = layout
        self.writable = writable
        self.fsync = fsync
        self._n = 0
        self._appended = 0  # committed length after this writer's last append (detects outside truncation)
        self._maps: dict[str, tuple[Mapping, int]] = {}  # file -> (mapping, rows)
        self._fds: dict[str, int] = {}
        if writable:
            self._recover()
        self._appended = self.refresh()

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | os.PathLike[str], layout: KVLayout, *, fsync: bool = False) -> KVLog:
        """Create a new empty log (the directory may exist but must not hold a log)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if (p / LAYOUT_FILE).exists():
            raise LogError(f"a KV log already exists at {p}")
        tmp = p / (LAYOUT_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(layout)))
        os.replace(tmp, p / LAYOUT_FILE)
        return cls(p, layout, writable=True, fsync=fsync)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False, fsync: bool = False) -> KVLog:
        p = Path(path)
        try:
            layout = KVLayout(**json.loads((p / LAYOUT_FILE).read_text()))
        except FileNotFoundError:
            raise LogError(f"no KV log at {p}") from None
        return cls(p, layout, writable=writable, fsync=fsync)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], layout: KVLayout, *, fsync: bool = False) -> KVLog:
        p = Path(path)
        if (p / LAYOUT_FILE).exists():
            log = cls.open(p, writable=True, fsync=fsync)
            if log.layout != layout:
                raise LogError(f"KV log at {p} has layout {log.layout}, engine needs {layout}")
            return log
        return cls.create(p, layout, fsync=fsync)

    def _files(self) -> list[str]:
        names = [TOKENS_FILE, POSITIONS_FILE]
        for layer in range(self.layout.num_layers):
            names += [_kfile(layer), _vfile(layer)]
        return names

    def _row_bytes(self, name: str) -> int:
        if name in (TOKENS_FILE, POSITIONS_FILE):
            return 4
        return self.layout.num_kv_heads * self.layout.head_dim * np.dtype(self.layout.np_dtype).itemsize

    def _recover(self) -> None:
        """Truncate every file to the longest prefix that all files hold completely."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()
        sizes = {}
        for name in self._files():
            f = self.path / name
            sizes[name] = f.stat().st_size // self._row_bytes(name) if f.exists() else 0
        n = min(sizes.values())
        for name in self._files():
            fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(fd, n * self._row_bytes(name))
            os.lseek(fd, 0, os.SEEK_END)
            self._fds[name] = fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()

    def __enter__(self) -> KVLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ length
    def __len__(self) -> int:
        return self._n

    def refresh(self) -> int:
        """Re-read the committed length (cheap: one stat). Returns it."""
        try:
            self._n = (self.path / TOKENS_FILE).stat().st_size // 4
        except FileNotFoundError:
            self._n = 0
        return self._n

    # ------------------------------------------------------------------ append (writer)
    def append(
        self,
        token_ids: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        keys: Sequence[torch.Tensor] | torch.Tensor,
        values: Sequence[torch.Tensor] | torch.Tensor,
    ) -> int:
        """Append C tokens. ``keys[l]`` / ``values[l]``: ``[C, H, D]`` for each layer ``l``.

        Returns the log offset of the first appended token.
        """
        if not self.writable:
            raise LogError(f"KV log at {self.path} is open read-only")
        tok = np.ascontiguousarray(token_ids, dtype=np.int32)
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        c = tok.shape[0]
        if pos.shape != (c,) or len(keys) != self.layout.num_layers or len(values) != self.layout.num_layers:
            raise LogError(
                f"append needs {self.layout.num_layers} layers of [C={c}, H, D] and C positions; got "
                f"{len(keys)} key / {len(values)} value layers and positions {pos.shape}"
            )
        if self.refresh() != self._appended:
            self._recover()  # another writer truncated the log (session recovery): start from its end
            self.refresh()
        start = self._n
        want = (c, *self.layout.row_shape)
        for layer in range(self.layout.num_layers):
            for name, t in ((_kfile(layer), keys[layer]), (_vfile(layer), values[layer])):
                if tuple(t.shape) != want:
                    raise LogError(f"layer {layer}: expected K/V of shape {want}, got {tuple(t.shape)}")
                self._write(name, self._to_bytes(t))
        self._write(POSITIONS_FILE, pos.tobytes())
        if self.fsync:
            for name, fd in self._fds.items():
                if name != TOKENS_FILE:
                    os.fsync(fd)
        self._write(TOKENS_FILE, tok.tobytes())
        if self.fsync:
            os.fsync(self._fds[TOKENS_FILE])
        self._n = self._appended = start + c
        return start

    def truncate(self, n: int) -> None:
        """Drop every token from ``n`` on (writer only; used by recovery when no step is in flight)."""
        if not self.writable:
            raise LogError(f"KV log at {self.path} is open read-only")
        if not 0 <= n <= self.refresh():
            raise LogError(f"cannot truncate a log of {self._n} tokens to {n}")
        os.ftruncate(self._fds[TOKENS_FILE], n * 4)  # the commit point first
        self._recover()
        self.refresh()
        self._appended = self._n

    def _to_bytes(self, t: torch.Tensor) -> bytes | memoryview:
        t = t.detach().to("cpu", self.layout.torch_dtype).contiguous()
        if self.layout.dtype == "bfloat16":
            t = t.view(torch.int16)
        return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]

    def _write(self, name: str, data: bytes | memoryview) -> None:
        fd = self._fds[name]
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    # ------------------------------------------------------------------ read
    def _mapping(self, name: str, dtype: type[np.generic], row: tuple[int, ...]) -> Mapping:
        n = self._n  # read once: another thread's refresh() may raise it meanwhile
        held = self._maps.get(name)
        if held is None or held[1] < n:
            if n == 0:
                raise LogError(f"KV log at {self.path} is empty")
            held = (map_file(self.path / name, dtype, (n, *row), random=True), n)  # see retrieval.mapping
            self._maps[name] = held
        return held[0]

    def _map(self, name: str, dtype: type[np.generic], row: tuple[int, ...]) -> np.ndarray:
        return self._mapping(name, dtype, row).array

    def _check(self, start: int, end: int) -> None:
        if not (0 <= start <= end <= self._n):
            self.refresh()
            if not (0 <= start <= end <= self._n):
                raise LogError(f"range [{start}, {end}) outside KV log of {self._n} tokens at {self.path}")

    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        return np.array(self.token_view(start, end))

    def token_view(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """:meth:`tokens` without the copy: a read-only view of the mapped file (committed tokens never
        change; the view keeps its mapping alive). Reading it reads only the pages touched."""
        end = self._n if end is None else end
        self._check(start, end)
        if start == end:
            return np.zeros(0, np.int32)
        return self._map(TOKENS_FILE, np.int32, ())[start:end]

    def positions(self, start: int = 0, end: int | None = None) -> np.ndarray:
        end = self._n if end is None else end
        self._check(start, end)
        if start == end:
            return np.zeros(0, np.int32)
        return np.array(self._map(POSITIONS_FILE, np.int32, ())[start:end])

    def _rows(self, name: str, start: int, end: int) -> torch.Tensor:
        self._check(start, end)
        arr = self._map(name, self.layout.np_dtype, self.layout.row_shape)[start:end]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mapping: we never write through it
            t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.layout.dtype == "bfloat16" else t

    def keys(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Zero-copy ``[end-start, H, D]`` view of layer ``layer``'s post-RoPE keys (read-only)."""
        return self._rows(_kfile(layer), start, end)

    def values(self, layer: int, start: int, end: int) -> torch.Tensor:
        return self._rows(_vfile(layer), start, end)

    def prefetch(self, ranges: Sequence[tuple[int, int]], layers: Sequence[int] | None = None) -> None:
        """Start reading the keys and values of ``ranges`` in ``layers`` (default: all), and their
        positions, into the page cache, without waiting. A window's gathers read a few KiB per event
        and layer from all over the log; past the page cache each fault would read one page and wait
        for it, so a gather that follows this one finds its pages read or in flight. Ranges outside
        the committed log are clipped; cached pages cost one lookup per range and file."""
        n = self.refresh()
        spans = sorted((max(0, s), min(e, n)) for s, e in ranges if min(e, n) > max(0, s))
        if not spans:
            return
        merged = [spans[0]]
        for s, e in spans[1:]:
            if s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self._mapping(POSITIONS_FILE, np.int32, ()).willneed(merged)
        for layer in range(self.layout.num_layers) if layers is None else layers:
            for name in (_kfile(layer), _vfile(layer)):
                self._mapping(name, self.layout.np_dtype, self.layout.row_shape).willneed(merged)

    def gather(self, layer: int, ranges: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenated keys, values and stored positions (int64) of several ranges (copies)."""
        ks = [self.keys(layer, s, e) for s, e in ranges]
        vs = [self.values(layer, s, e) for s, e in ranges]
        ps = [torch.from_numpy(self.positions(s, e).astype(np.int64)) for s, e in ranges]
        return torch.cat(ks), torch.cat(vs), torch.cat(ps)

    def disk_bytes(self) -> int:
        return sum((self.path / n).stat().st_size for n in self._files() if (self.path / n).exists())

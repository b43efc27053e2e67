"""Window-indexed random access over every shard of a manifest split."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from .arrow_store import ArrowShard
from .checksum import checksum
from .fields import FieldSpec, check_window_arrays
from .manifest import Manifest, Shard, ShardPart
from .writer import PartWriter
from .zarr_store import ZarrShard

Verify = Literal["open", "lazy", "none"]


def open_shard(
    path: str | os.PathLike, format: str, fields: dict[str, FieldSpec] | None = None
) -> ArrowShard | ZarrShard:
    if format == "arrow":
        return ArrowShard(path, fields)
    if format == "zarr":
        return ZarrShard(path, fields)
    raise ValueError(f"unknown shard format {format!r}: use arrow or zarr")


def write_shard(
    path: str | os.PathLike,
    fields: dict[str, FieldSpec],
    arrays: dict[str, np.ndarray],
    format: str = "arrow",
    zarr_chunk_windows: int = 16,
    zarr_compression: str | None = None,
) -> ShardPart:
    """Write one shard part atomically (one Arrow record batch) and return its manifest entry."""
    n = check_window_arrays(fields, arrays)
    writer = PartWriter(path, fields, n, format=format, rows_per_batch=max(1, n),
                        zarr_chunk_windows=zarr_chunk_windows, zarr_compression=zarr_compression)
    try:
        if n:
            writer.append({k: np.asarray(arrays[k], dtype=spec.storage_dtype) for k, spec in fields.items()})
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def verify_part(part: ShardPart) -> None:
    """Raise a ``ValueError`` naming the shard when its bytes differ from the manifest's checksum."""
    if not part.path.exists():
        raise ValueError(f"shard {str(part.path)!r} is missing")
    try:
        got = checksum(part.path)
    except OSError as e:  # unreadable (permissions, I/O error): the same one-line report
        raise ValueError(f"shard {str(part.path)!r} cannot be read: {e.strerror or e}") from e
    if got != part.checksum:
        raise ValueError(
            f"shard {str(part.path)!r} is corrupted: checksum {got} != {part.checksum} in the manifest; "
            "re-run the stage that wrote it"
        )


def verify_parts(parts: Iterable[ShardPart], threads: int | None = None) -> None:
    """:func:`verify_part` on every part, ``threads`` at a time (hashlib releases the GIL, so threads
    add disk / memory bandwidth; bench/verify.py measures it). Every part is checked; the error names
    the first bad one in the order given and counts the others."""
    parts = list(parts)
    threads = threads or min(8, os.cpu_count() or 1, max(1, len(parts)))

    def check(p: ShardPart) -> str | None:
        try:
            verify_part(p)
        except ValueError as e:
            return str(e)
        return None

    if threads > 1 and len(parts) > 1:
        with ThreadPoolExecutor(threads) as pool:
            errors = [e for e in pool.map(check, parts) if e]
    else:
        errors = [e for e in map(check, parts) if e]
    if errors:
        more = f" (and {len(errors) - 1} more bad shard(s))" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)


def missing_parts(parts: Iterable[ShardPart]) -> list[str]:
    """The paths of ``parts`` that do not exist, in order, from one listing per folder instead of one
    ``stat`` per part (10,000 shards: two listings; on a network file system a stat is a round trip)."""
    listed: dict[str, set[str] | None] = {}
    out = []
    for p in parts:
        folder = str(p.path.parent)
        names = listed.get(folder, ())
        if names == ():
            try:
                names = listed[folder] = set(os.listdir(folder))
            except OSError:  # absent or unreadable folder: every part in it is missing
                names = listed[folder] = None
        if names is None or p.path.name not in names:
            out.append(str(p.path))
    return out


def default_max_open(n_parts: int) -> int:
    """Shards a dataset keeps open at once: each open Arrow part holds a file descriptor and a map, so
    the bound follows the process's open-file limit (half of it for this dataset; ``ulimit -n``), at
    most 4096 shards. A shard evicted and used again is reopened (~0.1 ms), not re-verified."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 16
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        soft = 1024
    return max(8, min(4096, soft // 2 // max(1, n_parts)))


class WindowDataset:
    """``ds[i]`` -> dict of per-window numpy arrays across all parts (tokens, concepts, ...).

    Checksums are verified before a shard's data is first used: all at construction with
    ``verify="open"`` (the parts of the requested fields, in parallel), or per shard on first access
    with ``"lazy"``. ``limit``: only the first ``limit`` windows are exposed (and verified), e.g. the
    validation windows a trainer evaluates on.

    Opening costs O(shards) in memory only: no shard file is opened or mapped before one of its
    windows is read (a 10,000-shard split opens in well under a second; bench/manifest.py). At most
    ``max_open`` shards stay open (least recently used closed first; default :func:`default_max_open`),
    so a run over more shards than the open-file limit never fails with "too many open files".
    Windows already returned stay valid after their shard is closed (the map lives while a view does).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        verify: Verify = "lazy",
        fields: list[str] | None = None,
        limit: int | None = None,
        max_open: int | None = None,
    ):
        if split not in manifest.splits:
            raise ValueError(f"manifest {manifest.path}: no split {split!r} (has {sorted(manifest.splits)})")
        if verify not in ("open", "lazy", "none"):
            raise ValueError(f"verify must be open, lazy or none, not {verify!r}")
        unknown = set(fields or []) - set(manifest.fields)
        if unknown:
            raise ValueError(f"manifest {manifest.path}: no field(s) {sorted(unknown)} (has {sorted(manifest.fields)})")
        self.manifest = manifest
        self.split = split
        self.verify = verify
        self.fields = {k: v for k, v in manifest.fields.items() if fields is None or k in fields}
        wanted_parts = [p for p in manifest.parts if any(manifest.field_parts[k] == p for k in self.fields)]
        self._part_fields = {
            p: {k: v for k, v in self.fields.items() if manifest.field_parts[k] == p} for p in wanted_parts
        }
        self.shards: list[Shard] = manifest.splits[split].shards
        self._starts = np.cumsum([0] + [s.windows for s in self.shards])
        if limit is not None and limit < self._starts[-1]:
            n_shards = int(np.searchsorted(self._starts, max(limit, 0), side="left"))  # shards holding windows < limit
            self.shards = self.shards[:n_shards]
            self._starts = np.minimum(self._starts[: n_shards + 1], max(limit, 0))
        if max_open is not None and max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open or default_max_open(len(self._part_fields))
        self._open: OrderedDict[int, list[ArrowShard | ZarrShard]] = OrderedDict()
        self._verified: set[int] = set()  # lazy mode: shards whose checksums held (an evicted one is not re-hashed)
        if verify == "open":
            verify_parts(self.parts())
        elif verify == "lazy":  # checksums wait for first use, but a missing file fails here, not mid-run
            missing = missing_parts(self.parts())
            if missing:
                raise ValueError(f"manifest {manifest.path}: {len(missing)} shard file(s) of split {split!r} missing, "
                                 f"first {missing[0]!r}; re-run the stage that wrote them or fix the paths")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def parts(self) -> list[ShardPart]:
        """Every shard part this dataset reads (the parts of its fields, of its shards), in order."""
        return [s.parts[p] for s in self.shards for p in self._part_fields]

    def _shard(self, k: int) -> list[ArrowShard | ZarrShard]:
        readers = self._open.get(k)
        if readers is not None:
            self._open.move_to_end(k)
            return readers
        if self.verify == "lazy" and k not in self._verified:
            for pname in self._part_fields:
                verify_part(self.shards[k].parts[pname])
            self._verified.add(k)
        readers = []
        try:
            for pname, pfields in self._part_fields.items():
                part = self.shards[k].parts[pname]
                r = open_shard(part.path, part.format, pfields)
                readers.append(r)
                if len(r) != self.shards[k].windows:
                    raise ValueError(
                        f"shard {str(part.path)!r} has {len(r)} windows, the manifest says {self.shards[k].windows}"
                    )
        except BaseException:
            for r in readers:
                r.close()
            raise
        while len(self._open) >= self.max_open:
            for r in self._open.popitem(last=False)[1]:
                r.close()
        self._open[k] = readers
        return readers

    @property
    def open_shards(self) -> int:
        """How many shards are open (mapped) now: none before the first window is read."""
        return len(self._open)

    def locate(self, i: int) -> tuple[int, int]:
        """Global window index -> (shard number, index within the shard)."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows in split {self.split!r})")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k, j = self.locate(int(i))
        out: dict[str, np.ndarray] = {}
        for r in self._shard(k):
            out.update(r[j])
        return out

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        """Stack windows ``indices`` into (B, ...) arrays (a copy: the batch is handed to torch).

        Indices are grouped by shard and each group is read with one fancy index per field."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"window index out of range ({len(self)} windows in split {self.split!r})")
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        out = {k: np.empty((len(idx), *v.shape), v.storage_dtype) for k, v in self.fields.items()}
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            local = idx[sel] - self._starts[k]
            for r in self._shard(int(k)):
                for name, arr in r.take(local).items():
                    out[name][sel] = arr
        return out

    def shard_arrays(self, k: int) -> dict[str, np.ndarray]:
        """All windows of shard ``k`` (views where the format allows)."""
        out: dict[str, np.ndarray] = {}
        for r in self._shard(k):
            out.update(r.arrays())
        return out

    def close(self) -> None:
        for readers in self._open.values():
            for r in readers:
                r.close()
        self._open.clear()


def open_split(
    manifest: Manifest,
    split: str,
    verify: Verify = "lazy",
    fields: list[str] | None = None,
    limit: int | None = None,
    max_open: int | None = None,
) -> WindowDataset:
    return WindowDataset(manifest, split, verify=verify, fields=fields, limit=limit, max_open=max_open)

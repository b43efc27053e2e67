"""Window-indexed random access over every shard of a manifest split."""

from __future__ import annotations

import os
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


class WindowDataset:
    """``ds[i]`` -> dict of per-window numpy arrays across all parts (tokens, concepts, ...).

    Checksums are verified before a shard's data is first used: all at construction with
    ``verify="open"`` (the parts of the requested fields, in parallel), or per shard on first access
    with ``"lazy"``. ``limit``: only the first ``limit`` windows are exposed (and verified), e.g. the
    validation windows a trainer evaluates on.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        verify: Verify = "lazy",
        fields: list[str] | None = None,
        limit: int | None = None,
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
        self._open: dict[int, list[ArrowShard | ZarrShard]] = {}
        if verify == "open":
            verify_parts(self.parts())
        elif verify == "lazy":  # checksums wait for first use, but a missing file fails here, not mid-run
            missing = [str(s.parts[p].path) for s in self.shards for p in wanted_parts if not s.parts[p].path.exists()]
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
        if readers is None:
            readers = []
            for pname, pfields in self._part_fields.items():
                part = self.shards[k].parts[pname]
                if self.verify == "lazy":
                    verify_part(part)
                r = open_shard(part.path, part.format, pfields)
                if len(r) != self.shards[k].windows:
                    raise ValueError(
                        f"shard {str(part.path)!r} has {len(r)} windows, the manifest says {self.shards[k].windows}"
                    )
                readers.append(r)
            self._open[k] = readers
        return readers

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
    manifest: Manifest, split: str, verify: Verify = "lazy", fields: list[str] | None = None, limit: int | None = None
) -> WindowDataset:
    return WindowDataset(manifest, split, verify=verify, fields=fields, limit=limit)

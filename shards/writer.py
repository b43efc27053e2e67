"""The one shard writer: windows arrive batch by batch, memory stays bounded.

A concept part is ~7x its token part at k_mix = 32 (146 vs 2 bytes per token), so a 64 MB token shard
would need ~4.6 GB of records in memory if written in one go. This writer holds at most one block:
- Arrow: one record batch per ``rows_per_batch`` windows (``write_shard`` uses one batch per shard);
- Zarr: chunk-aligned slices, each chunk written whole, once (every chunk on disk, even all-zero
  ones, so the direct reader never has to guess what a missing chunk means).
Block boundaries are fixed window counts, never the caller's batch size, so the bytes do not depend
on how the windows were batched. The part is written under a temporary name and renamed into place
on :meth:`PartWriter.close`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .arrow_store import _META_KEY as ARROW_META_KEY
from .checksum import checksum, disk_bytes
from .fields import FieldSpec
from .manifest import ShardPart
from .zarr_store import _ATTR_KEY as ZARR_ATTR_KEY


class PartWriter:
    """Write ``n_windows`` windows of ``fields`` to ``path`` in blocks; ``close`` returns the part."""

    def __init__(
        self,
        path: str | os.PathLike,
        fields: dict[str, FieldSpec],
        n_windows: int,
        format: str = "arrow",
        rows_per_batch: int = 256,
        zarr_chunk_windows: int = 16,
        zarr_compression: str | None = None,
    ) -> None:
        if format not in ("arrow", "zarr"):
            raise ValueError(f"unknown shard format {format!r}: use arrow or zarr")
        if zarr_compression not in (None, "zstd"):
            raise ValueError(f"zarr compression {zarr_compression!r} is not supported: use none or zstd")
        self.path = Path(path).absolute()
        self.fields, self.n, self.format = fields, int(n_windows), format
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.written = 0
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in fields}
        self._buffered = 0
        if format == "arrow":
            import pyarrow as pa

            self.block = rows_per_batch
            self._sink = pa.OSFile(str(self.tmp), "wb")
            schema = pa.schema(
                [pa.field(k, pa.list_(pa.from_numpy_dtype(s.storage_dtype), s.numel)) for k, s in fields.items()],
                metadata={ARROW_META_KEY: _fields_json(fields).encode()},
            )
            self._writer = pa.ipc.new_file(self._sink, schema)
        else:
            import zarr
            from zarr.codecs import ZstdCodec

            cw = max(1, min(zarr_chunk_windows, self.n))
            self.block = cw * max(1, rows_per_batch // cw)  # chunk-aligned
            group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
            group.attrs[ZARR_ATTR_KEY] = {k: v.to_json() for k, v in fields.items()}
            self._arrays = {
                name: group.create_array(
                    name,
                    shape=(self.n, *spec.shape),
                    chunks=(cw, *spec.shape),
                    dtype=spec.storage_dtype,
                    compressors=[ZstdCodec(level=3)] if zarr_compression else None,
                    fill_value=0,
                    config={"write_empty_chunks": True},
                )
                for name, spec in fields.items()
            }

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        """Add (b, *field.shape) arrays for the next b windows."""
        if set(arrays) != set(self.fields):
            raise ValueError(f"expected fields {sorted(self.fields)}, got {sorted(arrays)}")
        b = len(next(iter(arrays.values())))
        for name, spec in self.fields.items():
            a = arrays[name]
            if a.shape != (b, *spec.shape) or a.dtype != spec.storage_dtype:
                raise ValueError(
                    f"field {name!r}: expected {(b, *spec.shape)} {spec.storage_dtype}, got {a.shape} {a.dtype}"
                )
            self._buf[name].append(a)
        self._buffered += b
        if self.written + self._buffered > self.n:
            raise ValueError(f"{self.path.name}: more than the {self.n} windows announced")
        while self._buffered >= self.block:
            self._flush(self.block)

    def _flush(self, rows: int) -> None:
        block = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in self._buf.items()}
        head = {k: v[:rows] for k, v in block.items()}
        self._buf = {k: [v[rows:]] if len(v) > rows else [] for k, v in block.items()}
        self._buffered -= rows
        if self.format == "arrow":
            import pyarrow as pa

            cols = [
                pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(head[k]).reshape(-1)), s.numel)
                for k, s in self.fields.items()
            ]
            self._writer.write_batch(pa.RecordBatch.from_arrays(cols, names=list(self.fields)))
        else:
            for name, arr in self._arrays.items():
                arr[self.written : self.written + rows] = head[name]
        self.written += rows

    def close(self) -> ShardPart:
        """Flush, check the window count, rename into place; returns the manifest entry."""
        if self._buffered:
            self._flush(self._buffered)
        if self.written != self.n:
            self.abort()
            raise ValueError(f"{self.path.name}: {self.written} windows written, {self.n} announced")
        if self.format == "arrow":
            self._writer.close()
            self._sink.close()
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
        if self.path.is_dir():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return ShardPart(path=self.path, format=self.format, checksum=checksum(self.path), bytes=disk_bytes(self.path))

    def abort(self) -> None:
        """Drop the temporary output (the target, if any, is left as it was)."""
        if self.format == "arrow":
            try:
                self._writer.close()
                self._sink.close()
            except Exception:  # already closed or broken: the file is removed below anyway
                pass
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists():
            self.tmp.unlink()


def _fields_json(fields: dict[str, FieldSpec]) -> str:
    import json

    return json.dumps({k: v.to_json() for k, v in fields.items()})

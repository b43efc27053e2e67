"""Arrow IPC shards: one row per window, one FixedSizeList column per field, one record batch.

Read through a memory map: every field becomes a numpy view over the mapped file, so a window read
is an index into the page cache and copies nothing (docs/data.md; README "Benchmarks": ~6 us per window).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .fields import FieldSpec

_META_KEY = b"cocomix.fields"


class ArrowShard:
    """Random access to the windows of one Arrow shard, without copies."""

    def __init__(self, path: str | os.PathLike, fields: dict[str, FieldSpec] | None = None):
        self.path = Path(path)
        try:
            self._mmap = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._mmap)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"shard {str(self.path)!r} is not a readable Arrow IPC file: {e}") from e
        stored = json.loads((reader.schema.metadata or {}).get(_META_KEY, b"{}"))
        self.fields = fields or {k: FieldSpec.from_json(v) for k, v in stored.items()}
        for name, spec in self.fields.items():
            if name not in stored or FieldSpec.from_json(stored[name]) != spec:
                raise ValueError(
                    f"shard {str(self.path)!r}: field {name!r} is {stored.get(name)}, expected {spec.to_json()}"
                )
        # Several record batches are allowed (a user may append), each viewed separately.
        self._starts: list[int] = []
        self._views: list[dict[str, np.ndarray]] = []
        n = 0
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            self._starts.append(n)
            self._views.append({name: self._view(batch, name, spec) for name, spec in self.fields.items()})
            n += batch.num_rows
        self.num_windows = n

    def _view(self, batch: pa.RecordBatch, name: str, spec: FieldSpec) -> np.ndarray:
        col = batch.column(name)
        if col.null_count:
            raise ValueError(f"shard {str(self.path)!r}: field {name!r} has null windows")
        flat = col.flatten().to_numpy(zero_copy_only=True)  # raises rather than copy
        if flat.dtype != spec.storage_dtype:
            raise ValueError(
                f"shard {str(self.path)!r}: field {name!r} stored as {flat.dtype}, expected {spec.storage_dtype}"
            )
        return flat.reshape(batch.num_rows, *spec.shape)

    def __len__(self) -> int:
        return self.num_windows

    def arrays(self) -> dict[str, np.ndarray]:
        """Whole-shard arrays (a view when the shard has one record batch, else a copy)."""
        if len(self._views) == 1:
            return dict(self._views[0])
        return {k: np.concatenate([v[k] for v in self._views]) for k in self.fields}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range for shard {str(self.path)!r} ({self.num_windows} windows)")
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - self._starts[b]
        return {k: v[j] for k, v in self._views[b].items()}

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Windows ``idx`` (local indices) stacked, one fancy-index copy per field and record batch."""
        if len(self._views) == 1:
            return {k: v[idx] for k, v in self._views[0].items()}
        batch_of = np.searchsorted(self._starts, idx, side="right") - 1
        out = {k: np.empty((len(idx), *s.shape), s.storage_dtype) for k, s in self.fields.items()}
        for b in np.unique(batch_of):
            sel = np.nonzero(batch_of == b)[0]
            for k, v in self._views[b].items():
                out[k][sel] = v[idx[sel] - self._starts[b]]
        return out

    def close(self) -> None:
        self._views.clear()
        self._mmap.close()

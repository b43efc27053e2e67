"""Zarr v3 shards: a group per shard, one array per field with a leading window axis.

zarr-python costs ~0.6 ms per call however little it reads (docs/data.md; bench/store.py), so reads never go through it
per window: uncompressed chunk files are memory-mapped directly (their bytes are the C-order array,
edge chunks padded to full size), and a compressed shard is decompressed once, whole, on first use.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from .fields import FieldSpec

_ATTR_KEY = "cocomix.fields"


class _DirectArray:
    """Window-indexed access to one uncompressed Zarr array through memory-mapped chunk files."""

    def __init__(self, root: Path, name: str, meta: dict, spec: FieldSpec):
        self.root, self.name, self.spec = root, name, spec
        self.n = int(meta["shape"][0])
        self.cw = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        trailing = sep.join("0" for _ in spec.shape)
        self._key = lambda c: f"c{sep}{c}{sep}{trailing}"
        self._chunks: dict[int, np.ndarray] = {}

    def _chunk(self, c: int) -> np.ndarray:
        chunk = self._chunks.get(c)
        if chunk is None:
            f = self.root / self.name / self._key(c)
            expected = self.cw * self.spec.nbytes
            if not f.is_file() or f.stat().st_size != expected:
                raise ValueError(f"shard {str(self.root)!r}: chunk {f.name} of {self.name!r} is missing or truncated")
            with open(f, "rb") as fh:
                # A plain ndarray over the map: np.memmap's subclass overhead costs ~4 us per index.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            chunk = np.frombuffer(mm, dtype=self.spec.storage_dtype).reshape(self.cw, *self.spec.shape)
            self._chunks[c] = chunk
        return chunk

    def __getitem__(self, i: int) -> np.ndarray:
        return self._chunk(i // self.cw)[i % self.cw]

    def full(self) -> np.ndarray:
        n_chunks = -(-self.n // self.cw)
        return np.concatenate([self._chunk(c) for c in range(n_chunks)])[: self.n] if self.n else np.zeros(
            (0, *self.spec.shape), self.spec.storage_dtype
        )


class ZarrShard:
    """Random access to the windows of one Zarr v3 shard, never through zarr-python per window."""

    def __init__(self, path: str | os.PathLike, fields: dict[str, FieldSpec] | None = None):
        self.path = Path(path)
        try:
            group_meta = json.loads((self.path / "zarr.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"shard {str(self.path)!r} is not a readable Zarr v3 group: {e}") from e
        stored = group_meta.get("attributes", {}).get(_ATTR_KEY, {})
        self.fields = fields or {k: FieldSpec.from_json(v) for k, v in stored.items()}
        self._direct: dict[str, _DirectArray] = {}
        self._loaded: dict[str, np.ndarray] = {}
        self._compressed: list[str] = []
        n = None
        for name, spec in self.fields.items():
            if name not in stored or FieldSpec.from_json(stored[name]) != spec:
                raise ValueError(
                    f"shard {str(self.path)!r}: field {name!r} is {stored.get(name)}, expected {spec.to_json()}"
                )
            try:
                meta = json.loads((self.path / name / "zarr.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"shard {str(self.path)!r}: array {name!r} is unreadable: {e}") from e
            codecs = [c["name"] for c in meta["codecs"]]
            endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
            if meta["shape"][1:] != list(spec.shape) or np.dtype(meta["data_type"]) != spec.storage_dtype:
                raise ValueError(
                    f"shard {str(self.path)!r}: array {name!r} has shape/dtype {meta['shape']}/{meta['data_type']}"
                )
            if codecs == ["bytes"] and (endian == "little" or spec.storage_dtype.itemsize == 1):
                self._direct[name] = _DirectArray(self.path, name, meta, spec)
            else:
                self._compressed.append(name)
            if n is not None and meta["shape"][0] != n:
                raise ValueError(f"shard {str(self.path)!r}: arrays disagree on the number of windows")
            n = meta["shape"][0]
        self.num_windows = int(n or 0)

    def _load_compressed(self) -> None:
        # Once per shard: decompress every compressed array whole (sequential reads, 200-400 MB/s).
        import zarr

        group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        for name in self._compressed:
            self._loaded[name] = np.asarray(group[name][:])
        self._compressed = []

    def __len__(self) -> int:
        return self.num_windows

    def arrays(self) -> dict[str, np.ndarray]:
        if self._compressed:
            self._load_compressed()
        return {k: (self._loaded[k] if k in self._loaded else self._direct[k].full()) for k in self.fields}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range for shard {str(self.path)!r} ({self.num_windows} windows)")
        if self._compressed:
            self._load_compressed()
        return {k: (self._loaded[k][i] if k in self._loaded else self._direct[k][i]) for k in self.fields}

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Windows ``idx`` (local indices) stacked."""
        if self._compressed:
            self._load_compressed()
        out = {k: v[idx] for k, v in self._loaded.items()}
        for k, arr in self._direct.items():
            out[k] = (
                np.stack([arr[int(i)] for i in idx])
                if len(idx)
                else np.zeros((0, *arr.spec.shape), arr.spec.storage_dtype)
            )
        return out

    def close(self) -> None:
        self._direct.clear()
        self._loaded.clear()

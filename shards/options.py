"""How shards are stored: the settings both stages expose as flags, owned (and validated) here once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .manifest import FORMATS


@dataclass(kw_only=True)
class StoreOptions:
    """Shard format options; stage 1's and stage 2's configs extend this class (docs/data.md, "Shard
    formats"), so each flag is declared and checked in one place."""

    format: Literal["arrow", "zarr"] = "arrow"
    """Shard format: arrow (memory-mapped IPC, fastest for training) or zarr (v3, chunked)."""
    zarr_chunk_windows: int = 16
    """Windows per Zarr chunk (--format zarr)."""
    zarr_compression: Literal["none", "zstd"] = "none"
    """Zarr compression (--format zarr; a compressed shard is decompressed once per shard when read)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be arrow or zarr, got {self.format!r}")
        if self.zarr_chunk_windows < 1:
            raise ValueError(f"--zarr-chunk-windows must be positive, got {self.zarr_chunk_windows}")
        if self.zarr_compression not in ("none", "zstd"):
            raise ValueError(f"--zarr-compression must be none or zstd, got {self.zarr_compression!r}")

    def writer_options(self) -> dict[str, Any]:
        """Keyword arguments of ``shards.write_shard`` / ``shards.PartWriter`` for these options."""
        return {"format": self.format, "zarr_chunk_windows": self.zarr_chunk_windows,
                "zarr_compression": None if self.zarr_compression == "none" else self.zarr_compression}

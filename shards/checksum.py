"""Checksums of shard files and Zarr shard directories."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_BLOCK = 1 << 22


def _update_from_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)


def checksum(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, or of a directory: every file's relative path and bytes, in sorted
    order, so renaming or dropping a chunk changes the sum."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            h.update(str(f.stat().st_size).encode() + b"\0")
            _update_from_file(h, f)
    elif path.is_file():
        _update_from_file(h, path)
    else:
        raise ValueError(f"shard {str(path)!r} does not exist")
    return "sha256:" + h.hexdigest()


def checksums(paths: list[Path], threads: int | None = None) -> list[str]:
    """:func:`checksum` of every path, in order, several at a time: hashlib releases the GIL, so
    threads add disk and memory bandwidth (bench/verify.py measures it; docs/scaling.md: one core
    hashing the token shards of a 1T-token corpus before stage 2 starts would take hours)."""
    threads = threads or min(8, os.cpu_count() or 1, max(1, len(paths)))
    if threads == 1:
        return [checksum(p) for p in paths]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(checksum, paths))


def disk_bytes(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size

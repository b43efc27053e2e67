"""Progress records: one small JSON file per finished unit of work (a stage-1 task, a stage-2 shard).

A long run must remember what it finished without rewriting a growing file after every unit: a
manifest rewritten after each of n shards costs O(n^2) bytes over a run (issue 14 measured it). A
record is written once, atomically (shards/atomic.py), and never changed; the manifest is assembled
from the records at checkpoints and at the end (docs/data.md, "The manifest"). Reading them back
costs one directory listing and one small read per record.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .atomic import write_atomic

SUFFIX = ".json"
# Keys become file names: keep them portable (no separators, no leading dot, which marks temporaries).
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,199}")


def _check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"record key {key!r}: use letters, digits, '_', '.', '=', '-' (at most 200)")
    return key


def write_record(folder: str | os.PathLike, key: str, record: dict[str, Any]) -> Path:
    """Write ``folder/key.json`` atomically (sorted keys: the same record is the same bytes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (_check_key(key) + SUFFIX)
    write_atomic(path, (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode())
    return path


def read_records(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Every record in ``folder`` by key, in key order; an absent folder has none.

    A file that is not a complete JSON object (it cannot happen through :func:`write_record`, but a
    user's copy tool can truncate) is skipped: its unit of work is simply done again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out: dict[str, dict[str, Any]] = {}
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.name.endswith(SUFFIX) and not e.name.startswith("."))
    for name in names:
        try:
            data = json.loads((folder / name).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out[name[: -len(SUFFIX)]] = data
    return out


def remove_records(folder: str | os.PathLike) -> None:
    """Remove ``folder``'s records and the folder, once a manifest holds what they said."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.endswith(SUFFIX) or (p.name.startswith(".") and p.name.endswith(SUFFIX + ".tmp")):
            p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # something else is in it (a user's file): leave the folder
        pass

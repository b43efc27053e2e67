"""Output places, for both stages: what may be written where, and the exact command a refusal prints.

Stage 1 (pipeline/stage1_out.py) and stage 2 (its concept directory and ``--manifest``) follow one
contract (docs/operations.md): nothing of the user's is replaced or removed, a place that cannot
be written is refused in one line before any heavy work, and every refusal names the command to
run next. The checks and the removal live here once; what each stage counts as "its own" files,
and the wording of each stage's refusals, stay with the stage.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.cli import config_flags
from shards.manifest import ExistingFile, inspect_path


def why(e: OSError) -> str:
    """The OS's own words for ``e`` ("No space left on device"), for messages that name the path already."""
    return e.strerror or str(e)


def command_line(prog: Sequence[str], cfg: Any, **changes: Any) -> str:
    """The shell command that runs the dataclass config ``cfg`` with ``changes`` applied: ``prog``
    followed by every flag whose value differs from its default (``--no-X`` for a false boolean
    whose default is true). A refusal prints it so the user can copy it as is."""
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    return shlex.join([*prog, *config_flags(cfg)])


def is_cocomix_shard(path: Path) -> bool:
    """Whether ``path`` is a shard part this project wrote (an Arrow file or Zarr group whose metadata
    records our fields), judged by its content: a file that merely has a shard's name (a user's
    ``train-00042.arrow``) is not ours, and ``--overwrite`` must never remove it."""
    from shards import open_shard

    try:
        open_shard(path, "zarr" if path.is_dir() else "arrow").close()
    except Exception:  # not Arrow / Zarr, or without our field metadata: somebody else's
        return False
    return True


def shown_names(names: Sequence[str], limit: int = 8) -> str:
    """``a, b, c, ... (12 in all)``: the first ``limit`` names of a listing, for a one-line message."""
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_writable_dir(target: Path, flag: str, shown: str | None = None) -> None:
    """``target`` (a directory to create or use, given as ``flag`` = ``shown``) can be made and
    written: its nearest existing ancestor is a directory, on a writable file system, writable by
    this user. Refused in one line otherwise, before any heavy work."""
    shown = str(target) if shown is None else shown
    p = target.absolute()
    anc = p
    while not (anc.exists() or anc.is_symlink()):
        anc = anc.parent
    if not anc.is_dir():
        if anc == p and shown == str(target):
            raise ValueError(f"{flag} {shown!r} is a file, not a directory: pass a directory path")
        raise ValueError(f"{flag} {shown!r}: {str(anc)!r} is a file, so no directory can be made under it; "
                         f"pass another {flag}")
    if os.statvfs(anc).f_flag & os.ST_RDONLY:
        raise ValueError(f"{flag} {shown!r}: {str(anc)!r} is on a read-only file system; "
                         "pass a path on writable storage")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {shown!r}: {str(anc)!r} is not writable by this user; pass another {flag}")


def inspect_file_target(path: str, flag: str) -> ExistingFile:
    """What the file path ``path`` (given as ``flag``, e.g. ``--manifest``) holds now, after
    refusing a folder that cannot be written and a directory at the path itself. The caller decides
    what it may replace (shards.manifest.inspect_path: absent, a manifest, damaged, other)."""
    p = Path(path)
    check_writable_dir(p.parent, flag, path)
    info = inspect_path(p)
    if info.kind == "directory":
        raise ValueError(f"{flag} {path!r} is a directory: pass a file path, e.g. {str(p / 'NAME.json')!r}")
    return info


def is_run_log(path: Path, command: str) -> bool:
    """Whether ``path`` is a run log (shards/runlog.py) whose first record is ``command``'s: kept,
    never counted as a user's file, never removed."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("command") == command


def remove_entry(path: Path) -> None:
    """Remove one file or directory that the caller has established is its own (never a symlink's target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_temporaries_of(target: Path) -> None:
    """Remove the temporaries shards.atomic / shards.PartWriter left beside ``target`` when a run was
    killed mid-save (``.NAME.tmp-<8 hex>``); nothing else beside it is touched."""
    for t in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if re.fullmatch(rf"\.{re.escape(target.name)}\.tmp-[0-9a-f]{{8}}", t.name):
            remove_entry(t)

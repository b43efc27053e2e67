"""Where the concept browser writes: the operating contract (docs/operations.md) for ``--out``.

A site is built whole in ``.<name>.browse-tmp`` beside ``--out`` and renamed into place, so ``--out``
holds either the previous site or the new one, whatever instant the process dies at. Its record
``.cocomix-browse.json`` lists every file browse wrote; a directory is browse's own only when it holds
exactly listed files. ``--overwrite`` replaces only such a site; a directory holding anything else
(your files) is refused with or without it, naming what is there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.outputs import check_writable_dir, remove_entry, shown_names

RECORD = ".cocomix-browse.json"
SCHEMA = "cocomix.browse/1"
BUILDING = ".cocomix-browse-building"
"""Written first into the temporary directory: marks it as browse's own, so a rerun may remove it."""


def temp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.browse-tmp"


def old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.browse-old"


def listed_files(site: Path) -> list[str] | None:
    """The files a browse record in ``site`` lists, or None when ``site`` holds no valid record."""
    try:
        rec = json.loads((site / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA or not isinstance(rec.get("files"), list):
        return None
    return [str(f) for f in rec["files"]]


def foreign_files(site: Path) -> list[str]:
    """Files and directories in ``site`` that browse's record does not list (all of them without a record)."""
    listed = set(listed_files(site) or [])
    found = []
    for root, dirs, files in os.walk(site):
        rel = Path(root).relative_to(site)
        for f in files:
            p = (rel / f).as_posix()
            if p != RECORD and p not in listed:
                found.append(p)
        for d in dirs:
            if Path(root, d).is_symlink():
                found.append((rel / d).as_posix())
    return sorted(found)


def check_out(out: Path, overwrite: bool, again: str) -> None:
    """Refuse, in one line and before any work, an ``--out`` that browse may not write. ``again``: the
    command with ``--overwrite`` added, quoted by the refusal."""
    check_writable_dir(out, "--out")
    clean_leftovers(out)  # first, so a site a killed run left aside is judged (and kept) like any other
    if not out.exists():
        return
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory: pass a directory path")
    if not any(out.iterdir()):
        return
    if listed_files(out) is None:
        names = sorted(p.name for p in out.iterdir())
        raise ValueError(f"--out {str(out)!r} holds files that browse did not write ({shown_names(names)}): "
                         "pass an empty or new directory")
    if foreign := foreign_files(out):
        raise ValueError(f"--out {str(out)!r} holds a concept browser site and files browse did not write "
                         f"({shown_names(foreign)}): move them away or pass another --out; they are never removed")
    if not overwrite:
        raise ValueError(f"--out {str(out)!r} holds a concept browser site already: to replace it, run {again}")


def clean_leftovers(out: Path) -> None:
    """Remove what a killed earlier run left beside ``out``: its temporary build and a replaced site
    not yet deleted (each only when it is provably browse's own)."""
    tmp = temp_dir(out)
    # Browse's own: still being built (the marker), or finished and recorded but not yet renamed.
    if tmp.is_dir() and ((tmp / BUILDING).is_file() or (listed_files(tmp) is not None and not foreign_files(tmp))):
        remove_entry(tmp)
    old = old_dir(out)
    if old.is_dir() and listed_files(old) is not None and not foreign_files(old):
        if out.exists():
            remove_entry(old)
        else:  # killed between the two renames: the old site is the only one; put it back
            old.rename(out)


def start(out: Path) -> Path:
    """A fresh temporary directory to build the site in (check_out has removed any leftover)."""
    tmp = temp_dir(out)
    tmp.mkdir(parents=True)
    (tmp / BUILDING).write_text("a concept browser site being built by python -m pipeline.browse\n")
    return tmp


def finish(tmp: Path, out: Path, manifest: str) -> None:
    """Write the record listing every file, then put the site in place of ``out`` (two renames; a
    replaced site is removed last)."""
    (tmp / BUILDING).unlink()
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    rec = {"schema": SCHEMA, "manifest": manifest, "files": files}
    (tmp / RECORD).write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    old = old_dir(out)
    if out.exists():
        if any(out.iterdir()):
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old.exists():
        remove_entry(old)

"""Stage 1's output place: what ``--out`` and ``--manifest`` may hold, and what a rerun does with it.

``--out`` belongs to stage 1 (docs/operations.md): it refuses an ``--out`` that holds anything it did
not write (nothing of the user's is ever deleted or mixed with our files) and a different dataset of
its own unless ``--overwrite``, which removes only what stage 1 wrote (shards, manifest.json, the
settings file of an unfinished run, its task records and val streams, temporaries). ``--manifest``
replaces only a manifest of this same dataset (or, with ``--overwrite``, another cocomix manifest),
never another file. An unfinished run of the same settings is resumed: the shards and val streams its
task records list are kept (pipeline/stage1_task.py verifies them), everything else of ours is
removed. The checks shared with stage 2 (writable places, removal, the command a refusal prints)
are pipeline/outputs.py.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.outputs import (
    check_writable_dir,
    inspect_file_target,
    is_cocomix_shard,
    is_run_log,
    remove_entry,
    shown_names,
    why,
)
from pipeline.stage1_config import TokenizeConfig, command_line
from pipeline.stage1_task import TASKS_DIR
from shards import Manifest, verify_part
from shards.atomic import atomic_path
from shards.manifest import ExistingFile, inspect_path
from shards.records import read_records
from shards.runlog import RUN_LOG

log = logging.getLogger("pipeline.stage1")  # one logger name for all of stage 1's modules
SETTINGS_FILE = ".stage1-settings.json"  # the settings of an unfinished run (removed once manifest.json is in)
# The only names stage 1 writes in --out: shards (train-<task>-<k> since stage 1 runs as tasks,
# train-<k> before; val-<k>), manifest.json, SETTINGS_FILE, RUN_LOG, TASKS_DIR and the temporaries of
# shards.atomic / shards.PartWriter (".NAME.tmp-<8 hex>").
_SHARD_NAME = re.compile(r"^(train|val)-(\d{6}-)?\d{5}\.(arrow|zarr)$")
_TEMPORARY = re.compile(
    r"^\.((train|val)-(\d{6}-)?\d{5}\.(arrow|zarr)|manifest\.json|\.stage1-settings\.json)\.tmp-[0-9a-f]{8}$"
)
# In TASKS_DIR: records (shards.records: ".NAME.tmp" while written), val streams and their temporaries.
_TASK_FILE = re.compile(r"^(t\d{6}\.(json|val)|\.t\d{6}\.json\.tmp|\.t\d{6}\.val\.tmp-[0-9a-f]{8})$")


def _is_tasks_dir(e: Path) -> bool:
    """TASKS_DIR holding only the names stage 1 writes there (a user's file inside makes it foreign)."""
    return e.is_dir() and not e.is_symlink() and all(_TASK_FILE.match(f.name) and f.is_file() for f in e.iterdir())


@dataclass
class OutDir:
    """What ``--out`` holds, sorted into what stage 1 wrote there and everything else."""

    path: Path
    ours: list[Path] = field(default_factory=list)
    """Entries stage 1 wrote (shards, manifest.json, settings file, temporaries); the run log is kept."""
    foreign: list[str] = field(default_factory=list)
    """Names of every other entry: never touched, not even by ``--overwrite``."""
    manifest: ExistingFile | None = None
    """manifest.json, when it is a cocomix manifest (valid or damaged)."""
    settings: dict | None = None
    """The settings of an unfinished run (SETTINGS_FILE), when there is one."""


def survey_out(out: Path, manifest_copy: Path | None = None) -> OutDir:
    """Sort the entries of ``out``. Ours: a cocomix manifest.json, the settings file, temporaries of
    our names, and shards (``train-00000.arrow``, ``val-00003.zarr/`` whose content is a cocomix shard:
    pipeline.outputs.is_cocomix_shard) beside our manifest or settings file; ``manifest_copy`` (this
    run's ``--manifest``) is judged on its own. All else is foreign."""
    d = OutDir(out)
    if not out.is_dir():
        return d
    entries = sorted(out.iterdir())
    names = {e.name for e in entries}
    if "manifest.json" in names:
        info = inspect_path(out / "manifest.json")
        d.manifest = info if info.kind in ("manifest", "damaged") else None
    if SETTINGS_FILE in names:
        try:
            settings = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
            d.settings = settings if isinstance(settings, dict) else None
        except (OSError, ValueError):
            pass
    marked = d.manifest is not None or d.settings is not None
    for e in entries:
        n = e.name
        if (n == "manifest.json" and d.manifest is not None) or (n == SETTINGS_FILE and d.settings is not None) \
                or _TEMPORARY.match(n) or (marked and _SHARD_NAME.match(n) and e.is_dir() == n.endswith(".zarr")
                                           and is_cocomix_shard(e)) or (marked and n == TASKS_DIR
                                                                        and _is_tasks_dir(e)):
            d.ours.append(e)
        elif (n == RUN_LOG and is_run_log(e, "pipeline.stage1")) or (
            manifest_copy is not None and e.absolute() == manifest_copy
        ):
            continue
        else:
            d.foreign.append(n + ("/" if e.is_dir() else ""))
    return d


def _settings_diff(old: dict, new: dict) -> list[str]:
    """``key: X there, Y now`` for every setting that differs (one level into dicts: tokenizer.*)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{j}: {a.get(j)!r} there, {b.get(j)!r} now"
                    for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
        else:
            out.append(f"{k}: {a!r} there, {b!r} now")
    return out


def check_manifest_target(path: str | None) -> ExistingFile | None:
    """Refuse, before any heavy work, a ``--manifest`` that holds something other than a cocomix
    manifest (never replaced, whatever the flags) or whose folder cannot be written."""
    if path is None:
        return None
    info = inspect_file_target(path, "--manifest")
    if info.kind == "other":
        raise ValueError(f"--manifest {path!r} holds {info.what}; stage 1 never replaces a file that is not a cocomix "
                         "manifest: pass another --manifest path")
    return info


def check_manifest_settings(info: ExistingFile | None, cfg: TokenizeConfig, settings: dict) -> None:
    """A manifest already at ``--manifest`` is rewritten only if it is this dataset's (same settings:
    an idempotent rerun) or with ``--overwrite``; otherwise refused, naming what differs."""
    if info is None or info.kind == "absent" or cfg.overwrite:
        return
    m = info.manifest
    if info.kind == "manifest" and m is not None and m.kind == "tokens" and m.settings == settings:
        return
    if m is None:
        what = info.what
    elif m.kind != "tokens":
        what = f"a {m.kind} manifest (stage 2's), not stage 1's"
    else:
        what = f"the manifest of a different stage-1 dataset ({'; '.join(_settings_diff(m.settings, settings)[:6])})"
    raise ValueError(f"--manifest {cfg.manifest!r} holds {what}. To replace that manifest, run: "
                     f"{command_line(cfg)} --overwrite ; to keep it, pass another --manifest path")


def check_out(cfg: TokenizeConfig) -> OutDir:
    """The checks on ``--out`` that need no tokenizer: a directory we can write, holding nothing
    stage 1 did not write. Foreign entries are refused even with ``--overwrite``, which would not
    remove them: our output never mixes silently with a user's files."""
    out = Path(cfg.out)
    check_writable_dir(out, "--out")
    d = survey_out(out, Path(cfg.manifest).absolute() if cfg.manifest else None)
    if d.foreign:
        shown = shown_names(d.foreign)
        raise ValueError(f"--out {cfg.out!r} holds {len(d.foreign)} entr{'y' if len(d.foreign) == 1 else 'ies'} "
                         f"stage 1 did not write ({shown}); stage 1 writes only into a directory of its own and never "
                         "deletes or writes beside other files: pass a new or empty --out, or move those files "
                         "elsewhere")
    return d


def _verified(m: Manifest) -> bool:
    try:
        for s in m.splits.values():
            for sh in s.shards:
                for p in sh.parts.values():
                    verify_part(p)
    except ValueError as e:
        log.warning("existing output is damaged (%s); rewriting it", e)
        return False
    return True


def prepare_out(d: OutDir, cfg: TokenizeConfig, settings: dict) -> Manifest | None:
    """Return the complete manifest if this exact dataset is already there; else make ``--out``
    ready, removing only what stage 1 wrote (``check_out`` has refused anything else)."""
    out = d.path
    m = d.manifest.manifest if d.manifest is not None else None
    complete = m is not None and m.kind == "tokens" and m.settings == settings and d.settings in (None, settings)
    if complete and not cfg.overwrite and _verified(m):
        for e in d.ours:
            if _TEMPORARY.match(e.name) or e.name == TASKS_DIR:  # a kill came after the manifest was saved
                remove_entry(e)
        return m
    if d.settings == settings and not cfg.overwrite:
        _keep_for_resume(d)
        return None
    # With a settings file the directory holds an unfinished run (its manifest.json, if any, is the
    # one an interrupted --overwrite was replacing): stage 1 never resumes one, so it is redone, or
    # replaced by these settings, without a flag. A finished dataset of other settings needs --overwrite.
    if d.settings is not None and d.settings != settings:
        log.warning("%s holds an unfinished stage-1 run of other settings (%s); replacing it", out,
                    "; ".join(_settings_diff(d.settings, settings)[:6]))
    elif d.manifest is not None and not complete and not cfg.overwrite:
        if m is None:
            what = d.manifest.what
        elif m.kind != "tokens":
            what = f"a {m.kind} manifest (stage 2's) as manifest.json"
        else:
            what = f"a different dataset ({'; '.join(_settings_diff(m.settings, settings)[:6])})"
        shards = sum(1 for e in d.ours if _SHARD_NAME.match(e.name))
        raise ValueError(f"--out {cfg.out!r} already holds {what}. To replace it (only what stage 1 wrote there: "
                         f"{shards} shard(s), manifest.json, temporaries), run: {command_line(cfg)} --overwrite ; "
                         "to keep it, pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Settings first: from here on, the directory is an unfinished run of these settings, whatever
        # instant a kill comes at; only then is the old manifest (the thing a rerun trusts) removed.
        with atomic_path(out / SETTINGS_FILE) as tmp:
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
        for e in sorted(d.ours, key=lambda e: e.name != "manifest.json"):
            if e.name != SETTINGS_FILE:
                remove_entry(e)
    except OSError as e:
        raise ValueError(f"--out {cfg.out!r}: cannot prepare the output directory: "
                         f"{why(e)} ({e.filename or out})") from e
    return None


def _keep_for_resume(d: OutDir) -> None:
    """An unfinished run of these settings: keep what its task records list (the tasks verify it before
    trusting it), remove every other entry of ours (temporaries, shards of unfinished tasks, a
    manifest.json an interrupted --overwrite was replacing)."""
    tasks = d.path / TASKS_DIR
    records = read_records(tasks)
    keep = {SETTINGS_FILE, TASKS_DIR}
    keep.update(sh.get("name") for r in records.values() for sh in r.get("shards", []) if isinstance(sh, dict))
    kept_files = set(f"{k}.json" for k in records)
    kept_files.update(r["val"]["file"] for r in records.values() if isinstance(r.get("val"), dict))
    try:
        for e in d.ours:
            if e.name not in keep:
                remove_entry(e)
        if tasks.is_dir():
            for f in tasks.iterdir():
                if f.name not in kept_files:
                    remove_entry(f)
    except OSError as e:
        raise ValueError(f"--out {str(d.path)!r}: cannot prepare the output directory: {why(e)} "
                         f"({e.filename or d.path})") from e
    if records:
        log.info("%s holds an unfinished run of these settings: resuming (%d task(s) recorded)", d.path,
                 len(records))


def remove_tasks_dir(out: Path) -> None:
    """Remove TASKS_DIR (records, val streams, their temporaries) once the manifest holds what they said;
    anything else in it (not ours) stays, with the folder."""
    tasks = out / TASKS_DIR
    if not tasks.is_dir():
        return
    for f in tasks.iterdir():
        if _TASK_FILE.match(f.name) and f.is_file():
            f.unlink()
    try:
        tasks.rmdir()
    except OSError:
        pass


def save_manifest(m: Manifest, path: Path, flag: str) -> None:
    try:
        m.save(path)
    except OSError as e:
        raise ValueError(f"{flag}: could not write {str(path.absolute())!r}: {why(e)}; free space (or choose another "
                         "place) and rerun the same command") from e

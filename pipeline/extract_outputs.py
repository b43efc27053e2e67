"""Stage 2's output places: what ``--out`` and ``--manifest`` may hold, and what a rerun may reuse.

Nothing of the user's is replaced (docs/operations.md): ``--manifest`` must be absent or a concept
manifest of this same extraction, the concept directory must hold only files this command writes,
and ``--overwrite`` replaces only those (shards, extraction.json, runs.jsonl, the records folder of a
run in progress, temporaries) and a cocomix concept manifest. Every refusal is one line naming what
is there, which settings differ, and the exact command to keep it (another ``--manifest``) or to
replace it (``--overwrite``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.outputs import (
    check_writable_dir,
    command_line,
    inspect_file_target,
    is_cocomix_shard,
    remove_entry,
    remove_temporaries_of,
)
from shards import Manifest
from shards.atomic import atomic_path
from shards.manifest import inspect_path
from shards.runlog import RUN_LOG

if TYPE_CHECKING:
    from pipeline.extract_plan import ExtractConfig

EXTRACTION_FILE = "extraction.json"  # the settings of the extraction a concept directory holds
RECORDS_DIR = "records"  # one record per finished shard while a run is in progress (pipeline/extract_progress.py)
# The only names this command writes in a concept directory: shards, the two files and the folder above, the
# temporaries of shards.atomic / shards.PartWriter (".NAME.tmp-<8 hex>").
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{5}\.(arrow|zarr)$")
_TEMPORARY = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}$")
# In RECORDS_DIR: a record (shards.records) per shard, ``train-00003.arrow.json``, and its temporary.
_RECORD = re.compile(r"^(?:[A-Za-z0-9_]+-\d{5}\.(?:arrow|zarr)\.json"
                     r"|\.[A-Za-z0-9_]+-\d{5}\.(?:arrow|zarr)\.json\.tmp)$")


def extraction_settings(m: Manifest) -> dict:
    """The settings of the extraction a concept manifest describes (Plan.settings), each read from
    the one entry that stores it: the teacher's and SAE's fingerprints, the hook layer, the
    attribution entry; ``settings`` holds the rest. Older manifests that repeated these facts in
    ``settings`` give the same dict."""
    att = m.attribution or {}
    return {"teacher": (m.teacher or {}).get("fingerprint"), "layer": (m.hook or {}).get("layer"),
            "sae": (m.sae or {}).get("fingerprint"), "attribution": att.get("variant"), "k_attr": att.get("k_attr"),
            "k_mix": att.get("k_mix"), "k_kd": att.get("k_kd"), "precision": att.get("precision"), **m.settings}


def stored_settings(settings: dict) -> dict:
    """The part of Plan.settings the manifest's ``settings`` entry holds (the rest is stored once,
    in ``teacher``, ``hook``, ``sae`` and ``attribution``; extraction_settings puts it back)."""
    elsewhere = ("teacher", "layer", "sae", "attribution", "k_attr", "k_mix", "k_kd", "precision")
    return {k: v for k, v in settings.items() if k not in elsewhere}


def _ours(entry: Path) -> bool:
    """Whether an entry of a concept directory is one this command wrote: its record files, its
    temporaries, its records folder (holding only shard records), and shards whose content is a
    cocomix shard (a user's ``train-00042.arrow`` is not)."""
    t = _TEMPORARY.match(entry.name)
    if t:
        return t.group(1) in (EXTRACTION_FILE, RUN_LOG) or bool(_SHARD_NAME.match(t.group(1)))
    if entry.name in (EXTRACTION_FILE, RUN_LOG):
        return True
    if entry.name == RECORDS_DIR and entry.is_dir() and not entry.is_symlink():
        return all(_RECORD.match(f.name) and f.is_file() for f in entry.iterdir())
    return bool(_SHARD_NAME.match(entry.name)) and is_cocomix_shard(entry)


def _foreign(d: Path) -> list[str]:
    return sorted(f.name for f in d.iterdir() if not _ours(f)) if d.is_dir() else []


def command(cfg: ExtractConfig, **changes: Any) -> str:
    """The command line of ``cfg`` with ``changes``: the exact command a refusal tells the user to run."""
    return command_line(("python", "pipeline/extract.py"), cfg, **changes)


def _free_manifest(cfg: ExtractConfig, start: Path | None = None) -> Path:
    """``start`` (default: ``--manifest``) or a numbered name next to it whose manifest and concept
    directory are both unused."""
    mp = (start or cfg.manifest_path).absolute()
    if start is not None and not mp.exists() and not (Path(cfg.out) / "concepts" / mp.stem).exists():
        return mp
    for n in range(2, 10_000):
        cand = mp.with_name(f"{mp.stem}-{n}{mp.suffix or '.json'}")
        if not cand.exists() and not (Path(cfg.out) / "concepts" / cand.stem).exists():
            return cand
    raise ValueError(f"no free manifest name next to {mp}")  # pragma: no cover


def _elsewhere(cfg: ExtractConfig) -> str:
    return (f"to keep it, pass another --manifest (its name picks the concept directory): "
            f"{command(cfg, manifest=str(_free_manifest(cfg)), overwrite=False)}")


def check_paths(cfg: ExtractConfig) -> None:
    """Everything about ``--out`` and ``--manifest`` that needs no settings, before any heavy work:
    the places must be directories we can write, the manifest path must be absent or hold a cocomix
    concept manifest, and the concept directory must hold only files this command writes."""
    mp, cdir = cfg.manifest_path.absolute(), cfg.concept_dir.absolute()
    check_writable_dir(Path(cfg.out), "--out")
    there = inspect_file_target(str(mp), "--manifest")  # refuses a directory there, or a folder we cannot write
    check_writable_dir(cdir, "--out", cfg.out)
    if cdir in mp.parents:
        raise ValueError(f"--manifest {mp} lies inside its own concept directory {cdir}; "
                         f"put it elsewhere, e.g. {cfg.out}")
    if there.kind == "other":
        raise ValueError(f"--manifest {mp} holds {there.what}; stage 2 leaves it alone: pass another --manifest: "
                         f"{command(cfg, manifest=str(_free_manifest(cfg)), overwrite=False)}")
    if there.kind == "damaged" and not cfg.overwrite:
        raise ValueError(f"--manifest {mp} holds {there.what}; {_elsewhere(cfg)}; "
                         f"to replace it: {command(cfg, overwrite=True)}")
    if there.manifest is not None and there.manifest.kind != "concepts":
        free = _free_manifest(cfg, Path(cfg.out) / "concepts.json")
        raise ValueError(f"--manifest {mp} holds {there.what} (stage-1 output, which stage 2 never replaces); pass "
                         f"another --manifest: {command(cfg, manifest=str(free), overwrite=False)}")
    foreign = _foreign(cdir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"concept directory {cdir} holds files stage 2 did not write ({shown}); it writes only its "
                         f"shards there and never removes other files: move them away, or pass another --manifest "
                         f"(its name picks the concept directory): "
                         f"{command(cfg, manifest=str(_free_manifest(cfg)), overwrite=False)}")


def _differs(there: dict, settings: dict, ignore: tuple[str, ...]) -> list[str]:
    def short(v: Any) -> str:
        t = json.dumps(v) if not isinstance(v, str) else v
        return t if len(t) <= 24 else t[:21] + "..."

    keys = sorted((set(there) | set(settings)) - set(ignore))
    return [f"{k} (there: {short(there.get(k))}, this run: {short(settings.get(k))})"
            for k in keys if there.get(k) != settings.get(k)]


def check_output(cfg: ExtractConfig, settings: dict, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a concept directory or manifest that holds a different extraction (unless --overwrite),
    naming the settings that differ and the commands to keep it or to replace it."""
    cdir, mp = cfg.concept_dir.absolute(), cfg.manifest_path.absolute()
    replace = f"to replace it (only what stage 2 wrote): {command(cfg, overwrite=True)}"
    marker = cdir / EXTRACTION_FILE
    if marker.is_file():
        try:
            there = json.loads(marker.read_text())
            bad = (_differs(there, settings, ignore) if isinstance(there, dict)
                   else [f"{EXTRACTION_FILE} is not an object"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            bad = [f"{EXTRACTION_FILE} cannot be read ({e})"]
        if bad and not cfg.overwrite:
            raise ValueError(f"concept directory {cdir} holds a different extraction (differs in: {', '.join(bad)}); "
                             f"{_elsewhere(cfg)}; {replace}")
    elif cdir.is_dir() and any(cdir.iterdir()) and not cfg.overwrite:
        raise ValueError(f"concept directory {cdir} holds concept shards but no {EXTRACTION_FILE} (their settings are "
                         f"unknown); {_elsewhere(cfg)}; {replace}")
    old = inspect_path(mp).manifest
    if old is None or cfg.overwrite:
        return
    bad = _differs(extraction_settings(old), settings, ignore)
    dirs = {sh.parts["concepts"].path.parent for s in old.splits.values() for sh in s.shards if "concepts" in sh.parts}
    if dirs and dirs != {cdir.resolve()}:
        bad.append(f"concept directory (there: {', '.join(map(str, sorted(dirs)))}, this run: {cdir}; another --out)")
    if bad:
        raise ValueError(f"manifest {mp} describes a different extraction (differs in: {', '.join(bad)}); "
                         f"{_elsewhere(cfg)}; {replace}")


def _clean_temporaries(cfg: ExtractConfig) -> None:
    """Temporaries of a killed run (shards.PartWriter / shards.atomic): in the concept directory, and
    the manifest's own beside it; only names this command writes."""
    for t in cfg.concept_dir.iterdir():
        if _TEMPORARY.match(t.name) and _ours(t):
            remove_entry(t)
    remove_temporaries_of(cfg.manifest_path.absolute())


def prepare_concept_dir(cfg: ExtractConfig, settings: dict) -> None:
    """Create the concept directory; with --overwrite remove what stage 2 wrote there (check_paths
    refused a directory holding anything else); record the settings in extraction.json."""
    d = cfg.concept_dir
    if cfg.overwrite and d.is_dir():
        for f in d.iterdir():
            if _ours(f):
                remove_entry(f)
    d.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(cfg)
    marker = d / EXTRACTION_FILE
    text = json.dumps(settings, indent=2) + "\n"
    if not marker.is_file() or marker.read_text() != text:
        with atomic_path(marker) as tmp:
            tmp.write_text(text)


def size_text(n: int) -> str:
    """A byte count as ``1.2 GB`` / ``3.4 MB`` / ``56 kB``."""
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"

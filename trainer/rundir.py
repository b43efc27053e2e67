"""The run directory (``--out-dir``): what it holds, and whether this run may write there.

    OUT/config.json     the run record: resolved config + data identity, written before step 1
    OUT/metrics.jsonl   one JSON line per logged step (each step once, also after a resume)
    OUT/ckpt/           checkpoints (:mod:`trainer.checkpoint`: step-N directories + ``latest``)
    OUT/tb/             TensorBoard events (``--tensorboard``; common/tracking.py)
    OUT/wandb_run.json  the W&B run id a rerun continues (``--wandb``); OUT/wandb/ W&B's local files

A directory holding another run is never written to: :func:`inspect` returns the run recorded there
and :mod:`trainer.loop` compares it with this one (:func:`trainer.validate.differences`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.tracking import NAMES as TRACKING_NAMES
from shards.atomic import write_atomic
from trainer import checkpoint

RECORD = "config.json"
METRICS = "metrics.jsonl"
CKPT = "ckpt"
OURS = (RECORD, METRICS, CKPT, *TRACKING_NAMES)  # every name a run writes in its out-dir


def check_path(out: Path) -> None:
    """``--out-dir`` must be a directory (or creatable as one) whose entries with our names are ours;
    checked before any data is read."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {str(out)!r} is a file, not a directory: choose another --out-dir")
    if not out.exists():
        for parent in out.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(
                        f"--out-dir {str(out)!r} cannot be created: {str(parent)!r} is a file; choose another --out-dir"
                    )
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise ValueError(
                        f"--out-dir {str(out)!r} cannot be created: {str(parent)!r} is not writable; "
                        "choose another --out-dir"
                    )
                break
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {str(out)!r} is not writable: choose another --out-dir")
    if (out / checkpoint.POINTER).is_file() or any((out / f).is_file() for f in ("model.safetensors", "state.pt")):
        raise ValueError(f"--out-dir {str(out)!r} is a checkpoint directory, not a run directory: pass the run's "
                         "directory (the parent of ckpt/) or choose another --out-dir")
    for name, is_dir in ((RECORD, False), (METRICS, False), (CKPT, True)):
        q = out / name
        if q.exists() and q.is_dir() != is_dir:
            kind = "a directory" if q.is_dir() else "a file"
            raise ValueError(
                f"--out-dir {str(out)!r}: {str(q)!r} is {kind}, not what this trainer writes there; "
                "choose another --out-dir"
            )


@dataclass
class Existing:
    """The run an out-dir already holds."""

    record: dict[str, Any]
    """Its run record: the latest checkpoint's config.json, else OUT/config.json."""
    ckpt: Path | None
    """The step directory to continue from (None: no checkpoint yet, the run restarts at step 0)."""
    step: int
    total_steps: int | None

    @property
    def finished(self) -> bool:
        return self.ckpt is not None and self.total_steps is not None and self.step >= self.total_steps

    @property
    def source(self) -> str:
        return "checkpoint" if self.ckpt is not None else "recorded run"


def inspect(out: Path) -> Existing | None:
    """The run recorded in ``out``, or None when it holds none (missing, empty or only other files)."""
    if not out.is_dir():
        return None
    ckpt = checkpoint.latest(out / CKPT)
    if ckpt is not None:
        rec = checkpoint.read_config(ckpt)
        return Existing(rec, ckpt, int(rec.get("step", 0)), rec.get("total_steps"))
    rec_path = out / RECORD
    if rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("train"), dict) and isinstance(rec.get("model"), dict)):
            raise ValueError(
                f"--out-dir {str(out)!r} holds {RECORD}, which is not a trainer run record: choose another --out-dir"
            )
        return Existing(rec, None, 0, rec.get("total_steps"))
    if (out / METRICS).exists():
        raise ValueError(f"--out-dir {str(out)!r} holds {METRICS} but no run record ({RECORD}): not a run this trainer "
                         "can continue; choose another --out-dir")
    # No run here yet: a new run starts only in an empty directory (or one holding nothing but our own
    # names), so that its files never mix with somebody else's (README, "Safe to operate").
    foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir() if e.name not in OURS)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 8 else "")
        raise ValueError(f"--out-dir {str(out)!r} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} the "
                         f"trainer did not write ({shown}) and no run: a run directory holds one run only; "
                         "choose a new or empty --out-dir")
    return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics lines that parse (a line torn by a crash does not)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= ``step`` (those a resumed run does not redo); atomic, so a crash
    leaves the old or the new file. Untouched when nothing is dropped."""
    if not path.is_file():
        return
    text = path.read_text()
    rows = read_metrics(path)
    keep = [r for r in rows if r["step"] <= step]
    new = "".join(json.dumps(r) + "\n" for r in keep)
    if new != text:
        write_atomic(path, new.encode())

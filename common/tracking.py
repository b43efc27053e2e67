"""Experiment tracking beside ``metrics.jsonl``: TensorBoard event files and Weights & Biases runs.

``metrics.jsonl`` stays the record of a run (docs/operations.md); a :class:`Tracker` sends the same
rows, as they are written, to the sinks a command's :class:`TrackingOptions` ask for:

- TensorBoard: ``OUT/tb/events.out.tfevents.*``, one scalar per numeric key of each row (tag = the
  key, nested dicts joined with ``/``), written and flushed in the calling thread with each row.
- Weights & Biases: one run per output directory, its id kept in ``OUT/wandb_run.json`` so that a
  rerun of the same command continues the same W&B run; W&B's local files go to ``OUT/wandb/``
  unless ``WANDB_DIR`` says otherwise. When online W&B is unavailable (no API key, no network) the
  run logs offline and says how to upload it (``wandb sync``).

Rules every command relies on (README, "Safe to operate"):

- The packages are optional extras: :meth:`TrackingOptions.check_packages` imports them before any
  heavy work and a missing one is a ``ValueError`` naming the install command (one ``error:`` line).
- Only rank 0 logs: :func:`start` returns a tracker with no sinks on any other rank.
- A sink that fails (a full disk, W&B unreachable) prints one warning and is dropped; training goes on
  and ``metrics.jsonl`` still holds every step.
- Resume: a run continued from step k logs steps k+1, ... again. TensorBoard: the new event file starts
  with a purge marker at step k+1 (what ``SummaryWriter(purge_step=...)`` writes), so readers drop the
  earlier attempt's steps after k and no step is shown twice. W&B: steps only increase within a run,
  so the steps the run already holds are skipped (their values are the replayed ones: the trainer
  resumes bit for bit on CPU, docs/operations.md).

Nothing heavy is imported here at module level: the packages load when a sink starts.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import string
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from common.cli import one_line

TB_DIR = "tb"
WANDB_DIR = "wandb"
WANDB_RUN = "wandb_run.json"
NAMES = (TB_DIR, WANDB_DIR, WANDB_RUN)
"""What tracking writes in an output directory (the run directories count these as their own)."""

INSTALL = {
    "tensorboard": "pip install tensorboard (or the project's extra: pip install -e '.[tensorboard]')",
    "wandb": "pip install wandb (or the project's extra: pip install -e '.[wandb]')",
}


@dataclass(kw_only=True)
class TrackingOptions:
    """Tracking flags shared by ``trainer.run`` and ``sae.train`` (their configs extend this class, so
    each flag is declared and checked here once)."""

    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars to OUT/tb (view: tensorboard --logdir OUT/tb; needs the
    tensorboard package, extra [tensorboard])."""
    wandb: str = ""
    """Also log the metrics and the config to this Weights & Biases project (needs the wandb package, extra
    [wandb]); rerunning the same command continues the same W&B run. Air-gapped: WANDB_MODE=offline."""
    wandb_entity: str = ""
    """W&B entity (user or team) of --wandb; default: your W&B default entity."""
    wandb_name: str = ""
    """W&B run name; default: the output directory's name."""
    wandb_mode: Literal["online", "offline"] | None = None
    """W&B mode: online, or offline (files only, upload later with wandb sync); default: WANDB_MODE, else online."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in (None, "online", "offline"):
            raise ValueError(f"--wandb-mode must be online or offline, got {self.wandb_mode!r}")
        if not self.wandb:
            given = [f"--{n.replace('_', '-')}" for n in ("wandb_entity", "wandb_name", "wandb_mode")
                     if getattr(self, n)]
            if given:
                raise ValueError(f"{', '.join(given)} configure(s) W&B logging: add --wandb PROJECT")

    def check_packages(self) -> None:
        """Import the packages these options need, before any heavy work: ValueError naming the install
        command when one is missing (never a failure mid-run)."""
        if self.tensorboard:
            _require("tensorboard", "--tensorboard", _import_tensorboard)
        if self.wandb:
            _require("wandb", "--wandb", _import_wandb)


TRACKING_FIELDS = tuple(f.name for f in fields(TrackingOptions))
"""Settings that change how a run is watched, never what it computes (free to differ on a resume)."""


def _import_tensorboard():
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    return event_pb2, summary_pb2, RecordWriter


def _import_wandb():
    import wandb

    return wandb


def _require(package: str, flag: str, load) -> None:
    try:
        load()
    except ImportError as e:
        raise ValueError(f"{flag} needs the {package} package, which is not installed ({one_line(e)}): "
                         f"{INSTALL[package]}") from e


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a metrics row by tag (``step`` is the x axis, not a value); nested dicts
    give ``outer/inner`` tags, strings and other values are left out."""
    out: dict[str, float] = {}
    for k, v in row.items():
        tag = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, tag + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and tag != "step":
            out[tag] = float(v)
    return out


class _TensorBoard:
    """Event files in ``path``: one per process, started with the purge marker of ``first_step``
    (what ``torch.utils.tensorboard.SummaryWriter(purge_step=...)`` writes, read by TensorBoard's Python
    loader and its data server alike), one event per row, flushed with it."""

    name = "TensorBoard"

    def __init__(self, path: Path, first_step: int) -> None:
        self._event, self._summary, record_writer = _import_tensorboard()
        path.mkdir(parents=True, exist_ok=True)
        # TensorBoard orders a directory's files by name: the time first, then host and pid (torch's scheme).
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.file = path / name
        n = 0
        while self.file.exists():  # a second writer of this process within the same second
            n += 1
            self.file = path / f"{name}.{n}"
        self._writer = record_writer(open(self.file, "xb"))
        ev = self._event
        self._write(ev.Event(wall_time=time.time(), step=first_step, file_version="brain.Event:2"))
        self._write(ev.Event(wall_time=time.time(), step=first_step,
                             session_log=ev.SessionLog(status=ev.SessionLog.START)))

    def _write(self, event) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        summary = self._summary.Summary(value=[self._summary.Summary.Value(tag=k, simple_value=v)
                                               for k, v in values.items()])
        self._write(self._event.Event(wall_time=time.time(), step=step, summary=summary))

    def close(self, failed: bool) -> None:
        self._writer.close()


class _WandB:
    """One W&B run per output directory: the id in ``OUT/wandb_run.json`` (written before the run
    starts, so a kill at any instant leaves it), resumed with ``resume="allow"``."""

    name = "W&B"

    def __init__(self, opts: TrackingOptions, out: Path, config: dict[str, Any], run_name: str) -> None:
        wandb = _import_wandb()
        run_id = _saved_run_id(out / WANDB_RUN, opts) or _new_run_id()
        _write_json(out / WANDB_RUN, {"id": run_id, "project": opts.wandb, "entity": opts.wandb_entity})
        kw: dict[str, Any] = {"project": opts.wandb, "name": opts.wandb_name or run_name, "id": run_id,
                              "resume": "allow"}
        if opts.wandb_entity:
            kw["entity"] = opts.wandb_entity
        if opts.wandb_mode:
            kw["mode"] = opts.wandb_mode
        # The user's WANDB_DIR wins, else beside the run's files; passed explicitly because W&B keeps the
        # settings of its first run in a process (recipes train several students in one process).
        kw["dir"] = os.environ.get("WANDB_DIR") or str(out)
        try:
            self.run = wandb.init(**kw)
        except Exception as e:
            if kw.get("mode", os.environ.get("WANDB_MODE", "online")) == "offline":
                raise
            # Online W&B unavailable (no API key, no network): keep the run's rows locally instead of losing
            # them; `wandb sync` uploads them later.
            kw["mode"] = "offline"
            self.run = wandb.init(**kw)
            print(f"warning: W&B online not available ({one_line(e).rstrip('.')}): logging offline under "
                  f"{kw['dir']}/wandb; upload later with: wandb sync {kw['dir']}/wandb/offline-run-*",
                  file=sys.stderr, flush=True)
        # A resumed run may have changed free settings (workers, log_every, ...): the latest values win.
        self.run.config.update(config, allow_val_change=True)
        self.first_new = int(getattr(self.run, "step", 0) or 0)
        """Steps below this one are in the W&B run already (a resumed online run): W&B would drop them
        with a warning each; they are skipped here instead."""

    def log(self, values: dict[str, float], step: int) -> None:
        if step < self.first_new:
            return
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _new_run_id() -> str:
    """A fresh W&B run id: 8 characters of [a-z0-9], the form W&B generates itself."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _saved_run_id(path: Path, opts: TrackingOptions) -> str | None:
    """The W&B run id this directory's run logs to, when it was for the same project and entity."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("id"), str):
        return None
    if saved.get("project") != opts.wandb or saved.get("entity", "") != opts.wandb_entity:
        return None
    return saved["id"]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all (a kill mid-write leaves the old file): temporary, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class Tracker:
    """The sinks a run logs to. Every call is safe: a sink that raises is dropped with one warning."""

    def __init__(self, sinks: list[Any] | None = None) -> None:
        self.sinks = list(sinks or [])

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def _drop(self, sink, e: Exception, when: str) -> None:
        self.sinks.remove(sink)
        print(f"warning: {sink.name} logging stopped {when}: {one_line(e).rstrip('.')}; training goes on and "
              "metrics.jsonl has every step", file=sys.stderr, flush=True)
        try:
            sink.close(failed=True)
        except Exception:  # already broken: nothing more to save
            pass

    def log(self, row: dict[str, Any], step: int) -> None:
        """Log one metrics row (the same dict as the metrics.jsonl line) at ``step``."""
        if not self.sinks:
            return
        values = scalars(row)
        for sink in list(self.sinks):
            try:
                sink.log(values, step)
            except Exception as e:
                self._drop(sink, e, f"at step {step}")

    def close(self, failed: bool = False) -> None:
        """Flush and close every sink (a W&B run is marked failed when ``failed``)."""
        for sink in list(self.sinks):
            try:
                sink.close(failed)
            except Exception as e:
                self.sinks.remove(sink)
                print(f"warning: {sink.name} did not close cleanly: {one_line(e)}; metrics.jsonl has every step",
                      file=sys.stderr, flush=True)
        self.sinks = []


def start(opts: TrackingOptions, out: Path, *, step: int, config: dict[str, Any], run_name: str,
          rank: int = 0) -> Tracker:
    """The tracker of a run in ``out`` that continues after ``step`` (0 for a new run). Rank 0 only:
    any other rank gets a tracker without sinks (nothing imported, nothing written). A sink that cannot
    start warns and is left out (the packages were checked before, by ``check_packages``)."""
    if rank != 0:
        return Tracker()
    sinks = []
    wanted: list[tuple[str, Any]] = []
    if opts.tensorboard:
        wanted.append(("TensorBoard", lambda: _TensorBoard(out / TB_DIR, step + 1)))
    if opts.wandb:
        wanted.append(("W&B", lambda: _WandB(opts, out, config, run_name)))
    for name, make in wanted:
        try:
            sinks.append(make())
        except Exception as e:
            print(f"warning: {name} logging not started: {one_line(e).rstrip('.')}; training goes on without it and "
                  "metrics.jsonl has every step", file=sys.stderr, flush=True)
    return Tracker(sinks)


def remove_event_files(path: Path) -> None:
    """Delete the TensorBoard event files in ``path`` (a replaced run's), and ``path`` once empty; other
    files there are left alone."""
    if not path.is_dir():
        return
    for f in path.iterdir():
        if f.is_file() and ".tfevents." in f.name:
            f.unlink()
    if not any(path.iterdir()):
        path.rmdir()


__all__ = ["TrackingOptions", "TRACKING_FIELDS", "Tracker", "start", "scalars", "remove_event_files", "NAMES",
           "TB_DIR", "WANDB_DIR", "WANDB_RUN"]

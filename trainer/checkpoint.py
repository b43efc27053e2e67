"""Checkpoints: versioned step directories plus an atomically replaced pointer, so that a crash
at any instant leaves the last complete checkpoint loadable.

    OUT/ckpt/step-000120/   model.safetensors, config.json, state.pt (optimiser, step), rng-rank{r}.pt
    OUT/ckpt/latest         "step-000120": the complete checkpoint to load

A save writes ``.step-000120.tmp/`` (each file fsynced), renames it to ``step-000120/``, then replaces
``latest`` (temporary file + fsync + ``os.replace`` + fsync of the directory), and only then removes
the previous step directory. A loader reads only what ``latest`` names (the newest complete step
directory when the pointer is missing), so a death between any two of these operations leaves
either the previous or the new checkpoint in force, never neither (tests/test_trainer_ops.py kills
a save at each of them).

``config.json`` holds the model config (enough to rebuild the model for generation), the training
config, the tokenizer the data was made with (for decoding) and the data identity checked on resume.
RNG states are saved per rank (``rng-rank{r}.pt``) because dropout draws differ between ranks.
Generation needs ``model.safetensors`` and ``config.json`` only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from shards.atomic import fsync_path, write_atomic
from trainer.config import ModelConfig
from trainer.model import GPT

POINTER = "latest"
MODEL_FILES = ("model.safetensors", "config.json")
FILES = (*MODEL_FILES, "state.pt")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _crash_point(name: str) -> None:
    """Called between the operations of :func:`save`; a no-op. tests/test_trainer_ops.py replaces it
    in a subprocess with ``os._exit`` at each point in turn to prove every instant is recoverable."""


def _oserror_in(e: BaseException) -> OSError | None:
    """The OSError behind an exception (torch and safetensors wrap EFBIG / ENOSPC in their own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(path)`` and fsync the file; a failure (disk full, file too large, ...) becomes one
    ``ValueError`` naming the file."""
    try:
        write(path)
        fsync_path(path)
    except (OSError, RuntimeError, ValueError) as e:  # SafetensorError is a plain Exception subclass
        raise CheckpointWriteError(path, e) from e
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise CheckpointWriteError(path, e) from e
        raise


class CheckpointWriteError(ValueError):
    """A checkpoint file could not be written; the previous checkpoint is still in force."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        os_err = _oserror_in(cause)
        why = (os_err.strerror or str(os_err)) if os_err is not None else str(cause).splitlines()[0]
        self.path = path
        self.errno = os_err.errno if os_err is not None else None
        super().__init__(f"could not write {str(path)!r}: {why}")


def rng_state() -> dict[str, Any]:
    s: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _step_of(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def _complete(d: Path, need: tuple[str, ...]) -> bool:
    return d.is_dir() and all((d / f).is_file() for f in need)


def _read_pointer(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / POINTER
    if not p.is_file():
        return None
    name = p.read_text().strip()
    if _step_of(name) is None:
        raise ValueError(f"checkpoint pointer {str(p)!r} holds {name!r}, not a step-N directory name")
    return name


def save(
    path: str | os.PathLike,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    state: dict[str, Any],
    rank: int = 0,
    world: int = 1,
    barrier=None,
) -> Path:
    """Save into ``path/step-N`` (N = ``state["step"]``) and point ``path/latest`` at it; returns the
    step directory. All ranks call this; rank 0 writes the shared files, every rank its RNG state.

    ``barrier``: a callable synchronising ranks (``torch.distributed.barrier``) or None. A write
    failure raises :class:`CheckpointWriteError` with the previous checkpoint still in force."""
    ckpt_dir = Path(path)
    name = step_dir_name(int(state["step"]))
    final, tmp = ckpt_dir / name, ckpt_dir / f".{name}.tmp"
    try:
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a save that died: never pointed at
                shutil.rmtree(tmp)
            tmp.mkdir()
            _crash_point("mkdir")
            _write(tmp / "model.safetensors", lambda p: save_model(model, str(p)))  # handles the tied LM head
            _crash_point("model")
            _write(tmp / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
            _crash_point("config")
            _write(tmp / "state.pt", lambda p: torch.save({"optimizer": optimizer.state_dict(), **state}, p))
            _crash_point("state")
        if barrier:
            barrier()
        _write(tmp / f"rng-rank{rank}.pt", lambda p: torch.save(rng_state(), p))
        _crash_point("rng")
        if barrier:
            barrier()
        if rank == 0:
            fsync_path(tmp)
            pointed = _read_pointer(ckpt_dir)
            if final.exists() and pointed != name:  # a complete save of this step that died before its pointer
                shutil.rmtree(final)
            if pointed != name:
                os.replace(tmp, final)
                fsync_path(ckpt_dir)
                _crash_point("rename")
                try:
                    write_atomic(ckpt_dir / POINTER, (name + "\n").encode())
                except OSError as e:
                    raise CheckpointWriteError(ckpt_dir / POINTER, e) from e
                _crash_point("pointer")
            else:  # this very step is already the pointed checkpoint: keep it
                shutil.rmtree(tmp)
            _prune(ckpt_dir, keep=name)
            _crash_point("prune")
    except (CheckpointWriteError, OSError) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointWriteError):
            raise
        raise CheckpointWriteError(Path(e.filename) if e.filename else tmp, e) from e
    if barrier:
        barrier()
    return final


def _prune(ckpt_dir: Path, keep: str) -> None:
    """Remove every other step directory and stale temporary one, once ``keep`` is pointed at. Each
    is renamed away first, so no ``step-N`` directory is ever seen half deleted."""
    for d in sorted(ckpt_dir.iterdir()):
        if not d.is_dir() or d.name == keep:
            continue
        if _step_of(d.name) is not None:
            trash = ckpt_dir / f".{d.name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(d, trash)
            shutil.rmtree(trash, ignore_errors=True)
        elif d.name.startswith(".step-") and (d.name.endswith(".tmp") or d.name.endswith(".old")):
            shutil.rmtree(d, ignore_errors=True)


def latest(ckpt_dir: str | os.PathLike, need: tuple[str, ...] = FILES) -> Path | None:
    """The step directory a run's checkpoint directory points at (or, without a pointer, its newest
    complete one); None when it holds no checkpoint. A pointer naming a missing or incomplete
    directory is an error: it is never written before its directory is complete."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    name = _read_pointer(ckpt_dir)
    if name is not None:
        d = ckpt_dir / name
        if not _complete(d, need):
            missing = [f for f in need if not (d / f).is_file()]
            raise ValueError(f"checkpoint {str(d)!r} (named by {str(ckpt_dir / POINTER)!r}) is incomplete: "
                             f"{', '.join(missing)} missing")
        return d
    steps = sorted((s, d) for d in ckpt_dir.iterdir() if (s := _step_of(d.name)) is not None and _complete(d, need))
    return steps[-1][1] if steps else None


def resolve(path: str | os.PathLike, need: tuple[str, ...] = FILES) -> Path:
    """A checkpoint argument -> the step directory to load: a run's ``ckpt`` directory (its pointer),
    or a step directory itself (also the flat layout of older versions)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"checkpoint {str(path)!r} is not a directory (pass OUT_DIR/ckpt or one of its step-N directories)"
        )
    if any((path / f).exists() for f in MODEL_FILES):  # a step directory
        missing = [f for f in need if not (path / f).is_file()]
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} is incomplete: {', '.join(missing)} missing")
        return path
    d = latest(path, need)
    if d is None:
        raise ValueError(f"checkpoint directory {str(path)!r} holds no complete checkpoint "
                         f"(no {POINTER!r} pointer, no step-N directory with {', '.join(need)})")
    return d


def read_config(path: str | os.PathLike, need: tuple[str, ...] = FILES) -> dict[str, Any]:
    """config.json of the checkpoint ``path`` resolves to (:func:`resolve`)."""
    d = resolve(path, need)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {str(d)!r}: config.json is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError(f"checkpoint {str(d)!r}: config.json has no 'model' section (not a trainer checkpoint)")
    return cfg


def load_model_from(path: str | os.PathLike, device: str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load its weights (for generation and eval): needs
    ``model.safetensors`` and ``config.json`` only."""
    d = resolve(path, MODEL_FILES)
    cfg = read_config(d, MODEL_FILES)
    try:
        model = GPT(ModelConfig.from_dict(cfg["model"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {str(d)!r}: config.json model section is invalid: {e}") from e
    missing, unexpected = _load_weights(model, d)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(d)!r} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device), cfg


def _load_weights(model: GPT, d: Path) -> tuple[list[str], list[str]]:
    try:
        return load_model(model, str(d / "model.safetensors"), strict=False)
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"checkpoint {str(d / 'model.safetensors')!r} cannot be loaded: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise ValueError(f"checkpoint {str(d / 'model.safetensors')!r} cannot be loaded: {e}") from e
        raise


def load_state(path: str | os.PathLike, model: GPT, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimiser and this rank's RNG in place; return the rest of state.pt."""
    path = resolve(path, FILES)
    missing, unexpected = _load_weights(model, path)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r}: weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    rng = path / f"rng-rank{rank}.pt"
    if not rng.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no RNG state for rank {rank} (saved with fewer ranks?)")
    set_rng_state(torch.load(rng, weights_only=False))
    return state

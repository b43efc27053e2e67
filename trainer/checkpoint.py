"""Checkpoints: ``model.safetensors`` + ``config.json`` + ``state.pt`` (optimiser, step, RNG), written
to a temporary directory and renamed into place, so a crash never leaves a half checkpoint.

``config.json`` holds the model config (enough to rebuild the model for generation), the training
config, the tokenizer the data was made with (for decoding) and the data identity checked on resume.
RNG states are saved per rank (``rng-rank{r}.pt``) because dropout draws differ between ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from trainer.config import ModelConfig
from trainer.model import GPT

FILES = ("model.safetensors", "config.json", "state.pt")


def rng_state() -> dict[str, Any]:
    s: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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
    """All ranks call this; rank 0 writes the shared files, every rank its RNG state.

    ``barrier``: a callable synchronising ranks (``torch.distributed.barrier``) or None."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied LM head
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        torch.save({"optimizer": optimizer.state_dict(), **state}, tmp / "state.pt")
    if barrier:
        barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if barrier:
        barrier()
    if rank == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    if barrier:
        barrier()
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    for f in FILES:
        if not (path / f).is_file():
            raise ValueError(f"checkpoint {str(path)!r} is incomplete: {f} is missing")
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {str(path)!r}: config.json is not valid JSON: {e}") from e


def load_model_from(path: str | os.PathLike, device: str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load its weights (for generation and eval)."""
    cfg = read_config(path)
    model = GPT(ModelConfig.from_dict(cfg["model"]))
    missing, unexpected = load_model(model, str(Path(path) / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device), cfg


def load_state(path: str | os.PathLike, model: GPT, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict[str, Any]:
    """Restore weights, optimiser and this rank's RNG in place; return the rest of state.pt."""
    path = Path(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r}: weights do not fit the model: missing {missing}, unexpected {unexpected}")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    rng = path / f"rng-rank{rank}.pt"
    if not rng.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no RNG state for rank {rank} (saved with fewer ranks?)")
    set_rng_state(torch.load(rng, weights_only=False))
    return state

"""Device names: the one place a ``--device`` value is checked and turned into a ``torch.device``.

Every command takes ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` where the command allows it: the first
CUDA device when one is visible, else the CPU). A bad name or a GPU the machine lacks is a one-line
``ValueError`` naming the flag (docs/operations.md), raised before any model loads. Light: torch is
imported inside the functions, so ``shards`` and the CLI parsers can import this module cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def check_device(device: str, flag: str = "--device", auto: bool = False) -> None:
    """Raise ``ValueError`` unless ``device`` names a device this machine has (``auto`` only when allowed)."""
    import torch

    if device == "cpu" or (auto and device == "auto"):
        return
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA device is visible; use {flag} cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(f"{flag} {device}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
        return
    choices = "auto, cpu, cuda or cuda:N" if auto else "cpu, cuda or cuda:N"
    raise ValueError(f"{flag} {device!r}: use {choices}")


def resolve_device(device: str, flag: str = "--device", local_rank: int | None = None) -> torch.device:
    """``device`` checked (``auto`` allowed) and resolved; with ``local_rank`` (a torchrun process) a bare
    ``cuda`` becomes that process's GPU, ``cuda:<local_rank>``."""
    import torch

    check_device(device, flag, auto=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    return torch.device(device)

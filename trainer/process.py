"""The process around the training loop (trainer/loop.py): torchrun ranks and the process group, this
rank's device, averaging across ranks and Ctrl-C handling (experiment tracking: common/tracking.py);
nothing here knows about the model or the data (docs/operations.md: interruptions and DDP)."""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from common.device import resolve_device


def distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def process_device(name: str, local_rank: int) -> torch.device:
    """This process's device (common/device.py resolves the name); made current for NCCL and autocast."""
    dev = resolve_device(name, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def allreduce_mean(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


class StopOnSigint:
    """While active (single process, main thread, default handler): the first Ctrl-C only sets
    ``requested``, so the loop ends the step, saves and stops cleanly; a second one interrupts now.
    Loader workers forked meanwhile inherit the handler and ignore the signal (pid check): they keep
    serving the step in flight instead of dying."""

    def __init__(self) -> None:
        self.requested = False
        self._pid = os.getpid()
        self._prev = None

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop now, unsaved)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSigint | None:
        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return None
        self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)

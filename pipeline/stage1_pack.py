"""Stage 1's packing: a token stream -> windows of ``seq_len + 1`` tokens -> full shards.

Window i covers stream tokens [i*T, i*T + T] (T = seq_len): consecutive windows share one token, so
every token after the first is a target exactly once (nanoGPT-style contiguous packing;
docs/data.md). The tail that cannot fill a last window is dropped and counted (``tail_tokens``).
Each stage-1 task packs its own train stream (pipeline/stage1_task.py), so a tail is dropped per task;
the driver packs the val split once, from every task's val stream in task order (pipeline/stage1.py).
Memory is bounded by one shard's worth of windows plus the current piece, not by a document.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.outputs import why
from pipeline.stage1_config import TokenizeConfig
from shards import FieldSpec, ShardPart, write_shard

log = logging.getLogger("pipeline.stage1")  # one logger name for all of stage 1's modules


class Packer:
    """Packs one token stream into windows; hands each full shard's windows to ``write``."""

    def __init__(self, seq_len: int, dtype: np.dtype, windows_per_shard: int,
                 write: Callable[[np.ndarray], None]):
        self.T, self.dtype, self.windows_per_shard, self.write = seq_len, dtype, windows_per_shard, write
        self.buf = np.zeros(0, dtype=dtype)
        self.blocks: list[np.ndarray] = []  # (n, T + 1) windows not in a shard yet, at most one shard's worth
        self.pending = 0
        self.documents = 0
        self.stream_tokens = 0
        self.windows = 0

    def add(self, ids: np.ndarray, eos: int | None = None) -> None:
        """Append ``ids`` (and ``eos``, which ends a document) to the stream."""
        if eos is not None:
            ids = np.append(ids, eos)
            self.documents += 1
        self.stream_tokens += len(ids)
        self.buf = np.concatenate([self.buf, ids.astype(self.dtype)])
        n = (len(self.buf) - 1) // self.T  # windows that fit: each needs T + 1 tokens
        if n > 0:
            # Window i = buf[i*T : i*T + T + 1]: a strided view, copied once (no (n, T+1) index array).
            self.blocks.append(
                np.lib.stride_tricks.sliding_window_view(self.buf, self.T + 1)[: n * self.T : self.T].copy()
            )
            self.buf = self.buf[n * self.T :].copy()
            self.pending += n
            self.windows += n
            while self.pending >= self.windows_per_shard:
                self.write(self._take(self.windows_per_shard))

    def _take(self, n: int) -> np.ndarray:
        """The next ``n`` pending windows as one (n, T + 1) array."""
        out: list[np.ndarray] = []
        need = n
        while need:
            b = self.blocks[0]
            if len(b) <= need:
                out.append(self.blocks.pop(0))
                need -= len(b)
            else:
                out.append(b[:need])
                self.blocks[0] = b[need:]
                need = 0
        self.pending -= n
        return np.concatenate(out) if len(out) > 1 else out[0]

    def finish(self) -> None:
        """Write the last, partial shard; the tail that fills no window is dropped."""
        if self.pending:
            self.write(self._take(self.pending))

    @property
    def tail_tokens(self) -> int:
        """Tokens in no window: the stream's tail after the last window's final token."""
        return self.stream_tokens - (self.windows * self.T + 1 if self.windows else 0)


def write_token_shard(path: Path, spec: FieldSpec, windows: np.ndarray, cfg: TokenizeConfig) -> ShardPart:
    """One token shard (written under a temporary name, renamed into place when whole)."""
    try:
        part = write_shard(path, {"tokens": spec}, {"tokens": windows}, **cfg.writer_options())
    except OSError as e:  # a full disk, a quota, a file size limit: the temporary is already removed
        raise ValueError(f"could not write shard {str(path.absolute())!r}: {why(e)}; free space (or pass another "
                         "--out) and rerun the same command") from e
    log.info("wrote %s (%d windows, %.1f MB)", part.path.name, len(windows), part.bytes / 1e6)
    return part


def shard_ext(cfg: TokenizeConfig) -> str:
    return "arrow" if cfg.format == "arrow" else "zarr"

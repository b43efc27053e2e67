"""Stage 1's packing: one split's token stream -> windows of ``seq_len + 1`` tokens -> full shards.

Window i covers stream tokens [i*T, i*T + T] (T = seq_len): consecutive windows share one token, so
every token after the first is a target exactly once (nanoGPT-style contiguous packing;
docs/data.md). The tail that cannot fill a last window is dropped and counted (``tail_tokens``).
Memory is bounded by one shard's worth of windows plus the current piece, not by a document.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.outputs import why
from pipeline.stage1_config import TokenizeConfig
from shards import Manifest, Split, write_shard

log = logging.getLogger("pipeline.stage1")  # one logger name for all of stage 1's modules


class SplitWriter:
    """Packs one split's token stream into windows and writes full shards as they fill."""

    def __init__(self, name: str, manifest: Manifest, out: Path, cfg: TokenizeConfig, windows_per_shard: int):
        self.name, self.manifest, self.out, self.cfg = name, manifest, out, cfg
        self.T = cfg.seq_len
        self.spec = manifest.fields["tokens"]
        self.windows_per_shard = windows_per_shard
        self.buf = np.zeros(0, dtype=self.spec.storage_dtype)
        self.blocks: list[np.ndarray] = []  # (n, T + 1) windows not in a shard yet, at most one shard's worth
        self.pending = 0
        self.documents = 0
        self.stream_tokens = 0
        self.windows = 0

    def add(self, ids: np.ndarray, eos: int | None) -> None:
        if eos is not None:
            ids = np.append(ids, eos)
            self.documents += 1
        self.stream_tokens += len(ids)
        self.buf = np.concatenate([self.buf, ids.astype(self.spec.storage_dtype)])
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
                self._flush(self._take(self.windows_per_shard))

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

    def _flush(self, windows: np.ndarray) -> None:
        k = len(self.manifest.splits.get(self.name).shards) if self.name in self.manifest.splits else 0
        ext = "arrow" if self.cfg.format == "arrow" else "zarr"
        path = self.out / f"{self.name}-{k:05d}.{ext}"
        try:
            part = write_shard(
                path,
                {"tokens": self.spec},
                {"tokens": windows},
                **self.cfg.writer_options(),
            )
        except OSError as e:  # a full disk, a quota, a file size limit: the temporary is already removed
            raise ValueError(f"could not write shard {str(path.absolute())!r}: {why(e)}; free space (or pass another "
                             "--out) and rerun the same command") from e
        self.manifest.add_shard(self.name, len(windows), {"tokens": part})
        log.info("wrote %s (%d windows, %.1f MB)", part.path.name, len(windows), part.bytes / 1e6)

    def finish(self) -> None:
        if self.pending:
            self._flush(self._take(self.pending))
        s = self.manifest.splits.setdefault(self.name, Split())
        # Tokens not in any window: the stream's tail after the last window's final token.
        kept = self.windows * self.T + (1 if self.windows else 0)
        s.extra.update(documents=self.documents, stream_tokens=self.stream_tokens,
                       tail_tokens=self.stream_tokens - kept)

"""Token windows from a corpus or stage-1 shards (one :func:`window_source` for ``sae.train`` and
``sae.eval``), teacher activations at a hook, a shuffle buffer.

Everything here is deterministic given its position, so a resumed training run re-reads the same
windows: ``iter_windows(..., skip=n)`` starts after the n-th window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae.hooks import HookSpec, capture_residual, run_until_hook


def iter_corpus_windows(paths: list[str], tokenizer, seq_len: int, eos_id: int) -> Iterator[np.ndarray]:
    """(seq_len,) int64 windows of documents tokenised with ``tokenizer``, EOS after each document,
    packed back to back (as stage 1 does). Plain text files separate documents by a line
    ``<|endoftext|>``; other corpus kinds go through ``common.corpus``."""
    from common.corpus import CorpusConfig, iter_documents

    for p in paths:
        if not Path(p).exists() and not p.startswith("hf:"):
            raise ValueError(f"corpus path {p!r} does not exist")
    buf: list[int] = []
    for _doc_id, text in iter_documents(CorpusConfig(paths=list(paths))):
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buf.append(eos_id)
        while len(buf) >= seq_len:
            yield np.asarray(buf[:seq_len], dtype=np.int64)
            del buf[:seq_len]


def iter_shard_windows(tokens_dir: str, split: str = "train") -> Iterator[np.ndarray]:
    """Stage-1 windows in manifest order; the first seq_len tokens of each (the positions that carry
    labels), as int64."""
    from shards import load_manifest, open_split

    m = load_manifest(tokens_dir)
    if split not in m.splits:
        raise ValueError(f"{tokens_dir}: no split {split!r} (has {sorted(m.splits)})")
    if "tokens" not in m.fields:
        raise ValueError(f"{tokens_dir}: the manifest has no 'tokens' field")
    ds = open_split(m, split, fields=["tokens"])
    try:
        for i in range(len(ds)):
            yield ds[i]["tokens"][: m.seq_len].astype(np.int64)
    finally:
        ds.close()


def window_source(tokens: str | None, split: str, corpus: list[str], teacher: str,
                  seq_len: int) -> Callable[[], Iterator[np.ndarray]]:
    """The windows ``sae.train`` and ``sae.eval`` read, as a callable returning a fresh iterator:
    stage-1 shards' ``split`` when ``tokens`` is set, else ``corpus`` tokenised with ``teacher``'s
    tokenizer into ``seq_len`` windows, each document followed by the teacher's separator token."""
    if tokens:
        return lambda: iter_shard_windows(tokens, split)
    from common.teacher import load_tokenizer, separator_token_id

    tok = load_tokenizer(teacher)
    eos = separator_token_id(tok)
    return lambda: iter_corpus_windows(corpus, tok, seq_len, eos)


def iter_windows(source, skip: int = 0, loop: bool = True) -> Iterator[np.ndarray]:
    """Windows from ``source()`` (a callable returning a fresh iterator), skipping the first ``skip``
    and starting over at the end when ``loop`` (a small corpus read for more than one epoch)."""
    seen = 0
    while True:
        any_window = False
        for w in source():
            any_window = True
            if seen >= skip:
                yield w
            seen += 1
        if not any_window:
            raise ValueError("--corpus / --tokens produced no window: the data holds fewer tokens than one window "
                             "(--seq-len); pass more text or a shorter --seq-len")
        if not loop:
            return


@torch.inference_mode()
def teacher_activations(model: nn.Module, hook: HookSpec, windows: np.ndarray, device: str) -> torch.Tensor:
    """(B, T) windows -> (B*T, D) float32 activations at ``hook``; the forward stops after the hook
    block (the later blocks and the LM head never run)."""
    ids = torch.from_numpy(windows).to(device)
    with capture_residual(model, hook, stop=True) as cap:
        run_until_hook(model, ids)
    assert cap.output is not None, "hook did not fire"
    return cap.output.reshape(-1, cap.output.shape[-1]).float()  # (B*T, D)


class ShuffleBuffer:
    """Holds ``capacity`` activation rows; once full, serves a random half of them as batches, and
    only then lets those rows be refilled with fresh activations. Tokens from many windows and
    positions are mixed in each batch, as with Gao et al.'s (2024) activation shuffle buffer. Its
    whole state (rows, order, position) is checkpointed, so a resumed run sees the same batches."""

    def __init__(self, capacity: int, d: int, generator: torch.Generator) -> None:
        if capacity < 2:
            raise ValueError(f"shuffle buffer capacity must be >= 2, got {capacity}")
        self.data = torch.empty(capacity, d)
        self.filled = 0
        self.free: torch.Tensor | None = None  # rows served, to be refilled
        self.order: torch.Tensor | None = None  # rows being served, in order
        self.pos = 0
        self.gen = generator

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    def needs_data(self) -> bool:
        return self.free is not None or self.filled < self.capacity

    def add(self, rows: torch.Tensor) -> torch.Tensor:
        """Store as many rows as fit; returns the rows that did not fit."""
        if self.free is not None:
            n = min(len(self.free), len(rows))
            self.data[self.free[:n]] = rows[:n]
            self.free = self.free[n:] if n < len(self.free) else None
            return rows[n:]
        n = min(self.capacity - self.filled, len(rows))
        self.data[self.filled : self.filled + n] = rows[:n]
        self.filled += n
        return rows[n:]

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """(batch_size, d) rows from a random half of the full buffer."""
        if self.needs_data():
            raise RuntimeError("ShuffleBuffer.next_batch called before the buffer was refilled")
        if self.order is None:
            half = max(batch_size, self.capacity // 2)
            self.order = torch.randperm(self.capacity, generator=self.gen)[: half // batch_size * batch_size]
            self.pos = 0
        batch = self.data[self.order[self.pos : self.pos + batch_size]].clone()
        self.pos += batch_size
        if self.pos >= len(self.order):
            self.free, self.order, self.pos = self.order, None, 0
        return batch

    def state_dict(self) -> dict:
        return {"data": self.data[: self.filled].clone(), "filled": self.filled, "free": self.free,
                "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.filled = state["filled"]
        self.data[: self.filled] = state["data"]
        self.free, self.order, self.pos = state["free"], state.get("order"), state.get("pos", 0)

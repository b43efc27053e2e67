"""Windows from shards to tensors: deterministic per-step sampling, a few loader workers.

The window order is a pure function of (seed, step): step s of epoch e = s // batches_per_epoch
takes global batch b = s % batches_per_epoch of the permutation drawn from ``(seed, e)``. A
checkpoint therefore only needs the step to restart at exactly the next window, with any number of
loader workers. Under ``torchrun`` rank r takes the r-th contiguous slice of each global batch, so
ranks see disjoint windows and their union is the single-process global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shards.fields import as_float32

# Float fields become fp32; integer fields int64 (torch has no arithmetic on uint16/uint32).
_FLOAT = {"float16", "bfloat16", "float32"}


class Windows(Protocol):
    """What the trainer needs from a split: ``shards.WindowDataset`` or :class:`ArrayWindows`."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict[str, np.ndarray]: ...
    def get_batch(self, indices) -> dict[str, np.ndarray]: ...


class ArrayWindows:
    """In-memory windows: a dict of arrays with a leading window axis (synthetic data, benches)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        lens = {len(a) for a in arrays.values()}
        if len(lens) != 1:
            raise ValueError(f"arrays disagree on the number of windows: {sorted(lens)}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        idx = np.asarray(indices)
        return {k: v[idx] for k, v in self.arrays.items()}


class StepSampler:
    """Global batch of step s, and each rank's share of it, from (seed, s) alone."""

    def __init__(self, n_windows: int, global_batch: int, seed: int, shuffle: bool = True) -> None:
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if n_windows < global_batch:
            raise ValueError(
                f"the split has {n_windows} windows, fewer than one global batch of {global_batch}: "
                "lower --micro-batch / --grad-accum or extract more data"
            )
        self.n, self.G, self.seed, self.shuffle = n_windows, global_batch, seed, shuffle
        self.batches_per_epoch = n_windows // global_batch  # the tail of each epoch is dropped
        self._cached: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            self._cached = (epoch, perm)
        return self._cached[1]

    def global_indices(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.batches_per_epoch)
        return self._perm(epoch)[b * self.G : (b + 1) * self.G]  # (G,)

    def rank_indices(self, step: int, rank: int, world: int) -> np.ndarray:
        share = self.G // world
        return self.global_indices(step)[rank * share : (rank + 1) * share]

    def state(self, step: int) -> dict[str, int]:
        epoch, b = divmod(step, self.batches_per_epoch)
        return {
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": b,
            "seed": self.seed,
            "windows": self.n,
            "global_batch": self.G,
        }


# The concept label fields, in pairs moved together: attribution (ids, scores), activation (ids, vals).
LABEL_FIELDS = ("concept_ids", "concept_scores", "mix_ids", "mix_vals")


class LabelPermutation:
    """The label-signal control (``--permute-labels SEED``): train window i takes the concept labels
    of window pi(i), its positions shuffled by sigma_i.

    pi is one cycle through all train windows in an order drawn from ``SEED`` (a derangement: no
    window keeps its own labels); sigma_i is a permutation of positions drawn from ``(SEED, i)``. Both
    are bijections, so over an epoch every (window, position)'s labels are used exactly once: the
    label distribution is the real one and any relation to the context is gone. A pure function of
    (SEED, i): deterministic, the same on resume, under any number of ranks or loader workers."""

    def __init__(self, n_windows: int, seed: int) -> None:
        order = np.random.default_rng([seed, n_windows]).permutation(n_windows)
        self.source = np.empty(n_windows, dtype=np.int64)
        self.source[order] = np.roll(order, -1)  # order[k] takes the labels of order[k + 1]
        self.seed = seed

    def positions(self, i: int, n_positions: int) -> np.ndarray:
        """sigma_i: (n_positions,) the source position of each position of window i."""
        return np.random.default_rng([self.seed, int(i)]).permutation(n_positions)

    def apply(self, raw: dict[str, np.ndarray], idx: np.ndarray, windows: Windows) -> np.ndarray:
        """Replace the label fields of ``raw`` (windows ``idx``) in place; returns the source windows."""
        fields = [f for f in LABEL_FIELDS if f in raw]
        src = self.source[np.asarray(idx, dtype=np.int64)]
        if not fields:
            return src
        donor = windows.get_batch(src)
        T = np.asarray(donor[fields[0]]).shape[1]
        sigma = np.stack([self.positions(i, T) for i in idx])  # (B, T), drawn once for every field
        for f in fields:
            lab = np.asarray(donor[f])  # (B, T, K)
            raw[f] = np.take_along_axis(lab, sigma.reshape(sigma.shape + (1,) * (lab.ndim - 2)), axis=1)
        return src


def to_torch(batch: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict[str, torch.Tensor]:
    """numpy window arrays -> tensors; ``dtypes`` are the manifest's logical dtypes per field."""
    out = {}
    for k, a in batch.items():
        dt = dtypes.get(k, str(a.dtype))
        if dt == "bfloat16":  # stored as uint16 bits
            out[k] = torch.from_numpy(as_float32(a, dt))
        elif dt in _FLOAT:
            out[k] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        else:
            out[k] = torch.from_numpy(np.asarray(a, dtype=np.int64))
    return out


# The key of the one-entry batch StepBatches returns instead of raising: a DataLoader worker's
# exception reaches the trainer as a multi-line "Caught ValueError in DataLoader worker process 0 ...
# Original Traceback" message; this way the loop raises the worker's one-line message itself.
LOAD_ERROR = "_load_error"


class StepBatches(Dataset):
    """Item s = this rank's windows of step s as tensors, checked against the model's ranges; a
    failure to read them (bad shard, out-of-range id) is returned as ``{LOAD_ERROR: message}``."""

    def __init__(
        self,
        windows: Windows,
        sampler: StepSampler,
        fields: list[str],
        dtypes: dict[str, str],
        rank: int = 0,
        world: int = 1,
        vocab_size: int | None = None,
        n_concepts: int | None = None,
        permute_labels: int | None = None,
    ) -> None:
        self.windows, self.sampler, self.fields, self.dtypes = windows, sampler, fields, dtypes
        self.rank, self.world = rank, world
        self.vocab_size, self.n_concepts = vocab_size, n_concepts
        self.permutation = LabelPermutation(len(windows), permute_labels) if permute_labels is not None else None

    def __len__(self) -> int:  # steps are unbounded (epochs repeat); DataLoader gets an explicit sampler
        return 2**62

    def _where(self, indices: np.ndarray) -> str:
        locate = getattr(self.windows, "locate", None)
        shards = getattr(self.windows, "shards", None)
        if locate is None or shards is None:
            return f"windows {indices.tolist()}"
        names = sorted({str(next(iter(shards[locate(int(i))[0]].parts.values())).path) for i in indices})
        return "shard(s) " + ", ".join(names)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        try:
            return self._load(step)
        except ValueError as e:  # includes pyarrow's ArrowInvalid
            return {LOAD_ERROR: str(e).splitlines()[0] if str(e) else type(e).__name__}
        except (OSError, IndexError, KeyError, RuntimeError) as e:
            return {
                LOAD_ERROR: f"reading the windows of step {step}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            }

    def _load(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.sampler.rank_indices(step, self.rank, self.world)
        raw = self.windows.get_batch(idx)
        raw = {k: raw[k] for k in self.fields}
        # The labels' windows: the step's own, or with --permute-labels those they were taken from.
        label_idx = idx if self.permutation is None else self.permutation.apply(raw, idx, self.windows)
        # Out-of-range ids would crash the embedding / gather (a device assert on GPU): name the shard.
        tok = raw["tokens"]
        if self.vocab_size is not None and tok.size and int(tok.max()) >= self.vocab_size:
            raise ValueError(
                f"token id {int(tok.max())} >= vocab {self.vocab_size} in {self._where(idx)}: "
                "corrupted or mismatched shard"
            )
        if (
            self.vocab_size is not None
            and "kd_ids" in raw
            and raw["kd_ids"].size
            and int(raw["kd_ids"].max()) >= self.vocab_size
        ):
            raise ValueError(
                f"kd_ids {int(raw['kd_ids'].max())} >= vocab {self.vocab_size} in {self._where(idx)}: "
                "teacher and tokenizer disagree"
            )
        if self.n_concepts is not None:
            for f, s in (("concept_ids", "concept_scores"), ("mix_ids", "mix_vals")):
                if f in raw:
                    ids = raw[f].astype(np.int64)
                    vals = as_float32(raw[s], "bfloat16") if self.dtypes.get(s) == "bfloat16" else raw[s]
                    bad = (ids >= self.n_concepts) & np.isfinite(vals)
                    if bad.any():
                        raise ValueError(
                            f"{f} {int(ids[bad].max())} >= n_concepts {self.n_concepts} in {self._where(label_idx)}"
                        )
        return to_torch(raw, self.dtypes)


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def step_loader(source: StepBatches, start: int, stop: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches of steps [start, stop) in order; ``workers`` processes prefetch ahead."""
    kw: dict[str, Any] = {}
    if workers > 0:
        kw = {"prefetch_factor": 4, "persistent_workers": False}
    # An explicit generator: otherwise creating the iterator draws a worker seed from the global RNG,
    # shifting the dropout stream of a resumed run against the uninterrupted one.
    return DataLoader(
        source, batch_size=None, sampler=_Steps(start, stop), num_workers=workers, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0), **kw,
    )


def eval_batches(
    windows: Windows, n: int, batch: int, rank: int, world: int, fields: list[str], dtypes: dict[str, str]
):
    """The first ``n`` windows of a split (fixed, so every evaluation sees the same ones), this
    rank's share, in batches."""
    idx = np.arange(min(n, len(windows)))[rank::world]
    for i in range(0, len(idx), batch):
        raw = windows.get_batch(idx[i : i + batch])
        yield to_torch({k: raw[k] for k in fields}, dtypes)

"""Concept-prediction quality: how many of the teacher's concept labels the student's top-k predicts.

The CoCoMix student predicts concept logits z (B, T, C) and mixes the k largest (docs/method.md
section 2.2; Tack et al. 2025, arXiv 2502.08524, Eq. 2-3). Its concept loss (section 2.4) is a CE over
all C latents, which says little about whether the labels the teacher attributed (section 1.4, K_attr
per position) are among the k concepts the student actually mixes. This module measures that:

- ``val_concept_recall``: over the valid (position, label) pairs of the held-out windows (validity:
  ``trainer.objectives.concept_label_mask``, or the activation labels' own mask), the fraction whose id
  is among the student's top-k ids at that position; micro-averaged (pairs, not positions, are the
  unit; a label id repeated at one position counts once per slot). The top-k set is the model's own
  selection (``GPTOut.concept_ids``, the ids mixed), so ties in z fall as ``torch.topk`` breaks them.
- ``val_concept_recall_prior``: the same recall for a predictor that ignores the context and always
  outputs the k ids most frequent among the train split's valid labels (ties between equal counts go
  to the lower id). It is the floor: a student below it has learned less than the label frequencies.

Both are ratios of counts, so under DDP the per-rank counts are summed before dividing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from trainer.data import to_torch
from trainer.objectives import concept_targets

# Windows converted to tensors at a time while counting train labels: bounds memory on large shards.
_CHUNK_WINDOWS = 256


def label_fields(labels: str) -> tuple[str, str]:
    """The shard fields the concept labels come from (``trainer.objectives.concept_targets``)."""
    return ("concept_ids", "concept_scores") if labels == "attribution" else ("mix_ids", "mix_vals")


def topk_hits(top_idx: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """(hits, valid labels): valid slots of ``ids`` (B, T, K) whose id is in ``top_idx`` (B, T, k)."""
    hit = (ids.long()[..., :, None] == top_idx.long()[..., None, :]).any(-1) & valid  # (B, T, K)
    return int(hit.sum().item()), int(valid.sum().item())


def prior_hits(prior: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> int:
    """Valid slots of ``ids`` (B, T, K) whose id is in the prior's id set; ``prior`` is a (C,) bool table."""
    table = prior.to(ids.device)
    safe = torch.where(valid, ids.long(), torch.zeros_like(ids, dtype=torch.long))
    return int((table[safe] & valid).sum().item())


def prior_table(counts: torch.Tensor, k: int) -> torch.Tensor:
    """(C,) bool: the k most frequent ids of ``counts`` (C,), equal counts broken towards the lower id."""
    order = torch.sort(counts, descending=True, stable=True).indices[:k]
    table = torch.zeros(counts.shape[0], dtype=torch.bool)
    table[order] = True
    return table


def label_counts(
    ds,
    labels: str,
    k_attr: int,
    n_concepts: int,
    dtypes: dict[str, str],
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """(C,) int64: how often each concept id is a valid label in ``ds`` (a ``shards.WindowDataset``).

    One bincount per shard, read in chunks of windows, so memory stays bounded whatever the split's
    size; under DDP each rank counts every world-th shard and the counts are summed over ranks."""
    fields = label_fields(labels)
    counts = torch.zeros(n_concepts, dtype=torch.int64)
    shards = range(rank, len(ds.shards), world)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shards), desc="concept label prior", unit="shard")
    for k in shards:
        arrays = ds.shard_arrays(k)
        n = len(arrays[fields[0]])
        for a in range(0, n, _CHUNK_WINDOWS):
            chunk = to_torch({f: np.asarray(arrays[f][a : a + _CHUNK_WINDOWS]) for f in fields}, dtypes)
            ids, valid = concept_targets(chunk, labels, k_attr)
            ids = ids[valid].long()
            if ids.numel() and int(ids.max()) >= n_concepts:
                path = ds.shards[k].parts[ds.manifest.field_parts[fields[0]]].path
                raise ValueError(f"{fields[0]} {int(ids.max())} >= n_concepts {n_concepts} in shard(s) {path}")
            counts += torch.bincount(ids, minlength=n_concepts)
        del arrays
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return counts


def recall_metrics(hits: float, prior: float, n: float) -> dict[str, float]:
    """The two logged values from summed counts (0 when no label was valid)."""
    n = max(n, 1.0)
    return {"val_concept_recall": hits / n, "val_concept_recall_prior": prior / n}

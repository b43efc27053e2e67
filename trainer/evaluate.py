"""Evaluation: the val split's metrics (:func:`val_metrics`) and more held-out sets (``--held-out
NAME=MANIFEST``), checked at start-up (:func:`check_held_out`), evaluated with the val split.

Each set is a manifest with the training data's tokenizer (a stage-1 tokens manifest suffices: only
``tokens`` is read). Its evaluated windows are those of its ``val`` split when it has any, else of its
``train`` split: the first ``eval_windows`` of them, exactly as the main val set picks its windows
(:func:`trainer.data.eval_batches`). The value logged is the same next-token loss as ``val_loss``,
mean over windows, summed over ranks under DDP, as ``held_out/NAME/loss`` (:func:`metric_key`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shards import load_manifest, open_split
from trainer import concept_metrics
from trainer.data import eval_batches
from trainer.objectives import concept_targets

_FIELDS = ["tokens"]


def metric_key(name: str) -> str:
    """The metrics.jsonl / TensorBoard / W&B key of a held-out set's mean LM loss."""
    return f"held_out/{name}/loss"


@dataclass
class HeldOut:
    """One checked held-out set; ``ds`` is open between :meth:`open` and :meth:`close`."""

    name: str
    manifest: Any
    split: str
    windows: int
    """Windows evaluated: min(eval_windows, the split's windows)."""
    ds: Any = None

    @property
    def dtypes(self) -> dict[str, str]:
        return {f: self.manifest.fields[f].dtype for f in _FIELDS}

    def open(self, verify: str) -> None:
        self.ds = open_split(self.manifest, self.split, verify=verify, fields=_FIELDS, limit=self.windows)

    def close(self) -> None:
        if self.ds is not None:
            self.ds.close()
            self.ds = None

    def identity(self) -> dict[str, Any]:
        """What decides the values logged: a resumed run must read the same windows (validate.differences)."""
        h = hashlib.sha256()
        n = 0
        for sh in self.manifest.splits[self.split].shards:
            if n >= self.windows:
                break
            h.update(f"{sh.windows}\0{sh.parts[self.manifest.field_parts['tokens']].checksum}\0".encode())
            n += sh.windows
        return {"split": self.split, "windows": self.windows, "tokens_checksum": "sha256:" + h.hexdigest()[:32]}


def check_held_out(specs: list[str] | None, manifest, block_size: int, eval_windows: int) -> list[HeldOut]:
    """Parse and check every ``NAME=MANIFEST`` (names are validated by TrainConfig) against the training
    ``manifest`` and the model's ``block_size``; reads manifests only, no shard. A problem raises one
    ValueError line naming ``--held-out NAME``."""
    out: list[HeldOut] = []
    for spec in specs or []:
        name, path = spec.split("=", 1)
        flag = f"--held-out {name}"
        if eval_windows < 1:
            raise ValueError(f"{flag}: --eval-windows is 0, so nothing would be evaluated; pass --eval-windows N")
        try:
            m = load_manifest(path)
        except (ValueError, OSError) as e:
            msg = " ".join(str(e).split())  # manifest schema errors span lines: keep it one line
            raise ValueError(f"{flag}: {msg}") from e
        where = f"{flag}: manifest {str(m.path)!r}"
        tok, ref = m.tokenizer or {}, manifest.tokenizer or {}
        fp, ref_fp = tok.get("fingerprint"), ref.get("fingerprint")
        if (fp is not None and ref_fp is not None and fp != ref_fp) or tok.get("vocab_size") != ref.get("vocab_size"):
            raise ValueError(f"{where} has another tokenizer than the training data (fingerprint {fp!r}, "
                             f"vocab {tok.get('vocab_size')}; training {ref_fp!r}, vocab {ref.get('vocab_size')}): "
                             "tokenize it with the training data's tokenizer")
        if "tokens" not in m.fields:
            raise ValueError(f"{where} has no tokens field (fields {sorted(m.fields)})")
        if m.seq_len > block_size:
            raise ValueError(f"{where} has windows of {m.seq_len} tokens, longer than the model's block_size "
                             f"{block_size}; tokenize it with --seq-len <= {block_size}")
        split = "val" if "val" in m.splits and m.splits["val"].windows > 0 else "train"
        n = m.splits[split].windows if split in m.splits else 0
        if n == 0:
            raise ValueError(f"{where} has no windows (neither a val nor a train split with windows)")
        out.append(HeldOut(name, m, split, min(eval_windows, n)))
    return out


@torch.no_grad()
def held_out_losses(
    sets: list[HeldOut], model, ntp_losses: Callable, micro_batch: int, rank: int, world: int, device: torch.device,
    autocast, head: bool = True,
) -> dict[str, float]:
    """``{held_out/NAME/loss: mean next-token loss}`` of every set, the model in eval mode (the caller's
    job): each set through :func:`val_metrics` as an NTP run (``ntp_losses(batch, model_output)``), so the
    arithmetic is val_loss's."""
    return {metric_key(s.name): val_metrics(
        eval_batches(s.ds, s.windows, micro_batch, rank, world, _FIELDS, s.dtypes), model, ntp_losses, "ntp",
        "attribution", None, None, world, device, autocast, head)["val_loss"] for s in sets}


@torch.no_grad()
def val_metrics(
    batches: Iterable[dict[str, torch.Tensor]], model, losses: Callable, mode: str, labels: str, k_attr: int | None,
    prior: torch.Tensor | None, world: int, device: torch.device, autocast, head: bool = True,
) -> dict[str, float]:
    """val_loss / val_ppl (and val_concept_loss, val_kd_loss, the concept recall and its prior floor) over
    this rank's ``batches``, summed over ranks; ``losses(batch, model_output)`` gives the run's objectives.
    Window-weighted fp64 means of the per-batch losses. ``head=False``: the model returns its hidden
    states and ``losses`` runs the LM head over chunks (trainer/chunked_ce.py), as in training."""
    sums = torch.zeros(7, dtype=torch.float64)  # ntp, concept, kd, windows, recall hits, prior hits, labels
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            pred = model(batch["tokens"][:, :-1], head=head)
            out = losses(batch, pred)
        if prior is not None:
            ids, valid = concept_targets(batch, labels, k_attr)
            hits, n_labels = concept_metrics.topk_hits(pred.concept_ids, ids, valid)
            sums[4:] += torch.tensor([hits, concept_metrics.prior_hits(prior, ids, valid), n_labels],
                                     dtype=torch.float64)
        n = batch["tokens"].shape[0]
        sums[:4] += torch.tensor([
            out.ntp.item() * n,
            (out.concept.item() if out.concept is not None else 0.0) * n,
            (out.kd.item() if out.kd is not None else 0.0) * n,
            n,
        ], dtype=torch.float64)
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    n = max(1.0, sums[3].item())
    res = {"val_loss": sums[0].item() / n}
    res["val_ppl"] = math.exp(min(res["val_loss"], 50.0))
    if mode == "cocomix":
        res["val_concept_loss"] = sums[1].item() / n
    if mode == "kd":
        res["val_kd_loss"] = sums[2].item() / n
    if prior is not None:
        res.update(concept_metrics.recall_metrics(sums[4].item(), sums[5].item(), sums[6].item()))
    return res

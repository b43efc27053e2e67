"""Training objectives: next-token CE, the CoCoMix concept CE, and KD on a stored teacher top-k.

Label conventions of the shards (docs/data.md, "Per-window fields"; the validity rule: docs/method.md section 1.4):
- A concept label slot is invalid when its score is not finite (the extraction writes -inf for the
  window's last position and for positions with fewer than K_attr usable latents) or, for signed id
  dtypes, when its id is negative. Invalid slots are masked out of the concept loss.
- KD targets are the teacher's top-k next-token log-probs per position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.chunked_ce import head_losses


class Losses(NamedTuple):
    total: torch.Tensor
    """The optimised loss: ntp + lambda * aux."""
    ntp: torch.Tensor
    """Next-token cross-entropy (nats per token)."""
    concept: torch.Tensor | None
    """Concept CE averaged over valid (position, label) pairs, or None."""
    kd: torch.Tensor | None
    """KL(teacher || student) per token on the stored top-k (plus the tail bucket), or None."""


def ntp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> mean CE in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def concept_label_mask(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, T, K) bool: which label slots carry a label (finite score and non-negative id)."""
    return torch.isfinite(scores) & (ids >= 0)


def concept_loss(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, denom: float | None = None) -> torch.Tensor:
    """(1/K_attr) sum_i CE(z_t, I_t,i), mean over positions (docs/method.md section 2.4).

    z (B, T, C) concept logits; ids (B, T, K) labels; valid (B, T, K) mask. Softmax over all C
    latents. With some slots invalid the mean is taken over the valid (position, label) pairs, which
    equals the paper's formula when every slot is valid. Returns 0 (with a graph) when none is valid.
    ``denom`` replaces the local count of valid slots: the training loop passes the count over the
    whole global batch (all micro-batches and ranks, scaled), so accumulation and DDP give exactly
    the single-process loss of the same global batch even when slots are masked unevenly.
    """
    logz = torch.logsumexp(z.float(), dim=-1, keepdim=True)  # (B, T, 1)
    safe = torch.where(valid, ids, torch.zeros_like(ids)).long()
    picked = torch.gather(z, -1, safe).float()  # (B, T, K): gather first, upcast only K values
    ce = (logz - picked) * valid  # (B, T, K)
    return ce.sum() / (valid.sum().clamp(min=1) if denom is None else denom)


def concept_targets(batch: dict[str, torch.Tensor], labels: str, k_attr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid) of the concept labels, by attribution (stored) or by activation (ablation)."""
    if labels == "attribution":
        return batch["concept_ids"], concept_label_mask(batch["concept_ids"], batch["concept_scores"])
    return activation_labels(batch["mix_ids"], batch["mix_vals"], k_attr)


def activation_labels(mix_ids: torch.Tensor, mix_vals: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's ablation: the k latents with the largest SAE activations (from the stored
    mixing targets). Returns (ids (B, T, k), valid (B, T, k)); zero or non-finite activations and
    negative ids are not labels (a TopK SAE's inactive slots are 0)."""
    vals = mix_vals.float()
    vals = torch.where(torch.isfinite(vals) & (mix_ids >= 0), vals, torch.full_like(vals, -float("inf")))
    k = min(k, vals.shape[-1])
    top, pos = torch.topk(vals, k, dim=-1)  # (B, T, k)
    ids = torch.gather(mix_ids.long(), -1, pos)
    return ids, torch.isfinite(top) & (top > 0)


def kd_loss(logits: torch.Tensor, kd_ids: torch.Tensor, kd_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) on the stored top-k, with the tail as one extra bucket.

    The teacher's mass outside its top k, r = 1 - sum_j p_j, is compared with the student's mass on
    the same complement, s = 1 - sum_j q_j, as a (k+1)-th outcome:
        KL = sum_j p_j (log p_j - log q_j) + r (log r - log s).
    This is the exact KL between the two distributions coarsened to {top-k ids, everything else}, a
    lower bound of the full KL that needs no renormalisation of the teacher. Mean over positions.
    logits (B, T, V); kd_ids (B, T, k); kd_logprobs (B, T, k); a position whose log-probs are not
    finite is masked.
    """
    logq_all = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    valid_pos = torch.isfinite(kd_logprobs).all(dim=-1)  # (B, T)
    logp = torch.where(valid_pos[..., None], kd_logprobs.float(), torch.zeros_like(kd_logprobs, dtype=torch.float32))
    logq = torch.gather(logq_all, -1, kd_ids.long().clamp(min=0))  # (B, T, k)
    p = logp.exp()
    head = (p * (logp - logq)).sum(-1)  # (B, T)
    # Tail masses in log space; clamp keeps log(1 - x) finite when fp16 rounding pushes sum p to 1.
    log_r = torch.log1p(-p.sum(-1).clamp(max=1 - 1e-6))
    log_s = torch.log(-torch.expm1(torch.logsumexp(logq, -1).clamp(max=-1e-6)))
    tail = log_r.exp() * (log_r - log_s)
    kl = (head + tail) * valid_pos
    return kl.sum() / valid_pos.sum().clamp(min=1)


def compute_losses(
    out,
    batch: dict[str, torch.Tensor],
    mode: str,
    labels: str = "attribution",
    k_attr: int = 4,
    lambda_concept: float = 0.1,
    lambda_kd: float = 0.1,
    concept_loss_on: bool = True,
    concept_denom: float | None = None,
    head_weight: torch.Tensor | None = None,
    chunk: int = 0,
) -> Losses:
    """out: a :class:`trainer.model.GPTOut`; batch: tensors from the loader (``tokens`` (B, T+1), ...).

    When ``out.hidden`` is set (the model ran with ``head=False``) the LM head ``head_weight`` (V, d)
    and the NTP / KD losses run over ``chunk`` positions at a time (trainer/chunked_ce.py): the same
    values and gradients without the (B, T, V) logits; ``ntp`` and ``kd`` are then reported detached
    and only ``total`` carries the gradient."""
    tokens = batch["tokens"]
    l_kd = None
    if out.hidden is not None:
        if head_weight is None or chunk < 1:
            raise ValueError("out.hidden needs head_weight and chunk >= 1")
        kd = mode == "kd"
        hl = head_losses(out.hidden, head_weight, tokens[:, 1:], chunk, batch["kd_ids"] if kd else None,
                         batch["kd_logprobs"] if kd else None, lambda_kd if kd else 0.0)
        total, l_ntp, l_kd = hl.total, hl.ntp, hl.kd
    else:
        l_ntp = ntp_loss(out.logits, tokens[:, 1:])
        total = l_ntp
        if mode == "kd":
            l_kd = kd_loss(out.logits, batch["kd_ids"], batch["kd_logprobs"])
            total = total + lambda_kd * l_kd
    l_c = None
    if mode == "cocomix" and out.concept_logits is not None:
        ids, valid = concept_targets(batch, labels, k_attr)
        l_c = concept_loss(out.concept_logits, ids, valid, concept_denom)
        if concept_loss_on:
            total = total + lambda_concept * l_c
        else:
            l_c = l_c.detach()  # "mix only": reported, not optimised
    return Losses(total, l_ntp, l_c, l_kd)

"""Concept attribution scores and top-K concept labels (docs/method.md).

Notation: N tokens (B windows x T positions, flattened), D teacher width at the hook, C SAE latents,
k the SAE's TopK, K the number of labels per token (K_attr, paper: 4).

Three variants, chosen by the user:
- ``act_x_grad`` (default; the reference code): a_i = c_i * <g, W_dec[i]>, where g = dL/dx is the
  gradient of the window's summed next-token loss w.r.t. the un-normalised residual x at the hook
  and c the SAE's (post-ReLU, TopK) code. c is zero outside the k active latents, so only those k
  dot products are computed: the same numbers as the dense (N, D) @ (D, C) product at k/C of its cost.
- ``preact_x_grad`` (the paper's Eq. 1): the pre-activation c_pre replaces c, so every latent can
  score; this one is dense over all C latents by definition.
- ``activation`` (the paper's ablation): labels are the latents with the largest activation c.

Labels. The dense reference takes ``topk`` of the signed scores over all C latents; when fewer than
K active latents score positive, it fills the remaining slots with arbitrary zero-score inactive
latents (docs/method.md). Here ``act_x_grad`` and ``activation`` keep only active latents with a
positive score; a missing slot holds id 0 and score -inf (the contract shared with the trainer: a
label slot is invalid exactly when its score is -inf), and the number of tokens with at least one
missing slot is counted. ``preact_x_grad`` keeps the paper's plain signed top-K over all C, which
never leaves a slot empty. Ties between equal scores go to the lower latent id, so labels do not
depend on the order in which the SAE returned its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Variant = Literal["act_x_grad", "preact_x_grad", "activation"]
VARIANTS: tuple[str, ...] = ("act_x_grad", "preact_x_grad", "activation")

# Tokens per slice of the sparse dot product: the gather W_dec[ids] is (rows, k, D), so slicing
# keeps it to ~100 MB at k=32, D=768 instead of growing with the batch.
_ROWS_PER_SLICE = 1024


@dataclass
class Labels:
    """Top-K concept labels of N tokens."""

    ids: torch.Tensor
    """(N, K) int64 latent ids, best first; 0 in a missing slot."""
    scores: torch.Tensor
    """(N, K) float32 scores, descending; -inf marks a missing slot."""
    n_short: int
    """Tokens with fewer than K positive scores (for act_x_grad/activation: with a missing slot)."""


def sparse_attribution(g: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """a[n, j] = vals[n, j] * <g[n], W_dec[ids[n, j]]>: the attribution of the active latents only.

    g: (N, D) gradient at the hook; ids, vals: (N, k) the SAE's sparse code; W_dec: (C, D), one
    decoder row per latent. Returns (N, k) float32.
    """
    out = torch.empty(ids.shape, dtype=torch.float32, device=g.device)
    for s in range(0, g.shape[0], _ROWS_PER_SLICE):
        e = s + _ROWS_PER_SLICE
        rows = W_dec[ids[s:e]].float()  # (n, k, D)
        dots = torch.bmm(rows, g[s:e].float().unsqueeze(-1)).squeeze(-1)  # (n, k)
        out[s:e] = vals[s:e].float() * dots
    return out


def dense_attribution(g: torch.Tensor, c: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The reference formula a = (g @ W_dec^T) * c over all C latents: (N, C).

    With c the post-activation code this is the reference code's score; with c the pre-activation
    it is the paper's Eq. 1. Only ``preact_x_grad`` (and tests) use it.
    """
    return (g.float() @ W_dec.float().T) * c.float()  # (N, C)


def top_positive(ids: torch.Tensor, scores: torch.Tensor, k: int) -> Labels:
    """The k best positive scores among candidate latents, ties to the lower id.

    ids, scores: (N, m) candidates (e.g. the SAE's k active latents and their scores), m >= k.
    Non-positive candidates never become labels; their slots get id 0 and score -inf.
    """
    if k > ids.shape[1]:
        raise ValueError(f"cannot take {k} labels from {ids.shape[1]} candidate latents per token")
    # Order candidates by id, then a stable descending sort by score: equal scores keep id order.
    ids_sorted, order = ids.sort(dim=1)
    scores = scores.float().gather(1, order)
    scores = scores.masked_fill(~(scores > 0), float("-inf"))  # also drops NaN
    top, pos = scores.sort(dim=1, descending=True, stable=True)
    top, pos = top[:, :k], pos[:, :k]
    top_ids = ids_sorted.gather(1, pos).masked_fill(top == float("-inf"), 0)
    n_short = int((top[:, -1] == float("-inf")).sum()) if k > 0 else 0
    return Labels(ids=top_ids.long(), scores=top, n_short=n_short)


def top_signed(scores: torch.Tensor, k: int) -> Labels:
    """The paper's plain top-k of signed dense scores (N, C) over all latents."""
    top, top_ids = scores.float().topk(k, dim=1)  # sorted, descending
    n_short = int((~(top > 0)).any(dim=1).sum()) if k > 0 else 0
    return Labels(ids=top_ids.long(), scores=top, n_short=n_short)


def dense_code_labels(variant: Variant, k: int, g: torch.Tensor, c: torch.Tensor, W_dec: torch.Tensor) -> Labels:
    """Labels from the dense code c (N, C) of an SAE without a fixed k (ReLU / JumpReLU), whose active
    set is data-dependent: every latent is a candidate, scored by ``dense_attribution`` (act_x_grad)
    or by c itself (activation); inactive latents score 0 and so are never labels."""
    all_ids = torch.arange(c.shape[1], device=c.device).expand_as(c)
    score = c if variant == "activation" else dense_attribution(g, c, W_dec)
    return top_positive(all_ids, score, k)


def attribution_labels(
    variant: Variant,
    k: int,
    g: torch.Tensor,
    ids: torch.Tensor,
    vals: torch.Tensor,
    W_dec: torch.Tensor,
    pre: torch.Tensor | None = None,
) -> Labels:
    """Labels of N tokens under one attribution variant.

    g: (N, D) gradient w.r.t. the un-normalised residual at the hook; ids, vals: (N, k_sae) the
    SAE's active latents and their (post-activation) values; pre: (N, C) dense pre-activations,
    needed only by ``preact_x_grad``.
    """
    if variant == "act_x_grad":
        return top_positive(ids, sparse_attribution(g, ids, vals, W_dec), k)
    if variant == "activation":
        return top_positive(ids, vals, k)
    if variant == "preact_x_grad":
        if pre is None:
            raise ValueError("preact_x_grad needs the dense pre-activations (pre=...)")
        return top_signed(dense_attribution(g, pre, W_dec), k)
    raise ValueError(f"unknown attribution variant {variant!r}: choose one of {', '.join(VARIANTS)}")

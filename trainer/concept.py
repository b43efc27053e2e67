"""The CoCoMix concept block (docs/method.md section 2.2; Tack et al. 2025, Eq. 2-4).

Given the hidden state h (B, T, d) after block L_ins-1 it predicts concept logits z over the C SAE
latents, keeps the k largest raw logits, compresses them into a continuous concept c_hat (B, T, d)
and hands both back; the GPT decides how c_hat is mixed (interleave / add / none).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ConceptConfig

# The SAE's input normalisation (OpenAI TopK SAE, copied by the reference code): eps added to the
# unbiased std when dividing; the de-normalisation multiplies by the std without eps.
LN_EPS = 1e-5


class ConceptOut(NamedTuple):
    logits: torch.Tensor
    """z, the predicted concept logits (B, T, C) after steering."""
    c_hat: torch.Tensor | None
    """The continuous concept (B, T, d), or None when the block does not mix (mix=none)."""
    top_idx: torch.Tensor
    """The k selected concept ids per position (B, T, k), by descending logit."""


def parameter_free_ln(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_n = (h - mu) / (std + eps) over the feature dim, std unbiased, no affine parameters."""
    mu = h.mean(dim=-1, keepdim=True)  # (B, T, 1)
    hc = h - mu
    std = hc.std(dim=-1, keepdim=True)  # (B, T, 1), unbiased as in the SAE
    return hc / (std + LN_EPS), mu, std


def steer_logits(z: torch.Tensor, steer: dict[int, float] | None, steer_from: int = 0) -> torch.Tensor:
    """Multiply z[..., id] by its scale at positions >= steer_from (docs/method.md section 2.6)."""
    if not steer:
        return z
    scale = torch.ones(z.shape[-1], dtype=z.dtype, device=z.device)
    for cid, s in steer.items():
        if not 0 <= cid < z.shape[-1]:
            raise ValueError(f"steered concept id {cid} is outside [0, {z.shape[-1]})")
        scale[cid] = s
    if steer_from <= 0:
        return z * scale
    pos = torch.arange(z.shape[1], device=z.device)[None, :, None]  # (1, T, 1)
    return torch.where(pos >= steer_from, z * scale, z)


class ConceptBlock(nn.Module):
    def __init__(self, d_model: int, cfg: ConceptConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.n_concepts
        # p: learned pre-bias subtracted after the LN and added back before de-normalising, init 0.
        self.pre_bias = nn.Parameter(torch.zeros(d_model))
        self.predictor = nn.Linear(d_model, C)  # W_pred (C, d), b_pred
        if cfg.mix != "none":
            # W_comp is (d, C); we store its transpose so that column i is row i, which is what a
            # gather over the k selected ids (embedding_bag) reads contiguously.
            self.comp_weight = nn.Parameter(torch.empty(C, d_model))  # W_comp^T (C, d)
            self.comp_bias = nn.Parameter(torch.zeros(d_model))
        else:
            self.register_parameter("comp_weight", None)
            self.register_parameter("comp_bias", None)

    def forward(self, h: torch.Tensor, steer: dict[int, float] | None = None, steer_from: int = 0) -> ConceptOut:
        B, T, d = h.shape
        k = self.cfg.topk
        x, mu, std = parameter_free_ln(h)
        x = x - self.pre_bias
        z = self.predictor(x)  # (B, T, C)
        z = steer_logits(z, steer, steer_from)
        # TopK of the raw signed logits, no ReLU (reference code; docs/method.md section 2.2).
        vals, idx = torch.topk(z, k, dim=-1)  # (B, T, k)
        if self.comp_weight is None:
            return ConceptOut(z, None, idx)
        # W_comp TopK(z): only the k selected columns contribute, so a weighted sum of k gathered
        # rows equals the dense (B,T,C)@(C,d) product with a masked z, at k/C of its cost.
        w = self.comp_weight
        comp = F.embedding_bag(
            idx.reshape(-1, k), w, per_sample_weights=vals.reshape(-1, k).to(w.dtype), mode="sum"
        ).view(B, T, d)  # (B, T, d)
        c_hat = (comp + self.comp_bias + self.pre_bias) * std + mu  # (B, T, d)
        return ConceptOut(z, c_hat, idx)


def dense_reference(block: ConceptBlock, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive formulation, for tests: a dense product with a masked z. Returns (z, c_hat)."""
    x, mu, std = parameter_free_ln(h)
    x = x - block.pre_bias
    z = x @ block.predictor.weight.T + block.predictor.bias  # (B, T, C)
    thresh = torch.topk(z, block.cfg.topk, dim=-1).values[..., -1:]  # (B, T, 1)
    if block.comp_weight is None:
        return z, None
    z_sparse = torch.where(z >= thresh, z, torch.zeros_like(z))  # (B, T, C), k non-zeros (no ties)
    c_hat = (z_sparse @ block.comp_weight + block.comp_bias + block.pre_bias) * std + mu
    return z, c_hat

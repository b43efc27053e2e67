"""The TopK SAE training recipe's pieces (Gao et al. 2024, arXiv 2406.04093; the recipe as a whole is
described in sae/train.py): b_dec's geometric-median init, the AuxK loss, the decoder-gradient
projection and the learning-rate schedule. Pure functions of their arguments; the trainer owns state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae.hooks import HookSpec
from sae.model import SparseAutoencoder
from sae.train_config import TrainConfig


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x (N, D)."""
    y = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(eps)  # (N,)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * max(1.0, y.norm().item()):
            return y_new
        y = y_new
    return y


def init_sae(cfg: TrainConfig, d_in: int, sample: torch.Tensor, hook: HookSpec) -> SparseAutoencoder:
    """Random unit-norm decoder rows, encoder = decoder transpose, b_dec from the (normalised) data."""
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = SparseAutoencoder(d_in, cfg.n_latents, "topk", cfg.k, normalize=cfg.normalize, hook=hook,
                            source=cfg.out, metadata={"trained_by": "sae.train"})
    with torch.no_grad():
        W = torch.randn(cfg.n_latents, d_in, generator=gen)
        sae.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec)  # (C, D): our W_enc layout is already the transpose of a (D, C) decoder
        x_n, _ = sae.normalize_input(sample)
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(x_n))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(x_n.mean(0))
    return sae


def auxk_loss(
    sae: SparseAutoencoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """Gao et al. 2024 §A.2: reconstruct the main loss's residual from the top-k_aux dead latents."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))  # (N, C): only dead latents can be picked
    vals, ids = masked.topk(k, dim=-1)
    e_hat = F.embedding_bag(ids, sae.W_dec, per_sample_weights=F.relu(vals), mode="sum")  # (N, D)
    scale = min(n_dead / k_aux, 1.0)  # sparsify: fewer dead latents -> proportionally less weight
    total_variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return scale * (e_hat - residual).pow(2).sum() / total_variance


@torch.no_grad()
def remove_parallel_grad(W: torch.nn.Parameter) -> None:
    """Project out the gradient component parallel to each (unit-norm) decoder row (Gao et al. §A.1)."""
    if W.grad is not None:
        W.grad -= (W.grad * W).sum(-1, keepdim=True) * W


def lr_at(cfg: TrainConfig, step: int, tokens: int) -> float:
    lr = cfg.resolved_lr() * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_decay_frac > 0:
        start = cfg.max_tokens * (1 - cfg.lr_decay_frac)
        if tokens > start:
            lr *= max(0.0, (cfg.max_tokens - tokens) / (cfg.max_tokens - start))
    return lr

"""The LM head and its losses (next-token CE, optionally KD) computed over chunks of positions.

The plain path materialises the (B, T, V) logits, their fp32 copy, the log-softmax and the gradient
of each: at V = 49,152 that is hundreds of MB of fresh allocations per step, and on CPU a large share
of the step time goes to the kernel zeroing and faulting in those pages. Here the head runs on
``chunk`` positions at a time and the gradient of the loss w.r.t. the chunk's logits is formed in
the forward pass (the loss is a scalar, so its gradient is known up to the incoming scale), turned at
once into the gradients of the hidden states and of the head weight, and the chunk's logits are
dropped. Peak memory holds one chunk's logits; the matmuls are the plain path's three (forward,
d hidden, d weight) with no recomputation. The values and gradients equal
:func:`trainer.objectives.ntp_loss` / :func:`trainer.objectives.kd_loss` (tests/test_chunked_ce.py).

Only the differentiable total ``ntp + kd_weight * kd`` carries a gradient; the separate ``ntp`` and
``kd`` values are returned detached (the training loop back-propagates the total only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class HeadLosses(NamedTuple):
    total: torch.Tensor
    """ntp + kd_weight * kd, differentiable w.r.t. the hidden states and the head weight."""
    ntp: torch.Tensor
    """Mean next-token CE (detached when a gradient was formed)."""
    kd: torch.Tensor | None
    """Mean top-k KL (see objectives.kd_loss), detached, or None without KD targets."""


def _chunk_terms(
    logits: torch.Tensor, tgt: torch.Tensor, kd_ids: torch.Tensor | None, kd_lp: torch.Tensor | None,
    need_grad: bool, n_tok: int, n_kd: torch.Tensor | None, kd_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk: fp32 logits (n, V) -> (CE sum, KL sum over valid positions, d total / d logits).

    The gradient reuses ``logits``' storage (softmax in place), so the chunk allocates one (n, V)."""
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    ce = (lse - logits.gather(1, tgt[:, None]).squeeze(1)).sum()
    kl = logits.new_zeros(())
    a = valid = None
    if kd_ids is not None:
        ids = kd_ids.long().clamp(min=0)
        valid = torch.isfinite(kd_lp).all(dim=-1)  # (n,)
        logp = torch.where(valid[:, None], kd_lp.float(), torch.zeros_like(kd_lp, dtype=torch.float32))
        logq = logits.gather(1, ids) - lse[:, None]  # (n, k)
        p = logp.exp()
        head = (p * (logp - logq)).sum(-1)
        log_r = torch.log1p(-p.sum(-1).clamp(max=1 - 1e-6))
        lsum = torch.logsumexp(logq, -1)
        log_s = torch.log(-torch.expm1(lsum.clamp(max=-1e-6)))
        r = log_r.exp()
        kl = ((head + r * (log_r - log_s)) * valid).sum()
        if need_grad:
            # d KL / d logq_j = -p_j + (r / s) q_j (the tail term; zero where the clamp on lsum binds).
            tail_on = (lsum < -1e-6).float()
            a = -p + (r * tail_on / log_s.exp())[:, None] * logq.exp()  # (n, k)
            a = a * (valid.float() * kd_weight / n_kd)[:, None]
    if not need_grad:
        return ce, kl, None
    # softmax in place; d CE_mean / d z = (softmax - onehot) / N; d KL / d z = scatter(a) - softmax * sum(a).
    g = logits.sub_(lse[:, None]).exp_()
    coef = torch.full_like(lse, 1.0 / n_tok)
    if a is not None:
        coef = coef - a.sum(-1)
    g.mul_(coef[:, None])
    g.scatter_add_(1, tgt[:, None], torch.full((tgt.shape[0], 1), -1.0 / n_tok, dtype=g.dtype, device=g.device))
    if a is not None:
        g.scatter_add_(1, kd_ids.long().clamp(min=0), a)
    return ce, kl, g


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, tgt, kd_ids, kd_lp, chunk: int, kd_weight: float):  # noqa: D401
        N = h.shape[0]
        n_kd = torch.isfinite(kd_lp).all(-1).sum().clamp(min=1) if kd_lp is not None else None
        gh = torch.empty_like(h)
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        ce_sum = h.new_zeros((), dtype=torch.float32)
        kl_sum = h.new_zeros((), dtype=torch.float32)
        for s in range(0, N, chunk):
            hc = h[s : s + chunk]
            raw = F.linear(hc, w)  # under autocast: the plain path's low-precision matmul
            cdt = raw.dtype
            logits = raw.float()
            del raw
            ce, kl, g = _chunk_terms(
                logits, tgt[s : s + chunk], None if kd_ids is None else kd_ids[s : s + chunk],
                None if kd_lp is None else kd_lp[s : s + chunk], True, N, n_kd, kd_weight,
            )
            ce_sum += ce
            kl_sum += kl
            if cdt == gw.dtype == h.dtype == w.dtype:  # fp32: write the products in place, no temporaries
                torch.matmul(g, w, out=gh[s : s + chunk])
                gw.addmm_(g.t(), hc)
            else:  # autocast: the matmuls in its dtype, as the plain backward would run them
                gl = g.to(cdt)
                gh[s : s + chunk] = gl @ w
                gw += (gl.t() @ hc).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        ntp = ce_sum / N
        kd = kl_sum / n_kd if kd_lp is not None else None
        total = ntp + kd_weight * kd if kd is not None else ntp.clone()  # outputs must be distinct tensors
        return total, ntp, kd if kd is not None else ntp.new_zeros(())

    @staticmethod
    def backward(ctx, g_total, _g_ntp, _g_kd):
        gh, gw = ctx.saved_tensors
        return gh * g_total, (gw * g_total).to(ctx.w_dtype), None, None, None, None, None


def head_losses(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
    kd_ids: torch.Tensor | None = None, kd_logprobs: torch.Tensor | None = None, kd_weight: float = 0.0,
) -> HeadLosses:
    """h (B, T, d) final hidden states (after the last LayerNorm); weight (V, d) the LM head;
    targets (B, T); chunk: positions per chunk (>= 1). With ``kd_ids`` / ``kd_logprobs`` (B, T, k)
    the KD term is included in ``total`` with weight ``kd_weight``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    hf = h.flatten(0, 1)
    tgt = targets.flatten().long()
    ki = kd_ids.flatten(0, 1) if kd_ids is not None else None
    kl = kd_logprobs.flatten(0, 1) if kd_logprobs is not None else None
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total, ntp, kd = _ChunkedHead.apply(hf, weight, tgt, ki, kl, chunk, kd_weight)
        return HeadLosses(total, ntp.detach(), kd.detach() if kl is not None else None)
    # No gradient wanted (evaluation): the same sums without the gradient work.
    N = hf.shape[0]
    n_kd = torch.isfinite(kl).all(-1).sum().clamp(min=1) if kl is not None else None
    ce_sum = hf.new_zeros((), dtype=torch.float32)
    kl_sum = hf.new_zeros((), dtype=torch.float32)
    for s in range(0, N, chunk):
        logits = F.linear(hf[s : s + chunk], weight).float()
        ce, kls, _ = _chunk_terms(logits, tgt[s : s + chunk], None if ki is None else ki[s : s + chunk],
                                  None if kl is None else kl[s : s + chunk], False, N, n_kd, kd_weight)
        ce_sum += ce
        kl_sum += kls
    ntp = ce_sum / N
    kd = kl_sum / n_kd if kl is not None else None
    return HeadLosses(ntp + kd_weight * kd if kd is not None else ntp, ntp, kd)

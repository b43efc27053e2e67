"""The student's optimiser and learning-rate schedule (docs/method.md): AdamW with weight decay on
matrices only, linear warmup then cosine decay. The LR is a function of the step alone, so a resumed
run (trainer/checkpoint.py) follows the uninterrupted run's schedule exactly."""

from __future__ import annotations

import math

import torch

from trainer.config import TrainConfig
from trainer.model import GPT


def lr_at(step: int, cfg: TrainConfig, total: int, warmup: int) -> float:
    """Linear warmup to the peak, then cosine to min_lr_ratio * peak at the last step (docs/method.md)."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")

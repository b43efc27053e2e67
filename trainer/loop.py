"""The training loop: AdamW, warmup + cosine, accumulation, DDP, eval, checkpoints, metrics.

Exact resume: the window order is a function of (seed, step) (:mod:`trainer.data`), the LR of the
step, and the checkpoint carries weights, optimiser moments and every RNG dropout draws from, so a
run resumed from step k replays the uninterrupted run's losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shards import load_manifest, open_split
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import StepBatches, StepSampler, eval_batches, step_loader
from trainer.model import GPT
from trainer.objectives import compute_losses, concept_targets
from trainer.validate import (
    build_model_config,
    check_manifest,
    check_resume,
    data_identity,
    k_attr,
    needed_fields,
)


def lr_at(step: int, cfg: TrainConfig, total: int, warmup: int) -> float:
    """Linear warmup to the peak, then cosine to min_lr_ratio * peak at the last step (COCOMIX.md 4)."""
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


def _distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but CUDA is not available")
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _allreduce_mean(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


class Trainer:
    """Builds everything from a TrainConfig; ``run()`` trains and returns a summary."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, local_rank = _distributed()
        self.device = _device(cfg.device, local_rank)
        if not cfg.shards:
            raise ValueError("--shards is required: the manifest JSON of the data to train on")
        self.manifest = load_manifest(cfg.shards)
        self.model_cfg = build_model_config(cfg, self.manifest)
        check_manifest(cfg, self.manifest, self.model_cfg)
        self.fields = needed_fields(cfg)
        self.dtypes = {k: self.manifest.fields[k].dtype for k in self.fields}
        self.k_attr = k_attr(self.manifest)
        self.train_ds = open_split(self.manifest, "train", verify=cfg.verify, fields=self.fields)
        self.val_ds = open_split(self.manifest, "val", verify=cfg.verify, fields=self.fields) if cfg.eval_windows > 0 else None
        self.T = self.manifest.seq_len
        self.G = cfg.micro_batch * cfg.grad_accum * self.world
        self.tokens_per_step = self.G * self.T
        # Neither --steps nor --max-tokens: one pass over the train split (plain `--shards M.json`).
        budget = cfg.max_tokens or len(self.train_ds) * self.T
        self.total_steps = cfg.steps or budget // self.tokens_per_step
        if self.total_steps < 1:
            raise ValueError(
                f"no steps to run: pass --steps, or a --max-tokens of at least one global batch ({self.tokens_per_step} tokens)"
            )
        self.warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, self.total_steps // 300)
        self.sampler = StepSampler(len(self.train_ds), self.G, cfg.seed)

        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.model = GPT(self.model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # each rank's dropout stream
        self.step, self.tokens = 0, 0
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "ckpt"
        resume = cfg.resume
        if resume == "auto":
            resume = str(self.ckpt_dir) if (self.ckpt_dir / "config.json").is_file() else ""
        if resume:
            saved = checkpoint.read_config(resume)
            check_resume(saved, self.model_cfg, cfg, self.manifest, self.world, self.total_steps)
            state = checkpoint.load_state(resume, self.model, self.optimizer, self.rank)
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.flops_per_token = self.model.flops_per_token(self.T)
        self.fwd = self.model
        if cfg.compile:
            self.fwd = torch.compile(self.model)
        if self.world > 1:
            self.fwd = torch.nn.parallel.DistributedDataParallel(
                self.fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )

    # -- pieces ------------------------------------------------------------------------------------

    def _losses(self, batch: dict[str, torch.Tensor], model, concept_denom: float | None = None) -> Any:
        cfg = self.cfg
        out = model(batch["tokens"][:, :-1])
        concept_on = self.model_cfg.concept.concept_loss if self.model_cfg.concept else False
        return compute_losses(
            out, batch, cfg.mode, cfg.labels, self.k_attr, cfg.lambda_concept, cfg.lambda_kd, concept_on, concept_denom
        )

    def _concept_denom(self, batch: dict[str, torch.Tensor]) -> float | None:
        """Valid concept labels in the global batch / (ranks x micro-batches): see objectives.concept_loss."""
        if self.cfg.mode != "cocomix":
            return None
        n = concept_targets(batch, self.cfg.labels, self.k_attr)[1].sum().to(torch.float64)
        if self.world > 1:
            n = n.to(self.device)
            dist.all_reduce(n)
        return max(n.item(), 1.0) / (self.world * self.cfg.grad_accum)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean NTP loss (and concept / KD loss) over the first eval_windows val windows."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # ntp, concept, kd, windows
        for batch in eval_batches(self.val_ds, self.cfg.eval_windows, self.cfg.micro_batch, self.rank, self.world, self.fields, self.dtypes):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast:
                losses = self._losses(batch, self.model)
            n = batch["tokens"].shape[0]
            sums += torch.tensor([
                losses.ntp.item() * n,
                (losses.concept.item() if losses.concept is not None else 0.0) * n,
                (losses.kd.item() if losses.kd is not None else 0.0) * n,
                n,
            ], dtype=torch.float64)
        if self.world > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        self.model.train()
        n = max(1.0, sums[3].item())
        out = {"val_loss": sums[0].item() / n}
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        if self.cfg.mode == "cocomix":
            out["val_concept_loss"] = sums[1].item() / n
        if self.cfg.mode == "kd":
            out["val_kd_loss"] = sums[2].item() / n
        return out

    def save(self) -> None:
        config = {
            "model": self.model_cfg.to_dict(),
            "train": self.cfg.to_dict(),
            "tokenizer": self.manifest.tokenizer,
            "data": data_identity(self.manifest),
            "manifest": str(self.manifest.path),
            "world_size": self.world,
            "total_steps": self.total_steps,
            "step": self.step,
        }
        state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state(self.step)}
        checkpoint.save(
            self.ckpt_dir, self.model, self.optimizer, config, state, self.rank, self.world,
            barrier=dist.barrier if self.world > 1 else None,
        )

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, is_main = self.cfg, self.rank == 0
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            resolved = {"train": cfg.to_dict(), "model": self.model_cfg.to_dict(), "world_size": self.world,
                        "total_steps": self.total_steps, "warmup_steps": self.warmup,
                        "params": self.model.num_params(), "flops_per_token": self.flops_per_token}
            (self.out / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        metrics_f = open(self.out / "metrics.jsonl", "a") if is_main else None
        tb = _tensorboard(self.out / "tb") if (cfg.tensorboard and is_main) else None
        source = StepBatches(
            self.train_ds, self.sampler, self.fields, self.dtypes, self.rank, self.world,
            vocab_size=self.model_cfg.vocab_size,
            n_concepts=self.model_cfg.concept.n_concepts if self.model_cfg.concept else None,
        )
        stop = self.total_steps if not cfg.halt_after else min(self.total_steps, self.step + cfg.halt_after)
        loader = step_loader(source, self.step, stop, cfg.workers, pin_memory=self.device.type == "cuda")
        bar = None
        if is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.mode}", unit="step")
        params = [p for p in self.model.parameters() if p.requires_grad]
        last: dict[str, Any] = {}
        evals: list[dict[str, float]] = []
        t_prev = time.perf_counter()
        self.model.train()
        try:
            for batch in loader:
                lr = lr_at(self.step, cfg, self.total_steps, self.warmup)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                sums = [0.0, 0.0, 0.0]
                denom = self._concept_denom(batch)
                for a in range(cfg.grad_accum):
                    mb = {k: v[a * cfg.micro_batch : (a + 1) * cfg.micro_batch].to(self.device, non_blocking=True) for k, v in batch.items()}
                    sync = self.world == 1 or a == cfg.grad_accum - 1
                    ctx = contextlib.nullcontext() if sync else self.fwd.no_sync()
                    with ctx:
                        with self.autocast:
                            losses = self._losses(mb, self.fwd, denom)
                        (losses.total / cfg.grad_accum).backward()
                    sums[0] += losses.total.item() / cfg.grad_accum
                    sums[1] += (losses.concept.item() if losses.concept is not None else 0.0) / cfg.grad_accum
                    sums[2] += (losses.kd.item() if losses.kd is not None else 0.0) / cfg.grad_accum
                if cfg.grad_clip > 0:
                    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
                else:
                    gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens += self.tokens_per_step
                loss, l_c, l_kd = _allreduce_mean(sums, self.world, self.device)
                now = time.perf_counter()
                tok_s = self.tokens_per_step / max(now - t_prev, 1e-9)
                t_prev = now
                last = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr, "grad_norm": gnorm,
                        "flops": self.flops_per_token * self.tokens, "tokens_per_s": tok_s}
                if cfg.mode == "cocomix":
                    last["concept_loss"] = l_c
                    last["ntp_loss"] = loss - (cfg.lambda_concept * l_c if self.model_cfg.concept.concept_loss else 0.0)
                elif cfg.mode == "kd":
                    last["kd_loss"] = l_kd
                    last["ntp_loss"] = loss - cfg.lambda_kd * l_kd
                else:
                    last["ntp_loss"] = loss
                is_last = self.step == self.total_steps
                if self.val_ds is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or is_last):
                    ev = self.evaluate()
                    last.update(ev)
                    evals.append({"step": self.step, **ev})
                if is_main and (self.step % cfg.log_every == 0 or "val_loss" in last or is_last):
                    metrics_f.write(json.dumps(last) + "\n")
                    metrics_f.flush()
                    if tb is not None:
                        for k, v in last.items():
                            if k != "step":
                                tb.add_scalar(k, v, self.step)
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or is_last:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        finally:
            if bar is not None:
                bar.close()
            if metrics_f is not None:
                metrics_f.close()
            if tb is not None:
                tb.close()
            for ds in (self.train_ds, self.val_ds):
                if ds is not None:
                    ds.close()
        return {"step": self.step, "tokens": self.tokens, "total_steps": self.total_steps, "last": last, "evals": evals,
                "out_dir": str(self.out), "params": self.model.num_params()}


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(path))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train from ``cfg`` (single process, or one rank under torchrun)."""
    return Trainer(cfg).run()

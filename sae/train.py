"""Train a TopK SAE on a teacher's activations, produced on the fly.

    python -m sae.train --teacher smollm2-135m --layer 9 --corpus owt_train.txt \
        --n-latents 4608 --k 32 --max-tokens 1000000 --out runs/sae-l9

Recipe of Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093):
- TopK activation (§2.3); decoder rows kept at unit norm, with the gradient component parallel to
  each row removed before every step (§A.1); encoder initialised as the decoder's transpose (§A.1);
  b_dec initialised to the geometric median of a data sample (§A.1);
- AuxK loss (§A.2): the residual is reconstructed from the top-k_aux pre-activations of the dead
  latents (not fired for ``dead_tokens`` tokens; the paper uses 10M), coefficient 1/32; k_aux = d_in/2
  as in EleutherAI sparsify (the paper uses 512), scaled by min(dead / k_aux, 1) as sparsify does;
- Adam with eps 6.25e-10 (§A.1, "Adam eps"), lr = 2e-4 / sqrt(n_latents / 2^14) (the paper's
  lr ~ 1/sqrt(n) scaling, constant as in sparsify), linear warmup, then constant; optional linear
  decay over the final fraction of tokens;
- inputs normalised with OpenAI's parameter-free layer norm by default (their TopK SAEs), the loss is
  the FVU in that space; batches come from a shuffle buffer of activations from many windows.
Teacher: inference mode, no parameter gradients; the forward stops after the hook block.
Outputs in ``--out``: ``cfg.json`` + ``sae_weights.safetensors`` (see ``sae.io``),
``train_config.json``, ``metrics.jsonl``, ``summary.json`` (written last: the run is finished), and
``checkpoint/`` for ``--resume``. Every file is written whole or not at all. What happens when --out
already holds something (another SAE, a user's files, this same run, another run) is in ``sae.rundir``:
nothing sae.train did not write is ever replaced, and rerunning a command continues or repeats it.
Bad input: one line ``error: ...`` and exit 2 (``sae.checks``), before the teacher is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from sae.checks import (
    TeacherShape,
    check_corpus,
    check_device,
    check_tokens,
    check_window,
    peek_teacher,
    shape_of_model,
)
from sae.data import (
    ShuffleBuffer,
    iter_corpus_windows,
    iter_shard_windows,
    iter_windows,
    teacher_activations,
)
from sae.hooks import LOCATIONS, HookSpec, check_sae_matches_model, hidden_size, resolve_layer
from sae.io import save_sae
from sae.model import SparseAutoencoder
from sae.rundir import (
    CHECKPOINT,
    METRICS,
    MUST_MATCH_ON_RESUME,
    STATE,
    SUMMARY,
    TRAIN_CONFIG,
    OutPlan,
    checkpoint_dir,
    plan_out,
    remove_ours,
    remove_tree_of_ours,
)
from shards.atomic import write_atomic


@dataclass
class TrainConfig:
    teacher: str = ""
    """Teacher: HF hub id, model directory, .gguf file or alias (smollm2-135m)."""
    layer: int | None = None
    """Block whose output (or sublayer output, see --location) the SAE reads: 0-based; -1 is the last
    block, -2 the one before (as in Python), recorded as the non-negative index. Required."""
    location: str = "resid_post"
    """Hook location: resid_post, attn_out or mlp_out."""
    corpus: list[str] = field(default_factory=list)
    """Text corpus (files separated by <|endoftext|> lines, jsonl, parquet); or use --tokens."""
    tokens: str | None = None
    """Stage-1 token shard directory (with manifest.json); alternative to --corpus."""
    split: str = "train"
    """Split of --tokens to read."""
    n_latents: int = 4608
    """Number of SAE latents."""
    k: int = 32
    """Active latents per token (TopK)."""
    max_tokens: int = 1_000_000
    """Training tokens (activations) in total."""
    out: str = ""
    """Output directory."""
    seq_len: int = 256
    """Window length when reading --corpus (stage-1 shards bring their own)."""
    teacher_batch: int = 8
    """Windows per teacher forward."""
    batch_size: int = 4096
    """Activations per SAE step."""
    buffer_tokens: int = 65536
    """Shuffle buffer size (activations); at least 2 x batch_size."""
    normalize: str = "layernorm"
    """Input normalisation: layernorm (OpenAI), sqrt_d, none."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(n_latents / 2^14) (Gao et al. 2024)."""
    warmup_steps: int = 50
    """Linear learning-rate warmup steps."""
    lr_decay_frac: float = 0.2
    """Decay the lr linearly to 0 over this final fraction of max_tokens (0: constant)."""
    auxk_coef: float = 1 / 32
    """AuxK loss coefficient (Gao et al. 2024 §A.2)."""
    k_aux: int | None = None
    """Dead latents used by AuxK; default d_in // 2 (sparsify)."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing; default min(10M, max_tokens // 10)."""
    b_dec_init: str = "geometric_median"
    """b_dec initialisation from the first buffer: geometric_median, mean or zeros."""
    checkpoint_every: int = 200
    """Steps between checkpoints (and one at the end)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    resume: bool = False
    """Continue the run in --out from its checkpoint, also with a larger --max-tokens or another lr
    schedule (a plain rerun of the same command continues on its own)."""
    overwrite: bool = False
    """Replace the sae.train run in --out: removes only the files sae.train wrote there."""
    seed: int = 0
    """Seed of the SAE init and the shuffle buffer."""
    device: str = "cpu"
    """cpu, cuda, cuda:0 ..."""
    teacher_dtype: str = "float32"
    """Teacher weights dtype (activations are cast to fp32 for the SAE)."""
    threads: int | None = None
    """torch CPU threads (default: torch's)."""

    def __post_init__(self) -> None:
        errors = []
        if not self.teacher:
            errors.append("--teacher is required")
        if self.layer is None:
            errors.append("--layer is required (0-based block index; -1 is the last block)")
        if self.location not in LOCATIONS:
            errors.append(f"--location must be one of {LOCATIONS}")
        if bool(self.corpus) == bool(self.tokens):
            errors.append("give exactly one of --corpus or --tokens")
        if not self.out:
            errors.append("--out is required")
        if self.n_latents < 1:
            errors.append(f"--n-latents={self.n_latents} must be >= 1")
        elif not 1 <= self.k <= self.n_latents:
            errors.append(f"--k={self.k} must be in 1..n_latents={self.n_latents}")
        if self.batch_size < 1:
            errors.append(f"--batch-size={self.batch_size} must be >= 1")
        if self.max_tokens < self.batch_size:
            errors.append(f"--max-tokens={self.max_tokens} is smaller than one batch ({self.batch_size})")
        if self.buffer_tokens < 2 * self.batch_size:
            errors.append(f"--buffer-tokens={self.buffer_tokens} must be at least 2 x batch_size={self.batch_size}")
        if self.normalize not in ("layernorm", "sqrt_d", "none"):
            errors.append("--normalize must be layernorm, sqrt_d or none")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            errors.append("--b-dec-init must be geometric_median, mean or zeros")
        if not 0 <= self.lr_decay_frac < 1:
            errors.append("--lr-decay-frac must be in [0, 1)")
        if self.seq_len < 1 or self.teacher_batch < 1:
            errors.append("--seq-len and --teacher-batch must be >= 1")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            errors.append(f"--lr={self.lr} must be a positive number (or leave it out for the default)")
        if self.warmup_steps < 0:
            errors.append(f"--warmup-steps={self.warmup_steps} must be >= 0")
        if not (math.isfinite(self.auxk_coef) and self.auxk_coef >= 0):
            errors.append(f"--auxk-coef={self.auxk_coef} must be >= 0")
        for name in ("k_aux", "dead_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"--{name.replace('_', '-')}={value} must be >= 1 (or leave it out for the default)")
        if self.checkpoint_every < 1 or self.log_every < 1:
            errors.append("--checkpoint-every and --log-every must be >= 1")
        if self.seed < 0:
            errors.append(f"--seed={self.seed} must be >= 0")
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            errors.append(f"--teacher-dtype={self.teacher_dtype!r} must be float32, bfloat16 or float16")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    def resolved_dead_tokens(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else max(self.batch_size, min(10_000_000, self.max_tokens // 10))


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


def auxk_loss(sae: SparseAutoencoder, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
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


class Trainer:
    """Owns the teacher, the window stream, the buffer, the SAE and its optimiser."""

    def __init__(self, cfg: TrainConfig, teacher: torch.nn.Module | None = None, plan: OutPlan | None = None) -> None:
        """``cfg``, ``teacher`` and ``plan`` as ``prepare`` returns them; without ``plan``, ``prepare``
        runs here (the command's checks, the layer resolved to its non-negative index)."""
        from common.teacher import load_teacher, load_tokenizer, separator_token_id

        self.cfg = cfg
        self.out = Path(cfg.out)
        if plan is None:  # called as a library: the same checks as the command (a negative layer resolved)
            cfg, loaded, plan = prepare(cfg, [])
            self.cfg, teacher = cfg, teacher if teacher is not None else loaded
        self.hook = HookSpec(cfg.layer, cfg.location)
        self.plan = plan
        self.teacher = teacher if teacher is not None else load_teacher(cfg.teacher, cfg.device, cfg.teacher_dtype)
        self.d_in = hidden_size(self.teacher)
        if cfg.tokens:
            self.source = lambda: iter_shard_windows(cfg.tokens, cfg.split)
        else:
            tok = load_tokenizer(cfg.teacher)
            eos = separator_token_id(tok)
            self.source = lambda: iter_corpus_windows(cfg.corpus, tok, cfg.seq_len, eos)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.buffer = ShuffleBuffer(cfg.buffer_tokens, self.d_in, self.gen)
        self.pending = torch.empty(0, self.d_in)
        self.windows_read = 0
        self.step = 0
        self.tokens = 0
        self.sae: SparseAutoencoder | None = None
        self.opt: torch.optim.Adam | None = None
        self.since_fired: torch.Tensor | None = None
        self.elapsed = 0.0
        self.windows = None
        self.last_metrics: dict = {}

    # ---------------------------------------------------------------- data
    def _fill_buffer(self) -> None:
        while self.buffer.needs_data():
            if len(self.pending) == 0:
                batch = [next(self.windows) for _ in range(self.cfg.teacher_batch)]
                self.windows_read += len(batch)
                self.pending = teacher_activations(self.teacher, self.hook, np.stack(batch), self.cfg.device).cpu()
            self.pending = self.buffer.add(self.pending)

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self) -> None:
        """Write checkpoint.tmp/ (state.pt last, so a complete copy is one with state.pt), then swap it
        in: checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint, drop checkpoint.old. Killed at
        any instant, ``sae.rundir.checkpoint_dir`` finds the newest complete copy."""
        d = self._ckpt_dir()
        tmp, old = d.with_name(CHECKPOINT + ".tmp"), d.with_name(CHECKPOINT + ".old")
        remove_tree_of_ours(tmp)  # left by a save that died: may mix files of two steps
        remove_tree_of_ours(old)
        tmp.mkdir(parents=True)
        try:
            self._write_checkpoint(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # incomplete (no state.pt): never trusted, but tidy
            raise
        if d.exists():
            os.replace(d, old)
            os.replace(tmp, d)
            remove_tree_of_ours(old)
        else:
            os.replace(tmp, d)

    def _write_checkpoint(self, tmp: Path) -> None:
        save_sae(self.sae, tmp, model_name=self.cfg.teacher)
        state = io.BytesIO()  # serialised in memory: a full disk is an OSError naming the file
        torch.save(
            {
                "opt": self.opt.state_dict(),
                "step": self.step,
                "tokens": self.tokens,
                "windows_read": self.windows_read,
                "since_fired": self.since_fired,
                "buffer": self.buffer.state_dict(),
                "pending": self.pending,
                "gen": self.gen.get_state(),
                "elapsed": self.elapsed,
                "config": dataclasses.asdict(self.cfg),
                "metrics": self.last_metrics,
            },
            state,
        )
        write_atomic(tmp / STATE, state.getvalue())  # last: its presence marks tmp complete

    def _load_checkpoint(self) -> None:
        from sae.io import load_sae

        d = checkpoint_dir(self.out)
        if d is None:
            raise ValueError(f"--resume: no checkpoint in {self._ckpt_dir()}; drop --resume to start the run over")
        try:
            state = torch.load(d / STATE, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for a damaged file
            raise ValueError(f"{d / STATE}: cannot read the checkpoint ({e}); to start the run over: "
                             f"{self.plan.command(['--overwrite'])}") from e
        saved = state["config"]
        for key in MUST_MATCH_ON_RESUME:
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise ValueError(f"--resume: {key}={getattr(self.cfg, key)!r} differs from the checkpoint's {saved[key]!r}; "
                                 f"pass the run's own value, or start over: {self.plan.command(['--overwrite'])}")
        self.sae = load_sae(d, device=self.cfg.device)
        self.sae.source = str(self.out)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.resolved_lr(), eps=6.25e-10)
        self.opt.load_state_dict(state["opt"])
        self.step, self.tokens, self.windows_read = state["step"], state["tokens"], state["windows_read"]
        self.since_fired = state["since_fired"].to(self.cfg.device)
        self.buffer.load_state_dict(state["buffer"])
        self.pending = state["pending"]
        self.gen.set_state(state["gen"])
        self.elapsed = state["elapsed"]
        self.last_metrics = state.get("metrics", {})

    # ---------------------------------------------------------------- training
    def _write_record(self) -> None:
        """train_config.json, first of all (it marks --out as an sae.train run), and a run that is
        (again) under way has no summary.json: that file is written last and means finished."""
        write_atomic(self.out / TRAIN_CONFIG, json.dumps(train_record(self.cfg), indent=2).encode())
        (self.out / SUMMARY).unlink(missing_ok=True)

    def _truncate_metrics(self) -> None:
        """metrics.jsonl keeps the lines up to the checkpoint's step: each step is logged once."""
        path = self.out / METRICS
        if not path.exists():
            return
        kept = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= self.step:
                    kept.append(ln)
            except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write
                continue
        write_atomic(path, "".join(ln + "\n" for ln in kept).encode())

    def setup(self) -> None:
        cfg = self.cfg
        if self.plan.overwrite:
            kept = remove_ours(self.out)
            what = "--overwrite: removed the sae.train run" if cfg.overwrite else "replaced an attempt that stopped before its first checkpoint"
            print(f"{what} in {self.out}" + (f" (kept {len(kept)} other entries)" if kept else ""), file=sys.stderr)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.plan.action == "resume":
            self._load_checkpoint()
            print(f"continuing the run in {self.out} from step {self.step} ({self.tokens} tokens)", file=sys.stderr)
            self._write_record()
            self._truncate_metrics()
            self.windows = iter_windows(self.source, skip=self.windows_read)
        else:
            self._write_record()
            (self.out / METRICS).unlink(missing_ok=True)  # of an attempt that died before its first checkpoint
            self.windows = iter_windows(self.source)
            self._fill_buffer()
            sample = self.buffer.data[: min(self.buffer.filled, 16384)]
            self.sae = init_sae(cfg, self.d_in, sample, self.hook).to(cfg.device)
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.resolved_lr(), eps=6.25e-10)  # Gao et al. §A.1
            self.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=cfg.device)
        check_sae_matches_model(self.sae, self.teacher, source=f"SAE in {self.out}")

    def train_step(self, x: torch.Tensor) -> dict:
        cfg, sae = self.cfg, self.sae
        k_aux = cfg.k_aux or self.d_in // 2
        out = sae(x.to(cfg.device))
        dead = self.since_fired >= cfg.resolved_dead_tokens()
        residual = (out.x_n - out.x_hat_n).detach()
        aux = auxk_loss(sae, out.pre_acts, residual, dead, k_aux) if cfg.auxk_coef > 0 else out.fvu.new_zeros(())
        loss = out.fvu + cfg.auxk_coef * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        remove_parallel_grad(sae.W_dec)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, self.step, self.tokens)
        self.opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
            fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=self.since_fired.device)
            fired[out.ids[out.vals > 0]] = True
            self.since_fired += len(x)
            self.since_fired[fired] = 0
        self.step += 1
        self.tokens += len(x)
        return {
            "step": self.step,
            "tokens": self.tokens,
            "fvu": out.fvu.item(),
            "auxk": float(aux.detach()),
            "l0": (out.vals > 0).sum(-1).float().mean().item(),
            "dead": dead.float().mean().item(),
            "lr": self.opt.param_groups[0]["lr"],
        }

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        if self.plan.action == "done":
            print(f"{self.out} holds this finished run; nothing to do (--overwrite trains it again)", file=sys.stderr)
            return self.plan.summary or {}
        self.setup()
        bar = tqdm(total=cfg.max_tokens, initial=self.tokens, unit="tok", unit_scale=True, desc="sae.train")
        t0 = time.time() - self.elapsed
        metrics = self.last_metrics
        try:  # the bar ends its line before any error message
            with open(self.out / METRICS, "a") as log:
                while self.tokens + cfg.batch_size <= cfg.max_tokens:
                    self._fill_buffer()
                    x = self.buffer.next_batch(cfg.batch_size)
                    metrics = self.last_metrics = self.train_step(x)
                    bar.update(len(x))
                    bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}", dead=f"{metrics['dead']:.3f}")
                    if self.step % cfg.log_every == 0:
                        log.write(json.dumps(metrics | {"wall_s": round(time.time() - t0, 1)}) + "\n")
                        log.flush()
                    if self.step % cfg.checkpoint_every == 0:
                        self.elapsed = time.time() - t0
                        self.save_checkpoint()
        finally:
            bar.close()
        self.elapsed = time.time() - t0
        self.save_checkpoint()
        save_sae(self.sae, self.out, model_name=cfg.teacher)
        summary = metrics | {
            "wall_s": round(self.elapsed, 1),
            "tokens_per_s": round(self.tokens / max(self.elapsed, 1e-9), 1),
            "windows_read": self.windows_read,
            "dead_fraction": float((self.since_fired >= cfg.resolved_dead_tokens()).float().mean()),
            "fingerprint": self.sae.fingerprint(),
        }
        write_atomic(self.out / SUMMARY, json.dumps(summary, indent=2).encode())  # last: the run is finished
        return summary


def train_record(cfg: TrainConfig) -> dict:
    """What train_config.json holds: the settings, the layer non-negative, and the resolved defaults."""
    return dataclasses.asdict(cfg) | {"lr_resolved": cfg.resolved_lr(), "dead_tokens_resolved": cfg.resolved_dead_tokens()}


def prepare(cfg: TrainConfig, argv: list[str]) -> tuple[TrainConfig, torch.nn.Module | None, OutPlan]:
    """Every check before heavy work: inputs, teacher shape, layer, --out. Returns the config with the
    layer resolved to its non-negative index, the teacher if it had to be loaded to learn its shape
    (GGUF), and what to do with --out."""
    from common.teacher import load_teacher

    check_device(cfg.device)
    if cfg.tokens:
        window = check_tokens(cfg.tokens, cfg.split)
    else:
        check_corpus(cfg.corpus)
        window = cfg.seq_len
    teacher = None
    shape: TeacherShape | None = peek_teacher(cfg.teacher)
    if shape is None:
        teacher = load_teacher(cfg.teacher, cfg.device, cfg.teacher_dtype)
        shape = shape_of_model(cfg.teacher, teacher)
    cfg = dataclasses.replace(cfg, layer=resolve_layer(cfg.layer, shape.n_blocks))
    check_window(window, shape, "--seq-len" if not cfg.tokens else f"--tokens {cfg.tokens}: window length")
    plan = plan_out(Path(cfg.out), train_record(cfg), cfg.resume, cfg.overwrite, argv)
    return cfg, teacher, plan


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Flags generated from TrainConfig: one per field, help = the field's docstring."""
    p = Parser(prog="python -m sae.train", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, TrainConfig)
    return p


def config_argv(cfg: TrainConfig) -> list[str]:
    """The flags that give ``cfg`` (those that differ from the defaults): the command line a refusal
    quotes when the run was started from Python (recipes/) rather than from a shell."""
    words: list[str] = []
    for f in dataclasses.fields(cfg):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(cfg, f.name)
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return words


def train(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """Train the SAE ``cfg`` describes, or report the finished run in ``cfg.out``; returns the summary.
    ``argv``: the command line refusals quote (default: ``config_argv(cfg)``). The programmatic entry
    (recipes/ call it); ValueError / OSError for user mistakes."""
    argv = config_argv(cfg) if argv is None else argv
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, teacher, plan = prepare(cfg, argv)
    if plan.action == "done":  # before loading the teacher: there is nothing to compute
        print(f"{cfg.out} holds this finished run; nothing to do (--overwrite trains it again)", file=sys.stderr)
        return plan.summary or {}
    return Trainer(cfg, teacher=teacher, plan=plan).run()


def main(argv: list[str] | None = None) -> dict:
    """The command; ValueError / OSError for user mistakes (``cli`` prints them as ``error: ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    summary = train(dataclass_from_args(TrainConfig, build_parser().parse_args(argv)), argv)
    print(json.dumps(summary, indent=2))
    return summary


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())

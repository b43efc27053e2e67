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
Outputs in ``--out``: ``cfg.json`` + ``sae_weights.safetensors`` (see ``sae.formats``),
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
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import tracking
from common.cli import Parser, add_dataclass_args, config_flags, dataclass_from_args, run_cli
from common.device import check_device
from sae.checks import check_window, check_window_source, teacher_shape
from sae.data import (
    ShuffleBuffer,
    iter_windows,
    teacher_activations,
    window_source,
)
from sae.formats import save_sae
from sae.hooks import HookSpec, check_sae_matches_model, hidden_size, resolve_layer
from sae.model import SparseAutoencoder
from sae.objective import auxk_loss, init_sae, lr_at, remove_parallel_grad
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
from sae.train_config import TrainConfig
from shards.atomic import write_atomic


class Trainer:
    """Owns the teacher, the window stream, the buffer, the SAE and its optimiser."""

    def __init__(self, cfg: TrainConfig, teacher: torch.nn.Module | None = None, plan: OutPlan | None = None) -> None:
        """``cfg``, ``teacher`` and ``plan`` as ``prepare`` returns them; without ``plan``, ``prepare``
        runs here (the command's checks, the layer resolved to its non-negative index)."""
        from common.teacher import load_teacher

        self.cfg = cfg
        self.out = Path(cfg.out)
        if plan is None:  # called as a library: the same checks as the command (a negative layer resolved)
            cfg, loaded, plan = prepare(cfg, [])
            self.cfg, teacher = cfg, teacher if teacher is not None else loaded
        self.hook = HookSpec(cfg.layer, cfg.location)
        self.plan = plan
        self.teacher = teacher if teacher is not None else load_teacher(cfg.teacher, cfg.device, cfg.teacher_dtype)
        self.d_in = hidden_size(self.teacher)
        self.source = window_source(cfg.tokens, cfg.split, cfg.corpus, cfg.teacher, cfg.seq_len)
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
        from sae.formats import load_sae

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
                raise ValueError(f"--resume: {key}={getattr(self.cfg, key)!r} differs from the checkpoint's "
                                 f"{saved[key]!r}; "
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
            what = ("--overwrite: removed the sae.train run" if cfg.overwrite
                    else "replaced an attempt that stopped before its first checkpoint")
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
        # TensorBoard / W&B get the metrics.jsonl rows (common/tracking.py); a resumed run's later steps are purged
        tracker = tracking.start(cfg, self.out, step=self.step, config=train_record(cfg),
                                 run_name=self.out.resolve().name)
        bar = tqdm(total=cfg.max_tokens, initial=self.tokens, unit="tok", unit_scale=True, desc="sae.train")
        t0 = time.time() - self.elapsed
        metrics = self.last_metrics
        ok = False
        try:  # the bar ends its line before any error message
            with open(self.out / METRICS, "a") as log:
                while self.tokens + cfg.batch_size <= cfg.max_tokens:
                    self._fill_buffer()
                    x = self.buffer.next_batch(cfg.batch_size)
                    metrics = self.last_metrics = self.train_step(x)
                    bar.update(len(x))
                    bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
                                    dead=f"{metrics['dead']:.3f}")
                    if self.step % cfg.log_every == 0:
                        row = metrics | {"wall_s": round(time.time() - t0, 1)}
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        tracker.log(row, self.step)
                    if self.step % cfg.checkpoint_every == 0:
                        self.elapsed = time.time() - t0
                        self.save_checkpoint()
            ok = True
        finally:
            bar.close()
            tracker.close(failed=not ok)
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
    return dataclasses.asdict(cfg) | {"lr_resolved": cfg.resolved_lr(),
                                      "dead_tokens_resolved": cfg.resolved_dead_tokens()}


def prepare(cfg: TrainConfig, argv: list[str]) -> tuple[TrainConfig, torch.nn.Module | None, OutPlan]:
    """Every check before heavy work: inputs, teacher shape, layer, --out. Returns the config with the
    layer resolved to its non-negative index, the teacher if it had to be loaded to learn its shape
    (GGUF), and what to do with --out."""
    check_device(cfg.device)
    cfg.check_packages()  # --tensorboard / --wandb: a missing package is one error line, before the teacher loads
    window = check_window_source(cfg.tokens, cfg.split, cfg.corpus, cfg.seq_len)
    # teacher: GGUF, loaded to learn its shape
    shape, teacher = teacher_shape(cfg.teacher, cfg.device, cfg.teacher_dtype)
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


def train(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    """Train the SAE ``cfg`` describes, or report the finished run in ``cfg.out``; returns the summary.
    ``argv``: the command line refusals quote (default: ``config_flags(cfg)``). The programmatic entry
    (recipes/ call it); ValueError / OSError for user mistakes."""
    argv = config_flags(cfg) if argv is None else argv
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

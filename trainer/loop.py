"""The training loop: setup and resume, accumulation, DDP, eval, checkpoints, metrics. The optimiser and
LR schedule are in trainer/optimizer.py; ranks, device, Ctrl-C and TensorBoard in trainer/process.py.
One ``Trainer`` class: its setup (out-dir, identity, checksums) and its step loop share the run's
state, which is why this file stays a little over 400 lines.

Exact resume: the window order is a function of (seed, step) (:mod:`trainer.data`), the LR of the
step, and the checkpoint carries weights, optimiser moments and every RNG dropout draws from, so a
run resumed from step k replays the uninterrupted run's losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common import tracking
from shards import load_manifest, open_split
from shards.dataset import verify_parts
from trainer import checkpoint, concept_metrics, rundir
from trainer.config import TrainConfig
from trainer.data import LOAD_ERROR, StepBatches, StepSampler, eval_batches, step_loader
from trainer.evaluate import check_held_out, held_out_losses, val_metrics
from trainer.model import GPT
from trainer.objectives import compute_losses, concept_targets
from trainer.optimizer import lr_at, make_optimizer
from trainer.process import (
    StopOnSigint,
    allreduce_mean,
    distributed,
    process_device,
)
from trainer.validate import (
    build_model_config,
    check_manifest,
    data_identity,
    differences,
    k_attr,
    needed_fields,
    run_record,
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: the message says what was saved and how to continue (``python -m trainer.run`` prints
    it and exits 130)."""


class Trainer:
    """Builds everything from a TrainConfig; ``run()`` trains and returns a summary.

    Order matters for the user: the out-dir path, then the manifest and the run's identity against
    what the out-dir holds (cheap, so a mistake costs no time), then the shard checksums (the slow
    part), then the model."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, local_rank = distributed()
        if not cfg.shards:
            raise ValueError("--shards is required: the manifest JSON of the data to train on")
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / rundir.CKPT
        rundir.check_path(self.out)
        cfg.check_packages()  # --tensorboard / --wandb: a missing package is one error line, before any work
        self.device = process_device(cfg.device, local_rank)
        self.manifest = load_manifest(cfg.shards)
        self.model_cfg = build_model_config(cfg, self.manifest)
        check_manifest(cfg, self.manifest, self.model_cfg)
        self.held_out = check_held_out(cfg.held_out, self.manifest, self.model_cfg.block_size, cfg.eval_windows)
        self.fields = needed_fields(cfg)
        self.dtypes = {k: self.manifest.fields[k].dtype for k in self.fields}
        self.k_attr = k_attr(self.manifest)
        self.T = self.manifest.seq_len
        self.G = cfg.micro_batch * cfg.grad_accum * self.world
        self.tokens_per_step = self.G * self.T
        # Neither --steps nor --max-tokens: one pass over the train split (plain `--shards M.json`).
        budget = cfg.max_tokens or self.manifest.splits["train"].windows * self.T
        self.total_steps = cfg.steps or budget // self.tokens_per_step
        if self.total_steps < 1:
            raise ValueError(
                "no steps to run: pass --steps, or a --max-tokens of at least one global batch "
                f"({self.tokens_per_step} tokens)"
            )
        self.warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, self.total_steps // 300)
        self.record = run_record(self.model_cfg, cfg, self.world, self.total_steps,
                                 data_identity(self.manifest, self.fields, cfg.eval_windows))
        if self.held_out:  # only then: the record of a run without --held-out stays as it was
            self.record["data"]["held_out"] = {h.name: h.identity() for h in self.held_out}
        self.step, self.tokens = 0, 0
        self.resume_from, self.complete = self._place()
        self.last_ckpt: Path | None = self.resume_from
        if self.complete:  # nothing to train: no data read, no model built, nothing written
            return
        # Under torchrun each rank hashes a share of the shards (not all of them: N ranks would read
        # the data N times over) and a bad shard found by any rank stops every rank before step 0.
        shared = cfg.verify == "open" and self.world > 1
        verify = "none" if shared else cfg.verify
        self.train_ds = open_split(self.manifest, "train", verify=verify, fields=self.fields)
        self.val_ds = (open_split(self.manifest, "val", verify=verify, fields=self.fields, limit=cfg.eval_windows)
                       if cfg.eval_windows > 0 else None)
        for h in self.held_out:
            h.open(verify)
        if shared:
            self._verify_shared()
        self.sampler = StepSampler(len(self.train_ds), self.G, cfg.seed)
        # Concept recall and its label-frequency floor (trainer/concept_metrics.py), with any model that
        # predicts concepts and reads labels; the prior's table is counted once, here, from the train split.
        self.prior: torch.Tensor | None = None
        if self.val_ds is not None and self.model_cfg.concept is not None and all(
            f in self.fields for f in concept_metrics.label_fields(cfg.labels)
        ):
            counts = concept_metrics.label_counts(
                self.train_ds, cfg.labels, self.k_attr, self.model_cfg.concept.n_concepts, self.dtypes, self.rank,
                self.world, self.device, progress=cfg.progress and self.rank == 0,
            )
            self.prior = concept_metrics.prior_table(counts, self.model_cfg.concept.topk)

        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.model = GPT(self.model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # each rank's dropout stream
        if self.resume_from is not None:
            state = checkpoint.load_state(self.resume_from, self.model, self.optimizer, self.rank)
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

    def _verify_shared(self) -> None:
        sets = (self.train_ds, self.val_ds, *(h.ds for h in self.held_out))
        parts = [p for ds in sets if ds is not None for p in ds.parts()]
        error = ""
        try:
            verify_parts(parts[self.rank :: self.world])
        except ValueError as e:
            error = str(e)
        bad = torch.tensor([1.0 if error else 0.0], device=self.device)
        dist.all_reduce(bad)
        if bad.item() > 0:
            raise ValueError(error or "a shard is corrupted or missing (reported by another rank; see its error)")

    def _place(self) -> tuple[Path | None, bool]:
        """Where this run starts: (checkpoint to load or None, already complete). Refuses an out-dir
        holding another run, and a --resume checkpoint of another run, naming every difference.

        The same unfinished run continues from its last complete checkpoint with or without
        ``--resume auto``: rerunning the command that was killed is how every stage of this project
        resumes, and nothing is lost (the steps after the checkpoint are redone bit for bit)."""
        cfg, out = self.cfg, self.out
        existing = rundir.inspect(out)
        src = None
        if cfg.resume not in ("", "auto"):
            src = checkpoint.resolve(cfg.resume)
            diffs = differences(checkpoint.read_config(src), self.record, self.manifest, "checkpoint")
            if diffs:
                raise ValueError(f"--resume {cfg.resume}: checkpoint {str(src)!r} is of another run: "
                                 + "; ".join(diffs)
                                 + "; resume it with its own settings and data, or train anew without --resume")
        if existing is not None:
            diffs = differences(existing.record, self.record, self.manifest, existing.source)
            if diffs:
                if existing.finished:
                    what, way = "a finished run", "the finished run there is kept"
                else:
                    what = f"another run (at step {existing.step} of {existing.total_steps})"
                    way = "to continue the run there instead, rerun its own command with --resume auto"
                raise ValueError(f"--out-dir {str(out)!r} holds {what} that differs from this one: " + "; ".join(diffs)
                                 + f"; choose another --out-dir for this run ({way})")
            if src is None:
                src = existing.ckpt
            elif existing.ckpt is not None and existing.step > int(checkpoint.read_config(src).get("step", 0)):
                # Going back would cut metrics.jsonl and prune the later checkpoint: never implicitly.
                raise ValueError(f"--resume {cfg.resume}: --out-dir {str(out)!r} holds this run at step "
                                 f"{existing.step}, later than that checkpoint; choose another --out-dir to continue "
                                 f"from it (its checkpoint {str(existing.ckpt)!r} is kept)")
        step = int(checkpoint.read_config(src).get("step", 0)) if src is not None else 0
        if step >= self.total_steps:
            if self.rank == 0:
                print(f"run complete: {str(out)!r} holds this run finished at step {step}/{self.total_steps} "
                      f"(checkpoint {str(src)!r}); nothing to do", file=sys.stderr)
            return src, True
        if self.rank == 0 and (src is not None or existing is not None):
            print(f"continuing the run in {str(out)!r} from step {step}/{self.total_steps}"
                  + (f" (checkpoint {str(src)!r})" if src is not None else " (no checkpoint yet: from the start)"),
                  file=sys.stderr)
        return src, False

    def _continue_hint(self) -> str:
        if self.last_ckpt is not None:
            return (f"the last complete checkpoint {str(self.last_ckpt)!r} is intact: rerun the same command "
                    "to continue from it")
        return "no checkpoint was written yet: rerun the same command to start again"

    def _complete_summary(self) -> dict[str, Any]:
        saved = checkpoint.read_config(self.resume_from)
        rows = rundir.read_metrics(self.out / rundir.METRICS)
        evals = [
            {"step": r["step"], **{k: v for k, v in r.items() if k.startswith(("val_", "held_out/"))}}
            for r in rows if "val_loss" in r
        ]
        params = None
        try:
            params = json.loads((self.out / rundir.RECORD).read_text()).get("params")
        except (OSError, json.JSONDecodeError):
            pass
        step = int(saved.get("step", self.total_steps))
        return {"step": step, "tokens": step * self.tokens_per_step, "total_steps": self.total_steps,
                "last": rows[-1] if rows else {}, "evals": evals, "out_dir": str(self.out), "params": params,
                "complete": True}

    # -- pieces ------------------------------------------------------------------------------------

    def _losses(self, batch: dict[str, torch.Tensor], model, concept_denom: float | None = None, out=None) -> Any:
        """The objectives of ``batch``; ``out``: the model's output on it when the caller already ran it."""
        cfg = self.cfg
        if out is None:  # the LM head runs inside the loss, over cfg.loss_chunk positions at a time
            out = model(batch["tokens"][:, :-1], head=cfg.loss_chunk == 0)
        concept_on = self.model_cfg.concept.concept_loss if self.model_cfg.concept else False
        return compute_losses(
            out, batch, cfg.mode, cfg.labels, self.k_attr, cfg.lambda_concept, cfg.lambda_kd, concept_on, concept_denom,
            self.model.lm_head.weight, cfg.loss_chunk,
        )

    def _ntp_losses(self, batch: dict[str, torch.Tensor], out) -> Any:
        """The next-token loss alone (the --held-out sets), through the same LM head path as training."""
        return compute_losses(out, batch, "ntp", head_weight=self.model.lm_head.weight, chunk=self.cfg.loss_chunk)

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
        """Mean NTP loss (and concept / KD loss, concept recall) over the first eval_windows val windows;
        the same NTP loss on each --held-out set (trainer/evaluate.py)."""
        self.model.eval()
        batches = eval_batches(self.val_ds, self.cfg.eval_windows, self.cfg.micro_batch, self.rank, self.world,
                               self.fields, self.dtypes)
        head = self.cfg.loss_chunk == 0  # else the LM head runs over chunks, as in training
        out = val_metrics(batches, self.model, lambda b, pred: self._losses(b, self.model, out=pred), self.cfg.mode,
                          self.cfg.labels, self.k_attr, self.prior, self.world, self.device, self.autocast, head)
        out |= held_out_losses(self.held_out, self.model, self._ntp_losses, self.cfg.micro_batch, self.rank,
                               self.world, self.device, self.autocast, head)
        self.model.train()
        return out

    def save(self) -> None:
        config = {
            "model": self.model_cfg.to_dict(),
            "train": self.cfg.to_dict(),
            "tokenizer": self.manifest.tokenizer,
            "manifest": str(self.manifest.path),
            "world_size": self.world,
            "total_steps": self.total_steps,
            "step": self.step,
        }
        config.update(self.record)  # the run record: what a resume or a rerun is compared with
        state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state(self.step)}
        try:
            self.last_ckpt = checkpoint.save(
                self.ckpt_dir, self.model, self.optimizer, config, state, self.rank, self.world,
                barrier=dist.barrier if self.world > 1 else None,
            )
        except checkpoint.CheckpointWriteError as e:
            raise ValueError(f"checkpoint of step {self.step} not saved: {e}; {self._continue_hint()}") from e

    # -- the loop ----------------------------------------------------------------------------------

    def _write_metrics(self, f, row: dict[str, Any]) -> None:
        try:
            f.write(json.dumps(row) + "\n")
            f.flush()
        except OSError as e:
            raise ValueError(f"could not write {str(self.out / rundir.METRICS)!r}: {e.strerror or e}; "
                             f"{self._continue_hint()}") from e

    def _resolved(self) -> dict[str, Any]:
        """The run record with what the run resolved (OUT/config.json; the W&B run's config)."""
        return {**self.record, "warmup_steps": self.warmup, "params": self.model.num_params(),
                "flops_per_token": self.flops_per_token}

    def _start_files(self) -> None:
        """Rank 0, before step 1: the run record, and metrics.jsonl cut back to the resumed step."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            rundir.write_json(self.out / rundir.RECORD, self._resolved())
            rundir.truncate_metrics(self.out / rundir.METRICS, self.step)
        except OSError as e:
            raise ValueError(f"could not write in --out-dir {str(self.out)!r}: {e}") from e

    def _interrupted(self, saved: bool) -> Interrupted:
        where = f"{self.step}/{self.total_steps}"
        if saved and self.last_ckpt is not None:
            what = f"saved checkpoint {str(self.last_ckpt)!r}"
        elif self.last_ckpt is not None:
            what = f"the last complete checkpoint is {str(self.last_ckpt)!r}"
        else:
            what = "no checkpoint was written"
        return Interrupted(
            f"interrupted at step {where}: {what}; rerun the same command (or add --resume auto) to continue"
        )

    def run(self) -> dict[str, Any]:
        if self.complete:
            return self._complete_summary()
        cfg, is_main = self.cfg, self.rank == 0
        if is_main:
            self._start_files()
        metrics_f = None
        tracker = tracking.Tracker()
        ok = False
        stop_request = StopOnSigint() if self.world == 1 else contextlib.nullcontext(None)
        source = StepBatches(
            self.train_ds, self.sampler, self.fields, self.dtypes, self.rank, self.world,
            vocab_size=self.model_cfg.vocab_size,
            n_concepts=self.model_cfg.concept.n_concepts if self.model_cfg.concept else None,
            permute_labels=cfg.permute_labels,  # the label-signal control; val keeps the real labels
        )
        stop = self.total_steps if not cfg.halt_after else min(self.total_steps, self.step + cfg.halt_after)
        loader = step_loader(source, self.step, stop, cfg.workers, pin_memory=self.device.type == "cuda")
        bar = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        last: dict[str, Any] = {}
        evals: list[dict[str, float]] = []
        self.model.train()
        try:
            with stop_request as sigint:
                if is_main:
                    try:
                        metrics_f = open(self.out / rundir.METRICS, "a")
                    except OSError as e:
                        raise ValueError(f"could not open {str(self.out / rundir.METRICS)!r}: {e.strerror or e}") from e
                # TensorBoard / W&B get the metrics.jsonl rows (rank 0 only; common/tracking.py)
                tracker = tracking.start(cfg, self.out, step=self.step, config=self._resolved(),
                                         run_name=self.out.resolve().name, rank=self.rank)
                if is_main and cfg.progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.mode}", unit="step")
                t_prev = time.perf_counter()
                batches = iter(loader)
                while True:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except Exception:
                        if sigint is not None and sigint.requested:  # a loader worker died of the Ctrl-C
                            raise self._interrupted(self._save_on_stop()) from None
                        raise
                    if LOAD_ERROR in batch:  # a worker's ValueError, reported as one line (data.StepBatches)
                        raise ValueError(batch[LOAD_ERROR])
                    last = self._train_step(batch, params)
                    tok_s = self.tokens_per_step / max((now := time.perf_counter()) - t_prev, 1e-9)
                    t_prev = now
                    last["tokens_per_s"] = tok_s
                    is_last = self.step == self.total_steps
                    if self.val_ds is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or is_last):
                        ev = self.evaluate()
                        last.update(ev)
                        evals.append({"step": self.step, **ev})
                    if is_main and (self.step % cfg.log_every == 0 or "val_loss" in last or is_last):
                        self._write_metrics(metrics_f, last)
                        tracker.log(last, self.step)
                    saved = False
                    if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or is_last:
                        self.save()
                        saved = True
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                    if sigint is not None and sigint.requested and not is_last:
                        raise self._interrupted(saved or self._save_on_stop())
            ok = True
        except Interrupted:
            raise
        except KeyboardInterrupt:  # before the handler was in place, or a second Ctrl-C: no new save
            raise self._interrupted(False) from None
        finally:
            if bar is not None:
                bar.close()
            if metrics_f is not None:
                with contextlib.suppress(OSError):
                    metrics_f.close()
            tracker.close(failed=not ok)
            for ds in (self.train_ds, self.val_ds):
                if ds is not None:
                    ds.close()
            for h in self.held_out:
                h.close()
        return {"step": self.step, "tokens": self.tokens, "total_steps": self.total_steps, "last": last, "evals": evals,
                "out_dir": str(self.out), "params": self.model.num_params()}

    def _save_on_stop(self) -> bool:
        """Ctrl-C between steps: save this step unless it is the saved one."""
        if self.last_ckpt is not None and self.last_ckpt.name == checkpoint.step_dir_name(self.step):
            return True
        self.save()
        return True

    def _train_step(self, batch: dict[str, torch.Tensor], params: list[torch.nn.Parameter]) -> dict[str, Any]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.total_steps, self.warmup)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        sums = [0.0, 0.0, 0.0]
        denom = self._concept_denom(batch)
        for a in range(cfg.grad_accum):
            mb = {
                k: v[a * cfg.micro_batch : (a + 1) * cfg.micro_batch].to(self.device, non_blocking=True)
                for k, v in batch.items()
            }
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
        loss, l_c, l_kd = allreduce_mean(sums, self.world, self.device)
        last = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr, "grad_norm": gnorm,
                "flops": self.flops_per_token * self.tokens}
        if cfg.mode == "cocomix":
            last["concept_loss"] = l_c
            last["ntp_loss"] = loss - (cfg.lambda_concept * l_c if self.model_cfg.concept.concept_loss else 0.0)
        elif cfg.mode == "kd":
            last["kd_loss"] = l_kd
            last["ntp_loss"] = loss - cfg.lambda_kd * l_kd
        else:
            last["ntp_loss"] = loss
        return last


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train from ``cfg`` (single process, or one rank under torchrun)."""
    return Trainer(cfg).run()

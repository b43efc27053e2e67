"""Stage 2: teacher + SAE -> per-token concept shards and a concept manifest, on Ray, resumable.

    python pipeline/extract.py --corpus owt_valid.txt --teacher smollm2-135m --sae SAE_DIR \\
        --out OUT --manifest OUT/owt.json

The driver: it plans (pipeline/extract_plan.py: config, inputs, jobs, resume), hands one token shard
at a time to Ray actors (pipeline/extract_worker.py, each a pipeline/extract_runner.py runner),
retries a shard whose worker died, and writes the manifest. The stage-2 API is
``from pipeline.extract import ExtractConfig, run``; pipeline/extract.py is the entry script.

Run once, resume always: one worker writes each concept shard (temporary name + rename), the
driver records it with its checksum (one small file per shard, pipeline/extract_progress.py) and
assembles the manifest from the finished shards at checkpoints (``stats.complete`` stays false until
the last one is in), and a rerun of the same command verifies the checksums of finished shards and
does only the rest. The finished manifest holds nothing that depends on the run (no times, no
throughput): killed at any instant and rerun, the same command writes the same bytes. Timings go to
``CONCEPT_DIR/runs.jsonl``, one JSON line per invocation. The bytes do not depend on the batch size
or the number of workers (fp32 on CPU): each shard is computed by one worker, each window's numbers
do not depend on its batch mates (pipeline/extract_runner.py), and the writer's block boundaries
are fixed window counts (shards/writer.py).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from pipeline.extract_outputs import RECORDS_DIR, command, prepare_concept_dir, stored_settings
from pipeline.extract_plan import ExtractConfig, Plan, check_space, finished_shards, make_jobs, plan
from pipeline.extract_progress import Bookkeeper, settings_digest
from pipeline.extract_runner import label_stats, record_fields
from pipeline.extract_worker import ExtractWorker, Progress, ShardJob, ShardResult
from shards import Manifest, ShardPart
from shards.records import remove_records
from shards.runlog import RUN_LOG, append_run, read_runs

log = logging.getLogger("pipeline.extract")
MAX_SHARD_RETRIES = 3  # resubmissions of a shard whose worker died (the actor itself is restarted by Ray)


def build_manifest(p: Plan, done: dict[str, ShardPart], jobs: list[ShardJob], stats: dict) -> Manifest:
    """The concept manifest over the finished shards, in token-shard order."""
    tm, cfg = p.token_manifest, p.cfg
    fields = {"tokens": tm.fields["tokens"], **record_fields(tm.seq_len, p.sae["n_latents"], cfg)}
    m = Manifest(
        kind="concepts", seq_len=tm.seq_len, tokenizer=tm.tokenizer, fields=fields,
        field_parts={k: "tokens" if k == "tokens" else "concepts" for k in fields},
        corpus=tm.corpus, teacher=p.teacher, hook={"layer": p.layer, "location": "resid_post"}, sae=p.sae,
        attribution={
            "variant": cfg.attribution, "k_attr": cfg.k_attr, "k_mix": cfg.k_mix, "k_kd": cfg.k_kd,
            "loss": "per-window sum of next-token NLL (scores do not depend on the batch size)",
            "labels": ("active latents with a positive score only; missing slots: id 0, score -inf"
                       if cfg.attribution != "preact_x_grad" else "signed top-k over all latents (paper Eq. 1)"),
            "ties": "lower latent id first",
            "last_position": ("windows hold T+1 tokens; input positions 0..T-1 all have a next-token target and a "
                              "gradient (position T-1's holds only its own loss); token T is a target only and has "
                              "no record"),
            "precision": p.settings["precision"],
        },
        settings=stored_settings(p.settings), stats=stats,
    )
    for job in jobs:
        if job.key in done:
            m.add_shard(job.split, job.windows, {"tokens": job.tokens, "concepts": done[job.key]})
    for name, s in tm.splits.items():
        m.splits.setdefault(name, type(s)()).extra.update(s.extra)
    return m



def run(cfg: ExtractConfig) -> Manifest:
    """Extract concepts for every token shard not done yet; returns the saved manifest."""
    import ray

    p = plan(cfg)
    jobs = make_jobs(p)
    done = finished_shards(p, jobs)
    todo = [j for j in jobs if j.key not in done]
    check_space(p, todo)
    prepare_concept_dir(cfg, p.settings)
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command(cfg), "manifest": str(cfg.manifest_path.absolute()),
        "shards": {"total": len(jobs), "verified": len(done), "to_do": len(todo)}, "per_shard": [],
    }
    records = cfg.concept_dir / RECORDS_DIR
    try:
        # Intermediate manifests (whole shards only, complete false, nothing run-dependent) are assembled
        # from the finished shards at checkpoints, each finished shard being recorded once in between
        # (pipeline/extract_progress.py): the finished manifest is the same bytes whatever the interruption point.
        def save() -> Manifest:
            return build_manifest(p, done, jobs, {"complete": False}).save(cfg.manifest_path)

        book = Bookkeeper(records, settings_digest(p.settings), len(jobs), save)
        if todo:
            save()
            log.info("%d of %d shard(s) to do (%d verified and skipped)", len(todo), len(jobs), len(done))
            n_workers = cfg.num_workers or (int(ray.cluster_resources().get("GPU", 0)) if p.use_gpu else 1)
            n_workers = max(1, min(n_workers, len(todo)))
            try:
                _execute(p, todo, done, n_workers, book, record)
            finally:
                if book.pending:  # the records hold them anyway; the manifest shows them to a reader too
                    try:
                        book.checkpoint()
                    except Exception as e:  # e.g. a full disk: the error that stopped the run is the one to report
                        log.warning("could not update the manifest after stopping: %s", e)
        m = build_manifest(p, done, jobs, {})
        labels = label_stats(m)  # from the shards: a resumed run reports exactly what an uninterrupted one does
        m.stats = {"complete": True, "labels": labels}
        m.save(cfg.manifest_path)
        remove_records(records)  # the complete manifest holds what they said
        record["outcome"] = "complete"
    except KeyboardInterrupt:
        record["outcome"] = "interrupted"
        raise
    except BaseException as e:
        record["outcome"] = f"error: {e}".splitlines()[0]
        raise
    finally:
        record["wall_s"] = round(time.perf_counter() - t0, 2)
        append_run(cfg.concept_dir, record)
    log.info("manifest %s complete: %d shards, %s tokens, %.1f%% of tokens with < %d positive labels",
             cfg.manifest_path, len(jobs), f"{labels['tokens']:,}", 100 * labels["frac_short"], cfg.k_attr)
    return m


def _our_error(e: Exception) -> Exception:
    """A worker's own ValueError (bad input, out of memory) as a plain ValueError for the CLI."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ValueError):
        return ValueError(str(cause))
    creation = getattr(e, "error_msg", "") or ""
    if "ValueError" in creation:  # an actor whose __init__ raised (Ray keeps only the message)
        return ValueError("a worker failed to start: " + creation.strip().splitlines()[-1])
    return e


def _execute(p: Plan, todo: list[ShardJob], done: dict[str, ShardPart], n_workers: int, book: Bookkeeper,
             record: dict) -> None:
    """Run ``todo`` on ``n_workers`` actors, recording each finished shard with ``book`` (which
    assembles the manifest at checkpoints); timings go to ``record`` (the run log's line), never to
    the manifest."""
    import ray
    from tqdm import tqdm

    from pipeline.raylib import cpus_per_actor

    cfg = p.cfg
    cpus = cpus_per_actor(n_workers + 1)  # leave a share for the driver (docs/operations.md: a 2-core hang)
    total_cpus = ray.cluster_resources().get("CPU", 1)
    threads = None if p.use_gpu else max(1, int(total_cpus) // n_workers)
    options: dict[str, Any] = {"max_restarts": 3, "max_task_retries": 0}
    options.update(num_gpus=1, num_cpus=1) if p.use_gpu else options.update(num_cpus=cpus)
    progress = ray.remote(num_cpus=0)(Progress).remote()
    Worker = ray.remote(ExtractWorker).options(**options)
    device = "cuda" if p.use_gpu else "cpu"
    actors = [Worker.remote(cfg.runner_config(device), threads, progress) for _ in range(n_workers)]
    try:
        ray.get([a.ready.remote() for a in actors])  # teacher + SAE loaded everywhere before the clock starts
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
        for a in actors:
            ray.kill(a)
        raise _our_error(e) from None
    log.info("%d %s worker(s) ready, batch size %d", n_workers, device.upper(), cfg.batch_size)

    queue = deque(todo)
    retries: dict[str, int] = {}
    pending: dict[Any, tuple[ShardJob, Any]] = {}
    idle = list(actors)
    total = sum(j.windows for j in todo) * p.token_manifest.seq_len
    t0 = time.perf_counter()
    tokens_done = 0
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="stage 2", dynamic_ncols=True, file=sys.stderr)
    try:
        while queue or pending:
            while queue and idle:
                job, actor = queue.popleft(), idle.pop(0)
                pending[actor.run_shard.remote(job)] = (job, actor)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                job, actor = pending.pop(ref)
                idle.append(actor)
                try:
                    res: ShardResult = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # our own code raised: not retried
                    raise _our_error(e) from None
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError) as e:
                    retries[job.key] = retries.get(job.key, 0) + 1
                    if retries[job.key] > MAX_SHARD_RETRIES:
                        raise ValueError(f"shard {job.key}: its worker process died {MAX_SHARD_RETRIES + 1} times "
                                         f"({type(e).__name__}; out of memory?); lower --batch-size or --num-workers "
                                         "and rerun the same command (finished shards are kept)") from e
                    log.warning("worker died on %s (%s); retrying (%d/%d)", job.key, type(e).__name__,
                                retries[job.key], MAX_SHARD_RETRIES)
                    progress.set.remote(job.key, 0)
                    queue.append(job)
                    continue
                done[job.key] = res.part
                record["per_shard"].append({"shard": job.key, "windows": job.windows, **res.stats.to_json(),
                                            "seconds": round(res.seconds, 2)})
                tokens_done += res.stats.tokens
                book.finished(job, res.part)
                s = res.stats
                bar.write(f"shard {job.key}: {job.windows} windows, {s.tokens:,} tokens in {res.seconds:.1f} s "
                          f"({s.tokens / max(res.seconds, 1e-9):,.0f} tok/s), {100 * s.short / max(1, s.tokens):.1f}% "
                          f"short, {res.part.checksum[:19]}")
            delta = ray.get(progress.total.remote()) - bar.n
            if delta > 0:
                bar.update(delta)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
        ray.kill(progress)
        elapsed = time.perf_counter() - t0
        record["throughput"] = {"tokens": tokens_done, "seconds": round(elapsed, 2),
                                "tokens_per_s": round(tokens_done / max(elapsed, 1e-9), 1),
                                "num_workers": n_workers, "device": device,
                                "batch_size": cfg.batch_size, "threads_per_worker": threads}


# -- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """One flag per ExtractConfig field, typed from its annotation, documented by its docstring."""
    p = Parser(prog="python pipeline/extract.py", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, ExtractConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python pipeline/extract.py``: 0, 2 with one ``error:`` line (common/cli.py), 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_cli(_main, argv, interrupted="interrupted: finished shards are recorded; run the same "
                                            "command again to resume")


def _main(argv: list[str] | None) -> int:
    cfg = dataclass_from_args(ExtractConfig, build_parser().parse_args(argv))
    print_summary(cfg, run(cfg))
    return 0


def print_summary(cfg: ExtractConfig, m: Manifest) -> None:
    """What a finished extraction prints: splits, label statistics, throughput, and the absolute paths of
    everything written (under a Ray job, a relative path would name the job's copy)."""
    lab = m.stats.get("labels", {})
    for name, s in m.splits.items():
        print(f"{name}: {s.windows} windows, {s.tokens:,} tokens, {len(s.shards)} shard(s)")
    print(f"labels: {lab.get('frac_short', 0):.2%} of tokens with < {cfg.k_attr} positive scores, "
          f"{lab.get('latents_used', 0)} latents used, teacher NLL {lab.get('teacher_mean_nll', 0):.3f}")
    runs = read_runs(cfg.concept_dir)
    if runs and (thr := runs[-1].get("throughput")):
        print(f"throughput: {thr['tokens_per_s']:,.0f} tokens/s on {thr['num_workers']} {thr['device']} worker(s)")
    print(f"manifest: {Path(m.path).absolute()}")
    print(f"concept shards: {cfg.concept_dir.absolute()}")
    print(f"run log: {(cfg.concept_dir / RUN_LOG).absolute()}")
    if cfg.corpus:
        print(f"token shards (stage 1): {(Path(cfg.out) / 'tokens').absolute()}")


__all__ = ["ExtractConfig", "build_parser", "main", "print_summary", "run"]

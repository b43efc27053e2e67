"""Stage 1: corpus -> token windows of ``seq_len + 1`` in Arrow / Zarr shards, plus a manifest.

    python -m pipeline.stage1 --corpus owt_train.txt --tokenizer smollm2-135m --seq-len 512 --out OUT

The corpus is cut into tasks that depend on the input only (common/partition.py: files, Parquet row
groups, ``--task-mb`` byte ranges of big text / JSONL files cut at document boundaries). Each task is
independent (pipeline/stage1_task.py): it reads its documents, tokenizes them (the tokenizer built
once per worker process), appends an EOS after every document, routes each document to train or val
by a hash of its id (or, with ``--val-corpus``, by the corpus it came from), packs its own train
stream into windows of ``seq_len + 1`` tokens with stride ``seq_len`` and writes its own shards
(pipeline/stage1_pack.py), and records what it wrote (shards/records.py). The driver only plans,
runs the tasks (Ray tasks, at most ``--num-workers`` at once, or one after the other with
``--in-process``), packs the val split from the tasks' val streams in task order, and assembles the
manifest from the records in task order. Nothing depends on which worker ran what or when, so the
shards and manifest are byte-identical whatever the number of workers.

The output directory belongs to stage 1: it refuses an ``--out`` that holds anything it did not
write and a different dataset of its own unless ``--overwrite``, which removes only what stage 1
wrote (pipeline/stage1_out.py). Killed at any instant and rerun, the same command resumes: finished
tasks whose files verify are kept, the rest is redone, and the bytes are those of an uninterrupted
run, manifests included: timings and throughput go to ``OUT/runs.jsonl`` (one JSON line per
invocation), not into the manifest. Memory is bounded by the piece size (common/corpus.py) and the
shard size, not by the size of a document.

Files: this one drives a run and is the command line; stage1_config.py holds the settings,
stage1_task.py one task, stage1_encode.py the tokenizer, stage1_pack.py the packing into shards,
stage1_out.py the rules of the output place (with pipeline/outputs.py, shared with stage 2).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from pathlib import Path

import numpy as np

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from common.corpus import CorpusStats
from common.partition import Task, plan, sources_of
from pipeline.outputs import remove_temporaries_of
from pipeline.stage1_config import TokenizeConfig, command_line, in_val, settings_record
from pipeline.stage1_encode import Encoder, encoder_payload
from pipeline.stage1_out import (
    SETTINGS_FILE,
    OutDir,
    check_manifest_settings,
    check_manifest_target,
    check_out,
    prepare_out,
    remove_tasks_dir,
    save_manifest,
    survey_out,
)
from pipeline.stage1_pack import Packer, shard_ext, write_token_shard
from pipeline.stage1_task import TASKS_DIR, TaskContext, add_digests, run_remote, run_task, task_key
from shards import FieldSpec, Manifest, ShardPart, Split, token_dtype
from shards.records import read_records
from shards.runlog import RUN_LOG, append_run

# The public API (recipes/, stage 2, the benchmarks and tests import it from here).
__all__ = ["TokenizeConfig", "run", "main", "build_parser", "config_from_args", "in_val", "command_line", "Encoder",
           "encoder_payload", "Packer", "OutDir", "survey_out", "check_out", "check_manifest_target",
           "SETTINGS_FILE", "plan_tasks"]

log = logging.getLogger("pipeline.stage1")
_VAL_CHUNK = 1 << 22  # tokens of a val stream read at once by the driver


def plan_tasks(cfg: TokenizeConfig) -> list[Task]:
    """The run's tasks: --corpus's, then --val-corpus's (common/partition.py)."""
    tasks = plan(cfg.corpus_config(), cfg.task_bytes)
    if cfg.val_corpus:
        tasks += plan(cfg.corpus_config(cfg.val_corpus), cfg.task_bytes, role="val", first_index=len(tasks))
    return tasks


def run(cfg: TokenizeConfig) -> Manifest:
    """Tokenize the corpus into shards; returns the saved manifest (reused if already complete)."""
    from common.corpus_sources import check_sources
    from common.teacher import (
        load_tokenizer,
        resolve_teacher,
        separator_token_id,
        tokenizer_fingerprint,
    )
    from pipeline.raylib import check_job_paths

    # Inside `ray job submit`, a relative path would land in Ray's temporary copy of --working-dir.
    check_job_paths({"--out": cfg.out, "--manifest": cfg.manifest, "--corpus": cfg.corpus,
                     "--val-corpus": cfg.val_corpus})
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # Everything that needs no tokenizer is checked first: paths, corpus files, the plan, --out, --manifest.
    check_sources(cfg.corpus_config())
    if cfg.val_corpus:
        check_sources(cfg.corpus_config(cfg.val_corpus))
    tasks = plan_tasks(cfg)
    out_dir = check_out(cfg)
    target = check_manifest_target(cfg.manifest)
    src = resolve_teacher(cfg.tokenizer)
    try:
        tokenizer = load_tokenizer(src)
    except ValueError as e:  # transformers' messages run over several lines: the first says it
        raise ValueError(str(e).strip().splitlines()[0]) from e
    eos = separator_token_id(tokenizer, cfg.eos_token)
    vocab_size = len(tokenizer)
    tok_info = {
        "name": src.name,
        "path": src.path if not src.is_local else None,
        "gguf_file": src.gguf_file,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": eos,
        "eos_token": tokenizer.convert_ids_to_tokens(eos),
    }
    spec = FieldSpec(token_dtype(vocab_size), (cfg.seq_len + 1,))
    windows_per_shard = max(1, int(cfg.shard_mb * 1e6) // spec.nbytes)
    settings = settings_record(cfg, tok_info, windows_per_shard)
    check_manifest_settings(target, cfg, settings)
    out = Path(cfg.out)
    t_start = time.perf_counter()
    done = prepare_out(out_dir, cfg, settings)
    if done is not None:
        log.info("%s already holds this dataset (checksums verified); nothing to do", out)
        if cfg.manifest:
            remove_temporaries_of(Path(cfg.manifest).absolute())
            save_manifest(done, Path(cfg.manifest), "--manifest")
            done.path = (out / "manifest.json").absolute()
        append_run(out, {"command": "pipeline.stage1", "outcome": "reused", "started": started,
                              "wall_s": round(time.perf_counter() - t_start, 2), "manifest": str(done.path),
                              "manifest_copy": str(Path(cfg.manifest).absolute()) if cfg.manifest else None})
        return done

    ctx = TaskContext(cfg=cfg, out=str(out.absolute()), spec=spec, windows_per_shard=windows_per_shard, eos=eos,
                      tokenizer_key=tok_info["fingerprint"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    records, reused, n_workers, mode = _execute(ctx, tasks, read_records(out / TASKS_DIR), tokenizer)
    manifest = _assemble(ctx, tasks, records, tok_info, settings)
    elapsed, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if manifest.corpus["documents"] == 0:
        raise ValueError(
            f"corpus {' '.join(cfg.corpus)} has no documents ({manifest.corpus['skipped_empty']} empty, "
            f"{manifest.corpus['skipped_bad_records']} bad records skipped)"
        )
    if manifest.splits["train"].windows == 0:
        raise ValueError(
            f"the corpus yields {manifest.splits['train'].extra['stream_tokens']} training tokens, fewer than one "
            f"window of {cfg.seq_len + 1} in any task: lower --seq-len (or raise --task-mb) or add text"
        )
    # The manifest holds only what decides the bytes; timings go to the run log (a rerun of the same
    # command must write the same manifest).
    if cfg.manifest:
        remove_temporaries_of(Path(cfg.manifest).absolute())
        save_manifest(manifest, Path(cfg.manifest), "--manifest")
    save_manifest(manifest, out / "manifest.json", "--out")
    (out / SETTINGS_FILE).unlink(missing_ok=True)
    remove_tasks_dir(out)
    tokens = sum(s.extra["stream_tokens"] for s in manifest.splits.values())
    append_run(out, {"command": "pipeline.stage1", "outcome": "wrote", "started": started,
                          "wall_s": round(elapsed, 2), "tokens": tokens,
                          "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                          "num_workers": n_workers, "ray": mode, "tasks": len(tasks), "tasks_reused": reused,
                          "driver_cpu_s": round(driver_cpu, 3),
                          "manifest": str(manifest.path),
                          "manifest_copy": str(Path(cfg.manifest).absolute()) if cfg.manifest else None})
    return manifest


def _execute(ctx: TaskContext, tasks: list[Task], previous: dict[str, dict],
             tokenizer) -> tuple[dict[int, dict], int, int, str]:
    """Run every task (those whose record verifies are not redone); returns (records by task index,
    tasks reused, workers, Ray mode)."""
    from tqdm import tqdm

    cfg = ctx.cfg
    records: dict[int, dict] = {}
    reused = tokens = 0
    bar = tqdm(total=sum(t.bytes for t in tasks), unit="B", unit_scale=True, desc="stage 1", dynamic_ncols=True,
               file=sys.stderr)
    t0 = time.perf_counter()

    def finished(t: Task, rec: dict, was_reused: bool) -> None:
        nonlocal reused, tokens
        records[t.index] = rec
        reused += was_reused
        tokens += rec["train"]["stream_tokens"] + rec["val"]["tokens"]
        bar.update(t.bytes)
        bar.set_postfix(tasks=f"{len(records)}/{len(tasks)}",
                        tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")

    try:
        if cfg.in_process:
            log.info("%d task(s), run in this process", len(tasks))
            for t in tasks:
                finished(t, *run_task(ctx, t, previous.get(task_key(t.index)), lambda: encoder_payload(tokenizer)))
            return records, reused, 1, "none"
        n_workers, mode = _execute_ray(ctx, tasks, previous, tokenizer, finished)
        return records, reused, n_workers, mode
    finally:
        bar.close()


def _execute_ray(ctx: TaskContext, tasks: list[Task], previous: dict[str, dict], tokenizer,
                 finished) -> tuple[int, str]:
    """Ray tasks, at most ``n_workers`` in flight: each finished one frees a slot for the next."""
    import ray

    from common.storage import client_env, is_url
    from pipeline.raylib import cpus_per_actor, init_ray

    mode = init_ray(ctx.cfg.ray_address)
    n_workers = ctx.cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    log.info("%d task(s) on %d Ray worker(s) (Ray: %s)", len(tasks), n_workers, mode)
    # Workers open the corpus themselves: a bucket's endpoint and credentials go with them, since a
    # worker's environment is its node's, not this process's (docs/operations.md, "Object storage").
    env = client_env() if any(is_url(r.location) for t in tasks for r in t.ranges) else {}
    remote = ray.remote(run_remote).options(num_cpus=cpus_per_actor(n_workers), max_retries=2,
                                            **({"runtime_env": {"env_vars": env}} if env else {}))
    ctx_ref, payload_ref = ray.put(ctx), ray.put(encoder_payload(tokenizer))
    queue = list(tasks)
    pending: dict = {}
    try:
        while queue or pending:
            while queue and len(pending) < n_workers:
                t = queue.pop(0)
                pending[remote.remote(ctx_ref, [payload_ref], t, previous.get(task_key(t.index)))] = t
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                t = pending.pop(ref)
                try:
                    rec, was_reused = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # our own code raised: one line for the CLI
                    cause = getattr(e, "cause", None)
                    raise (ValueError(str(cause)) if isinstance(cause, ValueError) else e) from None
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError) as e:  # after Ray's own retries (max_retries)
                    raise ValueError(f"task {t.index}: its worker died 3 times ({type(e).__name__}; out of memory?); "
                                     "lower --num-workers or --task-mb and rerun the same command (finished tasks "
                                     "are kept)") from None
                finished(t, rec, was_reused)
    finally:
        for ref in pending:  # an error or Ctrl-C: no task keeps writing into --out behind our back
            ray.cancel(ref, force=True)
    return n_workers, mode


def _assemble(ctx: TaskContext, tasks: list[Task], records: dict[int, dict], tok_info: dict,
              settings: dict) -> Manifest:
    """The manifest from the records in task order; the val split packed here from the val streams."""
    cfg, out = ctx.cfg, Path(ctx.out)
    manifest = Manifest(kind="tokens", seq_len=cfg.seq_len, tokenizer=tok_info, fields={"tokens": ctx.spec},
                        field_parts={"tokens": "tokens"}, settings=settings)
    manifest.splits = {"train": Split(), "val": Split()}
    train = {"documents": 0, "stream_tokens": 0, "tail_tokens": 0, "packed_streams": 0}
    ordered = [records[t.index] for t in tasks]
    for rec in ordered:
        for sh in rec["shards"]:
            part = ShardPart(out / sh["name"], cfg.format, sh["checksum"], sh["bytes"])
            manifest.add_shard("train", sh["windows"], {"tokens": part})
        for k in ("documents", "stream_tokens", "tail_tokens"):
            train[k] += rec["train"][k]
        train["packed_streams"] += rec["train"]["windows"] > 0
    manifest.splits["train"].extra.update(train)

    ext = shard_ext(cfg)

    def write_val(windows: np.ndarray) -> None:
        k = len(manifest.splits["val"].shards)
        part = write_token_shard(out / f"val-{k:05d}.{ext}", ctx.spec, windows, cfg)
        manifest.add_shard("val", len(windows), {"tokens": part})

    val = Packer(cfg.seq_len, ctx.spec.storage_dtype, ctx.windows_per_shard, write_val)
    for rec in ordered:
        if rec["val"]["file"] is None:
            continue
        path = out / TASKS_DIR / rec["val"]["file"]
        for start in range(0, rec["val"]["tokens"], _VAL_CHUNK):
            n = min(_VAL_CHUNK, rec["val"]["tokens"] - start)
            val.add(np.fromfile(path, dtype=ctx.spec.storage_dtype, count=n,
                                offset=start * ctx.spec.storage_dtype.itemsize))
    val.finish()
    manifest.splits["val"].extra.update(documents=sum(r["val"]["documents"] for r in ordered),
                                        stream_tokens=val.stream_tokens, tail_tokens=val.tail_tokens,
                                        packed_streams=int(val.windows > 0))
    counts = {k: sum(r["corpus"][k] for r in ordered) for k in CorpusStats().to_json() if k != "files"}
    corpus_tasks = [t for t in tasks if t.role == "corpus"]
    manifest.corpus = {"sources": list(cfg.corpus), **({"val_sources": list(cfg.val_corpus)} if cfg.val_corpus else {}),
                       "fingerprint": "sha256:" + add_digests([r["digest"] for r in ordered])[:16], **counts,
                       "files": sources_of(corpus_tasks) + sources_of([t for t in tasks if t.role == "val"]),
                       "tasks": len(tasks), "task_bytes": cfg.task_bytes}
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m pipeline.stage1", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, TokenizeConfig)
    return p


def config_from_args(argv: list[str] | None = None) -> TokenizeConfig:
    return dataclass_from_args(TokenizeConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.stage1``: 0, 2 with one ``error:`` line (common/cli.py), 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_cli(_main, argv, interrupted="interrupted: nothing was kept that a rerun would trust; run the "
                                            "same command again")


def _main(argv: list[str] | None) -> int:
    cfg = config_from_args(argv)
    m = run(cfg)
    for name, s in m.splits.items():
        print(f"{name}: {s.windows} windows, {s.tokens:,} predicted tokens, {len(s.shards)} shard(s), "
              f"{s.extra.get('documents', 0)} documents, tail dropped {s.extra.get('tail_tokens', 0)} tokens")
    out = Path(cfg.out).absolute()
    # Absolute paths: under a Ray job or a script, the working directory is not the user's.
    print(f"shards: {out}")
    print(f"manifest: {out / 'manifest.json'}")
    if cfg.manifest:
        print(f"manifest copy: {Path(cfg.manifest).absolute()}")
    print(f"run log: {out / RUN_LOG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

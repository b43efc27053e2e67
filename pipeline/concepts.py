"""Stage 2: teacher + SAE -> per-token concept shards and a concept manifest, on Ray, resumable.

    python -m pipeline.extract --corpus owt_valid.txt --teacher smollm2-135m --sae SAE_DIR \\
        --out OUT --manifest OUT/owt.json

Layout: stage-1 token shards in ``--tokens DIR`` (or ``OUT/tokens`` when ``--corpus`` runs stage 1),
concept shards of this extraction in ``OUT/concepts/NAME/`` (NAME = the manifest's file stem), the
manifest where ``--manifest`` says (default ``OUT/NAME.json``). The manifest references both the token
shards and the concept shards by relative path, so another SAE, layer or attribution variant writes a
new NAME next to this one and reuses the same token shards; both manifests stay valid.

Run once, resume always: one worker writes each concept shard (temporary name + rename), the
manifest is rewritten after every shard with that shard's checksum (``stats.complete`` stays false
until the last one), and a rerun of the same command verifies the checksums of finished shards and
does only the rest. The bytes do not depend on the batch size or the number of workers (fp32 on
CPU): each shard is computed by one worker, each window's numbers do not depend on its batch mates
(runner.py), and the writer's block boundaries are fixed window counts (shards/writer.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.extract_worker import ExtractWorker, Progress, ShardJob, ShardResult
from pipeline.runner import RunnerConfig, check_compatible, record_fields, resolve_precision
from shards import Manifest, ShardPart, checksum, load_manifest, open_shard
from shards.cli import add_dataclass_args, dataclass_from_args

log = logging.getLogger("pipeline.extract")
EXTRACTION_FILE = "extraction.json"  # the settings of the extraction a concept directory holds
MAX_SHARD_RETRIES = 3  # resubmissions of a shard whose worker died (the actor itself is restarted by Ray)


@dataclass
class ExtractConfig:
    teacher: str
    """Teacher: HF hub id, local model directory, .gguf file, or smollm2-135m."""
    sae: str
    """SAE directory or file (OpenAI .pt, SAELens, sparsify, or ours from sae.train)."""
    out: str
    """Output root: concept shards go to OUT/concepts/NAME/, stage-1 output (with --corpus) to OUT/tokens/."""
    tokens: str | None = None
    """Stage-1 output directory (or its manifest.json); exclusive with --corpus."""
    corpus: list[str] | None = None
    """Corpus files for stage 1 (run first, reusing OUT/tokens when it already holds them)."""
    val_corpus: list[str] | None = None
    """With --corpus: a held-out corpus that forms the val split (stage 1's --val-corpus)."""
    manifest: str | None = None
    """Concept manifest to write (default OUT/NAME.json; NAME defaults to 'concepts')."""
    sae_format: Literal["openai", "saelens", "sparsify", "cocomix"] | None = None
    """SAE format (default: detected)."""
    layer: int | None = None
    """Teacher block whose output the SAE reads, 0-based (default: the SAE's metadata)."""
    attribution: Literal["act_x_grad", "preact_x_grad", "activation"] = "act_x_grad"
    """act_x_grad (reference code), preact_x_grad (paper Eq. 1, dense), activation (ablation)."""
    k_attr: int = 4
    """Concept labels per token (paper: 4)."""
    k_mix: int = 32
    """SAE top-k code stored as mixing targets (0 = not stored)."""
    k_kd: int = 0
    """Teacher top-k next-token log-probs stored for the KD baseline (0 = not stored)."""
    format: Literal["arrow", "zarr"] = "arrow"
    """Concept shard format."""
    batch_size: int = 8
    """Windows per teacher forward/backward (lower it when out of memory)."""
    num_workers: int = 0
    """Ray actors (0: one per GPU of the cluster, else 1 CPU actor)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: GPUs when the cluster has them (num_gpus=1 per actor), else CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "bf16-above-hook"] = "auto"
    """auto = float32 (exact); bfloat16 / bf16-above-hook are faster on GPU but change 20% / 10% of label sets (runner.py)."""
    score_dtype: Literal["float16", "bfloat16"] = "float16"
    """Storage dtype of concept_scores."""
    seq_len: int = 512
    """Window length for stage 1 (with --corpus)."""
    zarr_chunk_windows: int = 16
    """Windows per Zarr chunk (--format zarr)."""
    zarr_compression: Literal["none", "zstd"] = "none"
    """Zarr compression (--format zarr)."""
    overwrite: bool = False
    """Replace a concept directory that holds a different extraction."""
    ray_address: str | None = None
    """Ray address (default: RAY_ADDRESS, a running cluster, else embedded; 'local' forces embedded)."""

    def __post_init__(self) -> None:
        if (self.tokens is None) == (not self.corpus):
            raise ValueError("pass exactly one of --tokens DIR (stage-1 output) and --corpus PATH")
        if self.val_corpus and not self.corpus:
            raise ValueError("--val-corpus goes with --corpus (with --tokens, the splits are already made)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.format not in ("arrow", "zarr"):
            raise ValueError(f"--format must be arrow or zarr, got {self.format!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.zarr_compression not in ("none", "zstd"):
            raise ValueError(f"--zarr-compression must be none or zstd, got {self.zarr_compression!r}")
        if self.seq_len < 1:
            raise ValueError(f"--seq-len must be positive, got {self.seq_len}")
        self.runner_config(device="cpu")  # validates the attribution settings

    def runner_config(self, device: str) -> RunnerConfig:
        return RunnerConfig(
            teacher=self.teacher, sae=self.sae, sae_format=self.sae_format, layer=self.layer,
            attribution=self.attribution, k_attr=self.k_attr, k_mix=self.k_mix, k_kd=self.k_kd,
            device=device, dtype=self.dtype, score_dtype=self.score_dtype,
        )

    @property
    def manifest_path(self) -> Path:
        return Path(self.manifest) if self.manifest else Path(self.out) / "concepts.json"

    @property
    def concept_dir(self) -> Path:
        return Path(self.out) / "concepts" / self.manifest_path.stem


# -- identity of the inputs ----------------------------------------------------------------------


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return "sha256:" + h.hexdigest()[:32]


def teacher_identity(name: str) -> dict[str, Any]:
    """Name, fingerprint, depth and width of a teacher, from its config and weight files only."""
    from transformers import AutoConfig

    from pipeline.teacher import resolve_teacher

    src = resolve_teacher(name)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read the config of teacher {name!r}: {e}") from e
    if src.gguf_file:
        fingerprint = _hash_files([Path(src.path) / src.gguf_file])
    elif src.is_local:
        weights = sorted(p for p in Path(src.path).iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        fingerprint = _hash_files(weights) if weights else "unknown"
    else:  # a hub id: its revision pins the weights
        fingerprint = f"hub:{name}@{getattr(config, '_commit_hash', None) or 'unknown'}"
    n_layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if not isinstance(n_layers, int) or not isinstance(width, int):
        raise ValueError(f"teacher {name!r}: its config has no num_hidden_layers / hidden_size")
    return {"name": name, "fingerprint": fingerprint, "architecture": type(config).__name__,
            "n_layers": n_layers, "width": width, "vocab_size": int(config.vocab_size)}


def token_identity(m: Manifest) -> str:
    """Fingerprint of a stage-1 dataset: its settings and every token shard's checksum."""
    h = hashlib.sha256(json.dumps(m.settings, sort_keys=True).encode())
    for name, split in sorted(m.splits.items()):
        for sh in split.shards:
            h.update(name.encode() + sh.parts["tokens"].checksum.encode())
    return "sha256:" + h.hexdigest()[:32]


# -- preparing a run -----------------------------------------------------------------------------


@dataclass
class Plan:
    cfg: ExtractConfig
    token_manifest: Manifest
    teacher: dict
    sae: dict
    layer: int
    settings: dict
    use_gpu: bool


def check_inputs(cfg: ExtractConfig) -> tuple[dict, Any, int]:
    """Teacher config, SAE and their compatibility: every cheap check, before any heavy work."""
    from sae import load_sae

    teacher = teacher_identity(cfg.teacher)
    sae = load_sae(cfg.sae, format=cfg.sae_format)
    layer = check_compatible(sae, cfg.runner_config("cpu"), teacher["n_layers"], teacher["width"])
    return teacher, sae, layer


def check_tokens(m: Manifest, teacher: dict) -> None:
    """The token shards must come from this teacher's tokenizer."""
    from pipeline.teacher import load_tokenizer, tokenizer_fingerprint

    if "tokens" not in m.fields:
        raise ValueError(f"{m.path}: no tokens field; pass a stage-1 output directory to --tokens")
    fp = tokenizer_fingerprint(load_tokenizer(teacher["name"]))
    if m.tokenizer.get("fingerprint") != fp:
        raise ValueError(
            f"tokenizer mismatch: the token shards in {m.path} were made with {m.tokenizer.get('name')!r} "
            f"({m.tokenizer.get('fingerprint')}), teacher {teacher['name']!r} tokenizes as {fp}; "
            "re-run stage 1 with --tokenizer set to the teacher"
        )
    if m.tokenizer["vocab_size"] > teacher["vocab_size"]:
        raise ValueError(f"token vocabulary {m.tokenizer['vocab_size']} exceeds the teacher's {teacher['vocab_size']}")


def check_output(cfg: ExtractConfig, settings: dict, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a concept directory or manifest that holds a different extraction (unless --overwrite)."""

    def differs(other: dict) -> list[str]:
        keys = (set(other) | set(settings)) - set(ignore)
        return sorted(k for k in keys if other.get(k) != settings.get(k))

    marker = cfg.concept_dir / EXTRACTION_FILE
    if marker.is_file():
        bad = differs(json.loads(marker.read_text()))
        if bad and not cfg.overwrite:
            raise ValueError(
                f"{cfg.concept_dir} holds a different extraction (differs in: {', '.join(bad)}); pass another "
                "--manifest (its name picks the concept directory) or --overwrite"
            )
    elif cfg.concept_dir.is_dir() and any(cfg.concept_dir.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{cfg.concept_dir} is not empty and holds no {EXTRACTION_FILE}; pass --overwrite or another --manifest")
    if cfg.manifest_path.is_file() and not cfg.overwrite:
        try:
            old = load_manifest(cfg.manifest_path)
        except ValueError:
            return  # a damaged manifest is rewritten; its shards are redone
        bad = differs(old.settings)
        if old.kind != "concepts" or bad:
            raise ValueError(
                f"manifest {cfg.manifest_path} describes a different dataset"
                + (f" (differs in: {', '.join(bad)})" if bad else f" (kind {old.kind})")
                + "; pass another --manifest or --overwrite"
            )


def plan(cfg: ExtractConfig) -> Plan:
    """Validate everything, run stage 1 if asked, and fix the settings that decide every byte."""
    teacher, sae, layer = check_inputs(cfg)
    token_manifest = load_manifest(cfg.tokens) if cfg.tokens else None  # a bad path fails before Ray starts
    if token_manifest is not None:
        check_tokens(token_manifest, teacher)
    from pipeline.raylib import init_ray

    mode = init_ray(cfg.ray_address)
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and not gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPUs; use --device cpu or auto")
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    precision = resolve_precision(cfg.dtype, torch.device("cuda" if use_gpu else "cpu"))
    sae_info = {"source": cfg.sae, "format": sae.metadata.get("format", cfg.sae_format), "fingerprint": sae.fingerprint(),
                "d_in": sae.d_in, "n_latents": sae.n_latents, "k": sae.k, "activation": sae.activation,
                "normalize": sae.normalize}
    settings = {
        "teacher": teacher["fingerprint"], "layer": layer, "sae": sae_info["fingerprint"],
        "attribution": cfg.attribution, "k_attr": cfg.k_attr, "k_mix": cfg.k_mix, "k_kd": cfg.k_kd,
        "score_dtype": cfg.score_dtype, "precision": precision, "format": cfg.format,
        "zarr": [cfg.zarr_chunk_windows, cfg.zarr_compression] if cfg.format == "zarr" else None,
    }
    check_output(cfg, settings, ignore=("tokens",))  # before stage 1, which can be long
    if cfg.corpus:
        from pipeline.tokenize import TokenizeConfig
        from pipeline.tokenize import run as tokenize

        token_manifest = tokenize(TokenizeConfig(corpus=list(cfg.corpus), val_corpus=cfg.val_corpus, tokenizer=cfg.teacher,
                                                 out=str(Path(cfg.out) / "tokens"), seq_len=cfg.seq_len,
                                                 ray_address=cfg.ray_address))
        check_tokens(token_manifest, teacher)
    settings["tokens"] = token_identity(token_manifest)
    check_output(cfg, settings)
    log.info("Ray %s: %d GPU(s); teacher %s, SAE %s (%d latents, k=%s) at layer %d", mode, gpus,
             teacher["name"], cfg.sae, sae.n_latents, sae.k, layer)
    return Plan(cfg, token_manifest, teacher, sae_info, layer, settings, use_gpu)


# -- the manifest ---------------------------------------------------------------------------------


def build_manifest(p: Plan, done: dict[str, tuple[ShardPart, dict]], jobs: list[ShardJob], stats: dict) -> Manifest:
    """The concept manifest over the finished shards, in token-shard order."""
    tm, cfg = p.token_manifest, p.cfg
    fields = {"tokens": tm.fields["tokens"], **record_fields(tm.seq_len, p.sae["n_latents"], cfg.runner_config("cpu"))}
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
                              "gradient (position T-1's holds only its own loss); token T is a target only and has no record"),
            "precision": p.settings["precision"],
        },
        settings=p.settings, stats=stats,
    )
    for job in jobs:
        if job.key in done:
            m.add_shard(job.split, job.windows, {"tokens": job.tokens, "concepts": done[job.key][0]})
    for name, s in tm.splits.items():
        m.splits.setdefault(name, type(s)()).extra.update(s.extra)
    return m


def as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored float16 / bfloat16 (raw uint16 bits) values as float32."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def label_stats(m: Manifest) -> dict:
    """Label statistics of a concept dataset, computed from its shards (so a resumed run reports the
    same numbers as an uninterrupted one)."""
    counts = np.zeros(m.sae["n_latents"], dtype=np.int64)
    tokens = short = valid = 0
    nll = 0.0
    spec = {k: m.fields[k] for k in ("concept_ids", "concept_scores", "teacher_nll")}
    for split in m.splits.values():
        for sh in split.shards:
            part = sh.parts["concepts"]
            r = open_shard(part.path, part.format, spec)
            a = r.arrays()
            scores = as_float32(a["concept_scores"], spec["concept_scores"].dtype)  # (n, T, K)
            ok = scores != -np.inf
            counts += np.bincount(a["concept_ids"][ok].astype(np.int64), minlength=len(counts))
            tokens += scores.shape[0] * scores.shape[1]
            short += int((~(scores > 0)).any(-1).sum())
            valid += int(ok.sum())
            nll += float(a["teacher_nll"].astype(np.float64).sum())
            r.close()
    p = counts[counts > 0] / max(1, counts.sum())
    return {
        "tokens": tokens,
        "tokens_short": short,
        "frac_short": round(short / max(1, tokens), 6),
        "mean_valid_labels": round(valid / max(1, tokens), 4),
        "teacher_mean_nll": round(nll / max(1, tokens), 4),
        "latents_used": int((counts > 0).sum()),
        "label_entropy_bits": round(float(-(p * np.log2(p)).sum()), 4),
    }


# -- running -------------------------------------------------------------------------------------


def make_jobs(p: Plan) -> list[ShardJob]:
    cfg, tm = p.cfg, p.token_manifest
    ext = "arrow" if cfg.format == "arrow" else "zarr"
    base = cfg.manifest_path.absolute().parent
    jobs = []
    for split, s in tm.splits.items():
        for i, sh in enumerate(s.shards):
            out = cfg.concept_dir.absolute() / f"{split}-{i:05d}.{ext}"
            jobs.append(ShardJob(
                key=Path(os.path.relpath(out, base)).as_posix(), split=split, tokens=sh.parts["tokens"],
                token_spec=tm.fields["tokens"], windows=sh.windows, out=str(out), format=cfg.format,
                seq_len=tm.seq_len, batch_size=cfg.batch_size, zarr_chunk_windows=cfg.zarr_chunk_windows,
                zarr_compression=None if cfg.zarr_compression == "none" else cfg.zarr_compression,
            ))
    return jobs


def finished_shards(p: Plan, jobs: list[ShardJob]) -> tuple[dict[str, tuple[ShardPart, dict]], dict]:
    """Shards of a previous run whose manifest entry, token shard and checksum all still hold, and
    that run's stats."""
    path = p.cfg.manifest_path
    if p.cfg.overwrite or not path.is_file():
        return {}, {}
    try:
        old = load_manifest(path)
    except ValueError as e:
        log.warning("ignoring unreadable manifest %s (%s): redoing every shard", path, e)
        return {}, {}
    if old.settings != p.settings:
        return {}, {}
    by_path = {str(sh.parts["concepts"].path): sh for s in old.splits.values() for sh in s.shards}
    per_shard = old.stats.get("shards", {})
    done = {}
    for job in jobs:
        sh = by_path.get(str(Path(job.out).resolve()))
        if sh is None or sh.parts["tokens"].checksum != job.tokens.checksum or sh.windows != job.windows:
            continue
        part = sh.parts["concepts"]
        if part.path.exists() and checksum(part.path) == part.checksum:
            done[job.key] = (part, per_shard.get(job.key, {}))
        else:
            log.warning("%s is missing or damaged: redoing it", part.path)
    return done, old.stats


def _clean_temporaries(d: Path) -> None:
    import shutil

    for t in d.glob(".*.tmp-*"):  # left by a killed worker (shards.PartWriter / shards.atomic)
        shutil.rmtree(t, ignore_errors=True) if t.is_dir() else t.unlink(missing_ok=True)


def run(cfg: ExtractConfig) -> Manifest:
    """Extract concepts for every token shard not done yet; returns the saved manifest."""
    import ray

    p = plan(cfg)
    if cfg.overwrite and cfg.concept_dir.exists():
        import shutil

        shutil.rmtree(cfg.concept_dir)
    cfg.concept_dir.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(cfg.concept_dir)
    (cfg.concept_dir / EXTRACTION_FILE).write_text(json.dumps(p.settings, indent=2) + "\n")

    jobs = make_jobs(p)
    done, old_stats = finished_shards(p, jobs)
    todo = [j for j in jobs if j.key not in done]
    t0 = time.perf_counter()
    run_stats: dict[str, Any] = {"complete": False, "shards": {k: v for k, (_, v) in done.items()}}
    if not todo and "throughput" in old_stats:
        run_stats["throughput"] = old_stats["throughput"]  # nothing new ran: keep the run that did the work

    def save() -> Manifest:
        return build_manifest(p, done, jobs, run_stats).save(cfg.manifest_path)

    save()
    if todo:
        log.info("%d of %d shard(s) to do (%d verified and skipped)", len(todo), len(jobs), len(done))
        n_workers = cfg.num_workers or (int(ray.cluster_resources().get("GPU", 0)) if p.use_gpu else 1)
        n_workers = max(1, min(n_workers, len(todo)))
        run_stats.update(_execute(p, todo, done, n_workers, save))
    wall = time.perf_counter() - t0
    m = build_manifest(p, done, jobs, run_stats)
    labels = label_stats(m)
    run_stats.update(complete=True, labels=labels, wall_s=round(wall, 2))
    m.stats = run_stats
    m.save(cfg.manifest_path)
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


def _execute(p: Plan, todo: list[ShardJob], done: dict, n_workers: int, save) -> dict:
    """Run ``todo`` on ``n_workers`` actors, saving the manifest after every shard."""
    import ray
    from tqdm import tqdm

    from pipeline.raylib import cpus_per_actor

    cfg = p.cfg
    cpus = cpus_per_actor(n_workers + 1)  # leave a share for the driver (NOTES.md: a 2-core hang)
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

    queue = list(todo)
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
                job, actor = queue.pop(0), idle.pop(0)
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
                        raise RuntimeError(f"shard {job.key} failed {MAX_SHARD_RETRIES + 1} times: {e}") from e
                    log.warning("worker died on %s (%s); retrying (%d/%d)", job.key, type(e).__name__,
                                retries[job.key], MAX_SHARD_RETRIES)
                    progress.set.remote(job.key, 0)
                    queue.append(job)
                    continue
                done[job.key] = (res.part, {**res.stats.to_json(), "seconds": round(res.seconds, 2)})
                tokens_done += res.stats.tokens
                save()
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
    return {"throughput": {"tokens": tokens_done, "seconds": round(elapsed, 2),
                           "tokens_per_s": round(tokens_done / max(elapsed, 1e-9), 1),
                           "num_workers": n_workers, "device": "cuda" if p.use_gpu else "cpu",
                           "batch_size": cfg.batch_size, "threads_per_worker": threads}}


# -- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """One flag per ExtractConfig field, typed from its annotation, documented by its docstring."""
    p = argparse.ArgumentParser(prog="extract.py", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, ExtractConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = dataclass_from_args(ExtractConfig, build_parser().parse_args(argv))
        m = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are in the manifest; run the same command again to resume",
              file=sys.stderr)
        return 130
    lab = m.stats.get("labels", {})
    print(f"manifest: {m.path}")
    for name, s in m.splits.items():
        print(f"{name}: {s.windows} windows, {s.tokens:,} tokens, {len(s.shards)} shard(s)")
    print(f"labels: {lab.get('frac_short', 0):.2%} of tokens with < {cfg.k_attr} positive scores, "
          f"{lab.get('latents_used', 0)} latents used, teacher NLL {lab.get('teacher_mean_nll', 0):.3f}")
    thr = m.stats.get("throughput")
    if thr:
        print(f"throughput: {thr['tokens_per_s']:,.0f} tokens/s on {thr['num_workers']} {thr['device']} worker(s)")
    return 0


__all__ = ["ExtractConfig", "build_parser", "main", "run"]

"""Stage 2, before any teacher runs: the config, the identity of every input, the input checks, the
jobs (one per token shard) and which of them a previous run already finished.

Layout: stage-1 token shards in ``--tokens DIR`` (or ``OUT/tokens`` when ``--corpus`` runs stage 1),
concept shards of this extraction in ``OUT/concepts/NAME/`` (NAME = the manifest's file stem), the
manifest where ``--manifest`` says (default ``OUT/concepts.json``). The manifest references both the
token shards and the concept shards by relative path, so another SAE, layer or attribution variant
writes a new NAME next to this one and reuses the same token shards; both manifests stay valid
(docs/data.md). The settings that decide every byte (``Plan.settings``) identify an extraction: a
rerun with the same settings resumes, different ones are refused (pipeline/extract_outputs.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.extract_outputs import RECORDS_DIR, check_output, check_paths, extraction_settings, size_text
from pipeline.extract_progress import part_from_record, record_key, settings_digest
from pipeline.extract_runner import RunnerConfig, check_compatible, record_fields, resolve_precision
from pipeline.extract_worker import ShardJob
from pipeline.stage1_config import TokenizeConfig
from shards import Manifest, ShardPart, load_manifest
from shards.checksum import checksums, disk_bytes
from shards.manifest import inspect_path
from shards.options import StoreOptions
from shards.records import read_records

log = logging.getLogger("pipeline.extract")


@dataclass(kw_only=True)
class ExtractConfig(RunnerConfig, StoreOptions):
    """Stage 2: what the runner computes (RunnerConfig's fields: teacher, SAE, layer, attribution,
    k_attr / k_mix / k_kd, precision, score dtype, each owned and validated there) plus where it
    reads and writes and how it runs on Ray. One flat set of flags (``--help``)."""

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
    # Narrows RunnerConfig.device: here the driver places the workers (one GPU per actor, or CPU),
    # so a worker's runner gets "cuda" or "cpu" (runner_config); "cuda:N" has no meaning on a cluster.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: GPUs when the cluster has them (num_gpus=1 per actor), else CPU."""
    batch_size: int = 8
    """Windows per teacher forward/backward (lower it when out of memory)."""
    num_workers: int = 0
    """Ray actors (0: one per GPU of the cluster, else 1 CPU actor)."""
    seq_len: int = 512
    """Window length for stage 1 (with --corpus)."""
    overwrite: bool = False
    """Replace a different extraction of the same name: only what stage 2 wrote (concept shards,
    extraction.json, runs.jsonl, a concept manifest), never other files."""
    ray_address: str | None = None
    """Ray address (default: RAY_ADDRESS, a running cluster, else embedded; 'local' forces embedded)."""

    def __post_init__(self) -> None:
        # Each base checks the settings it owns: the runner's (RunnerConfig), the shard format's (StoreOptions).
        RunnerConfig.__post_init__(self)
        StoreOptions.__post_init__(self)
        if (self.tokens is None) == (not self.corpus):
            raise ValueError("pass exactly one of --tokens DIR (stage-1 output) and --corpus PATH")
        if self.val_corpus and not self.corpus:
            raise ValueError("--val-corpus goes with --corpus (with --tokens, the splits are already made)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.corpus:
            self.stage1_config()  # --corpus / --val-corpus / --seq-len are stage 1's, checked where they are owned

    def stage1_config(self) -> TokenizeConfig:
        """Stage 1's config for the ``--corpus`` shortcut (its output goes to OUT/tokens)."""
        return TokenizeConfig(corpus=list(self.corpus or []), val_corpus=self.val_corpus, tokenizer=self.teacher,
                              out=str(Path(self.out) / "tokens"), seq_len=self.seq_len, ray_address=self.ray_address)

    def runner_config(self, device: str) -> RunnerConfig:
        """The runner settings alone, for a worker on ``device`` (what is shipped to each Ray actor)."""
        return RunnerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunnerConfig)
                               if f.name != "device"}, device=device)

    @property
    def manifest_path(self) -> Path:
        return Path(self.manifest) if self.manifest else Path(self.out) / "concepts.json"

    @property
    def concept_dir(self) -> Path:
        return Path(self.out) / "concepts" / self.manifest_path.stem


# -- identity of the inputs ----------------------------------------------------------------------


def _hash_files(paths: list[Path]) -> str:
    # Not shards.checksum: this digest names the files and is cut to 32 hex digits, and every existing
    # extraction's settings hold it (a different digest would refuse their reruns).
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

    from common.teacher import resolve_teacher

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


# -- checking the inputs -------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything a run decided before the first worker starts."""

    cfg: ExtractConfig
    token_manifest: Manifest
    teacher: dict
    """teacher_identity(): the manifest's ``teacher`` entry."""
    sae: dict
    """SparseAutoencoder.describe(): the manifest's ``sae`` entry."""
    layer: int
    """The 0-based hook layer (check_compatible)."""
    settings: dict
    """What decides every byte (extraction.json); a rerun with the same settings resumes."""
    use_gpu: bool


def check_inputs(cfg: ExtractConfig) -> tuple[dict, Any, int]:
    """Teacher config, SAE and their compatibility: every cheap check, before any heavy work."""
    from sae import load_sae

    teacher = teacher_identity(cfg.teacher)
    sae = load_sae(cfg.sae, format=cfg.sae_format)
    layer = check_compatible(sae, cfg, teacher["n_layers"], teacher["width"])
    return teacher, sae, layer


def check_tokens(m: Manifest, teacher: dict) -> None:
    """The token shards must be a stage-1 dataset made with this teacher's tokenizer."""
    from common.teacher import load_tokenizer, tokenizer_fingerprint

    if m.kind != "tokens":
        src = next((sh.parts["tokens"].path.parent for s in m.splits.values() for sh in s.shards
                    if "tokens" in sh.parts), None)
        hint = f" (its token shards are in {src})" if src else ""
        raise ValueError(f"--tokens {m.path} is a {m.kind} manifest, not stage-1 output; pass the stage-1 output "
                         f"directory{hint}")
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


def verify_token_shards(m: Manifest) -> float:
    """Every token shard exists, has the manifest's size and checksum: checked before the teacher
    loads, so a damaged input stops the run with one line instead of failing inside a worker.
    Returns the seconds it took (all sizes first, so a missing shard is reported at once)."""
    t0 = time.perf_counter()
    parts = [sh.parts["tokens"] for s in m.splits.values() for sh in s.shards]
    again = "; re-run stage 1 to rewrite it (or restore the file)"
    for p in parts:
        if not p.path.exists():
            raise ValueError(f"token shard {p.path} (listed in {m.path}) is missing{again}")
        size = disk_bytes(p.path)
        if size != p.bytes:
            raise ValueError(f"token shard {p.path} has {size:,} bytes, {m.path} says {p.bytes:,}: "
                             f"it was changed{again}")
    for p, got in zip(parts, checksums([p.path for p in parts]), strict=True):
        if got != p.checksum:
            raise ValueError(f"token shard {p.path} is corrupted: its sha256 differs from {m.path}{again}")
    seconds = time.perf_counter() - t0
    log.info("verified %d token shard(s), %.1f MB, in %.2f s", len(parts), sum(p.bytes for p in parts) / 1e6, seconds)
    return seconds


# -- the plan ------------------------------------------------------------------------------------


def plan(cfg: ExtractConfig) -> Plan:
    """Validate everything, run stage 1 if asked, and fix the settings that decide every byte."""
    from pipeline.raylib import check_job_paths, init_ray

    # Inside `ray job submit`, a relative path would land in Ray's temporary copy of --working-dir.
    check_job_paths({"--out": cfg.out, "--manifest": cfg.manifest, "--tokens": cfg.tokens, "--corpus": cfg.corpus,
                     "--val-corpus": cfg.val_corpus, "--sae": cfg.sae})
    check_paths(cfg)  # cheap, and before the teacher's weights are hashed
    teacher, sae, layer = check_inputs(cfg)
    token_manifest = None
    if cfg.tokens:  # a bad path or damaged shard fails before Ray starts
        try:
            token_manifest = load_manifest(cfg.tokens)
        except ValueError as e:
            raise ValueError(f"--tokens: {e}") from None
        check_tokens(token_manifest, teacher)
        verify_token_shards(token_manifest)
    mode = init_ray(cfg.ray_address)
    import ray
    import torch

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "cuda" and not gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPUs; use --device cpu or auto")
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    precision = resolve_precision(cfg.dtype, torch.device("cuda" if use_gpu else "cpu"))
    sae_info = sae.describe()
    settings = {
        "teacher": teacher["fingerprint"], "layer": layer, "sae": sae_info["fingerprint"],
        "attribution": cfg.attribution, "k_attr": cfg.k_attr, "k_mix": cfg.k_mix, "k_kd": cfg.k_kd,
        "score_dtype": cfg.score_dtype, "precision": precision, "format": cfg.format,
        "zarr": [cfg.zarr_chunk_windows, cfg.zarr_compression] if cfg.format == "zarr" else None,
    }
    check_output(cfg, settings, ignore=("tokens",))  # before stage 1, which can be long
    if cfg.corpus:
        from pipeline.stage1 import run as tokenize

        token_manifest = tokenize(cfg.stage1_config())
        check_tokens(token_manifest, teacher)
        verify_token_shards(token_manifest)
    settings["tokens"] = token_identity(token_manifest)
    check_output(cfg, settings)
    log.info("Ray %s: %d GPU(s); teacher %s, SAE %s (%d latents, k=%s) at layer %d", mode, gpus,
             teacher["name"], cfg.sae, sae.n_latents, sae.k, layer)
    return Plan(cfg, token_manifest, teacher, sae_info, layer, settings, use_gpu)


# -- jobs and resume -----------------------------------------------------------------------------


def make_jobs(p: Plan) -> list[ShardJob]:
    """One job per token shard, in token-shard order; the key is the concept shard's path relative to
    the manifest (the manifest stores relative paths)."""
    import os

    cfg, tm = p.cfg, p.token_manifest
    base = cfg.manifest_path.absolute().parent
    jobs = []
    for split, s in tm.splits.items():
        for i, sh in enumerate(s.shards):
            out = cfg.concept_dir.absolute() / f"{split}-{i:05d}.{cfg.format}"
            jobs.append(ShardJob(
                key=Path(os.path.relpath(out, base)).as_posix(), split=split, tokens=sh.parts["tokens"],
                token_spec=tm.fields["tokens"], windows=sh.windows, out=str(out), seq_len=tm.seq_len,
                batch_size=cfg.batch_size, **cfg.writer_options(),
            ))
    return jobs


def finished_shards(p: Plan, jobs: list[ShardJob]) -> dict[str, ShardPart]:
    """Shards a previous run finished whose checksum still holds: those its records list
    (pipeline/extract_progress.py; a run in progress) and those its manifest lists (a finished run, a
    checkpoint, or a run of a version before records), for the same settings and token shard."""
    if p.cfg.overwrite:
        return {}
    digest = settings_digest(p.settings)
    records = read_records(p.cfg.concept_dir / RECORDS_DIR)
    old = inspect_path(p.cfg.manifest_path).manifest  # check_paths refused anything else
    by_path = {}
    if old is not None and extraction_settings(old) == p.settings:
        by_path = {str(sh.parts["concepts"].path): sh for s in old.splits.values() for sh in s.shards}
    concept_dir = str(p.cfg.concept_dir.resolve())  # load_manifest resolves each folder (shards/manifest.py)
    candidates: dict[str, ShardPart] = {}
    for job in jobs:
        rec = records.get(record_key(job))
        part = part_from_record(job, rec, digest) if rec is not None else None
        if part is None:
            sh = by_path.get(f"{concept_dir}/{Path(job.out).name}")
            if sh is None or sh.parts["tokens"].checksum != job.tokens.checksum or sh.windows != job.windows:
                continue
            # the job's own path, as a worker returns it: the same relative path in the manifest either way
            part = dataclasses.replace(sh.parts["concepts"], path=Path(job.out))
        candidates[job.key] = part
    present = {k: p for k, p in candidates.items() if p.path.exists()}
    sums = dict(zip(present, checksums([p.path for p in present.values()]), strict=True))
    done = {}
    for key, part in candidates.items():
        if sums.get(key) == part.checksum:
            done[key] = part
        else:
            log.warning("%s is missing or damaged: redoing it", part.path)
    return done



def check_space(p: Plan, todo: list[ShardJob]) -> None:
    """Refuse to start when the concept shards still to write cannot fit on their disk (a full disk
    mid-run is still caught: the worker's error names the shard, the manifest lists only whole ones)."""
    cfg = p.cfg
    if cfg.format == "zarr" and cfg.zarr_compression != "none":
        return  # compressed size unknown in advance
    row = sum(f.nbytes for f in record_fields(p.token_manifest.seq_len, p.sae["n_latents"], cfg).values())
    need = sum(j.windows * row + (1 << 13) for j in todo)  # + Arrow/Zarr metadata per shard
    top = cfg.concept_dir.absolute()
    while not top.exists():  # checked before anything is created
        top = top.parent
    free = shutil.disk_usage(top).free
    if need > free:
        raise ValueError(f"--out: the {len(todo)} concept shard(s) still to write need about {size_text(need)}, "
                         f"the disk of {top} has {size_text(free)} free; free some space and rerun the same command, "
                         "or pass another --out")

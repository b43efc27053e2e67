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
does only the rest. The finished manifest holds nothing that depends on the run (no times, no
throughput): killed at any instant and rerun, the same command writes the same bytes. Timings go to
``CONCEPT_DIR/runs.jsonl``, one JSON line per invocation.

Nothing of the user's is replaced: ``--manifest`` must be absent or a concept manifest of this same
extraction, the concept directory must hold only files this command writes, and ``--overwrite``
replaces only those (shards, extraction.json, runs.jsonl, temporaries) and a cocomix concept manifest. The bytes do not depend on the batch size or the number of workers (fp32 on
CPU): each shard is computed by one worker, each window's numbers do not depend on its batch mates
(runner.py), and the writer's block boundaries are fixed window counts (shards/writer.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from pipeline.extract_worker import ExtractWorker, Progress, ShardJob, ShardResult
from pipeline.runner import RunnerConfig, check_compatible, record_fields, resolve_precision
from shards import Manifest, ShardPart, checksum, load_manifest, open_shard
from shards.atomic import atomic_path
from shards.checksum import disk_bytes
from shards.manifest import inspect_path
from shards.runlog import RUN_LOG, append_run, read_runs

log = logging.getLogger("pipeline.extract")
EXTRACTION_FILE = "extraction.json"  # the settings of the extraction a concept directory holds
# The only names this command writes in a concept directory: shards, the two files above, and the
# temporaries of shards.atomic / shards.PartWriter (".NAME.tmp-<8 hex>").
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_]+-\d{5}\.(arrow|zarr)$")
_TEMPORARY = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}$")
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
    """Teacher block whose output the SAE reads, 0-based; -1 is the last block, -2 the one before (recorded
    as the non-negative index) (default: the SAE's metadata)."""
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
    """Replace a different extraction of the same name: only what stage 2 wrote (concept shards, extraction.json, runs.jsonl, a concept manifest), never other files."""
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
            raise ValueError(f"token shard {p.path} has {size:,} bytes, {m.path} says {p.bytes:,}: it was changed{again}")
    for p in parts:
        got = checksum(p.path)
        if got != p.checksum:
            raise ValueError(f"token shard {p.path} is corrupted: its sha256 differs from {m.path}{again}")
    seconds = time.perf_counter() - t0
    log.info("verified %d token shard(s), %.1f MB, in %.2f s", len(parts), sum(p.bytes for p in parts) / 1e6, seconds)
    return seconds


# -- where the output goes ------------------------------------------------------------------------


def _ours(name: str) -> bool:
    """Whether a name in a concept directory is one this command writes."""
    t = _TEMPORARY.match(name)
    base = t.group(1) if t else name
    return base in (EXTRACTION_FILE, RUN_LOG) or bool(_SHARD_NAME.match(base))


def _foreign(d: Path) -> list[str]:
    return sorted(f.name for f in d.iterdir() if not _ours(f.name)) if d.is_dir() else []


def command(cfg: ExtractConfig, **changes: Any) -> str:
    """The command line of ``cfg`` with ``changes``: the exact command a refusal tells the user to run."""
    cfg = dataclasses.replace(cfg, **changes)
    words = ["python", "pipeline/extract.py"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == f.default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _free_manifest(cfg: ExtractConfig, start: Path | None = None) -> Path:
    """``start`` (default: ``--manifest``) or a numbered name next to it whose manifest and concept
    directory are both unused."""
    mp = (start or cfg.manifest_path).absolute()
    if start is not None and not mp.exists() and not (Path(cfg.out) / "concepts" / mp.stem).exists():
        return mp
    for n in range(2, 10_000):
        cand = mp.with_name(f"{mp.stem}-{n}{mp.suffix or '.json'}")
        if not cand.exists() and not (Path(cfg.out) / "concepts" / cand.stem).exists():
            return cand
    raise ValueError(f"no free manifest name next to {mp}")  # pragma: no cover


def _elsewhere(cfg: ExtractConfig) -> str:
    return f"to keep it, pass another --manifest (its name picks the concept directory): {command(cfg, manifest=str(_free_manifest(cfg)), overwrite=False)}"


def _writable_dir(path: Path, flag: str) -> None:
    """``path`` is (or will be made as) a directory: refuse a file there or above it, or a read-only place."""
    p = path.absolute()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag}: {p} is a file, not a directory; pass another {flag}")
    top = p
    while not top.exists() and top != top.parent:
        top = top.parent
    if not top.is_dir():
        raise ValueError(f"{flag}: {top} is a file, so {p} cannot be a directory; pass another {flag}")
    if not os.access(top, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {top} is not writable; pass another {flag}")


def check_paths(cfg: ExtractConfig) -> None:
    """Everything about ``--out`` and ``--manifest`` that needs no settings, before any heavy work:
    the places must be directories we can write, the manifest path must be absent or hold a cocomix
    concept manifest, and the concept directory must hold only files this command writes."""
    mp, cdir = cfg.manifest_path.absolute(), cfg.concept_dir.absolute()
    _writable_dir(Path(cfg.out), "--out")
    _writable_dir(mp.parent, "--manifest")
    _writable_dir(cdir, "--out")
    if cdir in mp.parents:
        raise ValueError(f"--manifest {mp} lies inside its own concept directory {cdir}; put it elsewhere, e.g. {cfg.out}")
    there = inspect_path(mp)
    if there.kind == "directory":
        raise ValueError(f"--manifest {mp} is a directory; pass a file name, e.g. --manifest {mp / 'concepts.json'}")
    if there.kind == "other":
        raise ValueError(f"--manifest {mp} holds {there.what}; stage 2 leaves it alone: pass another --manifest: "
                         f"{command(cfg, manifest=str(_free_manifest(cfg)), overwrite=False)}")
    if there.kind == "damaged" and not cfg.overwrite:
        raise ValueError(f"--manifest {mp} holds {there.what}; {_elsewhere(cfg)}; to replace it: {command(cfg, overwrite=True)}")
    if there.manifest is not None and there.manifest.kind != "concepts":
        free = _free_manifest(cfg, Path(cfg.out) / "concepts.json")
        raise ValueError(f"--manifest {mp} holds {there.what} (stage-1 output, which stage 2 never replaces); pass "
                         f"another --manifest: {command(cfg, manifest=str(free), overwrite=False)}")
    foreign = _foreign(cdir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"concept directory {cdir} holds files stage 2 did not write ({shown}); it writes only its shards "
                         f"there and never removes other files: move them away, or pass another --manifest (its name "
                         f"picks the concept directory): {command(cfg, manifest=str(_free_manifest(cfg)), overwrite=False)}")


def _differs(there: dict, settings: dict, ignore: tuple[str, ...]) -> list[str]:
    def short(v: Any) -> str:
        t = json.dumps(v) if not isinstance(v, str) else v
        return t if len(t) <= 24 else t[:21] + "..."

    keys = sorted((set(there) | set(settings)) - set(ignore))
    return [f"{k} (there: {short(there.get(k))}, this run: {short(settings.get(k))})"
            for k in keys if there.get(k) != settings.get(k)]


def check_output(cfg: ExtractConfig, settings: dict, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a concept directory or manifest that holds a different extraction (unless --overwrite),
    naming the settings that differ and the commands to keep it or to replace it."""
    cdir, mp = cfg.concept_dir.absolute(), cfg.manifest_path.absolute()
    replace = f"to replace it (only what stage 2 wrote): {command(cfg, overwrite=True)}"
    marker = cdir / EXTRACTION_FILE
    if marker.is_file():
        try:
            there = json.loads(marker.read_text())
            bad = _differs(there, settings, ignore) if isinstance(there, dict) else [f"{EXTRACTION_FILE} is not an object"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            bad = [f"{EXTRACTION_FILE} cannot be read ({e})"]
        if bad and not cfg.overwrite:
            raise ValueError(f"concept directory {cdir} holds a different extraction (differs in: {', '.join(bad)}); "
                             f"{_elsewhere(cfg)}; {replace}")
    elif cdir.is_dir() and any(cdir.iterdir()) and not cfg.overwrite:
        raise ValueError(f"concept directory {cdir} holds concept shards but no {EXTRACTION_FILE} (their settings are "
                         f"unknown); {_elsewhere(cfg)}; {replace}")
    old = inspect_path(mp).manifest
    if old is None or cfg.overwrite:
        return
    bad = _differs(old.settings, settings, ignore)
    dirs = {sh.parts["concepts"].path.parent for s in old.splits.values() for sh in s.shards if "concepts" in sh.parts}
    if dirs and dirs != {cdir.resolve()}:
        bad.append(f"concept directory (there: {', '.join(map(str, sorted(dirs)))}, this run: {cdir}; another --out)")
    if bad:
        raise ValueError(f"manifest {mp} describes a different extraction (differs in: {', '.join(bad)}); "
                         f"{_elsewhere(cfg)}; {replace}")


def plan(cfg: ExtractConfig) -> Plan:
    """Validate everything, run stage 1 if asked, and fix the settings that decide every byte."""
    from pipeline.raylib import check_job_paths

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
        from pipeline.stage1 import TokenizeConfig
        from pipeline.stage1 import run as tokenize

        token_manifest = tokenize(TokenizeConfig(corpus=list(cfg.corpus), val_corpus=cfg.val_corpus, tokenizer=cfg.teacher,
                                                 out=str(Path(cfg.out) / "tokens"), seq_len=cfg.seq_len,
                                                 ray_address=cfg.ray_address))
        check_tokens(token_manifest, teacher)
        verify_token_shards(token_manifest)
    settings["tokens"] = token_identity(token_manifest)
    check_output(cfg, settings)
    log.info("Ray %s: %d GPU(s); teacher %s, SAE %s (%d latents, k=%s) at layer %d", mode, gpus,
             teacher["name"], cfg.sae, sae.n_latents, sae.k, layer)
    return Plan(cfg, token_manifest, teacher, sae_info, layer, settings, use_gpu)


# -- the manifest ---------------------------------------------------------------------------------


def build_manifest(p: Plan, done: dict[str, ShardPart], jobs: list[ShardJob], stats: dict) -> Manifest:
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
            m.add_shard(job.split, job.windows, {"tokens": job.tokens, "concepts": done[job.key]})
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


def finished_shards(p: Plan, jobs: list[ShardJob]) -> dict[str, ShardPart]:
    """Shards of a previous run whose manifest entry, token shard and checksum all still hold."""
    path = p.cfg.manifest_path
    old = None if p.cfg.overwrite else inspect_path(path).manifest  # check_paths refused anything else
    if old is None or old.settings != p.settings:
        return {}
    by_path = {str(sh.parts["concepts"].path): sh for s in old.splits.values() for sh in s.shards}
    done = {}
    for job in jobs:
        sh = by_path.get(str(Path(job.out).resolve()))
        if sh is None or sh.parts["tokens"].checksum != job.tokens.checksum or sh.windows != job.windows:
            continue
        part = sh.parts["concepts"]
        if part.path.exists() and checksum(part.path) == part.checksum:
            done[job.key] = part
        else:
            log.warning("%s is missing or damaged: redoing it", part.path)
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clean_temporaries(cfg: ExtractConfig) -> None:
    """Temporaries of a killed run (shards.PartWriter / shards.atomic): in the concept directory, and
    the manifest's own beside it; only names this command writes."""
    for t in cfg.concept_dir.iterdir():
        if _TEMPORARY.match(t.name) and _ours(t.name):
            _remove(t)
    mp = cfg.manifest_path.absolute()
    for t in mp.parent.glob(f".{glob.escape(mp.name)}.tmp-*"):
        if _TEMPORARY.match(t.name):
            _remove(t)


def _prepare_concept_dir(p: Plan) -> None:
    """Create the concept directory; with --overwrite remove what stage 2 wrote there (check_paths
    refused a directory holding anything else); record the settings."""
    cfg = p.cfg
    d = cfg.concept_dir
    if cfg.overwrite and d.is_dir():
        for f in d.iterdir():
            if _ours(f.name):
                _remove(f)
    d.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(cfg)
    marker = d / EXTRACTION_FILE
    text = json.dumps(p.settings, indent=2) + "\n"
    if not marker.is_file() or marker.read_text() != text:
        with atomic_path(marker) as tmp:
            tmp.write_text(text)


def _check_space(p: Plan, todo: list[ShardJob]) -> None:
    """Refuse to start when the concept shards still to write cannot fit on their disk (a full disk
    mid-run is still caught: the worker's error names the shard, the manifest lists only whole ones)."""
    cfg = p.cfg
    if cfg.format == "zarr" and cfg.zarr_compression != "none":
        return  # compressed size unknown in advance
    row = sum(f.nbytes for f in record_fields(p.token_manifest.seq_len, p.sae["n_latents"],
                                               cfg.runner_config("cpu")).values())
    need = sum(j.windows * row + (1 << 13) for j in todo)  # + Arrow/Zarr metadata per shard
    top = cfg.concept_dir.absolute()
    while not top.exists():  # checked before anything is created
        top = top.parent
    free = shutil.disk_usage(top).free
    if need > free:
        raise ValueError(f"--out: the {len(todo)} concept shard(s) still to write need about {_size(need)}, the disk of "
                         f"{top} has {_size(free)} free; free some space and rerun the same command, or pass another --out")


def _size(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def run(cfg: ExtractConfig) -> Manifest:
    """Extract concepts for every token shard not done yet; returns the saved manifest."""
    import ray

    p = plan(cfg)
    jobs = make_jobs(p)
    done = finished_shards(p, jobs)
    todo = [j for j in jobs if j.key not in done]
    _check_space(p, todo)
    _prepare_concept_dir(p)
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command(cfg), "manifest": str(cfg.manifest_path.absolute()),
        "shards": {"total": len(jobs), "verified": len(done), "to_do": len(todo)}, "per_shard": [],
    }
    try:
        # Rewritten after every shard (intermediate: whole shards only, complete false, nothing run-dependent):
        # O(shards^2) bytes over a run, small next to the shards up to thousands of them; the finished
        # manifest is the same bytes whatever the interruption point.
        def save() -> Manifest:
            return build_manifest(p, done, jobs, {"complete": False}).save(cfg.manifest_path)

        if todo:
            save()
            log.info("%d of %d shard(s) to do (%d verified and skipped)", len(todo), len(jobs), len(done))
            n_workers = cfg.num_workers or (int(ray.cluster_resources().get("GPU", 0)) if p.use_gpu else 1)
            n_workers = max(1, min(n_workers, len(todo)))
            _execute(p, todo, done, n_workers, save, record)
        m = build_manifest(p, done, jobs, {})
        labels = label_stats(m)  # from the shards: a resumed run reports exactly what an uninterrupted one does
        m.stats = {"complete": True, "labels": labels}
        m.save(cfg.manifest_path)
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


def _execute(p: Plan, todo: list[ShardJob], done: dict[str, ShardPart], n_workers: int, save, record: dict) -> None:
    """Run ``todo`` on ``n_workers`` actors, saving the manifest after every shard; timings go to
    ``record`` (the run log's line), never to the manifest."""
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
                        raise ValueError(f"shard {job.key}: its worker process died {MAX_SHARD_RETRIES + 1} times "
                                         f"({type(e).__name__}; out of memory?); lower --batch-size or --num-workers and "
                                         "rerun the same command (finished shards are kept)") from e
                    log.warning("worker died on %s (%s); retrying (%d/%d)", job.key, type(e).__name__,
                                retries[job.key], MAX_SHARD_RETRIES)
                    progress.set.remote(job.key, 0)
                    queue.append(job)
                    continue
                done[job.key] = res.part
                record["per_shard"].append({"shard": job.key, "windows": job.windows, **res.stats.to_json(),
                                            "seconds": round(res.seconds, 2)})
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
    return run_cli(_main, argv, interrupted="interrupted: finished shards are in the manifest; run the same "
                                            "command again to resume")


def _main(argv: list[str] | None) -> int:
    cfg = dataclass_from_args(ExtractConfig, build_parser().parse_args(argv))
    m = run(cfg)
    lab = m.stats.get("labels", {})
    for name, s in m.splits.items():
        print(f"{name}: {s.windows} windows, {s.tokens:,} tokens, {len(s.shards)} shard(s)")
    print(f"labels: {lab.get('frac_short', 0):.2%} of tokens with < {cfg.k_attr} positive scores, "
          f"{lab.get('latents_used', 0)} latents used, teacher NLL {lab.get('teacher_mean_nll', 0):.3f}")
    runs = read_runs(cfg.concept_dir)
    thr = runs[-1].get("throughput") if runs else None
    if thr:
        print(f"throughput: {thr['tokens_per_s']:,.0f} tokens/s on {thr['num_workers']} {thr['device']} worker(s)")
    # Absolute paths of everything written (under a Ray job, a relative path would name the job's copy).
    print(f"manifest: {Path(m.path).absolute()}")
    print(f"concept shards: {cfg.concept_dir.absolute()}")
    print(f"run log: {(cfg.concept_dir / RUN_LOG).absolute()}")
    if cfg.corpus:
        print(f"token shards (stage 1): {(Path(cfg.out) / 'tokens').absolute()}")
    return 0


__all__ = ["ExtractConfig", "build_parser", "command", "main", "run"]

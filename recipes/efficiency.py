"""The paper's token-efficiency experiment at a size this machine can run, from one config file.

    python -m recipes.efficiency --config recipes/configs/cpu.json

teacher + corpus -> stage 1 (train file -> train split, valid file -> val split) -> a TopK SAE
trained by ``sae/train.py`` on the train split -> stage 2 (attribution labels + the teacher's top-k
log-probs for KD) -> NTP, CoCoMix and KD students on the same windows at the same token budget,
for each seed -> ``report.json`` and ``efficiency.png`` (validation loss against training tokens
and against training FLOPs) in the run directory.

A config may instead name *arms* (recipes/arms.py): students with the trainer's ablation switches
(prediction or mixing only, adding, activation labels, pause tokens, permuted labels, another width),
each compared with a baseline arm, and extra held-out corpora evaluated beside the val split
(``recipes/configs/ablations-cpu.json``, README "Why CoCoMix trails NTP").

The report answers the paper's headline question (arXiv 2502.08524, docs/method.md: at 1.38B CoCoMix
reaches NTP's final validation loss with 21.5% fewer tokens) at this scale, and the one the paper leaves
out: the same comparison at equal training FLOPs. Every step reuses what a previous run finished,
so an interrupted run continues where it stopped and a later run only adds seeds. A config may
``"extends": "other.json"`` and give only the keys it changes (``cpu-long.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from common.cli import Parser, run_cli
from recipes.arms import arm_report, check_arms, student_config
from recipes.compare import mean_curve, plot, plot_arms, print_report
from recipes.steps import announce, extract_concepts, first_documents, read_curve, tokenize, train_sae, train_student
from trainer.config import plain_name

ROOT = Path(__file__).resolve().parents[1]  # the checkout: relative paths in a config are relative to it

STEPS = ("tokens", "sae", "concepts", "students", "report")


@dataclass
class EfficiencyConfig:
    """One efficiency experiment (a JSON file under recipes/configs/)."""

    name: str
    """Name of the experiment; the default run directory is ../cocomix-runs/NAME."""
    corpus: list[str]
    """Training corpus (relative paths are relative to the repository root)."""
    val_corpus: list[str]
    """Held-out corpus: its documents are the validation split."""
    description: str = ""
    """What this preset is for."""
    teacher: str = "smollm2-135m"
    """Teacher: alias, hub id, model directory or .gguf."""
    layer: int = 14
    """Teacher block (0-based) whose output the SAE reads."""
    seq_len: int = 512
    """Tokens per window."""
    shard_mb: float = 0.25
    """Stage-1 shard size; stage 2 writes and resumes shard by shard, so small shards lose little to a crash."""
    sae_latents: int = 4608
    """SAE latents C (the concept vocabulary)."""
    sae_k: int = 32
    """SAE TopK (paper 32)."""
    sae_tokens: int = 524_288
    """Activations the SAE trains on (one pass)."""
    sae_batch_size: int = 1024
    """SAE optimiser batch (activations)."""
    sae_buffer_tokens: int = 32_768
    """SAE shuffle buffer (activations)."""
    teacher_batch: int = 4
    """Windows per teacher forward while collecting SAE activations."""
    k_attr: int = 4
    """Concept labels per token (paper 4)."""
    k_kd: int = 32
    """Teacher top-k log-probs stored for the KD student."""
    k_mix: int = 0
    """The SAE's own top-k code stored per token (0: none); the activation-label arm needs >= k_attr."""
    train_documents: int | None = None
    """Use only the first this many documents of ``corpus`` (None: all): a smaller extraction when the
    students need fewer tokens than the corpus has. The slice is written to OUT/corpus/."""
    val_documents: int | None = None
    """Likewise for ``val_corpus``."""
    extract_batch_size: int = 8
    """Windows per teacher forward/backward in stage 2."""
    device: str = "auto"
    """cpu, cuda or auto for the SAE, stage 2 and the students."""
    preset: str = "small"
    """Student preset (NTP and KD get the width-matched baseline, as in the paper)."""
    modes: list[str] = field(default_factory=lambda: ["ntp", "cocomix", "kd"])
    """Students to train, one arm per mode (ignored when ``arms`` is given)."""
    arms: dict[str, dict] | None = None
    """Students by name, each a dict of trainer settings (``mode`` plus any of recipes/arms.py ARM_KEYS, e.g.
    ``{"mode": "cocomix", "mix": "add"}``) and optionally its own ``seeds``. None: one arm per mode."""
    baseline: str = "ntp"
    """The arm every other is compared with (tokens to reach its final loss)."""
    held_out: dict[str, list[str]] = field(default_factory=dict)
    """More held-out corpora by name, each tokenized by stage 1 (tokens only, into OUT/held-out/NAME)
    and evaluated at every evaluation beside the val split (relative paths: to the repository root)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds of each student (init and window order), unless its arm lists its own."""
    max_tokens: int = 393_216
    """Training tokens per student (the same budget for every mode)."""
    micro_batch: int = 8
    """Windows per forward."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    lr: float = 6e-4
    """Peak learning rate."""
    eval_every: int = 8
    """Evaluate every this many steps."""
    eval_windows: int = 64
    """Validation windows per evaluation (the same ones for every student)."""
    manifest: str | None = None
    """Also save the concept manifest here (relative to the repository root), e.g. manifests/owt.json."""
    extraction: str | None = None
    """Reuse the stage 1, SAE and stage 2 outputs of this run directory (relative to the repository
    root, e.g. ../cocomix-runs/efficiency-cpu) instead of extracting again: for another student budget
    on the same labels. Its SAE must have this config's layer, latents and k."""

    @classmethod
    def load(cls, path: str | Path) -> EfficiencyConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read config {path}: {e}") from e
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known - {"extends"}:
            raise ValueError(f"config {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if base := d.pop("extends", None):  # another config file (relative to this one) supplies every key not given
            d = asdict(cls.load(Path(path).parent / base)) | d
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"config {path}: {e}") from e

    def student_arms(self) -> dict[str, dict]:
        """Arm name -> its trainer settings (with ``seeds``), the ``modes`` shorthand expanded."""
        arms = self.arms if self.arms is not None else {m: {"mode": m} for m in self.modes}
        return {name: {"seeds": self.seeds} | a for name, a in arms.items()}

    def __post_init__(self) -> None:
        if self.arms is None:
            if bad := set(self.modes) - {"ntp", "cocomix", "kd"}:
                raise ValueError(f"modes must be among ntp, cocomix, kd; got {sorted(bad)}")
            if "ntp" not in self.modes:
                raise ValueError("modes must include ntp: every comparison is against it")
        else:
            check_arms(self.arms, self.baseline)
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        for name in self.held_out:
            if name == "val" or not plain_name(name):
                raise ValueError(f"held_out name {name!r}: use letters, digits, - and _ (and not 'val')")
        for name in ("train_documents", "val_documents"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null for the whole corpus)")
        if self.k_mix < 0:
            raise ValueError("k_mix must be >= 0")
        if self.max_tokens < 1 or self.eval_every < 1:
            raise ValueError("max_tokens and eval_every must be >= 1")


def _repo_path(p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else ROOT / q)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m recipes.efficiency", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config (recipes/configs/cpu.json or gpu.json)")
    p.add_argument("--out", default=None, help="run directory (default ../cocomix-runs/NAME beside the checkout)")
    p.add_argument("--corpus", nargs="+", default=None, help="training corpus instead of the config's")
    p.add_argument("--val-corpus", nargs="+", default=None, help="held-out corpus instead of the config's")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds instead of the config's")
    p.add_argument("--modes", nargs="+", default=None,
                   help="students instead of the config's (ntp must be one), for a config without arms")
    p.add_argument("--arms", nargs="+", default=None,
                   help="train and report only these of the config's arms (its baseline must be one)")
    p.add_argument("--until", choices=STEPS, default="report", help="stop after this step")
    p.add_argument("--ray-address", default="local",
                   help="'local': a private embedded Ray; or a cluster address for stage 1 and stage 2")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.efficiency``: 0, 2 with one ``error:`` line (common/cli.py), 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_cli(_main, argv, interrupted="interrupted: every finished step is kept; the same command continues")


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    cfg = EfficiencyConfig.load(a.config)
    overrides = {k: v for k, v in (("corpus", a.corpus), ("val_corpus", a.val_corpus), ("seeds", a.seeds),
                                   ("modes", a.modes)) if v}
    if a.modes and cfg.arms is not None:
        raise ValueError(f"--modes: {a.config} names arms ({', '.join(cfg.arms)}); choose among them with --arms")
    if a.arms:
        if cfg.arms is None:
            raise ValueError(f"--arms: {a.config} names no arms (its students are its modes; use --modes)")
        if unknown := [n for n in a.arms if n not in cfg.arms]:
            raise ValueError(f"--arms: {unknown} not in {a.config}'s arms {list(cfg.arms)}")
        overrides["arms"] = {n: cfg.arms[n] for n in cfg.arms if n in a.arms}
    if overrides:
        cfg = EfficiencyConfig(**(asdict(cfg) | overrides))
    out = Path(a.out) if a.out else ROOT.parent / "cocomix-runs" / cfg.name
    report = run(cfg, out, a.until, a.ray_address, a.config)
    if report is not None:
        print_report(report)
    return 0


def run(cfg: EfficiencyConfig, out: Path, until: str, ray_address: str, config_path: str) -> dict | None:
    """The experiment up to step ``until``; the report (also written to OUT/report.json) when it got there."""
    from common.corpus_sources import expand_sources
    from pipeline.extract import ExtractConfig
    from pipeline.stage1 import TokenizeConfig
    from sae.train import TrainConfig as SaeConfig

    for name, sources in cfg.held_out.items():  # a wrong path shows now, not after the extraction
        try:
            expand_sources([_repo_path(p) for p in sources])
        except ValueError as e:
            raise ValueError(f"held_out {name}: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    # Extraction outputs live in `ext`: this run's own directory, or the one named by cfg.extraction
    # (whose wall times are then reported as they were measured there).
    ext = Path(_repo_path(cfg.extraction)) if cfg.extraction else out
    if cfg.extraction and not (ext / "tokens").is_dir():
        raise ValueError(f"extraction={cfg.extraction!r}: {ext / 'tokens'} does not exist; run its config first")
    walls_path = next((d / "walls.json" for d in (out, ext) if (d / "walls.json").is_file()), None)
    walls: dict[str, float] = json.loads(walls_path.read_text()) if walls_path else {}

    def timed(name: str, t0: float) -> None:
        walls[name] = round(time.perf_counter() - t0, 1)
        (out / "walls.json").write_text(json.dumps(walls, indent=2))

    t = announce(1, 5, f"stage 1: {cfg.corpus} (train) + {cfg.val_corpus} (val) -> {ext / 'tokens'}")
    corpus = first_documents([_repo_path(p) for p in cfg.corpus], cfg.train_documents, ext / "corpus" / "train")
    val_corpus = first_documents([_repo_path(p) for p in cfg.val_corpus], cfg.val_documents, ext / "corpus" / "val")
    tok_m = tokenize(TokenizeConfig(corpus=corpus, val_corpus=val_corpus,
                                    tokenizer=cfg.teacher, out=str(ext / "tokens"), seq_len=cfg.seq_len,
                                    shard_mb=cfg.shard_mb, ray_address=ray_address))
    walls.setdefault("stage 1", round(time.perf_counter() - t, 1))
    if until == "tokens":
        return None

    t = announce(2, 5, f"SAE: {cfg.sae_latents} latents, TopK {cfg.sae_k}, block {cfg.layer}, "
                       f"{cfg.sae_tokens:,} tokens")
    sae_dir = ext / "sae"
    sae_summary, fresh = train_sae(SaeConfig(
        teacher=cfg.teacher, layer=cfg.layer, tokens=str(ext / "tokens"), n_latents=cfg.sae_latents, k=cfg.sae_k,
        max_tokens=cfg.sae_tokens, batch_size=cfg.sae_batch_size, buffer_tokens=cfg.sae_buffer_tokens,
        teacher_batch=cfg.teacher_batch, out=str(sae_dir), device="cuda" if cfg.device == "cuda" else "cpu",
    ), "point --out or `extraction` at another run directory")
    if fresh:
        timed("SAE", t)
    if until == "sae":
        return None

    t = announce(3, 5, "stage 2: attribution labels + KD targets")
    concept_manifest = Path(_repo_path(cfg.manifest)) if cfg.manifest else ext / "concepts.json"
    extract_concepts(ExtractConfig(
        tokens=str(ext / "tokens"), teacher=cfg.teacher, sae=str(sae_dir), out=str(ext), manifest=str(concept_manifest),
        k_attr=cfg.k_attr, k_mix=cfg.k_mix, k_kd=cfg.k_kd, batch_size=cfg.extract_batch_size, device=cfg.device,
        ray_address=ray_address))
    if "stage 2" not in walls:
        timed("stage 2", t)
    if until == "concepts":
        return None

    held_out = held_out_sets(cfg, out, ray_address)
    arms = cfg.student_arms()
    announce(4, 5, f"students: arms {list(arms)}, {cfg.max_tokens:,} tokens each ({cfg.preset})")
    students: dict[str, dict[int, dict]] = {}
    for seed in sorted({s for a in arms.values() for s in a["seeds"]}):  # seed-major: a run stopped early
        for name, arm in arms.items():                                  # still has whole seeds of every arm
            if seed not in arm["seeds"]:
                continue
            run_dir = out / "students" / f"{name}-seed{seed}"
            summary_path = run_dir / "summary.json"
            if not summary_path.is_file():
                t = time.perf_counter()
                summary = train_student(student_config(
                    arm, shards=str(concept_manifest), preset=cfg.preset, seed=seed, max_tokens=cfg.max_tokens,
                    micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, lr=cfg.lr, eval_every=cfg.eval_every,
                    eval_windows=cfg.eval_windows, ckpt_every=cfg.eval_every * 4, out_dir=str(run_dir),
                    resume="auto", device=cfg.device,
                    held_out=[f"{n}={m}" for n, m in held_out.items()] or None))
                summary_path.write_text(json.dumps({"params": summary.get("params"), "tokens": summary.get("tokens"),
                                                    "wall_s": round(time.perf_counter() - t, 1)}))
            students.setdefault(name, {})[seed] = json.loads(summary_path.read_text())
    if until == "students":
        return None

    announce(5, 5, "report")
    curves = {}
    for name, arm in arms.items():
        per_seed = {s: read_curve(out / "students" / f"{name}-seed{s}") for s in arm["seeds"]}
        if not all(per_seed.values()):
            raise ValueError(f"{name}: a student has no evaluation in {out / 'students'}")
        curves[name] = {"seeds": per_seed, "mean": mean_curve(list(per_seed.values()))}
    base = curves[cfg.baseline]["mean"]
    rows = {name: arm_report(arms[name], students[name], c["seeds"], c["mean"],
                             None if name == cfg.baseline else base, list(held_out)) for name, c in curves.items()}
    report = {
        "config": asdict(cfg), "config_file": config_path, "run_dir": str(out),
        "command": " ".join(["python", "-m", "recipes.efficiency", *sys.argv[1:]]),
        "data": {s: {"windows": sp.windows, "tokens": sp.tokens, "documents": sp.extra.get("documents")}
                 for s, sp in tok_m.splits.items()},
        "held_out": {n: str(m) for n, m in held_out.items()},
        "sae": {k: sae_summary.get(k) for k in ("fvu", "l0", "dead_fraction", "tokens")},
        "baseline": cfg.baseline,
        "students": rows,
        "vs_ntp": {name: r["vs_baseline"] for name, r in rows.items() if "vs_baseline" in r},
        "wall_s": walls,
    }
    title = f"{cfg.name}: {cfg.preset} students, teacher {cfg.teacher} (block {cfg.layer})"
    png = (plot(curves, out / "efficiency.png", title) if cfg.arms is None
           else plot_arms(rows, cfg.baseline, list(held_out), out / "efficiency.png", title))
    report["plot"] = str(png) if png else None
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def held_out_sets(cfg: EfficiencyConfig, out: Path, ray_address: str) -> dict[str, Path]:
    """Stage 1 over each ``held_out`` corpus (all its windows in one split; reused when done):
    name -> its tokens manifest."""
    from pipeline.stage1 import TokenizeConfig

    sets: dict[str, Path] = {}
    for name, sources in cfg.held_out.items():
        announce(4, 5, f"held-out set {name}: {sources}")
        m = tokenize(TokenizeConfig(corpus=[_repo_path(p) for p in sources], tokenizer=cfg.teacher,
                                    out=str(out / "held-out" / name), seq_len=cfg.seq_len, shard_mb=cfg.shard_mb,
                                    val_fraction=0.0, ray_address=ray_address))
        sets[name] = Path(m.path)
    return sets


if __name__ == "__main__":
    sys.exit(main())

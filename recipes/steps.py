"""The steps of a whole-system run, written once for every recipe (``recipes/demo.py``,
``recipes/efficiency.py``): stage 1 -> SAE -> stage 2 -> students -> validation curves.

Each step calls its package's programmatic entry with that package's config dataclass (no argv lists,
no exit codes turned back into exceptions), so a mistake surfaces as the package's own ValueError /
OSError and the recipe's ``common.cli.run_cli`` prints it as one ``error:`` line (docs/operations.md).
Each step reuses what a previous run completed: stage 1, stage 2 and the trainer verify and skip a
finished output themselves; the SAE step reuses a finished SAE after checking it is the one asked for.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy packages load when a step runs, so --help stays fast
    from pipeline.extract import ExtractConfig
    from pipeline.stage1 import TokenizeConfig
    from sae.train import TrainConfig as SaeConfig
    from shards import Manifest
    from trainer.config import TrainConfig


def announce(n: int, total: int, what: str, lead: str = "") -> float:
    """Print the step header ``[n/total] what`` and return the step's start time."""
    print(f"{lead}[{n}/{total}] {what}", flush=True)
    return time.perf_counter()


def tokenize(cfg: TokenizeConfig) -> Manifest:
    """Stage 1 (pipeline/stage1.py): corpus -> token windows; an existing identical dataset is reused."""
    from pipeline.stage1 import run

    return run(cfg)


def check_sae(sae_dir: Path, cfg: SaeConfig, elsewhere: str) -> None:
    """A reused SAE must be the one ``cfg`` asks for, or the labels would silently differ.
    ``elsewhere``: how to pick another place (the recipe's own flag)."""
    record = sae_dir / "train_config.json"  # sae/rundir.py: TRAIN_CONFIG
    if not record.is_file():
        raise ValueError(f"{sae_dir} holds an SAE without sae.train's train_config.json: its settings cannot be "
                         f"checked; {elsewhere}")
    tc = json.loads(record.read_text())
    want: dict[str, Any] = {"teacher": cfg.teacher, "n_latents": cfg.n_latents, "k": cfg.k}
    if cfg.layer is not None and cfg.layer >= 0:  # sae.train records a negative layer as its non-negative index
        want["layer"] = cfg.layer
    if diff := {k: (tc.get(k), v) for k, v in want.items() if tc.get(k) != v}:
        raise ValueError(f"{sae_dir} holds an SAE with other settings (found, wanted): {diff}; {elsewhere}")


def first_documents(sources: list[str], n: int | None, out: Path) -> list[str]:
    """The first ``n`` documents of delimited text files, as one file under ``out`` named like the first
    source (so document ids keep its name); ``sources`` unchanged when ``n`` is None. A slice already
    there with the same bytes is reused; a different one is refused, never replaced."""
    if n is None:
        return sources
    from common.corpus import CorpusConfig
    from common.corpus_cuts import is_delimiter_line

    delim = CorpusConfig.delimiter.encode()  # the readers' default document delimiter
    chunks: list[bytes] = []
    left = n
    for src in sources:
        if not src.endswith(".txt"):
            raise ValueError(f"a document limit needs delimited .txt sources; {src} is not one")
        try:
            lines = Path(src).read_bytes().splitlines(keepends=True)
        except OSError as e:
            raise ValueError(f"cannot read corpus {src}: {e}") from e
        for i, line in enumerate(lines):
            if is_delimiter_line(line, delim):
                left -= 1
                if left == 0:
                    chunks.append(b"".join(lines[:i + 1]))
                    break
        else:
            chunks.append(b"".join(lines))
        if left == 0:
            break
    if left > 0:
        raise ValueError(f"asked for the first {n} documents of {sources}, which hold only {n - left}")
    data = b"".join(chunks)
    dst = out / Path(sources[0]).name
    if dst.is_file():
        if dst.read_bytes() != data:
            raise ValueError(f"{dst} holds another slice of the corpus (another document count or corpus); "
                             "pass another --out, or delete it if it is this recipe's and no longer needed")
    else:
        from shards.atomic import write_atomic

        dst.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dst, data)
    return [str(dst)]


def train_sae(cfg: SaeConfig, elsewhere: str) -> tuple[dict, bool]:
    """The SAE in ``cfg.out``: reused when finished (and the one asked for), else trained by sae/train.py.
    Returns its summary and whether it was trained now."""
    out = Path(cfg.out)
    if (out / "summary.json").is_file():
        check_sae(out, cfg, elsewhere)
        print(f"  reusing {out}")
        return json.loads((out / "summary.json").read_text()), False
    from sae.train import train

    summary = train(cfg)
    print(json.dumps(summary, indent=2))  # what `python -m sae.train` prints
    return summary, True


def extract_concepts(cfg: ExtractConfig) -> Manifest:
    """Stage 2 (pipeline/extract.py): teacher + SAE -> concept labels; finished shards are verified and
    kept. Prints what ``python pipeline/extract.py`` prints at the end."""
    from pipeline.extract import run
    from pipeline.extract_driver import print_summary

    m = run(cfg)
    print_summary(cfg, m)
    return m


def train_student(cfg: TrainConfig) -> dict[str, Any]:
    """One student (trainer/loop.py); an unfinished run in ``cfg.out_dir`` continues with
    ``resume="auto"``, a finished one is reported complete and not touched."""
    from trainer.loop import train

    try:
        return train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # under torchrun (trainer/run.py does the same)
            dist.destroy_process_group()


# Evaluation metrics a curve point carries beside val_loss when the student logged them
# (trainer/concept_metrics.py; each held-out set's held_out/NAME/loss too).
CURVE_EXTRAS = ("val_concept_recall", "val_concept_recall_prior")


def read_curve(run_dir: Path) -> list[dict]:
    """Every evaluation of a student as {tokens, flops, val_loss} plus the held-out losses and concept
    recall it logged; the last line per step wins (a resume rewrites steps). Empty when the student
    has no metrics yet."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        m = json.loads(line)
        if "val_loss" in m:
            by_step[m["step"]] = {"tokens": m["tokens"], "flops": m.get("flops"), "val_loss": m["val_loss"]} | {
                k: v for k, v in m.items() if k in CURVE_EXTRAS or (k.startswith("held_out/") and k.endswith("/loss"))}
    return [by_step[s] for s in sorted(by_step)]


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'cocomix[plot]'): no plot", file=sys.stderr)
        return None
    return plt

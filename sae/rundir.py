"""What ``python -m sae.train --out DIR`` may do with DIR, decided before any heavy work.

sae.train writes only the names in ``FILES`` and ``DIRS`` (and their temporaries), and with --tensorboard /
--wandb the tracking names of common/tracking.py (``tb/``; W&B's ``wandb/``, never removed). ``train_config.json``
is written first, so any directory sae.train has touched says which run it holds. Then:

- DIR absent or empty: a new run.
- DIR holds anything without an sae.train ``train_config.json`` (another SAE, a user's files): refused,
  nothing is touched; ``--overwrite`` does not apply either (sae.train wrote none of it).
- The same run (every setting that decides the result equal), finished: nothing to do; the saved
  summary is printed again (idempotent). Unfinished: it continues from its last checkpoint (a kill -9 and
  a rerun of the same command give the same SAE), or starts over when it died before the first one.
- A run that died before its first checkpoint (whatever its settings): replaced, it holds nothing to lose.
- A run with other settings: refused, naming each difference, with the exact commands to continue it
  (``--resume``, when only settings a resume may change differ), to replace it (``--overwrite``: removes
  only the files sae.train wrote, a user's other files stay), or to choose another ``--out``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.tracking import TB_DIR, TRACKING_FIELDS, WANDB_RUN, remove_event_files
from sae.formats import CFG, SAELENS_WEIGHTS, load_sae

TRAIN_CONFIG = "train_config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"  # sae.eval's default output beside the SAE
CHECKPOINT = "checkpoint"
STATE = "state.pt"
FILES = (CFG, SAELENS_WEIGHTS, TRAIN_CONFIG, METRICS, SUMMARY, EVAL, WANDB_RUN)
DIRS = (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old")
CHECKPOINT_FILES = (CFG, SAELENS_WEIGHTS, STATE)
# Settings that do not decide the result: never a reason to refuse a directory.
NOT_IDENTITY = ("resume", "overwrite", "threads", "out", *TRACKING_FIELDS)
# Settings a --resume must not change: the checkpoint's SAE, buffer and window position depend on them.
MUST_MATCH_ON_RESUME = ("teacher", "layer", "location", "corpus", "tokens", "split", "n_latents", "k", "normalize",
                        "seq_len", "teacher_batch", "batch_size", "buffer_tokens", "seed", "teacher_dtype")


def written_by_us(name: str) -> bool:
    """Whether sae.train (or sae.eval's default output) writes this name directly in --out."""
    if name in FILES or name in DIRS or name == TB_DIR:
        return True
    # shards.atomic.write_atomic's temporaries (.NAME.tmp), and the NAME.tmp of earlier versions of save_sae
    return any(name in (f".{f}.tmp", f"{f}.tmp") for f in (*FILES, STATE))


def train_command(argv: list[str], add: list[str] | None = None, drop: tuple[str, ...] = ()) -> str:
    """``python -m sae.train ARGV`` with flags dropped / added: the exact command a refusal suggests."""
    words = [w for w in argv if w not in drop]
    return shlex.join(["python", "-m", "sae.train", *words, *(add or [])])


def read_train_config(out: Path) -> dict | None:
    """The settings of the sae.train run in ``out``; None when ``out`` holds no readable record."""
    try:
        data = json.loads((out / TRAIN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "lr_resolved" in data else None


def differences(saved: dict, current: dict) -> list[str]:
    keys = [k for k in current if k not in NOT_IDENTITY and not k.endswith("_resolved")]
    return [k for k in keys if saved.get(k) != current[k]]


def checkpoint_dir(out: Path) -> Path | None:
    """The complete checkpoint of ``out``, after finishing a save that a crash interrupted.

    A save writes ``checkpoint.tmp/`` (``state.pt`` last, so its presence means complete), then renames
    ``checkpoint`` -> ``checkpoint.old`` and ``checkpoint.tmp`` -> ``checkpoint``. Killed between the two
    renames, the newest complete copy is ``checkpoint.tmp``, else ``checkpoint.old``.
    """
    d = out / CHECKPOINT
    if (d / STATE).is_file():
        return d
    if d.exists():  # no state.pt inside: not ours to repair
        return None
    for candidate in (out / (CHECKPOINT + ".tmp"), out / (CHECKPOINT + ".old")):
        if (candidate / STATE).is_file():
            os.replace(candidate, d)
            return d
    return None


def remove_tree_of_ours(d: Path) -> None:
    """Remove a checkpoint directory: only the names a save writes; refuse anything else inside."""
    if not d.exists():
        return
    others = [f.name for f in d.iterdir() if f.name not in CHECKPOINT_FILES and not written_by_us(f.name)]
    if others:
        raise ValueError(f"{d} holds files sae.train did not write ({', '.join(sorted(others)[:5])}): move them away")
    shutil.rmtree(d)


def remove_ours(out: Path) -> list[str]:
    """--overwrite: delete what sae.train wrote in ``out``; returns the names of the other files, kept."""
    for name in os.listdir(out):
        if not written_by_us(name):
            continue
        if name in DIRS:
            remove_tree_of_ours(out / name)
        elif name == TB_DIR:  # the replaced run's curves; W&B's own wandb/ (maybe not synced yet) stays
            remove_event_files(out / name)
        else:
            (out / name).unlink()
    return sorted(os.listdir(out))


def _names(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_writable(out: Path) -> None:
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so {out} cannot be created: choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable: choose another --out")


@dataclass
class OutPlan:
    action: Literal["fresh", "resume", "done"]
    """fresh: train from step 0; resume: continue from the checkpoint; done: the same run has finished."""
    overwrite: bool = False
    """Delete what sae.train wrote in --out before starting (the user passed --overwrite)."""
    summary: dict | None = None
    """The finished run's summary (action ``done``)."""
    argv: list[str] | None = None
    """The command line, for the commands later refusals suggest."""

    def command(self, add: list[str], drop: tuple[str, ...] = ("--resume", "--no-resume")) -> str:
        return train_command(self.argv or [], add, drop)


def plan_out(out: Path, current: dict, resume: bool, overwrite: bool, argv: list[str]) -> OutPlan:
    """Decide what to do with ``--out`` (see the module docstring); ValueError for every refusal."""
    plan = _plan_out(out, current, resume, overwrite, argv)
    plan.argv = list(argv)
    return plan


def _plan_out(out: Path, current: dict, resume: bool, overwrite: bool, argv: list[str]) -> OutPlan:
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass only one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory: choose another --out")
    _check_writable(out)
    entries = sorted(os.listdir(out)) if out.is_dir() else []
    if not entries:
        if resume:
            raise ValueError(f"--resume: {out} holds no run to continue; drop --resume to start one there")
        return OutPlan("fresh")
    saved = read_train_config(out)
    if saved is None:
        kind = " (an SAE written by something else)" if CFG in entries else ""
        raise ValueError(
            f"--out {out} already holds {len(entries)} entries that sae.train did not write{kind}: "
            f"{_names(entries)}; nothing there is replaced: choose a new or empty --out"
        )
    if overwrite:
        return OutPlan("fresh", overwrite=True)
    diffs = differences(saved, current)
    finished = (out / SUMMARY).is_file()
    if finished and not diffs:
        return OutPlan("done", summary=_finished_summary(out, argv))
    has_ckpt = checkpoint_dir(out) is not None
    if resume:
        for k in diffs:
            if k in MUST_MATCH_ON_RESUME:
                raise ValueError(f"--resume: {k}={current[k]!r} differs from the run's {saved.get(k)!r} in {out}; "
                                 f"pass the run's own value, or replace the run: "
                                 f"{train_command(argv, ['--overwrite'], ('--resume',))}")
        if not has_ckpt:
            raise ValueError(f"--resume: no checkpoint in {out / CHECKPOINT}; drop --resume to start the run over")
        return OutPlan("resume")
    if not diffs:
        return OutPlan("resume" if has_ckpt else "fresh")
    if not finished and not has_ckpt:
        # An attempt that died (or was refused, e.g. an empty corpus) before its first checkpoint: only its
        # record and a few metrics lines, nothing a new run could lose. Replace them.
        return OutPlan("fresh", overwrite=True)
    state = "a finished" if finished else "an unfinished"
    changed = "; ".join(f"{k}={saved.get(k)!r} there, {current[k]!r} here" for k in diffs)
    plain = ("--resume", "--no-resume", "--overwrite", "--no-overwrite")
    options = []
    if has_ckpt and not set(diffs) & set(MUST_MATCH_ON_RESUME):
        options.append(f"to continue it with these settings: {train_command(argv, ['--resume'], plain)}")
    options.append(
        f"to replace it (only the files sae.train wrote; others stay): {train_command(argv, ['--overwrite'], plain)}"
    )
    raise ValueError(
        f"--out {out} holds {state} sae.train run with other settings ({changed}); "
        + "; ".join(options) + "; or choose another --out"
    )


def _finished_summary(out: Path, argv: list[str]) -> dict:
    """The summary of a finished run, after checking that its SAE is the one the summary describes."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
        fingerprint = load_sae(out).fingerprint()
    except ValueError as e:
        summary, fingerprint = None, f"unreadable ({e})"
    if not isinstance(summary, dict) or summary.get("fingerprint") != fingerprint:
        raise ValueError(
            f"--out {out} holds a finished sae.train run whose SAE ({CFG}, {SAELENS_WEIGHTS}) is missing or no "
            f"longer matches {SUMMARY} (SAE: {fingerprint}); to train it again: "
            f"{train_command(argv, ['--overwrite'], ('--resume', '--no-resume'))}; or choose another --out"
        )
    return summary

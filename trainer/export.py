"""Export a trained student as a Hugging Face model directory (docs/export.md).

    python -m trainer.export --ckpt runs/x/ckpt --out hf/x [--overwrite] [--steer ID=SCALE ...]

NTP and KD students become a standard ``GPT2LMHeadModel``; CoCoMix students carry their own modeling
code (trainer/hf_remote/), loaded with ``trust_remote_code=True``. Pause-token students (``--pause``)
are refused: neither GPT-2 nor that code has a pause path (sample them with trainer.generate). Beside
the weights: the tokenizer the training data was made with (the checkpoint's manifest records it, as for
trainer.generate), a ``generation_config.json`` and a model card (README.md: data manifest, mode, tokens
seen, validation losses). ``--ckpt`` takes a run's ckpt/ directory (its ``latest`` pointer) or a step directory.

The directory is written as ``.NAME.export-tmp`` beside ``--out`` and renamed into place, so ``--out``
is either absent, the previous export or the complete new one. ``--out`` must be absent, empty or an
export of ours (``cocomix_export.json`` lists its files); an export is replaced only with
``--overwrite``, and a directory holding anything else is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from common.cli import Parser, run_cli
from shards.atomic import fsync_path

MARKER = "cocomix_export.json"
"""Names this directory as ours and lists every file the export wrote."""
FORMAT = "cocomix-hf-export"
REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"


def _command(a: argparse.Namespace, *extra: str) -> str:
    steer = "".join(f" --steer {s}" for s in a.steer or [])
    tok = f" --tokenizer {a.tokenizer}" if a.tokenizer else ""
    return f"python -m trainer.export --ckpt {a.ckpt} --out {a.out}{tok}{steer}" + "".join(f" {e}" for e in extra)


def check_out(out: Path, overwrite: bool, a: argparse.Namespace) -> None:
    """``--out`` is absent, empty, or an export of ours (replaced only with --overwrite)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory: choose another --out")
    parent = out.absolute().parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"--out {str(out)!r} cannot be written: {str(p)!r} is not a writable directory")
            break
    if not out.is_dir():
        return
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    listed = _read_marker(out)
    if listed is None:
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise ValueError(f"--out {str(out)!r} holds files this export did not write ({shown}): nothing was changed; "
                         "choose another --out")
    foreign = [e for e in entries if e not in listed and e != MARKER]
    if foreign:
        raise ValueError(f"--out {str(out)!r} holds an export plus files it did not write ({', '.join(foreign)}): "
                         "move them away or choose another --out; nothing was changed")
    if not overwrite:
        raise ValueError(f"--out {str(out)!r} already holds an export; to replace it run: {_command(a, '--overwrite')}")


def _read_marker(out: Path) -> set[str] | None:
    try:
        m = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), list):
        return None
    return {str(f) for f in m["files"]}


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; a previous export is renamed away first, then removed."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        old = out.parent / f".{out.name}.export-old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent)


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 saves ``tokenizer_class: TokenizersBackend``, a name transformers 4 cannot resolve,
    and the load-time flags ``is_local`` / ``local_files_only``; ``PreTrainedTokenizerFast`` (the same
    tokenizer.json-backed class in both) and no flags load everywhere."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_export(tmp: Path, step_dir: Path, cfg: dict[str, Any], model, tok, steer: dict[int, float]) -> dict:
    """Write every file of the export into ``tmp``; returns the marker's content."""
    from safetensors.torch import save_file

    from trainer import hf_card, hf_convert

    eos = (cfg.get("tokenizer") or {}).get("eos_id")
    eos = eos if isinstance(eos, int) else tok.eos_token_id
    if model.concept is None:
        tensors, config = hf_convert.gpt2_state_dict(model), hf_convert.gpt2_config(model, eos)
    else:
        tensors, config = hf_convert.cocomix_state_dict(model), hf_convert.cocomix_config(model, eos, steer)
        for f in hf_convert.REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / f, tmp / f)
    arch = config["architectures"][0]
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(hf_convert.generation_config(eos), indent=2) + "\n")
    tok.save_pretrained(str(tmp))
    _portable_tokenizer_config(tmp / "tokenizer_config.json")
    card = hf_card.model_card(step_dir, cfg, arch, model.num_params(), steer)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    files = sorted(p.name for p in tmp.iterdir())
    marker = {"format": FORMAT, "version": 1, "architecture": arch, "mode": (cfg.get("train") or {}).get("mode"),
              "checkpoint": str(step_dir), "step": cfg.get("step"), "files": files}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    mode = 0o666 & ~_umask()  # safetensors writes 0600; an export is meant to be shared like any file
    for p in tmp.iterdir():
        if p.is_file():
            os.chmod(p, mode)
            fsync_path(p)
    return marker


def main(argv: list[str] | None = None) -> dict:
    p = Parser(prog="python -m trainer.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint: a run's OUT/ckpt directory or one of its step-N dirs")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out (only ours)")
    p.add_argument("--steer", action="append", metavar="ID=SCALE",
                   help="CoCoMix only: store concept steering in config.json (applied by every forward); repeatable")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer recorded in the checkpoint")
    a = p.parse_args(argv)

    from trainer import checkpoint
    from trainer.generate import load_tokenizer, parse_steer

    parse_steer(a.steer)  # the form ID=SCALE, before anything is read
    out = Path(a.out)
    check_out(out, a.overwrite, a)
    step_dir = checkpoint.resolve(a.ckpt, checkpoint.MODEL_FILES)
    cfg = checkpoint.read_config(step_dir, checkpoint.MODEL_FILES)
    if cfg["model"].get("pause_layer") is not None:
        raise ValueError(f"--ckpt {a.ckpt} is a pause-token student (--pause, pauses from block "
                         f"{cfg['model']['pause_layer']}): pause models are not exportable to the Hugging Face format "
                         f"(GPT-2 and the CoCoMix remote code have no pause path); sample it with "
                         f"python -m trainer.generate --ckpt {a.ckpt}")
    concept = cfg["model"].get("concept")
    if a.steer and not concept:
        raise ValueError(f"--steer needs a CoCoMix checkpoint; {a.ckpt} has no concept block "
                         f"(mode {(cfg.get('train') or {}).get('mode', '?')})")
    steer = parse_steer(a.steer, concept["n_concepts"] if concept else None)
    try:
        tok = load_tokenizer(cfg.get("tokenizer") or {}, a.tokenizer)
    except ValueError as e:
        raise ValueError(f"--tokenizer {a.tokenizer}: {e}" if a.tokenizer else str(e)) from e
    model, cfg = checkpoint.load_model_from(step_dir)
    model.eval()

    tmp = out.absolute().parent / f".{out.name}.export-tmp"
    if tmp.exists():  # left by an export that died before its rename: ours by its name
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        marker = write_export(tmp, step_dir, cfg, model, tok, steer)
        check_out(out, a.overwrite, a)  # nothing appeared meanwhile
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trust = " (load with trust_remote_code=True)" if marker["architecture"] != "GPT2LMHeadModel" else ""
    print(f"exported {step_dir} ({marker['mode']}, step {marker['step']}) as {marker['architecture']} "
          f"to {out}{trust}", file=sys.stderr)
    return marker


def cli(argv: list[str] | None = None) -> int:
    """``python -m trainer.export``: 0, or 2 with one ``error:`` line naming the flag or file."""
    return run_cli(main, argv, interrupted="interrupted: --out was not changed; rerun the same command")


if __name__ == "__main__":
    sys.exit(cli())

"""The model card (README.md) of an exported student: what it was trained on and how far (docs/export.md).

Everything comes from the checkpoint's config.json, its state.pt (tokens seen) and the run's
metrics.jsonl beside ckpt/ (validation losses), so the same checkpoint always gives the same card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_VAL_KEYS = ("val_loss", "val_ppl", "val_concept_loss", "val_kd_loss", "val_concept_recall",
             "val_concept_recall_prior")


def tokens_seen(step_dir: Path, cfg: dict[str, Any]) -> int | None:
    """Tokens trained on up to this checkpoint: state.pt's count (memory-mapped, tensors not read),
    else step x tokens per step from the run record; None when neither is there."""
    state = step_dir / "state.pt"
    if state.is_file():
        try:
            s = torch.load(state, map_location="cpu", weights_only=True, mmap=True)
            return int(s["tokens"])
        except Exception:  # an older or foreign state.pt: fall back to the config
            pass
    train, step, seq = cfg.get("train") or {}, cfg.get("step"), cfg.get("seq_len")
    try:
        return int(step) * int(train["micro_batch"]) * int(train["grad_accum"]) * int(cfg["world_size"]) * int(seq)
    except (KeyError, TypeError, ValueError):
        return None


def validation_rows(step_dir: Path, step: int | None) -> list[dict[str, Any]]:
    """The run's evaluations up to this checkpoint's step, from OUT/metrics.jsonl (OUT/ckpt/step-N)."""
    metrics = step_dir.parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the trainer rewrites it on resume
        if isinstance(r, dict) and "val_loss" in r and (step is None or r.get("step", 0) <= step):
            rows.append({"step": r.get("step"), **{k: r[k] for k in _VAL_KEYS if k in r}})
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(step_dir: Path, cfg: dict[str, Any], architecture: str, params: int, steer: dict[int, float]) -> str:
    train = cfg.get("train") or {}
    mode = train.get("mode", "?")
    tok = cfg.get("tokenizer") or {}
    step = cfg.get("step")
    tokens = tokens_seen(step_dir, cfg)
    rows = validation_rows(step_dir, step if isinstance(step, int) else None)
    remote = architecture != "GPT2LMHeadModel"
    trust = ", trust_remote_code=True" if remote else ""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cocomix, " + ("concept-mixing" if remote else "gpt2") + "]",
        "---",
        "",
        f"# CoCoMix project student ({mode})",
        "",
        f"A `{architecture}` exported by `python -m trainer.export` from the trainer checkpoint "
        f"`{step_dir}`.",
        "",
        "| | |",
        "|---|---|",
        f"| mode | {mode} |",
        f"| data manifest | `{cfg.get('manifest', '?')}` |",
        f"| tokenizer | `{tok.get('name', '?')}` ({tok.get('fingerprint', '?')}) |",
        f"| step | {step} of {cfg.get('total_steps', '?')} |",
        f"| tokens seen | {tokens if tokens is not None else 'unknown'} |",
        f"| parameters (without positions) | {params} |",
        f"| context (positions) | {cfg['model']['block_size']} |",
    ]
    if remote:
        c = cfg["model"]["concept"]
        lines.append(f"| concept block | C={c['n_concepts']}, k={c['topk']}, after block {c['insert_layer']}, "
                     f"mix={c['mix']} |")
        lines.append(f"| steering (config.json `steer`) | {json.dumps({str(k): v for k, v in steer.items()})} |")
    lines += ["", "## Validation losses", ""]
    if rows:
        keys = [k for k in _VAL_KEYS if any(k in r for r in rows)]
        lines += ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in ("step", *keys)) + " |" for r in rows]
    else:
        lines.append("Not recorded (no metrics.jsonl with validation rows beside the checkpoint).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(DIR{trust})",
        f"tok = AutoTokenizer.from_pretrained(DIR{trust})  # transformers reads config.json first",
        "```",
        "",
        f"lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=DIR{trust.replace(' ', '')} "
        "--tasks lambada_openai,wikitext,hellaswag,piqa,siqa,arc_easy,winogrande`",
    ]
    if remote:
        lines += [
            "",
            "Steering (docs/method.md section 2.6 of the project): `steer` in config.json, {\"CONCEPT_ID\": SCALE},",
            "multiplies that concept's predicted logit before TopK in every forward call; "
            "`model.generate(..., steer={ID: SCALE})`",
            "overrides it and, like `python -m trainer.generate --steer`, steers from the last prompt position on.",
            "The outputs carry `concept_logits` and `concept_ids`.",
        ]
    return "\n".join(lines) + "\n"

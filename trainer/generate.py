"""Sample from a trained student, optionally steering its concepts.

    python -m trainer.generate --ckpt runs/x/ckpt --prompt "The meaning of" --steer 123=5 --show-concepts 5

Steering multiplies the predicted logit z_t[ID] by SCALE before TopK (docs/method.md 2.6)
at every position that produces a generated token: the last prompt position and every generated
one. The KV cache holds one entry per token in the blocks before L_ins and two (token slot, concept
slot) after it, so each new token costs one position below L_ins and two above; a pause-token student
(--pause) caches the same way, with its pause slot in place of the concept slot.

Only the tokenizer is loaded for decoding: its name (alias, directory, hub id or .gguf) comes from
the manifest recorded in the checkpoint, and its fingerprint is checked against the recorded one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, NamedTuple

import torch

from common.cli import Parser, run_cli
from common.device import check_device
from trainer.checkpoint import load_model_from
from trainer.model import GPT, KVCache


class Generation(NamedTuple):
    tokens: list[int]
    """The generated token ids (prompt excluded)."""
    concepts: list[list[int]]
    """Per generated token, the top predicted concept ids at the position that produced it."""
    logits: list[torch.Tensor]
    """Per generated token, the next-token logits (V,) it was sampled from."""


def parse_steer(items: list[str] | None, n_concepts: int | None = None) -> dict[int, float]:
    """``["12=5", "40=-2.5"]`` -> {12: 5.0, 40: -2.5}; ids must be in [0, n_concepts) when given."""
    out: dict[int, float] = {}
    for it in items or []:
        try:
            cid, scale = it.split("=")
            cid_i, scale_f = int(cid), float(scale)
        except ValueError as e:
            raise ValueError(f"--steer expects ID=SCALE (e.g. 123=5), got {it!r}") from e
        if not math.isfinite(scale_f):
            raise ValueError(f"--steer {it}: the scale must be a finite number")
        if cid_i < 0 or (n_concepts is not None and cid_i >= n_concepts):
            bound = f"[0, {n_concepts})" if n_concepts is not None else ">= 0"
            raise ValueError(f"--steer {it}: concept id {cid_i} is outside {bound}, the checkpoint's concepts")
        out[cid_i] = scale_f
    return out


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    steer: dict[int, float] | None = None,
    show_concepts: int = 0,
    use_cache: bool = True,
    eos_id: int | None = None,
    seed: int = 0,
) -> Generation:
    """Greedy when ``temperature`` is 0, else sampling (top-k if ``top_k`` > 0) from ``seed``."""
    if not prompt:
        raise ValueError("the prompt is empty: generation needs at least one token")
    if steer and model.concept is None:
        raise ValueError("--steer needs a CoCoMix checkpoint; this model has no concept block")
    if len(prompt) + max_new_tokens > model.cfg.block_size:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's block_size "
            f"{model.cfg.block_size}"
        )
    model.eval()
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    seq = torch.tensor([prompt], dtype=torch.long, device=dev)  # (1, T0)
    cache = KVCache(model.cfg.n_layer) if use_cache else None
    out_tok, out_c, out_logits = [], [], []
    step_in = seq
    for _ in range(max_new_tokens):
        if cache is not None:
            # First call: the whole prompt, steered from its last position; then one token at a time.
            steer_from = seq.shape[1] - 1 if cache.n_tokens == 0 else 0
            o = model(step_in, cache=cache, steer=steer, steer_from=steer_from)
        else:
            o = model(seq, steer=steer, steer_from=len(prompt) - 1)
        logits = o.logits[0, -1].float()  # (V,)
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            scaled = logits / temperature
            if top_k > 0:
                kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, -float("inf"))
            nxt = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen))
        out_tok.append(nxt)
        out_logits.append(logits)
        if show_concepts and o.concept_logits is not None:
            out_c.append(torch.topk(o.concept_logits[0, -1], show_concepts).indices.tolist())
        if eos_id is not None and nxt == eos_id:
            break
        step_in = torch.tensor([[nxt]], dtype=torch.long, device=dev)
        seq = torch.cat([seq, step_in], dim=1)
    return Generation(out_tok, out_c, out_logits)


def load_tokenizer(info: dict[str, Any], override: str | None = None):
    """The tokenizer the training data was made with, and only that (no model weights)."""
    from transformers import AutoTokenizer

    # Lazy: common.teacher has no heavy imports, but training never needs it.
    from common.teacher import resolve_teacher, tokenizer_fingerprint

    name = override or info.get("name")
    if not name or name == "synthetic":
        raise ValueError(f"the checkpoint's data has no loadable tokenizer (name {name!r}): pass --tokenizer")
    src = resolve_teacher(name)
    gguf = src.gguf_file or (None if override else info.get("gguf_file"))
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kw)
    except OSError as e:
        raise ValueError(f"could not load tokenizer {name!r}: {e}") from e
    want = info.get("fingerprint")
    if not override and isinstance(want, str) and want.startswith("sha256:"):
        got = tokenizer_fingerprint(tok)
        if got != want:
            raise ValueError(f"tokenizer {name!r} has fingerprint {got}, the training data was made with {want}")
    return tok


def main(argv: list[str] | None = None) -> Generation:
    p = Parser(
        prog="python -m trainer.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="checkpoint directory (OUT_DIR/ckpt of a run)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--steer",
        action="append",
        metavar="ID=SCALE",
        help="multiply concept ID's predicted logit by SCALE (paper: [-10, 10]); repeatable",
    )
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--show-concepts",
        type=int,
        nargs="?",
        const=5,
        default=0,
        metavar="N",
        help="print the top N predicted concept ids per generated token (default N=5)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence every token (for checking the cache)"
    )
    p.add_argument("--tokenizer", default=None, help="override the tokenizer recorded in the checkpoint")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the EOS token")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    check_args(a)
    model, cfg = load_model_from(a.ckpt, a.device)
    if a.steer and model.concept is None:
        raise ValueError(
            f"--steer needs a CoCoMix checkpoint; {a.ckpt} has no concept block "
            f"(mode {cfg.get('train', {}).get('mode', '?')})"
        )
    steer = parse_steer(a.steer, model.cfg.concept.n_concepts if model.cfg.concept else None)
    if a.max_new_tokens >= model.cfg.block_size:
        raise ValueError(
            f"--max-new-tokens {a.max_new_tokens} leaves no room for the prompt in the model's block_size "
            f"{model.cfg.block_size}"
        )
    info = cfg.get("tokenizer") or {}
    tok = load_tokenizer(info, a.tokenizer)
    prompt = tok.encode(a.prompt, add_special_tokens=False)
    if not prompt:
        raise ValueError("--prompt encodes to no tokens: give some text")
    eos = None if a.ignore_eos else info.get("eos_id")
    g = generate(
        model, prompt, a.max_new_tokens, a.temperature, a.top_k, steer, a.show_concepts, not a.no_cache, eos, a.seed
    )
    print(tok.decode(prompt + g.tokens))
    if a.show_concepts:
        for t, cs in zip(g.tokens, g.concepts, strict=False):
            print(json.dumps({"token": t, "text": tok.decode([t]), "concepts": cs}), file=sys.stdout)
    return g


def check_args(a: argparse.Namespace) -> None:
    """Every option's range, before the checkpoint is loaded (cheap mistakes first)."""
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {a.temperature}")
    if a.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = all tokens), got {a.top_k}")
    if a.show_concepts < 0:
        raise ValueError(f"--show-concepts must be >= 0, got {a.show_concepts}")
    parse_steer(a.steer)  # the form ID=SCALE; the id range is checked against the checkpoint
    check_device(a.device)


def cli(argv: list[str] | None = None) -> int:
    """``python -m trainer.generate``: 0, or 2 with one ``error:`` line naming the flag or file."""
    return run_cli(main, argv, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(cli())

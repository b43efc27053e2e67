"""Quality of an SAE on a teacher: FVU, L0, dead / dense latents, and loss recovered.

    python -m sae.eval --sae DIR --teacher smollm2-135m --tokens TOKDIR [--split val]
    python -m sae.eval --sae DIR --teacher smollm2-135m --corpus owt_valid.txt

Per batch of windows, one teacher forward over three copies of the batch: clean, with the SAE's
reconstruction spliced in at the hook, and with the hook tensor zeroed. The next-token losses give

    loss recovered = (L_zero - L_sae) / (L_zero - L_clean)

(the standard metric of e.g. SAELens and Gao et al. 2024 §4.1 "downstream loss"). FVU is measured in
the teacher's raw activation space: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens
(``fvu``), and in the SAE's normalised input space (``fvu_normalized``, what training minimises).
A latent is dead if it never fires on the evaluated tokens, dense if it fires on more than
``dense_threshold`` of them (10%, as in Gao et al. 2024 §A.2 / Rajamanoharan et al.).

Everything is checked before the teacher runs (``sae.checks``): the SAE files, its fit to the teacher,
the layer, the data, where the result goes. A mistake prints one line ``error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import Parser, run_cli
from common.device import check_device
from sae.checks import (
    check_sae_fits,
    check_window,
    check_window_source,
    check_writable_file,
    teacher_shape,
)
from sae.data import iter_windows, window_source
from sae.formats import load_sae
from sae.hooks import HookSpec, capture_residual, check_sae_matches_model, resolve_layer
from shards.atomic import write_atomic


@dataclass
class EvalConfig:
    sae: str = ""
    """SAE path (any supported format)."""
    teacher: str = ""
    """Teacher the SAE reads (alias, hub id, directory, .gguf)."""
    tokens: str | None = None
    """Stage-1 token shard directory; or use --corpus."""
    split: str = "val"
    """Split of --tokens to evaluate on."""
    corpus: list[str] = field(default_factory=list)
    """Text corpus (documents separated by <|endoftext|> lines)."""
    seq_len: int = 256
    """Window length for --corpus."""
    max_tokens: int = 16384
    """Tokens to evaluate."""
    batch_windows: int = 4
    """Windows per forward (each forward runs 3 copies)."""
    layer: int | None = None
    """Override the SAE's hook layer (needed for files that do not record it); -1 is the last block, as in
    Python, recorded as the non-negative index."""
    dense_threshold: float = 0.1
    """Firing rate above which a latent counts as dense."""
    device: str = "cpu"
    """cpu, cuda ..."""
    out: str | None = None
    """Write the metrics JSON here (default: <sae>/eval.json when the SAE is a directory)."""

    def __post_init__(self) -> None:
        errors = []
        if not self.sae or not self.teacher:
            errors.append("--sae and --teacher are required")
        if bool(self.tokens) == bool(self.corpus):
            errors.append("give exactly one of --tokens or --corpus")
        if self.max_tokens < 1 or self.batch_windows < 1:
            errors.append("--max-tokens and --batch-windows must be >= 1")
        if self.seq_len < 2:
            errors.append(f"--seq-len={self.seq_len} must be >= 2 (the loss needs a next token)")
        if not (math.isfinite(self.dense_threshold) and 0 <= self.dense_threshold < 1):
            errors.append(f"--dense-threshold={self.dense_threshold} must be in [0, 1)")
        if errors:
            raise ValueError("invalid eval config: " + "; ".join(errors))


def _splicer(sae, B: int, stats: dict):
    """Hook edit for a (3B, T, D) batch: rows [0, B) clean, [B, 2B) the SAE's reconstruction of the
    clean rows, [2B, 3B) zero-ablated. Keeps the clean activations and the code in ``stats``."""

    def splice(x: torch.Tensor) -> torch.Tensor:
        clean = x[:B]
        flat = clean.reshape(-1, clean.shape[-1]).float()  # (B*T, D)
        out = sae(flat)
        stats["x"], stats["x_hat"], stats["ids"], stats["vals"] = flat, out.x_hat, out.ids, out.vals
        stats["x_n"], stats["x_hat_n"] = out.x_n, out.x_hat_n
        x_hat = out.x_hat.to(x.dtype).reshape(clean.shape)
        return torch.cat([clean, x_hat, torch.zeros_like(clean)], dim=0)

    return splice


def is_eval_result(path: Path) -> bool:
    """Whether ``path`` is a result this command wrote (so replacing it loses nothing of the user's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"sae_fingerprint", "loss_recovered", "config"} <= set(data)


def default_out(cfg: EvalConfig) -> str | None:
    return cfg.out or (str(Path(cfg.sae) / "eval.json") if Path(cfg.sae).is_dir() else None)


def prepare(cfg: EvalConfig):
    """Every check before the teacher runs; returns (cfg with the layer resolved, SAE, teacher or None)."""
    check_device(cfg.device)
    out = default_out(cfg)
    if out:
        check_writable_file(Path(out), "--out" if cfg.out else f"--out (default {out})", is_eval_result)
    sae = load_sae(cfg.sae, device=cfg.device)
    window = check_window_source(cfg.tokens, cfg.split, cfg.corpus, cfg.seq_len)
    shape, model = teacher_shape(cfg.teacher, cfg.device)  # model: a GGUF teacher, loaded to learn its shape
    if cfg.layer is not None:
        cfg = dataclasses.replace(cfg, layer=resolve_layer(cfg.layer, shape.n_blocks))
        sae.hook = HookSpec(cfg.layer, sae.hook.location)
    elif sae.hook.layer is None:
        raise ValueError(f"--sae {cfg.sae}: the file does not record which layer it reads: pass --layer")
    else:
        resolve_layer(sae.hook.layer, shape.n_blocks, flag=f"--sae {cfg.sae}: hook layer",
                      hint="the SAE was trained on another teacher; pass its own --teacher, or --layer")
    check_sae_fits(sae, shape, f"--sae {cfg.sae}")
    check_window(window, shape, "--seq-len" if not cfg.tokens else f"--tokens {cfg.tokens}: window length")
    return cfg, sae, model


@torch.no_grad()
def evaluate(cfg: EvalConfig, sae=None, model=None) -> dict:
    """The metrics of ``cfg.sae`` (or ``sae``) on ``cfg.teacher`` (or ``model``)."""
    from tqdm import tqdm

    from common.teacher import load_teacher

    if sae is None:
        sae = load_sae(cfg.sae, device=cfg.device)
        if cfg.layer is not None:
            sae.hook = HookSpec(cfg.layer, sae.hook.location)
    if model is None:
        model = load_teacher(cfg.teacher, cfg.device)
    check_sae_matches_model(sae, model, source=cfg.sae)
    windows = iter_windows(window_source(cfg.tokens, cfg.split, cfg.corpus, cfg.teacher, cfg.seq_len), loop=False)

    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_pred = 0
    sq_err = 0.0
    x_sum = None
    x_sq = 0.0
    sq_err_n, xn_sum, xn_sq = 0.0, None, 0.0
    n_tok = 0
    l0_sum = 0
    fire_count = torch.zeros(sae.n_latents, dtype=torch.long, device=cfg.device)
    def next_batch() -> list[np.ndarray]:
        return [w for _, w in zip(range(cfg.batch_windows), windows, strict=False)]

    batch = next_batch()  # before the progress bar: an empty source is an error line of its own
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc="sae.eval")
    try:  # the bar ends its line before any error message
        while n_tok < cfg.max_tokens and batch:
            ids = torch.from_numpy(np.stack(batch)).to(cfg.device)  # (B, T)
            B = ids.shape[0]
            stats: dict[str, torch.Tensor] = {}
            with capture_residual(model, sae.hook, edit=_splicer(sae, B, stats)):
                logits = model(ids.repeat(3, 1), use_cache=False).logits  # (3B, T, V)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids.repeat(3, 1)[:, 1:].flatten(),
                                  reduction="none")
            nll = nll.view(3, -1)  # (3, B*(T-1))
            for i, key in enumerate(("clean", "sae", "zero")):
                sums[key] += nll[i].sum().item()
            n_pred += nll.shape[1]
            x, x_hat = stats["x"], stats["x_hat"]
            sq_err += (x - x_hat).pow(2).sum().item()
            x_sum = x.double().sum(0) if x_sum is None else x_sum + x.double().sum(0)
            x_sq += x.pow(2).double().sum().item()
            xn, xn_hat = stats["x_n"], stats["x_hat_n"]
            sq_err_n += (xn - xn_hat).pow(2).sum().item()
            xn_sum = xn.double().sum(0) if xn_sum is None else xn_sum + xn.double().sum(0)
            xn_sq += xn.pow(2).double().sum().item()
            active = stats["vals"] > 0
            l0_sum += int(active.sum())
            fire_count += torch.bincount(stats["ids"][active], minlength=sae.n_latents)
            n_tok += len(x)
            bar.update(len(x))
            if n_tok < cfg.max_tokens:
                batch = next_batch()
    finally:
        bar.close()
    if n_tok == 0:
        raise ValueError("no evaluation windows: the token source is empty")
    total_var = x_sq - (x_sum.pow(2).sum().item() / n_tok)  # sum ||x - mean||^2
    loss = {k: v / n_pred for k, v in sums.items()}
    rate = fire_count.float() / n_tok
    result = {
        "sae": cfg.sae,
        "sae_fingerprint": sae.fingerprint(),
        "teacher": cfg.teacher,
        "hook": sae.hook.to_dict(),
        "tokens": n_tok,
        "fvu": sq_err / max(total_var, 1e-12),
        # in the SAE's normalised input space (what training minimises; equals fvu without normalisation)
        "fvu_normalized": sq_err_n / max(xn_sq - xn_sum.pow(2).sum().item() / n_tok, 1e-12),
        "l0": l0_sum / n_tok,
        "dead_fraction": float((fire_count == 0).float().mean()),
        "dense_fraction": float((rate > cfg.dense_threshold).float().mean()),
        "loss_clean": loss["clean"],
        "loss_sae": loss["sae"],
        "loss_zero_ablation": loss["zero"],
        # undefined when zero-ablating the hook does not change the loss (e.g. a random teacher)
        "loss_recovered": (loss["zero"] - loss["sae"]) / (loss["zero"] - loss["clean"])
        if loss["zero"] != loss["clean"] else float("nan"),
        "config": asdict(cfg),
    }
    return result


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sae.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", required=True, help="SAE path (any supported format)")
    p.add_argument("--teacher", required=True, help="teacher alias, hub id, directory or .gguf")
    p.add_argument("--tokens", default=None, help="stage-1 token shard directory")
    p.add_argument("--split", default="val", help="split of --tokens (default: val)")
    p.add_argument("--corpus", nargs="+", default=[], help="text corpus instead of --tokens")
    p.add_argument("--seq-len", type=int, default=256, help="window length for --corpus (default: 256)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens to evaluate (default: 16384)")
    p.add_argument("--batch-windows", type=int, default=4, help="windows per forward (default: 4)")
    p.add_argument("--layer", type=int, default=None,
                   help="override the SAE's hook layer: 0-based, -1 = the last block (as in Python), "
                        "recorded non-negative")
    p.add_argument("--dense-threshold", type=float, default=0.1, help="firing rate counted as dense (default: 0.1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="metrics JSON path (default: <sae>/eval.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """The command; ValueError / OSError for user mistakes (``cli`` prints them as ``error: ...``)."""
    cfg = EvalConfig(**vars(build_parser().parse_args(argv)))
    cfg, sae, model = prepare(cfg)
    result = evaluate(cfg, sae, model)
    out = default_out(cfg)
    if out:
        write_atomic(out, json.dumps(result, indent=2).encode())
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())

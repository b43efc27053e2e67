"""The teacher runner: one teacher + one SAE, loaded once, turning batches of token windows into
per-token concept records (docs/data.md, the concept records).

Per batch of B windows of T+1 tokens:
1. teacher forward on the T input tokens; the output of block L (the residual stream the SAE reads)
   is swapped for a detached copy that requires grad, so autograd records only the blocks above
   the hook and the head: no graph below the hook, no parameter gradients;
2. the head runs one window at a time: log-probs, the per-token NLL, the optional KD top-k, and
   dNLL/dhidden, so the (B, T, V) logits never exist at once;
3. one backward from the final hidden state to the hook gives g = dL/dx, L the window's SUMMED
   next-token loss (windows are independent, so the batch's summed loss has the same g per window,
   and the scores do not depend on the batch size; docs/method.md);
4. the SAE encodes x (sparse top-k), attribution.py scores and ranks the latents.

The last position. A window holds T+1 tokens and positions 0..T-1 are inputs, each with a target
(the next token), so every labelled position has a gradient: position t's g holds its own loss and
the losses of t+1..T-1 that it influences; position T-1's only its own. Token T is only a target and
has no record. This is the reference code's "last position without a next token", excluded by
construction (docs/data.md: windows of seq_len + 1 tokens, positions 0..seq_len-1 carry labels).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common.device import resolve_device
from common.teacher import load_teacher
from pipeline.attribution import VARIANTS, Variant, attribution_labels, dense_code_labels
from sae import HookSpec, load_sae, n_layers, resolve_block
from sae.hooks import capture_residual, resolve_layer
from shards import FieldSpec, Manifest, id_dtype, open_shard
from shards.fields import as_float32

FLOAT16_MAX = 65504.0
PRECISIONS = ("float32", "bfloat16", "bf16-above-hook")
# Agreement with float32 labels, measured on an H200 (bench/extract.py --check-bf16: SmolLM2-135M,
# layer 9, a 4608-latent TopK SAE, 64 windows x 1024 tokens of OpenWebText):
#   bfloat16 (autocast everywhere):  top-1 94.3%, K_attr=4 set 80.6%, SAE top-32 set 63.8%; 4.1x the fp32 speed
#   bf16-above-hook (fp32 below):    top-1 97.0%, K_attr=4 set 90.4%, SAE top-32 set 100%;  2.7x the fp32 speed
# One token in ten (or five) getting other labels is beyond what we accept silently, so ``auto`` is
# float32 on GPU too; the bf16 modes are opt-in and recorded in the manifest (settings.precision).


def resolve_precision(dtype: str, device: torch.device) -> str:
    """``auto`` -> float32 on every device (see the measurements above); else ``dtype`` itself."""
    return "float32" if dtype == "auto" else dtype


@dataclass
class RunnerConfig:
    """What a runner loads and computes."""

    teacher: str
    """Teacher: HF hub id, local model directory, .gguf file, or smollm2-135m."""
    sae: str
    """SAE directory or file (OpenAI .pt, SAELens, sparsify, or ours from sae.train)."""
    sae_format: Literal["openai", "saelens", "sparsify", "cocomix"] | None = None
    """SAE format (default: detected)."""
    layer: int | None = None
    """Teacher block whose output the SAE reads, 0-based; -1 is the last block, -2 the one before (recorded
    as the non-negative index) (default: the SAE's metadata)."""
    attribution: Variant = "act_x_grad"
    """act_x_grad (reference code), preact_x_grad (paper Eq. 1, dense), activation (ablation)."""
    k_attr: int = 4
    """Concept labels per token (paper: 4)."""
    k_mix: int = 32
    """SAE top-k code stored as mixing targets (0 = not stored)."""
    k_kd: int = 0
    """Teacher top-k next-token log-probs stored for the KD baseline (0 = not stored)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    dtype: Literal["auto", "float32", "bfloat16", "bf16-above-hook"] = "auto"
    """auto = float32 (exact); bfloat16 / bf16-above-hook are faster on GPU but change 20% / 10% of label sets
    (bfloat16: autocast everywhere; bf16-above-hook: fp32 up to the hook, bf16 above it and in the backward)."""
    score_dtype: Literal["float16", "bfloat16"] = "float16"
    """Storage dtype of concept_scores."""

    def __post_init__(self) -> None:
        if self.attribution not in VARIANTS:
            raise ValueError(f"--attribution {self.attribution!r}: choose one of {', '.join(VARIANTS)}")
        for name in ("k_attr", "k_mix", "k_kd"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.k_attr < 1:
            raise ValueError("--k-attr must be >= 1 (paper: 4)")
        if self.dtype not in ("auto", *PRECISIONS):
            raise ValueError(f"--dtype {self.dtype!r}: choose auto, {', '.join(PRECISIONS)}")
        if self.score_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"--score-dtype {self.score_dtype!r}: choose float16 or bfloat16")


def record_fields(seq_len: int, n_latents: int, cfg: RunnerConfig) -> dict[str, FieldSpec]:
    """The per-window concept records (docs/data.md), in the order they are stored."""
    T, ids = seq_len, id_dtype(n_latents)
    fields = {
        "concept_ids": FieldSpec(ids, (T, cfg.k_attr)),
        "concept_scores": FieldSpec(cfg.score_dtype, (T, cfg.k_attr)),
    }
    if cfg.k_mix:
        fields["mix_ids"] = FieldSpec(ids, (T, cfg.k_mix))
        fields["mix_vals"] = FieldSpec("float16", (T, cfg.k_mix))
    if cfg.k_kd:
        fields["kd_ids"] = FieldSpec("int32", (T, cfg.k_kd))
        fields["kd_logprobs"] = FieldSpec("float16", (T, cfg.k_kd))
    fields["teacher_nll"] = FieldSpec("float16", (T,))
    return fields


def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as a numpy array of a storage dtype; bfloat16 is kept as its raw uint16 bits (numpy
    has no bfloat16). Finite values are clamped to the float16 range, so a large score saturates
    instead of turning into an inf that would read as a missing label."""
    t = t.detach()
    if dtype in ("float16", "bfloat16"):
        t = t.float()
        if dtype == "float16":
            t = torch.where(torch.isfinite(t), t.clamp(-FLOAT16_MAX, FLOAT16_MAX), t)
        t = t.to(getattr(torch, dtype))
        if dtype == "bfloat16":
            return t.view(torch.int16).cpu().numpy().view(np.uint16)
        return t.cpu().numpy()
    return t.cpu().numpy().astype(dtype)


@dataclass
class BatchStats:
    """Label statistics, summed over batches (shard and run totals are sums of these)."""

    tokens: int = 0
    """Labelled positions."""
    short: int = 0
    """Positions with fewer than K_attr positive scores."""
    valid_labels: int = 0
    """Label slots holding a real latent (score != -inf)."""
    nll_sum: float = 0.0
    """Sum of the teacher's per-token NLL (nats)."""

    def add(self, other: BatchStats) -> None:
        self.tokens += other.tokens
        self.short += other.short
        self.valid_labels += other.valid_labels
        self.nll_sum += other.nll_sum

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "short": self.short, "valid_labels": self.valid_labels,
                "nll_sum": round(self.nll_sum, 4)}


def label_stats(m: Manifest) -> dict:
    """Label statistics of a whole concept dataset, read back from its shards (the manifest's
    ``stats.labels``): computed from the bytes, not summed from the workers' BatchStats, so a resumed
    run reports exactly what an uninterrupted one does."""
    counts = np.zeros(m.sae["n_latents"], dtype=np.int64)
    tokens = short = valid = 0
    nll = 0.0
    spec = {k: m.fields[k] for k in ("concept_ids", "concept_scores", "teacher_nll")}
    for split in m.splits.values():
        for sh in split.shards:
            part = sh.parts["concepts"]
            r = open_shard(part.path, part.format, spec)
            a = r.arrays()
            scores = as_float32(a["concept_scores"], spec["concept_scores"].dtype)  # (n, T, K)
            ok = scores != -np.inf
            counts += np.bincount(a["concept_ids"][ok].astype(np.int64), minlength=len(counts))
            tokens += scores.shape[0] * scores.shape[1]
            short += int((~(scores > 0)).any(-1).sum())
            valid += int(ok.sum())
            nll += float(a["teacher_nll"].astype(np.float64).sum())
            r.close()
    p = counts[counts > 0] / max(1, counts.sum())
    return {
        "tokens": tokens,
        "tokens_short": short,
        "frac_short": round(short / max(1, tokens), 6),
        "mean_valid_labels": round(valid / max(1, tokens), 4),
        "teacher_mean_nll": round(nll / max(1, tokens), 4),
        "latents_used": int((counts > 0).sum()),
        "label_entropy_bits": round(float(-(p * np.log2(p)).sum()), 4),
    }


def check_compatible(sae, cfg: RunnerConfig, n_blocks: int, width: int) -> int:
    """ValueError for every way this SAE cannot serve this teacher; returns the 0-based hook layer.

    Runs on the driver before any heavy work (from the teacher's config) and again in each worker.
    """
    location = sae.hook.location
    if location != "resid_post":
        raise ValueError(
            f"the SAE reads {location!r}; extraction differentiates the residual stream and supports "
            "only resid_post SAEs"
        )
    layer = cfg.layer if cfg.layer is not None else sae.hook.layer
    if layer is None:
        raise ValueError("the SAE does not record its hook layer: pass --layer")
    # Negative = counted from the last block, as in Python; resolved here, once, so the manifest, the
    # settings and every worker's hook see the same non-negative index (sae.hooks.resolve_layer).
    if cfg.layer is not None:
        layer = resolve_layer(layer, n_blocks)
    else:
        layer = resolve_layer(layer, n_blocks, flag=f"{sae.source}: hook layer",
                              hint="the SAE was trained on another teacher; pass the right --teacher or --sae")
    if sae.d_in != width:
        raise ValueError(f"SAE d_in {sae.d_in} != teacher width {width} at layer {layer}: wrong SAE for this teacher")
    if sae.k is not None and cfg.attribution != "preact_x_grad" and cfg.k_attr > sae.k:
        raise ValueError(f"--k-attr {cfg.k_attr} > SAE k {sae.k}: at most k latents are active")
    if sae.k is not None and cfg.k_mix > sae.k:
        raise ValueError(f"--k-mix {cfg.k_mix} > SAE k {sae.k}: the SAE code has only k non-zeros")
    return layer


class TeacherRunner:
    """Teacher + SAE, loaded once (one per Ray actor); ``run`` turns a batch of windows into records.

    ``model`` and ``sae`` may be passed in already built (tests, benchmarks); otherwise they are
    loaded from ``cfg.teacher`` / ``cfg.sae``.
    """

    def __init__(self, cfg: RunnerConfig, model: torch.nn.Module | None = None, sae=None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.dtype, self.device)
        if model is None:
            model = load_teacher(cfg.teacher, device=str(self.device), dtype="float32")
        self.model = model.to(self.device).eval().requires_grad_(False)
        if sae is None:
            sae = load_sae(cfg.sae, format=cfg.sae_format)
        self.sae = sae.to(self.device).eval().requires_grad_(False)

        self.layer = check_compatible(sae, cfg, n_layers(self.model), self.model.get_output_embeddings().in_features)
        self.hook = HookSpec(self.layer, "resid_post")
        resolve_block(self.model, self.layer)
        self.base = self.model.base_model  # the transformer without its LM head
        self.head = self.model.get_output_embeddings()
        # Gemma-2 caps its logits (tanh); None for GPT-2 / Llama.
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.n_latents = int(sae.n_latents)

    # -- the pieces, exposed for tests and benchmarks ------------------------------------------

    def _amp(self, whole_forward: bool = False):
        """bf16 autocast where the precision asks for it: the whole forward only for ``bfloat16``;
        the head and the backward for both bf16 modes."""
        if self.precision == "bfloat16" or (self.precision == "bf16-above-hook" and not whole_forward):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _autocast_after_hook(self):
        """For bf16-above-hook: switch autocast on from the hook on (blocks below stay fp32)."""
        dev = self.device.type
        prev = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        try:
            yield lambda: (torch.set_autocast_dtype(dev, torch.bfloat16), torch.set_autocast_enabled(dev, True))
        finally:
            torch.set_autocast_enabled(dev, prev[0])
            torch.set_autocast_dtype(dev, prev[1])
            torch.clear_autocast_cache()

    def residual_and_grad(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward + activation-only backward for (B, T+1) token windows.

        Returns x (B, T, D) the residual at the hook, g (B, T, D) the gradient of each window's summed
        next-token loss w.r.t. x, nll (B, T) the per-token loss, and kd_ids / kd_logprobs (B, T, k_kd).
        """
        inp, tgt = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        leaf: dict[str, torch.Tensor] = {}

        with self._autocast_after_hook() as start_autocast:

            def make_leaf(h: torch.Tensor) -> torch.Tensor:
                leaf["x"] = h.detach().requires_grad_(True)  # autograd starts here: nothing below is recorded
                if self.precision == "bf16-above-hook":
                    start_autocast()
                return leaf["x"]

            with capture_residual(self.model, self.hook, edit=make_leaf), torch.enable_grad(), self._amp(True):
                hidden = self.base(input_ids=inp, use_cache=False).last_hidden_state  # (B, T, D)
        x = leaf["x"]

        B, T = inp.shape
        nll = torch.empty(B, T, dtype=torch.float32, device=inp.device)
        dhidden = torch.empty_like(hidden)
        k_kd = self.cfg.k_kd
        kd_ids = torch.empty(B, T, k_kd, dtype=torch.long, device=inp.device)
        kd_lp = torch.empty(B, T, k_kd, dtype=torch.float32, device=inp.device)
        for b in range(B):  # one window at a time: same shapes whatever B is, and no (B, T, V)
            h = hidden[b].detach().requires_grad_(True)  # (T, D)
            with torch.enable_grad(), self._amp():
                logits = self.head(h).float()  # (T, V)
                if self.softcap:
                    logits = self.softcap * torch.tanh(logits / self.softcap)
                logp = logits.log_softmax(-1)
                nll_b = -logp.gather(1, tgt[b, :, None]).squeeze(1)  # (T,)
            (dhidden[b],) = torch.autograd.grad(nll_b.sum(), h)
            nll[b] = nll_b.detach()
            if k_kd:
                kd_lp[b], kd_ids[b] = logp.detach().topk(k_kd, dim=-1)
        (g,) = torch.autograd.grad(hidden, x, grad_outputs=dhidden)
        return {"x": x.detach(), "g": g, "nll": nll, "kd_ids": kd_ids, "kd_logprobs": kd_lp}

    def labels(self, x: torch.Tensor, g: torch.Tensor):
        """SAE code and attribution labels for flattened (N, D) residuals and gradients.

        Returns (Labels, mix_ids, mix_vals) with mix_* (N, k_mix) the SAE's own top-k code.
        """
        cfg, sae = self.cfg, self.sae
        x, g = x.float(), g.float()
        with torch.no_grad():
            pre = sae.pre_activations(x) if cfg.attribution == "preact_x_grad" else None
            if sae.k is not None:
                ids, vals = sae.encode_topk(x)  # (N, k) sorted by value, descending
                mix_ids, mix_vals = ids[:, : cfg.k_mix], vals[:, : cfg.k_mix]
                labels = attribution_labels(cfg.attribution, cfg.k_attr, g, ids, vals, sae.W_dec, pre)
            else:
                # No fixed k (ReLU / JumpReLU SAEs): the active set is data-dependent, so score the
                # dense code and keep its active positive entries.
                c = sae.encode(x)  # (N, C)
                mix_ids, mix_vals = sae.encode_topk(x, k=cfg.k_mix) if cfg.k_mix else (c[:, :0].long(), c[:, :0])
                if cfg.attribution == "preact_x_grad":
                    labels = attribution_labels(cfg.attribution, cfg.k_attr, g, mix_ids, mix_vals, sae.W_dec, pre)
                else:
                    labels = dense_code_labels(cfg.attribution, cfg.k_attr, g, c, sae.W_dec)
        return labels, mix_ids, mix_vals

    # -- the batch method ----------------------------------------------------------------------

    @torch.inference_mode(False)
    def run(self, windows: np.ndarray) -> tuple[dict[str, np.ndarray], BatchStats]:
        """(B, T+1) token windows -> per-window records (docs/data.md dtypes) and label statistics."""
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"expected (B, T+1) token windows with T >= 1, got shape {windows.shape}")
        tokens = torch.from_numpy(windows.astype(np.int64)).to(self.device)
        B, T = tokens.shape[0], tokens.shape[1] - 1
        fwd = self.residual_and_grad(tokens)
        D = fwd["x"].shape[-1]
        labels, mix_ids, mix_vals = self.labels(fwd["x"].reshape(-1, D), fwd["g"].reshape(-1, D))

        ids_dtype = id_dtype(self.n_latents)
        cfg = self.cfg
        records = {
            "concept_ids": to_numpy(labels.ids, ids_dtype).reshape(B, T, cfg.k_attr),
            "concept_scores": to_numpy(labels.scores, cfg.score_dtype).reshape(B, T, cfg.k_attr),
        }
        if cfg.k_mix:
            records["mix_ids"] = to_numpy(mix_ids, ids_dtype).reshape(B, T, cfg.k_mix)
            records["mix_vals"] = to_numpy(mix_vals, "float16").reshape(B, T, cfg.k_mix)
        if cfg.k_kd:
            records["kd_ids"] = to_numpy(fwd["kd_ids"], "int32")
            records["kd_logprobs"] = to_numpy(fwd["kd_logprobs"], "float16")
        records["teacher_nll"] = to_numpy(fwd["nll"], "float16")

        valid = labels.scores != float("-inf")
        stats = BatchStats(
            tokens=B * T,
            short=labels.n_short,
            valid_labels=int(valid.sum()),
            nll_sum=float(fwd["nll"].double().sum()),
        )
        return records, stats

"""One sparse autoencoder for every public format (OpenAI, SAELens, sparsify, ours).

Internal representation (one decoder ROW per latent, so sparse decode is a row gather)::

    x_n, stats = normalize_input(x)                  # none | layernorm | constant | sqrt_d
    pre   = (x_n - b_dec * subtract_b_dec) @ W_enc.T + b_enc      # (N, n_latents)
    c     = act(pre)                                 # relu | topk(k) then relu | jumprelu(threshold)
    x_hat = denormalize(c @ W_dec + b_dec, stats)    # (N, d_in)

Normalisations:
- ``layernorm``: OpenAI's parameter-free layer norm (sparse_autoencoder/model.py ``LN``):
  mu = mean(x), std = unbiased std(x), x_n = (x - mu) / (std + 1e-5); decode multiplies by ``std``
  (without the eps) and adds mu, exactly as OpenAI and SAELens ``layer_norm`` do. docs/method.md §1.2.
- ``constant``: x_n = x * norm_scale, decode divides by it (SAELens "scaling factor").
- ``sqrt_d``: x_n = x * sqrt(d_in) / ||x||, undone on decode (SAELens ``constant_norm_rescale``).

How the concept extraction uses it (docs/method.md §1.3, the reference code's attribution):
    ids, vals = sae.encode_topk(x)      # x: un-normalised residual (N, D) at sae.hook; c = vals at ids
    g = dL/dx                           # gradient of the teacher loss w.r.t. that same un-normalised x
    a = vals * <g, W_dec[ids]>          # a_i = c_i * <g, W_dec[i]>, only at the k active latents
                                        # (pipeline/attribution.py: sparse_attribution)
The score uses the raw decoder row and the raw-space gradient g, as the reference code does
(``(g @ W_dec) * c``), even though with layer-norm input c is a function of the normalised x; nothing
is rescaled by the layer norm's std. The paper-text variant (Eq. 1) uses ``pre_activations(x)``
instead of c (dense over all latents).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sae.hooks import HookSpec

ACTIVATIONS = ("relu", "topk", "jumprelu")
NORMALIZATIONS = ("none", "layernorm", "constant", "sqrt_d")
LN_EPS = 1e-5  # OpenAI sparse_autoencoder/model.py LN(eps=1e-5)


class NormStats(NamedTuple):
    """What ``normalize_input`` did to each row, to undo it on decode."""

    shift: torch.Tensor | None
    """(N, 1) mean removed (layernorm), or None."""
    scale: torch.Tensor | float | None
    """(N, 1) or scalar that the normalised x is MULTIPLIED by on decode, or None."""


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor
    """(N, d_in) reconstruction in the input's (un-normalised) space."""
    ids: torch.Tensor
    """(N, k) int64 ids of the active latents, by value descending."""
    vals: torch.Tensor
    """(N, k) their activations (zeros allowed)."""
    pre_acts: torch.Tensor
    """(N, n_latents) pre-activations (needed by the AuxK loss)."""
    fvu: torch.Tensor
    """Fraction of variance unexplained of this batch, in the normalised space the SAE is trained in."""
    x_hat_n: torch.Tensor
    """(N, d_in) reconstruction in the normalised space."""
    x_n: torch.Tensor
    """(N, d_in) normalised input."""


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        d_in: int,
        n_latents: int,
        activation: str = "topk",
        k: int | None = 32,
        normalize: str = "none",
        subtract_b_dec: bool = True,
        hook: HookSpec | None = None,
        norm_scale: float = 1.0,
        source: str = "memory",
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        if d_in <= 0 or n_latents <= 0:
            raise ValueError(f"{source}: d_in and n_latents must be positive, got {d_in}, {n_latents}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{source}: unknown SAE activation {activation!r}; expected one of {ACTIVATIONS}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"{source}: unknown input normalisation {normalize!r}; expected one of {NORMALIZATIONS}")
        if activation == "topk":
            if k is None or k <= 0:
                raise ValueError(f"{source}: a TopK SAE needs k >= 1, got {k}")
            if k > n_latents:
                raise ValueError(f"{source}: k={k} is larger than n_latents={n_latents}")
        elif k is not None:
            raise ValueError(f"{source}: k is only meaningful for TopK SAEs (activation={activation!r})")
        if not (norm_scale > 0 and math.isfinite(norm_scale)):
            raise ValueError(f"{source}: norm_scale must be a positive finite number, got {norm_scale}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.activation, self.normalize = activation, normalize
        self.subtract_b_dec = subtract_b_dec
        self.hook = hook if hook is not None else HookSpec(None, "resid_post")
        self.norm_scale = float(norm_scale)
        self.source = source
        """Where the SAE was loaded from (for error messages and manifests)."""
        self.metadata: dict = dict(metadata or {})
        """Free-form provenance: original format, folded factors, the user's normalisation choice."""
        self.W_enc = nn.Parameter(torch.zeros(n_latents, d_in))  # (C, D)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))  # (C,)
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_in))  # (C, D): one row per latent
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # (D,)
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(n_latents))  # (C,)
        else:
            self.threshold = None

    # ---------------------------------------------------------------- checks and identity
    def config(self) -> dict:
        """Everything besides the tensors that decides the SAE's function, plus its hook."""
        return {
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "activation": self.activation,
            "k": self.k,
            "normalize": self.normalize,
            "norm_scale": self.norm_scale,
            "subtract_b_dec": self.subtract_b_dec,
            "hook": self.hook.to_dict(),
        }

    def describe(self) -> dict:
        """The manifest's ``sae`` entry (docs/data.md): source, format, fingerprint, shape, k, normalisation."""
        return {
            "source": self.source,
            "format": self.metadata.get("format"),
            "fingerprint": self.fingerprint(),
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "activation": self.activation,
            "normalize": self.normalize,
            "subtract_b_dec": self.subtract_b_dec,
            "hook": self.hook.to_dict(),
        }

    def validate(self) -> None:
        """ValueError naming ``self.source`` when a tensor has the wrong shape or a NaN/inf."""
        expected = {
            "W_enc": (self.n_latents, self.d_in),
            "b_enc": (self.n_latents,),
            "W_dec": (self.n_latents, self.d_in),
            "b_dec": (self.d_in,),
        }
        if self.threshold is not None:
            expected["threshold"] = (self.n_latents,)
        for name, shape in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{self.source}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"{self.source}: tensor {name} contains NaN or inf values: the file is damaged or its training "
                    "diverged; use another SAE (or retrain it)"
                )

    def fingerprint(self) -> str:
        """``sha256:`` of the config (hook included) and the fp32 bytes of every tensor."""
        h = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None:
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return "sha256:" + h.hexdigest()[:32]

    # ---------------------------------------------------------------- normalisation
    def normalize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, NormStats]:
        """x (..., d_in) -> (x_n, stats). Computed in x's dtype upcast to the SAE's dtype."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{self.source}: input width {x.shape[-1]} != d_in {self.d_in}")
        x = x.to(self.W_enc.dtype)
        if self.normalize == "none":
            return x, NormStats(None, None)
        if self.normalize == "layernorm":
            mu = x.mean(dim=-1, keepdim=True)  # (N, 1)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)  # unbiased, as torch.std and OpenAI's LN
            return x / (std + LN_EPS), NormStats(mu, std)
        if self.normalize == "constant":
            return x * self.norm_scale, NormStats(None, 1.0 / self.norm_scale)
        # sqrt_d: SAELens constant_norm_rescale
        coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)  # (N, 1)
        return x * coeff, NormStats(None, 1.0 / coeff)

    @staticmethod
    def denormalize(x_n: torch.Tensor, stats: NormStats) -> torch.Tensor:
        if stats.scale is not None:
            x_n = x_n * stats.scale
        if stats.shift is not None:
            x_n = x_n + stats.shift
        return x_n

    # ---------------------------------------------------------------- encode
    def _pre_from_normalized(self, x_n: torch.Tensor) -> torch.Tensor:
        if self.subtract_b_dec:
            x_n = x_n - self.b_dec
        return F.linear(x_n, self.W_enc, self.b_enc)  # (N, C)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_latents) dense pre-activations, after normalisation and b_dec subtraction."""
        return self._pre_from_normalized(self.normalize_input(x)[0])

    def _activate_dense(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(pre)
        if self.activation == "jumprelu":
            return F.relu(pre) * (pre > self.threshold)
        vals, ids = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, ids, F.relu(vals))

    def _topk_from_pre(self, pre: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if k is None:
            k = self.k
        if k is None:
            raise ValueError(f"{self.source}: a {self.activation} SAE has no k; pass k to encode_topk")
        if not 1 <= k <= self.n_latents:
            raise ValueError(f"{self.source}: k={k} must be in 1..n_latents={self.n_latents}")
        if self.activation == "topk":
            if k > self.k:
                raise ValueError(f"{self.source}: k={k} exceeds the SAE's own k={self.k}")
            vals, ids = pre.topk(k, dim=-1)  # sorted descending; ReLU keeps the order
            return ids, F.relu(vals)
        vals, ids = self._activate_dense(pre).topk(k, dim=-1)
        return ids, vals

    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, vals), each (N, k), by value descending; vals are post-activation (zeros allowed).

        For TopK SAEs no dense code is built (only the unavoidable (N, C) pre-activation matmul);
        for ReLU / JumpReLU SAEs these are the k largest activations of the dense code.
        """
        return self._topk_from_pre(self.pre_activations(x), k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_latents) dense code."""
        return self._activate_dense(self.pre_activations(x))

    # ---------------------------------------------------------------- decode
    def decode_sparse(
        self, ids: torch.Tensor, vals: torch.Tensor, stats: NormStats | None = None
    ) -> torch.Tensor:
        """(N, k) ids and values -> (N, d_in), touching only the k decoder rows each row needs."""
        # embedding_bag with per-sample weights: sum_j vals[n, j] * W_dec[ids[n, j]], no (N, k, D) gather
        y = F.embedding_bag(ids, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum")
        y = y + self.b_dec  # (N, D)
        return self.denormalize(y, stats) if stats is not None else y

    def decode(self, c: torch.Tensor, stats: NormStats | None = None) -> torch.Tensor:
        """(N, n_latents) dense code -> (N, d_in)."""
        y = c.to(self.W_dec.dtype) @ self.W_dec + self.b_dec  # (N, D)
        return self.denormalize(y, stats) if stats is not None else y

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Encode (sparse TopK path, or dense then top-k for other activations) and decode."""
        x_n, stats = self.normalize_input(x)
        pre = self._pre_from_normalized(x_n)
        if self.activation == "topk":
            ids, vals = self._topk_from_pre(pre, self.k)
            x_hat_n = self.decode_sparse(ids, vals)
        else:
            c = self._activate_dense(pre)
            x_hat_n = self.decode(c)
            k = max(1, int((c != 0).sum(-1).max().item())) if c.numel() else 1
            vals, ids = c.topk(min(k, self.n_latents), dim=-1)
        fvu = fraction_of_variance_unexplained(x_n, x_hat_n)
        return SAEOutput(self.denormalize(x_hat_n, stats), ids, vals, pre, fvu, x_hat_n, x_n)

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **cfg) -> SparseAutoencoder:
        """Build from internal-layout tensors (W_enc (C,D), b_enc, W_dec (C,D), b_dec[, threshold])."""
        source = cfg.get("source", "memory")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if name not in tensors:
                raise ValueError(f"{source}: missing tensor {name!r} (found {sorted(tensors)})")
        W_enc = tensors["W_enc"]
        if W_enc.dim() != 2:
            raise ValueError(f"{source}: W_enc must be 2-D, got shape {tuple(W_enc.shape)}")
        n_latents, d_in = W_enc.shape
        if cfg.get("activation") == "jumprelu" and "threshold" not in tensors:
            raise ValueError(f"{source}: a JumpReLU SAE needs a 'threshold' tensor")
        sae = cls(d_in, n_latents, **cfg)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                if getattr(sae, name) is not None:
                    t = tensors[name].detach().to(torch.float32)
                    if tuple(t.shape) != tuple(getattr(sae, name).shape):
                        raise ValueError(
                            f"{source}: tensor {name} has shape {tuple(t.shape)}, "
                            f"expected {tuple(getattr(sae, name).shape)}"
                        )
                    getattr(sae, name).copy_(t)
        sae.validate()
        return sae


def fraction_of_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch (Gao et al. 2024 normalised MSE)."""
    total = (x - x.mean(dim=0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(1e-12)

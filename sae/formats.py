"""Loading SAEs from the public formats into :class:`SparseAutoencoder`, and saving ours.

Formats (auto-detected by :func:`detect_format`, or named with ``format=``):
- ``openai``: a ``.pt`` state dict of OpenAI's ``sparse_autoencoder`` (``pre_bias``, ``latent_bias``,
  ``encoder.weight`` (C, D), ``decoder.weight`` (D, C), ``activation`` name, ``activation_state_dict``
  with ``k``). The file does not record input normalisation: OpenAI's own loader
  (``Autoencoder.from_state_dict``) turns layer norm on exactly when the activation is TopK; we do
  the same unless ``normalize=`` overrides it, and record the choice in ``sae.metadata``.
- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` (architectures standard, topk, jumprelu;
  pre-6.0 and 6.x config keys). Scaling factors are folded into the weights at load time.
- ``sparsify``: EleutherAI sparsify, ``<hookpoint>/cfg.json`` + ``sae.safetensors``; always
  subtracts b_dec (there is no flag).
- ``cocomix``: ours = a SAELens 6 directory (``cfg.json`` + ``sae_weights.safetensors``, readable by
  ``sae_lens.SAE.load_from_disk``) whose ``cfg.json`` also carries a ``cocomix`` section.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from sae.hooks import HookSpec
from sae.model import SparseAutoencoder
from shards.atomic import write_atomic

FORMATS = ("openai", "saelens", "sparsify", "cocomix")
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
CFG = "cfg.json"
_NORM_TO_SAELENS = {"none": "none", "layernorm": "layer_norm", "sqrt_d": "constant_norm_rescale"}
_SAELENS_TO_NORM = {v: k for k, v in _NORM_TO_SAELENS.items()}


# --------------------------------------------------------------------------- detection
def detect_format(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"SAE path {str(p)!r} does not exist: check --sae")
    if p.is_file():
        if p.suffix in (".pt", ".pth"):
            return "openai"
        raise ValueError(f"{p}: an SAE file must be an OpenAI .pt state dict; pass a directory for other formats")
    cfg = p / CFG
    if cfg.is_file():
        data = _read_json(cfg)
        if (p / SAELENS_WEIGHTS).is_file():
            return "cocomix" if "cocomix" in data else "saelens"
        if (p / SPARSIFY_WEIGHTS).is_file():
            return "sparsify"
        raise ValueError(
            f"{p}: has cfg.json but neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify): the SAE "
            "directory is incomplete; copy its weights file too"
        )
    if (p / SAELENS_WEIGHTS).is_file() or (p / SPARSIFY_WEIGHTS).is_file():
        raise ValueError(f"{p}: has SAE weights but no cfg.json: the SAE directory is incomplete; "
                         "copy its cfg.json too")
    if (p / "train_config.json").is_file() and (p / "checkpoint").is_dir():
        raise ValueError(
            f"{p}: an sae.train run that has not finished (no final SAE yet): rerun its sae.train command to "
            f"finish it, or pass {p / 'checkpoint'} to use its last checkpoint"
        )
    subdirs = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / CFG).is_file())
    if subdirs:
        raise ValueError(f"{p}: holds SAEs for several hookpoints; pass one of: {', '.join(subdirs)}")
    raise ValueError(f"{p}: no cfg.json (SAELens/sparsify/cocomix) and not a .pt file (OpenAI)")


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path}: weights file is missing")
    try:
        return {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path}: cannot read safetensors weights ({e}): "
                         "the file is truncated or corrupt; copy it again") from e


def _need(tensors: dict, name: str, source: Path) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{source}: missing tensor {name!r} (found {sorted(tensors)})")
    return tensors[name]


# --------------------------------------------------------------------------- public API
def load_sae(
    path: str | os.PathLike,
    format: str | None = None,
    normalize: str | None = None,
    hook: HookSpec | None = None,
    device: str | torch.device = "cpu",
) -> SparseAutoencoder:
    """Load an SAE in any supported format as fp32 on ``device``.

    normalize: overrides the input normalisation the file implies (needed for OpenAI files, which
    do not record it, and for SAELens ``expected_average_only_in`` files whose factor is unknown).
    hook: overrides (or supplies) the hook the file records.
    """
    fmt = format or detect_format(path)
    loaders = {"openai": _load_openai, "saelens": _load_saelens, "sparsify": _load_sparsify, "cocomix": _load_saelens}
    if fmt not in loaders:
        raise ValueError(f"unknown SAE format {fmt!r}; expected one of {FORMATS}")
    if not Path(path).exists():
        raise ValueError(f"SAE path {str(path)!r} does not exist")
    sae = loaders[fmt](Path(path), normalize)
    sae.metadata["format"] = fmt
    if hook is not None:
        sae.hook = hook
    return sae.to(device)


def save_sae(sae: SparseAutoencoder, out_dir: str | os.PathLike, model_name: str | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors``: our format, a valid SAELens 6 directory.

    A ``constant`` normalisation is folded into the weights (SAELens has no runtime constant).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    W_enc, b_enc = sae.W_enc.detach().float().cpu(), sae.b_enc.detach().float().cpu()
    W_dec, b_dec = sae.W_dec.detach().float().cpu(), sae.b_dec.detach().float().cpu()
    normalize = sae.normalize
    if normalize == "constant":  # x_n = s x: fold s into W_enc, 1/s into W_dec and b_dec
        s = sae.norm_scale
        W_enc, W_dec, b_dec, normalize = W_enc * s, W_dec / s, b_dec / s, "none"
    tensors = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec.contiguous(), "b_dec": b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold.detach().float().cpu()
    architecture = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.activation]
    layer = sae.hook.layer
    hook_name = f"blocks.{layer}.hook_{sae.hook.location}" if layer is not None else None
    cfg: dict = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.subtract_b_dec,
        "normalize_activations": _NORM_TO_SAELENS[normalize],
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "model_name": model_name, "hook_name": hook_name},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cocomix = sae.config() | {"normalize": normalize, "norm_scale": 1.0}
    cfg["cocomix"] = cocomix | {"provenance": {k: v for k, v in sae.metadata.items() if _jsonable(v)}}
    # Serialised in memory, then written by shards.atomic.write_atomic: a full disk is a plain OSError naming
    # the file (safetensors' own writer raises an opaque SafetensorError), and no half-written file
    # ever carries the final name.
    write_atomic(out / SAELENS_WEIGHTS, safetensors_bytes(tensors))
    write_atomic(out / CFG, (json.dumps(cfg, indent=2) + "\n").encode())
    return out


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _jsonable(v: object) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# --------------------------------------------------------------------------- OpenAI
_OPENAI_PATH_HOOKS = {"resid_post_mlp": "resid_post", "resid_delta_mlp": "mlp_out", "resid_delta_attn": "attn_out"}


def _load_openai(path: Path, normalize: str | None) -> SparseAutoencoder:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a torch state dict: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected an OpenAI sparse_autoencoder state dict, got {type(state).__name__}")
    act_name = state.get("activation", "ReLU")  # OpenAI's from_state_dict default
    act_state = state.get("activation_state_dict", {}) or {}
    if act_name == "TopK":
        activation, k = "topk", int(_need(act_state, "k", path))
        postact = act_state.get("postact_fn", "ReLU")
        if postact != "ReLU":
            raise ValueError(f"{path}: TopK post-activation {postact!r} is not supported (only ReLU)")
    elif act_name == "ReLU":
        activation, k = "relu", None
    else:
        raise ValueError(f"{path}: unknown OpenAI activation {act_name!r}; supported: TopK, ReLU")
    rule = "layernorm" if activation == "topk" else "none"  # OpenAI: normalize = activation == "TopK"
    tensors = {
        "W_enc": _need(state, "encoder.weight", path).float(),  # (C, D)
        "b_enc": _need(state, "latent_bias", path).float(),
        "W_dec": _need(state, "decoder.weight", path).float().T,  # (D, C) -> (C, D)
        "b_dec": _need(state, "pre_bias", path).float(),
    }
    m = re.search(r"(resid_post_mlp|resid_delta_mlp|resid_delta_attn)_v\d+_\d+k/autoencoders/(\d+)\.pt$", str(path))
    hook = HookSpec(int(m.group(2)), _OPENAI_PATH_HOOKS[m.group(1)]) if m else None
    return SparseAutoencoder.from_tensors(
        tensors,
        activation=activation,
        k=k,
        normalize=normalize or rule,
        subtract_b_dec=True,
        hook=hook,
        source=str(path),
        metadata={"normalize_rule": rule, "normalize_override": normalize},
    )


# --------------------------------------------------------------------------- SAELens (and ours)
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre|attn_out|mlp_out)$")


def _saelens_hook(name: str | None, source: Path) -> HookSpec:
    if name is None:
        return HookSpec(None)
    m = _TL_HOOK.match(name)
    if not m:
        raise ValueError(
            f"{source}: hook {name!r} is not a block output, attn_out or mlp_out; pass hook= to load it anyway"
        )
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "resid_pre":  # the input of block L is the output of block L - 1
        if layer == 0:
            raise ValueError(f"{source}: hook {name!r} reads the embeddings, which is not supported")
        return HookSpec(layer - 1, "resid_post")
    return HookSpec(layer, kind)


def _load_saelens(path: Path, normalize: str | None) -> SparseAutoencoder:
    cfg = _read_json(path / CFG)
    tensors = _read_safetensors(path / SAELENS_WEIGHTS)
    meta = cfg.get("metadata") or {}
    # Pre-6.0 configs: hook_point -> hook_name, activation_fn_str -> activation_fn, k in kwargs.
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    k = cfg.get("k")
    if act_fn == "topk" and k is None:
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        arch = "topk" if k is not None else arch
    if arch == "standard" and act_fn not in ("relu", None):
        raise ValueError(f"{path}: SAELens activation {act_fn!r} is not supported (relu, topk, jumprelu)")
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(arch)
    if activation is None:
        raise ValueError(f"{path}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu)")
    if cfg.get("reshape_activations", "none") != "none" or cfg.get("hook_head_index") is not None:
        raise ValueError(f"{path}: per-head (hook_z) SAEs are not supported")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    W_enc = _need(tensors, "W_enc", path)
    if W_enc.shape != (d_in, d_sae):
        raise ValueError(f"{path}: W_enc has shape {tuple(W_enc.shape)}, cfg.json says d_in={d_in}, d_sae={d_sae}")
    t = {
        "W_enc": W_enc.T.contiguous(),  # SAELens stores (D, C)
        "b_enc": _need(tensors, "b_enc", path),
        "W_dec": _need(tensors, "W_dec", path),
        "b_dec": _need(tensors, "b_dec", path),
    }
    folded: list[str] = []
    if activation == "jumprelu":
        if "threshold" in tensors:
            t["threshold"] = tensors["threshold"]
        elif "log_threshold" in tensors:
            t["threshold"] = tensors["log_threshold"].exp()
        else:
            raise ValueError(f"{path}: a JumpReLU SAE needs a 'threshold' tensor")
    # Finetuning scaling factor: acts are multiplied by it before decode -> fold into W_dec rows.
    sf = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if sf is not None and not torch.allclose(sf, torch.ones_like(sf)):
        t["W_dec"] = t["W_dec"] * sf[:, None]
        folded.append("finetuning_scaling_factor")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # pre * ||W_dec[i]|| picks the top k and decode uses W_dec[i] / ||W_dec[i]||: fold the norms.
        norms = t["W_dec"].norm(dim=-1)
        t["W_enc"], t["b_enc"], t["W_dec"] = (
            t["W_enc"] * norms[:, None], t["b_enc"] * norms, t["W_dec"] / norms[:, None]
        )
        if "threshold" in t:
            t["threshold"] = t["threshold"] * norms
        folded.append("rescale_acts_by_decoder_norm")
    raw_norm = cfg.get("normalize_activations", "none")
    if isinstance(raw_norm, bool):  # pre-6.0 boolean
        raw_norm = "expected_average_only_in" if raw_norm else "none"
    raw_norm = raw_norm or "none"
    if normalize is None:
        if raw_norm == "expected_average_only_in":
            raise ValueError(
                f"{path}: normalize_activations='expected_average_only_in' needs the dataset's norm scaling "
                "factor, which the directory does not hold (SAELens itself ignores it in encode()); fold it "
                "into the weights, or pass normalize='none' to load it as SAELens does"
            )
        if raw_norm not in _SAELENS_TO_NORM:
            raise ValueError(f"{path}: normalize_activations={raw_norm!r} cannot be folded or applied")
        normalize = _SAELENS_TO_NORM[raw_norm]
    ours = cfg.get("cocomix") or {}
    hook_name = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    hook = HookSpec(**ours["hook"]) if "hook" in ours else _saelens_hook(hook_name, path)
    return SparseAutoencoder.from_tensors(
        t,
        activation=activation,
        k=int(k) if activation == "topk" else None,
        normalize=normalize,
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
        hook=hook,
        source=str(path),
        metadata={"folded": folded, "saelens_normalize_activations": raw_norm, "hook_name": hook_name}
        | ({"provenance": ours.get("provenance")} if ours else {}),
    )


# --------------------------------------------------------------------------- sparsify
_SPARSIFY_HOOK = re.compile(
    r"^(?:transformer\.|model\.|gpt_neox\.)?(?:h|layers)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)


def _sparsify_hook(name: str) -> HookSpec:
    m = _SPARSIFY_HOOK.match(name)
    if not m:
        return HookSpec(None)  # directory name is not a hookpoint: the user supplies the layer
    location = "resid_post" if m.group(2) is None else ("mlp_out" if m.group(2) == "mlp" else "attn_out")
    return HookSpec(int(m.group(1)), location)


def _load_sparsify(path: Path, normalize: str | None) -> SparseAutoencoder:
    cfg = _read_json(path / CFG)
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise ValueError(f"{path}: sparsify {flag}=true is not an SAE of the residual stream; not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported (topk only)")
    if "d_in" not in cfg:
        raise ValueError(f"{path}: cfg.json has no d_in")
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    tensors = _read_safetensors(path / SPARSIFY_WEIGHTS)
    t = {
        "W_enc": _need(tensors, "encoder.weight", path),
        "b_enc": _need(tensors, "encoder.bias", path),
        "W_dec": _need(tensors, "W_dec", path),
        "b_dec": _need(tensors, "b_dec", path),
    }
    if t["W_enc"].shape != (n, d_in):
        raise ValueError(f"{path}: encoder.weight has shape {tuple(t['W_enc'].shape)}, cfg.json implies {(n, d_in)}")
    return SparseAutoencoder.from_tensors(
        t,
        activation="topk",
        k=int(cfg.get("k", 32)),
        normalize=normalize or "none",
        subtract_b_dec=True,  # sparsify always subtracts b_dec before encoding
        hook=_sparsify_hook(path.resolve().name),
        source=str(path),
    )


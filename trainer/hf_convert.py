"""Our student's weights and config in the layouts transformers loads (docs/export.md).

NTP and KD students are GPT-2 (trainer/model.py follows its layout), so they become a standard
``GPT2LMHeadModel``: the same learned positions, pre-LN blocks, LayerNorm eps 1e-5, attention scaled
by 1/sqrt(head_dim), tanh GELU ("gelu_new"), MLP width 4d, tied LM head. Only the names differ, and
GPT-2's ``Conv1D`` stores (in, out) where ``nn.Linear`` stores (out, in), so every matrix is transposed.
A student trained without biases gets zero biases (GPT-2 always has them: same function).

CoCoMix students keep their own parameter names and load through the resource files in
trainer/hf_remote/ (``trust_remote_code``). Only torch is needed here, never transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.model import GPT

LAYER_NORM_EPS = 1e-5
"""nn.LayerNorm's default, which trainer/model.py uses; GPT-2's layer_norm_epsilon is the same."""

REMOTE_FILES = ("configuration_cocomix.py", "modeling_cocomix.py")
"""The files of trainer/hf_remote/ copied beside a CoCoMix export's config.json."""


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu").contiguous().clone()


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` tensors (lm_head is tied to ``transformer.wte``, so not stored)."""
    if model.concept is not None:
        raise ValueError("a student with a concept block is not a GPT-2: export it as CoCoMix")
    if model.pause is not None:
        raise ValueError("a pause-token student is not a GPT-2 (its pause vector would be dropped): not exportable")
    sd = model.state_dict()
    d = model.cfg.d_model

    def bias(name: str, n: int) -> torch.Tensor:
        return _t(sd[name]) if name in sd else torch.zeros(n, dtype=sd["wte.weight"].dtype)

    out = {"transformer.wte.weight": _t(sd["wte.weight"]), "transformer.wpe.weight": _t(sd["wpe.weight"])}
    for i in range(model.cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}{ln}.weight"] = _t(sd[f"{src}{ln}.weight"])
            out[f"{dst}{ln}.bias"] = bias(f"{src}{ln}.bias", d)
        for ours, theirs, n_out in (("attn.qkv", "attn.c_attn", 3 * d), ("attn.proj", "attn.c_proj", d),
                                    ("mlp.fc", "mlp.c_fc", 4 * d), ("mlp.proj", "mlp.c_proj", d)):
            out[f"{dst}{theirs}.weight"] = _t(sd[f"{src}{ours}.weight"].T)  # Conv1D: (in, out)
            out[f"{dst}{theirs}.bias"] = bias(f"{src}{ours}.bias", n_out)
    out["transformer.ln_f.weight"] = _t(sd["ln_f.weight"])
    out["transformer.ln_f.bias"] = bias("ln_f.bias", d)
    return out


def gpt2_config(model: GPT, eos_id: int | None) -> dict[str, Any]:
    c = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,  # 4 * n_embd, as trainer/model.py's MLP
        "activation_function": "gelu_new",  # tanh-approximated GELU
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": True,
    }


def cocomix_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The trainer's own tensors (trainer/hf_remote/modeling_cocomix.py uses its names); the LM head is
    the token embedding (tied), so it is not stored twice."""
    if model.concept is None:
        raise ValueError("a student without a concept block exports as GPT-2")
    return {k: _t(v) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def cocomix_config(model: GPT, eos_id: int | None, steer: dict[int, float]) -> dict[str, Any]:
    c, cc = model.cfg, model.cfg.concept
    assert cc is not None
    return {
        "architectures": ["CocomixForCausalLM"],
        "model_type": "cocomix",
        "auto_map": {
            "AutoConfig": "configuration_cocomix.CocomixConfig",
            "AutoModelForCausalLM": "modeling_cocomix.CocomixForCausalLM",
        },
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "dropout": c.dropout,
        "bias": c.bias,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "n_concepts": cc.n_concepts,
        "insert_layer": cc.insert_layer,
        "topk": cc.topk,
        "mix": cc.mix,
        "steer": {str(k): v for k, v in sorted(steer.items())},
        "initializer_range": 0.02,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": True,
        "use_cache": True,  # modeling_cocomix.py's own KV cache in greedy decoding and sampling
    }


def generation_config(eos_id: int | None) -> dict[str, Any]:
    return {"bos_token_id": eos_id, "eos_token_id": eos_id}

"""Where an SAE reads a HF transformers model, and how to read (or replace) that tensor.

Locations, for block L (0-based):
- ``resid_post``: the residual stream after block L, i.e. the block's output. HF's
  ``hidden_states[L + 1]`` equals it for every block but the last, whose entry is taken after the final
  norm (docs/method.md 1.1), so we always hook the block itself.
- ``attn_out`` / ``mlp_out``: the output of the block's attention / MLP sublayer (before it is added
  to the residual stream).

Works for GPT-2 (``transformer.h[L].attn/.mlp``), Llama-style models such as SmolLM2
(``model.layers[L].self_attn/.mlp``), GPT-NeoX and the bare base models of each.

Typical use::

    with capture_residual(model, HookSpec(9, "resid_post"), stop=True) as cap:
        run_until_hook(model, input_ids)      # stops after block 9: later blocks never run
    x = cap.output                            # (B, T, D)

    # splice a reconstruction back in (loss recovered), or make x a leaf for dL/dx (attribution):
    leaf = {}
    def edit(x):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]
    with capture_residual(model, spec, edit=edit):
        loss = model(input_ids, labels=input_ids).loss
    loss.backward()                           # leaf["x"].grad is dL/dx at the hook
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

LOCATIONS = ("resid_post", "attn_out", "mlp_out")

# Attribute paths of the block list, in the order tried (CausalLM wrappers first, then base models).
_BLOCK_PATHS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "h", "layers")
_ATTN_NAMES = ("attn", "self_attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward")


@dataclass(frozen=True)
class HookSpec:
    """Which tensor of the teacher an SAE reads."""

    layer: int | None
    """0-based block index; None when the SAE file does not say (the user must then pass it)."""
    location: str = "resid_post"
    """One of ``resid_post`` (block output), ``attn_out``, ``mlp_out``."""

    def __post_init__(self) -> None:
        if self.location not in LOCATIONS:
            raise ValueError(f"hook location {self.location!r} is not one of {LOCATIONS}")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"hook layer must be a non-negative int or None, got {self.layer!r}")

    def to_dict(self) -> dict:
        return {"layer": self.layer, "location": self.location}

    def __str__(self) -> str:
        return f"{self.location}@{self.layer}"


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (the layers after the hook are not needed)."""


def _get_path(model: nn.Module, path: str) -> nn.Module | None:
    obj: object = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a GPT-2, Llama-style or GPT-NeoX model (or its base model)."""
    for path in _BLOCK_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}: tried {', '.join(_BLOCK_PATHS)}"
    )


def n_layers(model: nn.Module) -> int:
    return len(blocks(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (also of attn_out / mlp_out for these architectures)."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the hidden size of {type(model).__name__} from its config")


def resolve_layer(layer: int, n_blocks: int, flag: str = "--layer", hint: str = "pick one of those") -> int:
    """The 0-based block index ``layer`` names, counted as Python counts: -1 is the last block, -2 the
    one before. Every command resolves ``--layer`` once, early, with this, and records only the
    non-negative result (HookSpec refuses negative layers). ValueError when out of range."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{flag} must be an integer block index, got {layer!r}")
    if not -n_blocks <= layer < n_blocks:
        raise ValueError(
            f"{flag} {layer} is out of range: the teacher has {n_blocks} blocks, 0..{n_blocks - 1} "
            f"(or -{n_blocks}..-1 counting from the last); {hint}"
        )
    return layer % n_blocks


def resolve_block(model: nn.Module, layer: int) -> nn.Module:
    """Transformer block ``layer`` (0-based; negative counts from the end, see :func:`resolve_layer`)."""
    layers = blocks(model)
    return layers[resolve_layer(layer, len(layers), flag="layer")]


def resolve_hook_module(model: nn.Module, spec: HookSpec) -> nn.Module:
    """The module whose output is the tensor ``spec`` names."""
    if spec.layer is None:
        raise ValueError("the SAE's hook layer is unknown: pass the layer explicitly (e.g. --layer)")
    block = resolve_block(model, spec.layer)
    if spec.location == "resid_post":
        return block
    names = _ATTN_NAMES if spec.location == "attn_out" else _MLP_NAMES
    for name in names:
        sub = getattr(block, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise ValueError(f"block {spec.layer} of {type(model).__name__} has none of {names} for {spec.location}")


class Capture:
    """What a :func:`capture_residual` hook saw."""

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None
        """The hooked tensor (B, T, D) of the last forward, after ``edit`` if one was given."""


@contextmanager
def capture_residual(
    model: nn.Module,
    spec: HookSpec,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop: bool = False,
) -> Iterator[Capture]:
    """Expose (and optionally replace) the tensor at ``spec`` during forwards inside the block.

    ``edit(x) -> x'`` replaces the tensor in the forward pass (same shape); ``stop=True`` raises
    :class:`StopForward` right after the hook so the rest of the model is skipped: call the model
    through :func:`run_until_hook`, which swallows it.
    """
    module = resolve_hook_module(model, spec)
    cap = Capture()

    def hook(_mod: nn.Module, _inputs: tuple, output: object) -> object:
        # Blocks and attention modules return tuples in some HF versions, tensors in others.
        is_tuple = isinstance(output, tuple)
        x = output[0] if is_tuple else output
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"hook {spec} produced {type(x).__name__}, not a tensor")
        if edit is not None:
            new = edit(x)
            if new.shape != x.shape:
                raise ValueError(f"edit at hook {spec} changed the shape {tuple(x.shape)} -> {tuple(new.shape)}")
            x = new
        cap.output = x
        if stop:
            raise StopForward
        if edit is None:
            return None
        return (x, *output[1:]) if is_tuple else x

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def run_until_hook(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> None:
    """Run ``model(input_ids)`` inside a ``capture_residual(..., stop=True)`` block, ignoring the
    early stop. Blocks after the hook never run: reading layer 9 of 30 costs ~1/3 of a forward."""
    try:
        model(input_ids, use_cache=False, **kwargs)
    except StopForward:
        pass


def check_sae_matches_model(sae, model: nn.Module, source: str = "the SAE") -> None:
    """ValueError when an SAE cannot read this model at its hook (width or layer out of range)."""
    width = hidden_size(model)
    if sae.d_in != width:
        raise ValueError(
            f"{source}: d_in={sae.d_in} does not match the teacher's width {width} at hook {sae.hook}"
        )
    if sae.hook.layer is not None:
        resolve_block(model, sae.hook.layer)

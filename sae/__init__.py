"""Sparse autoencoders: one model for every public format, loaders, a TopK trainer, metrics."""

from sae.formats import FORMATS, detect_format, load_sae, save_sae
from sae.hooks import (
    HookSpec,
    capture_residual,
    hidden_size,
    n_layers,
    resolve_block,
    run_until_hook,
)
from sae.model import NormStats, SAEOutput, SparseAutoencoder, fraction_of_variance_unexplained

__all__ = [
    "FORMATS",
    "HookSpec",
    "NormStats",
    "SAEOutput",
    "SparseAutoencoder",
    "capture_residual",
    "detect_format",
    "fraction_of_variance_unexplained",
    "hidden_size",
    "load_sae",
    "n_layers",
    "resolve_block",
    "run_until_hook",
    "save_sae",
]

"""The concept manifest stores each fact once; its extraction identity is rebuilt from the entries
that hold them, so manifests written before (settings repeating teacher, layer, SAE, attribution,
k's, precision) compare equal and resume."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.extract_outputs import extraction_settings, stored_settings
from trainer.validate import k_attr

SETTINGS = {"teacher": "sha256:t", "layer": 9, "sae": "sha256:s", "attribution": "act_x_grad", "k_attr": 4,
            "k_mix": 32, "k_kd": 0, "score_dtype": "float16", "precision": "float32", "format": "arrow", "zarr": None,
            "tokens": "sha256:tok"}


def manifest(settings: dict) -> SimpleNamespace:
    return SimpleNamespace(
        teacher={"name": "smollm2-135m", "fingerprint": "sha256:t"}, hook={"layer": 9, "location": "resid_post"},
        sae={"fingerprint": "sha256:s", "n_latents": 1024}, settings=settings,
        attribution={"variant": "act_x_grad", "k_attr": 4, "k_mix": 32, "k_kd": 0, "precision": "float32"})


def test_each_fact_is_stored_once_and_the_identity_is_rebuilt():
    stored = stored_settings(SETTINGS)
    assert set(stored) == {"score_dtype", "format", "zarr", "tokens"}  # k_attr & co. live in `attribution`
    assert extraction_settings(manifest(stored)) == SETTINGS


def test_older_manifests_repeating_the_settings_give_the_same_identity():
    assert extraction_settings(manifest(dict(SETTINGS))) == SETTINGS
    assert extraction_settings(manifest({**SETTINGS, "k_attr": 8})) != SETTINGS  # a real difference still shows


def test_trainer_reads_k_attr_from_attribution_only():
    assert k_attr(manifest(stored_settings(SETTINGS))) == 4
    assert k_attr(SimpleNamespace(attribution=None)) is None  # a token manifest: ntp needs no labels

"""Every manifest shipped in manifests/ is valid; the shards of those present on this machine verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards import load_manifest, open_split

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "manifests").glob("*.json"))


def test_manifests_are_shipped():
    assert SHIPPED, "manifests/ should hold at least one example manifest"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifest_structure(path):
    m = load_manifest(path)  # schema, fields, splits, relative paths
    assert m.splits and all(s.windows > 0 for s in m.splits.values())
    if m.kind == "concepts":
        assert m.sae["n_latents"] > 0 and m.attribution["k_attr"] > 0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifest_data_when_present(path):
    m = load_manifest(path)
    parts = [p for s in m.splits.values() for sh in s.shards for p in sh.parts.values()]
    if not all(p.path.exists() for p in parts):
        pytest.skip(f"{path.name}: shards not on this machine (run the command that makes them)")
    for split in m.splits:
        ds = open_split(m, split, verify="open")
        assert ds[len(ds) - 1]["tokens"].shape == (m.seq_len + 1,)

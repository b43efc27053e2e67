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


def test_shipped_demo_manifest_has_the_settings_make_demo_records_now():
    """`make demo` on a fresh clone replaces manifests/demo-tokens.json only when it describes the same
    stage-1 dataset; a stage-1 setting added or changed since it was shipped (split_rule, task_mb in
    issue 14) made make demo refuse it. Regenerate it with `make demo` when this fails."""
    from pipeline.stage1_config import settings_record
    from recipes.demo import DemoConfig, default_corpus_path, stage1_config

    m = load_manifest(Path(__file__).resolve().parents[1] / "manifests" / "demo-tokens.json")
    a = DemoConfig()
    cfg = stage1_config(a, [str(default_corpus_path(a))])
    want = settings_record(cfg, m.tokenizer, m.settings["windows_per_shard"])
    assert m.settings == want

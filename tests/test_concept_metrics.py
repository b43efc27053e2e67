"""Concept recall (trainer/concept_metrics.py) against brute-force counts, and in a real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shards import load_manifest, open_split
from trainer import concept_metrics as cm
from trainer.config import TrainConfig
from trainer.data import to_torch
from trainer.loop import train
from trainer.objectives import concept_label_mask
from trainer.synthetic import write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ("val_concept_recall", "val_concept_recall_prior")


def test_topk_hits_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    B, T, K, C, k = 3, 7, 4, 20, 5
    z = torch.randn(B, T, C, generator=g)  # continuous: no ties
    top = torch.topk(z, k, dim=-1).indices
    ids = torch.randint(0, C, (B, T, K), generator=g)
    scores = torch.randn(B, T, K, generator=g)
    scores[torch.rand(B, T, K, generator=g) < 0.3] = -float("inf")  # invalid slots
    valid = concept_label_mask(ids, scores)
    hits, n = cm.topk_hits(top, ids, valid)
    want_hits = want_n = 0
    for b in range(B):
        for t in range(T):
            chosen = set(top[b, t].tolist())
            for i in range(K):
                if valid[b, t, i]:
                    want_n += 1
                    want_hits += int(ids[b, t, i].item()) in chosen
    assert (hits, n) == (want_hits, want_n)
    assert 0 < hits < n  # the check can fail both ways
    # An invalid slot never counts, even when its id is selected.
    assert cm.topk_hits(top[:, :, :1], top[:, :, :1], torch.zeros(B, T, 1, dtype=torch.bool)) == (0, 0)


def test_prior_table_breaks_ties_towards_lower_ids():
    counts = torch.tensor([1, 5, 3, 5, 0, 3])
    assert cm.prior_table(counts, 3).nonzero().flatten().tolist() == [1, 2, 3]
    assert cm.prior_table(counts, 2).nonzero().flatten().tolist() == [1, 3]


def test_label_counts_and_prior_recall_equal_brute_force(tmp_path):
    C, K = 32, 4
    m = load_manifest(write_manifest(tmp_path / "d", windows=21, val_windows=9, seq_len=8, vocab=64, n_concepts=C,
                                     k_attr=K, shards_per_split=3))
    fields = ["concept_ids", "concept_scores"]
    dtypes = {f: m.fields[f].dtype for f in fields}
    train_ds = open_split(m, "train", fields=fields)
    counts = cm.label_counts(train_ds, "attribution", K, C, dtypes)
    want = np.zeros(C, dtype=np.int64)
    for i in range(len(train_ds)):
        w = train_ds[i]
        pairs = zip(w["concept_ids"].reshape(-1).tolist(), w["concept_scores"].astype(np.float32).reshape(-1),
                    strict=True)
        for cid, s in pairs:
            if np.isfinite(s):
                want[cid] += 1
    assert counts.tolist() == want.tolist() and want.sum() > 0
    k = 5
    table = cm.prior_table(counts, k)
    top = sorted(range(C), key=lambda c: (-want[c], c))[:k]
    assert table.nonzero().flatten().tolist() == sorted(top)
    val_ds = open_split(m, "val", fields=fields)
    hits = n = 0
    for i in range(len(val_ds)):
        w = val_ds[i]
        pairs = zip(w["concept_ids"].reshape(-1).tolist(), w["concept_scores"].astype(np.float32).reshape(-1),
                    strict=True)
        for cid, s in pairs:
            if np.isfinite(s):
                n += 1
                hits += cid in top
    batch = to_torch(val_ds.get_batch(np.arange(len(val_ds))), dtypes)
    valid = concept_label_mask(batch["concept_ids"], batch["concept_scores"])
    assert cm.prior_hits(table, batch["concept_ids"], valid) == hits and int(valid.sum()) == n
    train_ds.close()
    val_ds.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=32, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_cocomix_logs_recall_and_ntp_does_not(data, tmp_path):
    kw = dict(shards=str(data), preset="tiny", steps=4, micro_batch=4, grad_accum=1, eval_every=2, eval_windows=8,
              workers=0, progress=False)
    summary = train(TrainConfig(out_dir=str(tmp_path / "c"), mode="cocomix", **kw))
    evals = [r for r in rows(tmp_path / "c") if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert all(0.0 <= r[key] <= 1.0 for key in KEYS)
    assert evals[0]["val_concept_recall_prior"] == evals[1]["val_concept_recall_prior"] > 0  # fixed floor
    assert all(key in summary["last"] for key in KEYS)
    # The activation-label ablation measures recall of its own labels (the top SAE activations).
    train(TrainConfig(out_dir=str(tmp_path / "a"), mode="cocomix", labels="activation", **kw))
    assert all(0.0 <= r[key] <= 1.0 for r in rows(tmp_path / "a") if "val_loss" in r for key in KEYS)
    train(TrainConfig(out_dir=str(tmp_path / "n"), mode="ntp", **kw))
    assert not any(key in r for r in rows(tmp_path / "n") for key in KEYS)

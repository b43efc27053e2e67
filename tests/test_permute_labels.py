"""--permute-labels SEED (the label-signal control): over an epoch the training labels are a bijective
reshuffle of the real ones across (window, position), tokens untouched, deterministic per seed,
resume-identical; validation and the concept-recall metrics keep the real labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shards import load_manifest, open_split
from trainer.config import TrainConfig
from trainer.data import ArrayWindows, LabelPermutation, StepBatches, StepSampler
from trainer.loop import Trainer, train
from trainer.synthetic import make_arrays, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

N, T, G = 24, 16, 6  # windows, positions, global batch: 4 steps per epoch
ATTR = ["tokens", "concept_ids", "concept_scores"]
ACT = ["tokens", "mix_ids", "mix_vals"]


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return make_arrays(N, T, vocab=128, n_concepts=64)


def epoch(arrays, fields: list[str], seed: int | None, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
    """One epoch of training batches (this rank's share), concatenated, with the window index of each row."""
    w = ArrayWindows({k: arrays[k] for k in fields})
    sampler = StepSampler(N, G, seed=5)
    dtypes = {k: str(arrays[k].dtype) for k in fields}
    src = StepBatches(w, sampler, fields, dtypes, rank, world, vocab_size=128, n_concepts=64, permute_labels=seed)
    out: dict[str, list] = {k: [] for k in [*fields, "index"]}
    for s in range(sampler.batches_per_epoch):
        b = src[s]
        for k in fields:
            out[k].append(b[k].numpy())
        out["index"].append(sampler.rank_indices(s, rank, world))
    return {k: np.concatenate(v) for k, v in out.items()}


def label_rows(e: dict[str, np.ndarray], ids: str, vals: str) -> list[tuple]:
    """Every (position) label row as a sortable tuple: the multiset of labels over the epoch."""
    a, b = e[ids], e[vals]
    return sorted(tuple(a[i, t].tolist()) + tuple(b[i, t].tolist()) for i in range(len(a)) for t in range(a.shape[1]))


@pytest.mark.parametrize(("fields", "ids", "vals"), [(ATTR, "concept_ids", "concept_scores"),
                                                     (ACT, "mix_ids", "mix_vals")])
def test_an_epoch_reshuffles_the_real_labels(arrays, fields, ids, vals):
    real, perm = epoch(arrays, fields, None), epoch(arrays, fields, 11)
    assert np.array_equal(real["index"], perm["index"]) and sorted(real["index"].tolist()) == list(range(N))
    assert np.array_equal(real["tokens"], perm["tokens"])  # tokens unchanged
    assert label_rows(real, ids, vals) == label_rows(perm, ids, vals)  # the same multiset of label rows
    assert all(not np.array_equal(real[ids][i], perm[ids][i]) for i in range(N))  # every window's labels differ
    # window i holds window pi(i)'s labels with positions shuffled, ids and scores moved together
    p = LabelPermutation(N, 11)
    for row, i in enumerate(perm["index"]):
        j, sigma = p.source[i], p.positions(i, T)
        assert j != i
        assert np.array_equal(perm[ids][row], arrays[ids][j][sigma])
        assert np.array_equal(perm[vals][row], arrays[vals][j][sigma].astype(np.float32))
    assert sorted(p.source.tolist()) == list(range(N))  # pi is a bijection


def test_deterministic_per_seed_and_the_same_on_any_rank(arrays):
    a, b, c = epoch(arrays, ATTR, 11), epoch(arrays, ATTR, 11), epoch(arrays, ATTR, 12)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["concept_ids"], c["concept_ids"])
    r0, r1 = epoch(arrays, ATTR, 11, 0, 2), epoch(arrays, ATTR, 11, 1, 2)
    for k in ATTR:  # two ranks' shares are the single process's rows of the same windows
        both = np.concatenate([r0[k], r1[k]])
        order = np.argsort(np.concatenate([r0["index"], r1["index"]]))
        assert np.array_equal(both[order], a[k][np.argsort(a["index"])])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=24, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


def cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(data), out_dir=str(out), preset="tiny", mode="cocomix", steps=4, micro_batch=4,
                eval_windows=8, eval_every=2, workers=0, progress=False, lr=3e-3, dropout=0.1)
    return TrainConfig(**{**base, **kw})


def test_the_shard_dataset_path_permutes_too(data):
    ds = open_split(load_manifest(data), "train", fields=ATTR)
    dtypes = {k: load_manifest(data).fields[k].dtype for k in ATTR}
    sampler = StepSampler(len(ds), 8, seed=1)
    real = StepBatches(ds, sampler, ATTR, dtypes, n_concepts=64)[0]
    perm = StepBatches(ds, sampler, ATTR, dtypes, n_concepts=64, permute_labels=3)[0]
    ds.close()
    assert (real["tokens"] == perm["tokens"]).all() and not (real["concept_ids"] == perm["concept_ids"]).all()


def test_validation_and_recall_use_the_real_labels(data, tmp_path):
    real = Trainer(cfg(data, tmp_path / "a")).evaluate()
    perm = Trainer(cfg(data, tmp_path / "b", permute_labels=11)).evaluate()
    assert "val_concept_recall" in perm and "val_concept_recall_prior" in perm
    assert real == perm  # the same initial model on the same (real) val labels and the same prior


def rows(out: Path) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r["concept_loss"], r.get("val_loss"), r.get("val_concept_loss"))
            for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())}


def test_training_sees_the_permuted_labels_and_resumes_identically(data, tmp_path):
    real = train(cfg(data, tmp_path / "real"))
    train(cfg(data, tmp_path / "full", permute_labels=11))
    train(cfg(data, tmp_path / "part", permute_labels=11, ckpt_every=2, halt_after=3))
    train(cfg(data, tmp_path / "part", permute_labels=11, ckpt_every=2))
    a, b = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert sorted(a) == [1, 2, 3, 4] and a == b
    # the first step's concept loss is on other labels (same initial model, same tokens)
    assert rows(tmp_path / "real")[1][1] != a[1][1] and real["step"] == 4

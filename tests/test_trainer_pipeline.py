"""The contract between the stages: a concept manifest written by the real extraction (stage 1 +
stage 2, a tiny random GPT-2 teacher with a real BPE tokenizer and a random TopK SAE) trains the
student in every mode, and the checkpoint decodes with the recorded tokenizer."""

from __future__ import annotations

import json

import pytest

from tests.helpers import owt_documents, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local", "one_thread")
T = 16


@pytest.fixture(scope="module")
def concepts(tmp_path_factory, tiny_teacher_dir):
    from pipeline.extract import ExtractConfig, run
    from pipeline.stage1 import TokenizeConfig
    from pipeline.stage1 import run as tokenize
    from sae import save_sae
    from tests.helpers import random_sae

    root = tmp_path_factory.mktemp("pipeline")
    corpus = write_corpus(root / "corpus.txt", [d[:1500] for d in owt_documents(12)])
    tokenize(TokenizeConfig(corpus=[str(corpus)], tokenizer=str(tiny_teacher_dir), out=str(root / "tokens"),
                            seq_len=T, val_fraction=0.2))
    save_sae(random_sae(d=64, c=300, k=8, layer=1, seed=1), root / "sae")
    run(ExtractConfig(tokens=str(root / "tokens"), teacher=str(tiny_teacher_dir), sae=str(root / "sae"),
                      out=str(root / "out"), k_mix=8, k_kd=4, batch_size=8, ray_address="local",
                      manifest=str(root / "out" / "owt.json")))
    return root / "out" / "owt.json"


@pytest.mark.parametrize("kw", [{"mode": "cocomix"}, {"mode": "cocomix", "labels": "activation"}, {"mode": "kd"},
                                {"mode": "ntp"}])
def test_extracted_manifest_trains(concepts, tmp_path, kw):
    from trainer.config import TrainConfig
    from trainer.loop import train

    out = train(TrainConfig(shards=str(concepts), out_dir=str(tmp_path), preset="tiny", steps=4, micro_batch=2,
                            eval_windows=4, workers=0, progress=False, verify="open", **kw))
    assert out["step"] == 4
    last = out["last"]
    assert all(v == v for v in last.values())  # no NaN from masked labels or the KD tail
    if kw["mode"] == "cocomix":
        assert last["concept_loss"] > 0 and "val_concept_loss" in last
        cfg = json.loads((tmp_path / "config.json").read_text())
        assert cfg["model"]["concept"]["n_concepts"] == 300
    if kw["mode"] == "kd":
        assert last["kd_loss"] >= 0


def test_checkpoint_generates_with_the_recorded_tokenizer(concepts, tmp_path):
    from trainer.config import TrainConfig
    from trainer.generate import main as generate_main
    from trainer.loop import train

    train(TrainConfig(shards=str(concepts), out_dir=str(tmp_path), preset="tiny", steps=2, micro_batch=2,
                      eval_windows=0, workers=0, progress=False))
    g = generate_main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "The news", "--max-new-tokens", "4",
                       "--steer", "7=5", "--show-concepts", "2", "--ignore-eos"])
    assert len(g.tokens) == 4 and all(len(c) == 2 for c in g.concepts)

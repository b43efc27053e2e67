"""Negative --layer means what Python means (-1: the last block), is resolved once and early, and only the
non-negative index is recorded (train_config.json, the SAE's cfg.json, the checkpoint, eval.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae import HookSpec, load_sae
from tests.helpers import owt_documents, write_corpus

SMALL = ["--n-latents", "64", "--k", "4", "--seq-len", "32", "--batch-size", "128", "--buffer-tokens", "512",
         "--threads", "1", "--warmup-steps", "2", "--max-tokens", "1024", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_teacher_dir):
    """A 2-block teacher, a corpus, and an SAE trained with --layer -1."""
    from sae.train import main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sae_layers")
    corpus = write_corpus(root / "corpus.txt", owt_documents(20))
    common = ["--teacher", str(tiny_teacher_dir), "--corpus", str(corpus), *SMALL, "--out", str(root / "sae")]
    summary = main([*common, "--layer", "-1"])
    return tiny_teacher_dir, corpus, root / "sae", common, summary


def test_train_layer_minus_one_is_the_last_block_recorded_non_negative(trained):
    from sae.train import main

    _, _, out, common, summary = trained
    assert json.loads((out / "train_config.json").read_text())["layer"] == 1
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["cocomix"]["hook"] == {"layer": 1, "location": "resid_post"}
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert load_sae(out).hook == HookSpec(1, "resid_post")
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["config"]["layer"] == 1
    # --layer 1 names the same block: the same finished run, nothing to do
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main([*common, "--layer", "1"]) == summary
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


def test_eval_layer_minus_one_equals_layer_one(trained, tmp_path):
    from sae.eval import main

    teacher, corpus, out, _, _ = trained
    base = ["--sae", str(out), "--teacher", str(teacher), "--corpus", str(corpus),
            "--seq-len", "32", "--max-tokens", "128"]
    neg = main([*base, "--layer", "-1", "--out", str(tmp_path / "neg.json")])
    pos = main([*base, "--layer", "1", "--out", str(tmp_path / "pos.json")])
    assert neg["hook"] == {"layer": 1, "location": "resid_post"} and neg["config"]["layer"] == 1
    assert json.loads((tmp_path / "neg.json").read_text())["config"]["layer"] == 1
    assert {k: v for k, v in neg.items() if k != "config"} == {k: v for k, v in pos.items() if k != "config"}
    # -2 is block 0: another tensor, another result
    assert main([*base, "--layer", "-2", "--out", str(tmp_path / "b0.json")])["hook"]["layer"] == 0


def test_help_says_what_negative_layers_mean():
    from common.cli import field_docs
    from pipeline.extract import ExtractConfig
    from sae.eval import build_parser as eval_parser
    from sae.train import build_parser as train_parser

    for text in (train_parser().format_help(), eval_parser().format_help(), field_docs(ExtractConfig)["layer"]):
        flat = " ".join(text.split())
        assert "-1 is the last block" in flat or "-1 = the last block" in flat, flat


def test_resolve_layer():
    from sae.hooks import resolve_layer

    assert [resolve_layer(i, 3) for i in (0, 2, -1, -3)] == [0, 2, 2, 0]
    for bad in (3, -4):
        with pytest.raises(ValueError, match=r"0\.\.2 \(or -3\.\.-1 counting from the last\)"):
            resolve_layer(bad, 3)
    with pytest.raises(ValueError, match="non-negative"):
        HookSpec(-1)  # only resolved indices are ever recorded


def test_train_refuses_layer_out_of_range_before_loading_the_teacher(trained, tmp_path, monkeypatch):
    import common.teacher
    from sae.train import main

    teacher, corpus, _, _, _ = trained

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded before --layer was checked")

    monkeypatch.setattr(common.teacher, "load_teacher", no_load)
    for layer in ("2", "-3"):
        with pytest.raises(ValueError, match=f"--layer {layer} is out of range"):
            main(["--teacher", str(teacher), "--corpus", str(corpus), *SMALL, "--layer", layer,
                  "--out", str(tmp_path / layer)])
        assert not Path(tmp_path / layer).exists()

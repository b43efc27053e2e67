"""Hooks on real HF models, TopK SAE training on a tiny random GPT-2, resume, eval, config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sae import HookSpec, capture_residual, load_sae, resolve_block, run_until_hook
from sae.hooks import hidden_size, n_layers
from sae.model import fraction_of_variance_unexplained
from tests.helpers import tiny_teacher, write_word_corpus

torch.set_num_threads(1)  # shared 2-core machines: oversubscribed OpenMP threads stall everything

# Small enough for a few seconds of CPU; threads=1 keeps it deterministic and polite on shared cores.
TRAIN_ARGS = ["--layer", "1", "--n-latents", "256", "--k", "16", "--seq-len", "64", "--batch-size", "256",
              "--buffer-tokens", "2048", "--warmup-steps", "10", "--lr", "3e-3", "--threads", "1",
              "--log-every", "5", "--checkpoint-every", "40"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_teacher(root / "teacher"), write_word_corpus(root / "corpus.txt")


# ------------------------------------------------------------------------ hooks
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64)).eval()


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_resid_post_matches_hidden_states_and_last_block_is_before_final_norm(make):
    model = make()
    ids = torch.randint(0, 64, (2, 10))
    assert n_layers(model) == 3 and hidden_size(model) == 32
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        for layer in range(3):
            with capture_residual(model, HookSpec(layer)) as cap:
                model(ids)
            if layer < 2:
                torch.testing.assert_close(cap.output, hs[layer + 1])
            else:  # HF's last entry is after the final norm; the hook is the block output itself
                assert not torch.allclose(cap.output, hs[3])
        with capture_residual(model, HookSpec(1), stop=True) as cap:
            run_until_hook(model, ids)
        torch.testing.assert_close(cap.output, hs[2])


@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_sublayer_outputs_sum_to_the_block_update(make):
    model = make()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        with (capture_residual(model, HookSpec(1, "attn_out")) as a,
              capture_residual(model, HookSpec(1, "mlp_out")) as m):
            model(ids)
    # resid_post(1) = resid_post(0) + attn_out(1) + mlp_out(1)
    torch.testing.assert_close(hs[1] + a.output + m.output, hs[2], atol=1e-5, rtol=1e-5)


def test_edit_replaces_the_tensor_and_gradients_flow_to_it():
    model = _llama()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        clean = model(ids).logits
        with capture_residual(model, HookSpec(1), edit=lambda x: x):
            same = model(ids).logits
        with capture_residual(model, HookSpec(1), edit=torch.zeros_like):
            zeroed = model(ids).logits
    torch.testing.assert_close(same, clean)
    assert not torch.allclose(zeroed, clean)
    leaf = {}

    def make_leaf(x):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    model.requires_grad_(False)
    with capture_residual(model, HookSpec(1), edit=make_leaf):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert leaf["x"].grad is not None and leaf["x"].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="out of range"):
        resolve_block(model, 7)


# ------------------------------------------------------------------------ training
def _held_out_fvu(sae_dir: Path, teacher: Path, tmp_path: Path) -> float:
    from common.teacher import load_teacher, load_tokenizer, separator_token_id
    from sae.data import iter_corpus_windows, teacher_activations

    corpus = write_word_corpus(tmp_path / "held_out.txt", n_docs=10, seed=1)  # documents not trained on
    tok = load_tokenizer(str(teacher))
    windows = list(iter_corpus_windows([str(corpus)], tok, 64, separator_token_id(tok)))[:16]
    model = load_teacher(str(teacher))
    sae = load_sae(sae_dir)
    import numpy as np

    x = teacher_activations(model, sae.hook, np.stack(windows), "cpu")
    with torch.no_grad():
        return fraction_of_variance_unexplained(x, sae(x).x_hat).item()


def test_training_reaches_low_fvu_with_few_dead_latents(tiny, tmp_path):
    from sae.train import main

    teacher, corpus = tiny
    out = tmp_path / "run"
    summary = main(["--teacher", str(teacher), "--corpus", str(corpus), "--max-tokens", "24000", "--out", str(out),
                    *TRAIN_ARGS])
    assert summary["tokens"] == 23808  # 93 whole batches of 256
    assert summary["fvu"] < 0.3 and summary["dead_fraction"] < 0.05
    # the saved SAE, applied in the teacher's raw space (it layer-norms internally), on other windows
    assert _held_out_fvu(out, teacher, tmp_path) < 0.3
    sae = load_sae(out)
    assert sae.hook == HookSpec(1, "resid_post") and sae.k == 16 and sae.normalize == "layernorm"
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(256), atol=1e-5, rtol=0)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 93 // 5 and json.loads(lines[0])["step"] == 5
    assert json.loads((out / "train_config.json").read_text())["lr_resolved"] == 3e-3


def test_resume_continues_exactly(tiny, tmp_path):
    from sae.train import main

    teacher, corpus = tiny
    common = ["--teacher", str(teacher), "--corpus", str(corpus), *TRAIN_ARGS, "--lr-decay-frac", "0"]
    full = main([*common, "--max-tokens", "20480", "--out", str(tmp_path / "full")])
    part = main([*common, "--max-tokens", "10240", "--out", str(tmp_path / "part")])
    assert part["step"] == 40
    with pytest.raises(ValueError, match="--resume"):
        main([*common, "--max-tokens", "20480", "--out", str(tmp_path / "part")])
    resumed = main([*common, "--max-tokens", "20480", "--out", str(tmp_path / "part"), "--resume"])
    assert resumed["step"] == full["step"] == 80
    assert resumed["fingerprint"] == full["fingerprint"], "resumed run must equal the uninterrupted one"
    with pytest.raises(ValueError, match="k=8 differs"):
        main([*common, "--max-tokens", "30720", "--out", str(tmp_path / "part"), "--resume", "--k", "8"])


def test_eval_reports_loss_recovered(tiny, tmp_path):
    from sae.eval import main as eval_main
    from sae.train import main

    teacher, corpus = tiny
    out = tmp_path / "run"
    main(["--teacher", str(teacher), "--corpus", str(corpus), "--max-tokens", "24000", "--out", str(out), *TRAIN_ARGS])
    r = eval_main(["--sae", str(out), "--teacher", str(teacher), "--corpus", str(corpus),
                   "--seq-len", "64", "--max-tokens", "1024"])
    assert r["tokens"] == 1024
    # a random teacher predicts nearly uniformly, so only check that both splices changed the loss
    assert r["loss_sae"] != r["loss_clean"] and r["loss_zero_ablation"] != r["loss_clean"]
    assert abs(r["loss_sae"] - r["loss_clean"]) < abs(r["loss_zero_ablation"] - r["loss_clean"]) * 10
    assert r["loss_recovered"] == pytest.approx(
        (r["loss_zero_ablation"] - r["loss_sae"]) / (r["loss_zero_ablation"] - r["loss_clean"]))
    assert 0 < r["fvu"] < 0.35 and 0 < r["fvu_normalized"] < 0.35 and 15 < r["l0"] <= 16
    assert 0 <= r["dead_fraction"] < 1 and 0 <= r["dense_fraction"] < 1
    assert json.loads((out / "eval.json").read_text())["fvu"] == r["fvu"]


def test_bad_configs(tiny, tmp_path):
    from sae.train import TrainConfig, main

    teacher, corpus = tiny
    with pytest.raises(ValueError, match="exactly one of --corpus or --tokens"):
        TrainConfig(teacher="x", layer=1, out="o")
    with pytest.raises(ValueError, match="k=300 must be in 1..n_latents=256"):
        TrainConfig(teacher="x", layer=1, out="o", corpus=["c"], n_latents=256, k=300)
    with pytest.raises(ValueError, match="out of range"):
        main(["--teacher", str(teacher), "--corpus", str(corpus), "--max-tokens", "1024", "--out", str(tmp_path / "x"),
              *TRAIN_ARGS[2:], "--layer", "5"])
    with pytest.raises(ValueError, match="does not exist"):
        main(["--teacher", str(teacher), "--corpus", str(tmp_path / "missing.txt"), "--max-tokens", "1024",
              "--out", str(tmp_path / "y"), *TRAIN_ARGS])


def test_eval_refuses_width_mismatch(tiny, tmp_path):
    from sae.eval import main as eval_main

    teacher, corpus = tiny
    fixture = Path(__file__).parent / "fixtures" / "sae" / "saelens_standard"
    shutil.copytree(fixture, tmp_path / "s")
    with pytest.raises(ValueError, match=r"d_in=8 does not match the teacher's width 64"):
        eval_main(["--sae", str(tmp_path / "s"), "--teacher", str(teacher), "--corpus", str(corpus),
                   "--max-tokens", "64"])


@pytest.mark.slow
def test_smollm2_hook_equals_hidden_states_and_stops_early():
    """The real offline teacher (Llama architecture, 30 blocks): block 9's output is hidden_states[10],
    and the early-stopped forward returns the same tensor."""
    from common.teacher import load_teacher, resolve_teacher

    try:
        resolve_teacher("smollm2-135m")
    except ValueError as e:
        pytest.skip(str(e))

    model = load_teacher("smollm2-135m")
    assert n_layers(model) == 30 and hidden_size(model) == 576
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        with capture_residual(model, HookSpec(9), stop=True) as cap:
            run_until_hook(model, ids)
    torch.testing.assert_close(cap.output, hs[10])


def test_tokens_dir_from_stage1_shards(tiny, tmp_path):
    """--tokens reads stage-1 windows (T + 1 tokens) through the shards API and trains on their first T."""
    import numpy as np

    from common.teacher import load_tokenizer, separator_token_id
    from sae.data import iter_corpus_windows, iter_shard_windows
    from sae.eval import main as eval_main
    from sae.train import main
    from shards import FieldSpec, Manifest, write_shard

    teacher, corpus = tiny
    tok = load_tokenizer(str(teacher))
    windows = np.stack(list(iter_corpus_windows([str(corpus)], tok, 65, separator_token_id(tok))))[:40]
    m = Manifest(kind="tokens", seq_len=64,
                 tokenizer={"name": "tiny", "fingerprint": "sha256:0", "vocab_size": len(tok),
                            "eos_id": separator_token_id(tok)}, fields={"tokens": FieldSpec("uint16", (65,))},
                 field_parts={"tokens": "tokens"})
    for k, chunk in enumerate((windows[:25], windows[25:])):
        part = write_shard(tmp_path / f"tokens-{k}.arrow", m.part_fields("tokens"), {"tokens": chunk.astype(np.uint16)})
        m.add_shard("train", len(chunk), {"tokens": part})
    m.save(tmp_path / "manifest.json")
    read = list(iter_shard_windows(str(tmp_path), "train"))
    assert len(read) == 40 and all((r == w[:64]).all() for r, w in zip(read, windows, strict=True))
    with pytest.raises(ValueError, match="no split 'val'"):
        next(iter_shard_windows(str(tmp_path), "val"))
    out = tmp_path / "run"
    s = main(["--teacher", str(teacher), "--tokens", str(tmp_path), "--max-tokens", "4096", "--out", str(out),
              *TRAIN_ARGS])
    assert s["tokens"] == 4096 and s["windows_read"] >= 2048 // 64
    r = eval_main(["--sae", str(out), "--teacher", str(teacher), "--tokens", str(tmp_path), "--split", "train",
                   "--max-tokens", "256"])
    assert r["tokens"] == 256

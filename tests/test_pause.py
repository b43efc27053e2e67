"""The pause-token baseline (paper Fig. 6f; Goyal et al. 2024): a learned vector interleaved after every
token from block pause_layer on, the LM head reading the pause slots. Values against a hand-built stream,
causality, the KV cache, accounting against CoCoMix, training (ntp, kd), bit-exact resume, user errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.test_model_cocomix import naive_block
from trainer import checkpoint
from trainer.config import ModelConfig, TrainConfig, get_preset
from trainer.generate import generate
from trainer.model import GPT, KVCache

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(pause_layer: int | None = 2, dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(vocab_size=97, block_size=32, n_layer=4, d_model=32, n_head=4, dropout=dropout,
                       pause_layer=pause_layer)


def model_for(pause_layer: int | None = 2, seed: int = 0) -> GPT:
    """A random pause model whose pause vector is large enough to matter."""
    torch.manual_seed(seed)
    m = GPT(tiny(pause_layer)).eval()
    with torch.no_grad():
        m.pause.normal_(std=1.0)
    return m


def naive_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The stream [h_1, p, h_2, p, ...] built position by position, blocks with an explicit mask,
    logits read from the pause slots."""
    B, T = idx.shape
    x = model.wte(idx) + model.wpe(torch.arange(T))
    L = model.cfg.pause_layer
    for b in model.blocks[:L]:
        x = naive_block(b, x)
    slots = []
    for t in range(T):
        slots += [x[:, t], model.pause.expand(B, -1)]
    x = torch.stack(slots, dim=1)  # (B, 2T, d)
    for b in model.blocks[L:]:
        x = naive_block(b, x)
    x = torch.stack([x[:, 2 * t + 1] for t in range(T)], dim=1)
    return model.lm_head(model.ln_f(x))


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_forward_and_grads_equal_naive_reference(layer):
    model = model_for(layer).double()
    idx = torch.randint(0, 97, (2, 11))
    out = model(idx)
    ref = naive_forward(model, idx)
    assert out.concept_logits is None and out.concept_ids is None
    torch.testing.assert_close(out.logits, ref)
    w = torch.randn_like(ref)
    params = list(model.parameters())
    g = torch.autograd.grad((out.logits * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    # The pause slots really are what the head reads: without them (plain NTP on the same weights) the
    # logits differ.
    plain = GPT(tiny(None)).double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pause"})
    assert not torch.allclose(plain(idx).logits, out.logits)


def test_gradient_reaches_the_pause_vector_and_training_moves_it():
    torch.manual_seed(1)
    model = GPT(tiny()).train()
    idx = torch.randint(0, 97, (2, 12))
    loss = F.cross_entropy(model(idx).logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert model.pause.grad is not None and model.pause.grad.abs().sum() > 0
    before = model.pause.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(before, model.pause)


def test_pause_layer_is_causal():
    """Changing token j changes no logit at a position before j (and does change position j's)."""
    model = model_for(2, seed=2)
    idx = torch.randint(0, 97, (1, 16))
    base = model(idx).logits
    for j in (0, 5, 15):
        other = idx.clone()
        other[0, j] = (other[0, j] + 1) % 97
        o = model(other).logits
        torch.testing.assert_close(o[:, :j], base[:, :j], rtol=0, atol=0)
        assert not torch.equal(o[:, j], base[:, j])


def test_kv_cache_equals_the_full_forward():
    model = model_for(2, seed=3)
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(model.cfg.n_layer)
        parts = [model(idx[:, :5], cache=cache).logits]
        parts += [model(idx[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert [cache.entries(i) for i in range(4)] == [12, 12, 24, 24] and cache.n_tokens == 12


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_cache_equals_without(temperature):
    model = model_for(2, seed=4)
    prompt = [3, 14, 15, 92, 65]
    a = generate(model, prompt, 20, temperature=temperature, top_k=10, use_cache=True, seed=1)
    b = generate(model, prompt, 20, temperature=temperature, top_k=10, use_cache=False, seed=1)
    assert a.tokens == b.tokens and a.concepts == b.concepts == []
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_params_and_flops_against_cocomix():
    """Same width and L_ins as the CoCoMix preset: the parameters of NTP on that backbone plus d, the
    FLOPs of CoCoMix minus its predictor and compression (the 2T positions after L_ins are the same)."""
    with torch.device("meta"):
        co = GPT(get_preset("69m", "cocomix"))
        c = co.cfg.concept
        pause = GPT(dataclasses.replace(co.cfg, concept=None, pause_layer=c.insert_layer))
        plain = GPT(dataclasses.replace(co.cfg, concept=None))
    d, T = co.cfg.d_model, 1024
    assert pause.interleaves and pause.insert_layer == c.insert_layer == 3
    assert pause.num_params() == plain.num_params() + d
    assert pause.flops_per_token(T) == co.flops_per_token(T) - 3 * (2 * d * c.n_concepts + 2 * c.topk * d)
    assert plain.flops_per_token(T) < pause.flops_per_token(T) < co.flops_per_token(T)
    # The interleaved blocks cost twice per token (plus attention over twice the context), directly:
    m = GPT(ModelConfig(vocab_size=100, block_size=16, n_layer=2, d_model=32, n_head=4, pause_layer=1))
    per_block = 2 * 12 * 32 * 32
    assert m.flops_per_token(16) == 3 * ((per_block + 2 * 32 * 16) + 2 * (per_block + 2 * 32 * 32) + 2 * 32 * 100)


# -- training ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from trainer.synthetic import write_manifest

    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=48, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


def base_kw(data: Path, **kw) -> dict:
    return dict(shards=str(data), preset="tiny", pause=True, micro_batch=8, lr=3e-3, warmup_steps=2,
                eval_windows=8, workers=0, progress=False) | kw


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ntp", "kd"])
def test_pause_trains_in_ntp_and_kd(data, tmp_path, mode):
    from trainer.loop import train

    train(TrainConfig(out_dir=str(tmp_path), mode=mode, steps=20, eval_every=10, **base_kw(data)))
    r = rows(tmp_path)
    first, last = (sum(x["ntp_loss"] for x in r[s]) / 4 for s in (slice(0, 4), slice(-4, None)))
    assert last < first - 0.3, (first, last)
    if mode == "kd":
        assert r[-1]["kd_loss"] < r[0]["kd_loss"]
    assert "val_loss" in r[-1]
    # The CoCoMix preset's backbone, pauses where its concepts go, no concept block.
    resolved = json.loads((tmp_path / "config.json").read_text())["model"]
    co = get_preset("tiny", "cocomix")
    assert resolved["concept"] is None and resolved["pause_layer"] == co.concept.insert_layer
    assert resolved["d_model"] == co.d_model and resolved["n_layer"] == co.n_layer
    # The checkpoint holds a trained pause vector and generates the same with and without the cache.
    weights = load_file(str(checkpoint.latest(tmp_path / "ckpt") / "model.safetensors"))
    assert weights["pause"].shape == (co.d_model,)
    model, _ = checkpoint.load_model_from(tmp_path / "ckpt")
    assert model.pause is not None and torch.equal(model.pause.detach(), weights["pause"])
    a = generate(model, [1, 2, 3], 8, use_cache=True)
    b = generate(model, [1, 2, 3], 8, use_cache=False)
    assert a.tokens == b.tokens


def test_kill_and_resume_gives_identical_losses(data, tmp_path):
    from tests.test_trainer_resume import losses
    from trainer.loop import train

    # 48 windows / 8 per step = 6 steps per epoch: 8 steps cross an epoch boundary; dropout on.
    kw = base_kw(data, mode="kd", steps=8, dropout=0.1, eval_every=2)
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    part = train(TrainConfig(out_dir=str(tmp_path / "part"), ckpt_every=3, halt_after=5, **kw))
    assert part["step"] == 5
    resumed = train(TrainConfig(out_dir=str(tmp_path / "part"), ckpt_every=3, resume="auto", **kw))
    assert resumed["step"] == full["step"] == 8
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # exact equality of losses, grad norms and val losses at every step
    wa = load_file(str(checkpoint.latest(tmp_path / "full" / "ckpt") / "model.safetensors"))
    wb = load_file(str(checkpoint.latest(tmp_path / "part" / "ckpt") / "model.safetensors"))
    assert sorted(wa) == sorted(wb) and "pause" in wa and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- user errors -------------------------------------------------------------------------------------


def one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("argv,want", [
    (["--mode", "cocomix", "--pause"], "--pause applies to --mode ntp or kd, not cocomix"),
    (["--mode", "ntp", "--pause", "--mix", "add"], "--mix/--concept-topk only apply to --mode cocomix"),
    (["--mode", "kd", "--pause", "--concept-topk", "4"], "--mix/--concept-topk only apply to --mode cocomix"),
    (["--mode", "ntp", "--insert-layer", "1"], "--insert-layer applies to --mode cocomix or --pause"),
    (["--mode", "ntp", "--pause", "--insert-layer", "9"], "pause_layer=9 must be in [0, n_layer=4]"),
])
def test_train_user_errors(data, tmp_path, capsys, argv, want):
    from trainer.run import cli

    out = tmp_path / "out"
    rc = cli(["--shards", str(data), "--out-dir", str(out), "--preset", "tiny", "--steps", "1", "--no-progress"]
             + argv)
    assert want in one_line_error(capsys, rc)
    assert not out.exists() or not any(out.iterdir())


def test_export_refuses_a_pause_model(tmp_path, capsys):
    from trainer.export import cli

    model = GPT(tiny())
    cfg = {"model": model.cfg.to_dict(), "tokenizer": {"name": "synthetic"}, "train": {"mode": "ntp"}, "step": 1}
    checkpoint.save(tmp_path / "ckpt", model, torch.optim.AdamW(model.parameters()), cfg, {"step": 1})
    rc = cli(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    err = one_line_error(capsys, rc)
    assert "pause models are not exportable to the Hugging Face format" in err and "trainer.generate" in err
    assert not (tmp_path / "hf").exists() and not any(p.name.startswith(".hf") for p in tmp_path.iterdir())

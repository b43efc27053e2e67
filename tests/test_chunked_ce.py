"""The chunked LM head + loss (trainer/chunked_ce.py) equals the plain full-logits path: loss values
and gradients w.r.t. the hidden states and the tied head weight, for NTP, KD and CoCoMix, chunk sizes
that do and do not divide B*T, masked KD positions; and a tiny training run gives the same curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.chunked_ce import head_losses
from trainer.config import ModelConfig, TrainConfig, get_preset
from trainer.loop import train
from trainer.model import GPT
from trainer.objectives import compute_losses, kd_loss, ntp_loss
from trainer.synthetic import write_manifest

B, T, D, V, K = 3, 7, 16, 50, 4  # B*T = 21 positions


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    w = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    tg = torch.randint(0, V, (B, T), generator=g)
    # The teacher's top-k: distinct ids (as extraction writes them) with their log-probs.
    lp, ids = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(K, -1)
    lp[0, 2, 1] = -float("inf")  # a masked KD position
    return h, w, tg, ids, lp


@pytest.mark.parametrize("chunk", [1, 4, 7, 21, 64])
@pytest.mark.parametrize("kd_weight", [0.0, 0.3])
def test_values_and_gradients_equal_the_plain_head(chunk, kd_weight):
    h, w, tg, ids, lp = _inputs()
    logits = h @ w.t()
    ref_ntp = ntp_loss(logits, tg)
    ref_kd = kd_loss(logits, ids, lp) if kd_weight else None
    ref = ref_ntp + kd_weight * ref_kd if kd_weight else ref_ntp
    ref_g = torch.autograd.grad(ref * 1.7, [h, w])  # a non-unit incoming gradient (grad_accum, lambda)
    out = head_losses(h, w, tg, chunk, ids if kd_weight else None, lp if kd_weight else None, kd_weight)
    got_g = torch.autograd.grad(out.total * 1.7, [h, w])
    torch.testing.assert_close(out.total, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.ntp, ref_ntp.detach(), rtol=1e-6, atol=1e-6)
    if kd_weight:
        torch.testing.assert_close(out.kd, ref_kd.detach(), rtol=1e-6, atol=1e-6)
    else:
        assert out.kd is None
    for got, exp in zip(got_g, ref_g, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_without_gradient_the_values_match_and_no_graph_is_built():
    h, w, tg, ids, lp = _inputs(1)
    with torch.no_grad():
        out = head_losses(h, w, tg, 5, ids, lp, 0.1)
        ref_ntp, ref_kd = ntp_loss(h @ w.t(), tg), kd_loss(h @ w.t(), ids, lp)
    assert not out.total.requires_grad
    torch.testing.assert_close(out.ntp, ref_ntp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.kd, ref_kd, rtol=1e-6, atol=1e-6)


def test_a_wrong_chunk_is_refused():
    h, w, tg, _, _ = _inputs()
    with pytest.raises(ValueError, match="chunk"):
        head_losses(h, w, tg, 0)
    with pytest.raises(ValueError, match="loss-chunk"):
        TrainConfig(loss_chunk=-1)


def _batch(cfg: ModelConfig, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t, v = 2, 16, cfg.vocab_size
    batch = {"tokens": torch.randint(0, v, (b, t + 1), generator=g)}
    if mode == "cocomix":
        batch["concept_ids"] = torch.randint(0, cfg.concept.n_concepts, (b, t, 4), generator=g)
        batch["concept_scores"] = torch.rand(b, t, 4, generator=g)
        batch["concept_scores"][0, 3, 2] = -float("inf")  # an invalid label slot
    if mode == "kd":
        lp, ids = torch.log_softmax(torch.randn(b, t, v, generator=g), -1).topk(4, -1)
        lp[1, 5] = -float("inf")
        batch["kd_ids"], batch["kd_logprobs"] = ids, lp
    return batch


@pytest.mark.parametrize("mode, mix", [("ntp", None), ("kd", None), ("cocomix", "interleave"), ("cocomix", "add")])
@pytest.mark.parametrize("chunk", [5, 32])
def test_the_model_losses_and_every_parameter_gradient_match(mode, mix, chunk):
    """Through GPT(head=False) + compute_losses: CoCoMix's interleaving sends only the concept slots
    through the head; the tied embedding/head weight gets both of its gradients."""
    cfg = get_preset("tiny", mode)
    if mix is not None:
        cfg.concept.mix = mix
    torch.manual_seed(0)
    model = GPT(cfg)
    batch = _batch(cfg, mode)
    ref = compute_losses(model(batch["tokens"][:, :-1]), batch, mode)
    ref_g = torch.autograd.grad(ref.total, list(model.parameters()))
    out = compute_losses(model(batch["tokens"][:, :-1], head=False), batch, mode,
                         head_weight=model.lm_head.weight, chunk=chunk)
    got_g = torch.autograd.grad(out.total, list(model.parameters()))
    torch.testing.assert_close(out.total, ref.total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.ntp, ref.ntp.detach(), rtol=1e-6, atol=1e-6)
    # fp32 rounding differences (the chunked head sums in another order) pass through the blocks'
    # backward; a wrong gradient would be off by O(|grad|), not by 1e-4 of it.
    for name, got, exp in zip([n for n, _ in model.named_parameters()], got_g, ref_g, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4 * exp.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["ntp", "cocomix", "kd"])
def test_a_training_run_follows_the_plain_curve(tmp_path, mode):
    man = write_manifest(tmp_path / "d", windows=48, val_windows=8, seq_len=32, vocab=256, n_concepts=128)
    curves = {}
    for chunk in (0, 100):  # 100 does not divide micro_batch x T = 256
        out = tmp_path / f"run{chunk}"
        train(TrainConfig(shards=str(man), out_dir=str(out), preset="tiny", mode=mode, steps=12, micro_batch=8,
                          lr=3e-3, warmup_steps=2, eval_every=0, eval_windows=8, workers=0, progress=False,
                          loss_chunk=chunk))
        rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
        curves[chunk] = [r["loss"] for r in rows if "loss" in r]
    assert len(curves[0]) == 12
    for a, b in zip(curves[0], curves[100], strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (curves[0], curves[100])

"""The CoCoMix student against a naive reference: values, gradients, causality, variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.concept import ConceptBlock, dense_reference
from trainer.config import ConceptConfig, ModelConfig, get_preset
from trainer.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(mix: str = "interleave", dropout: float = 0.0, **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=97, block_size=32, n_layer=4, d_model=32, n_head=4, dropout=dropout,
        concept=ConceptConfig(n_concepts=64, insert_layer=2, topk=5, mix=mix, **kw),
    )


def naive_attention(block, x: torch.Tensor) -> torch.Tensor:
    """Attention with an explicit lower-triangular mask and softmax (no SDPA)."""
    a = block.attn
    B, L, d = x.shape
    nh = a.n_head
    q, k, v = a.qkv(x).split(d, dim=2)
    q, k, v = (t.view(B, L, nh, d // nh).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(d // nh)
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return a.proj((att @ v).transpose(1, 2).reshape(B, L, d))


def naive_block(block, x):
    x = x + naive_attention(block, block.ln_1(x))
    return x + block.mlp(block.ln_2(x))


def naive_forward(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked compression and an explicit per-position interleave loop."""
    B, T = idx.shape
    x = model.wte(idx) + model.wpe(torch.arange(T))
    L = model.cfg.concept.insert_layer
    for b in model.blocks[:L]:
        x = naive_block(b, x)
    z, c_hat = dense_reference(model.concept, x)
    mix = model.cfg.concept.mix
    if mix == "interleave":
        slots = []
        for t in range(T):
            slots += [x[:, t], c_hat[:, t]]
        x = torch.stack(slots, dim=1)  # (B, 2T, d)
    elif mix == "add":
        x = x + c_hat
    for b in model.blocks[L:]:
        x = naive_block(b, x)
    if mix == "interleave":
        x = torch.stack([x[:, 2 * t + 1] for t in range(T)], dim=1)
    return model.lm_head(model.ln_f(x)), z


def test_concept_block_sparse_equals_dense_values_and_grads():
    torch.manual_seed(0)
    cfg = ConceptConfig(n_concepts=300, insert_layer=0, topk=7)
    blk = ConceptBlock(24, cfg)
    torch.nn.init.normal_(blk.comp_weight, std=0.1)
    torch.nn.init.normal_(blk.pre_bias, std=0.1)
    h = torch.randn(3, 11, 24, dtype=torch.float64, requires_grad=True)
    blk = blk.double()
    out = blk(h)
    z_ref, c_ref = dense_reference(blk, h)
    torch.testing.assert_close(out.logits, z_ref)
    torch.testing.assert_close(out.c_hat, c_ref)
    w = torch.randn_like(c_ref)
    g_sparse = torch.autograd.grad((out.c_hat * w).sum() + out.logits.sum() * 0.01, [h, *blk.parameters()])
    g_dense = torch.autograd.grad((c_ref * w).sum() + z_ref.sum() * 0.01, [h, *blk.parameters()])
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b)
    # Only the k selected columns of W_comp receive gradient at each position.
    names = ["h"] + [n for n, _ in blk.named_parameters()]
    g_comp = g_sparse[names.index("comp_weight")]  # (C, d): row i is W_comp's column i
    touched = set((g_comp.abs().sum(-1) > 0).nonzero().flatten().tolist())
    assert touched == set(out.top_idx.flatten().tolist())


@pytest.mark.parametrize("mix", ["interleave", "add", "none"])
def test_forward_and_grads_equal_naive_reference(mix):
    torch.manual_seed(1)
    model = GPT(tiny(mix)).double()
    idx = torch.randint(0, 97, (2, 13))
    out = model(idx)
    ref_logits, ref_z = naive_forward(model, idx)
    torch.testing.assert_close(out.logits, ref_logits)
    torch.testing.assert_close(out.concept_logits, ref_z)
    w1 = torch.randn_like(ref_logits)
    w2 = torch.randn_like(ref_z)
    params = [p for p in model.parameters()]
    g = torch.autograd.grad((out.logits * w1).sum() + (out.concept_logits * w2).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref_logits * w1).sum() + (ref_z * w2).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, msg=name)


def test_interleave_is_causal():
    """Changing tokens after t changes neither the logits nor the concepts at positions <= t."""
    torch.manual_seed(2)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (1, 16))
    base = model(idx)
    for t in (0, 5, 14):
        other = idx.clone()
        other[0, t + 1 :] = (other[0, t + 1 :] + 1 + torch.arange(15 - t)) % 97
        o = model(other)
        torch.testing.assert_close(o.logits[:, : t + 1], base.logits[:, : t + 1], rtol=0, atol=0)
        torch.testing.assert_close(o.concept_logits[:, : t + 1], base.concept_logits[:, : t + 1], rtol=0, atol=0)
        assert not torch.equal(o.logits[:, t + 1 :], base.logits[:, t + 1 :])


def test_concept_slot_sees_its_own_token_but_token_slot_not_its_concept():
    """Gradient check on the 2T stream: slot c_t depends on h_t; slot h_t does not depend on c_t."""
    torch.manual_seed(3)
    model = GPT(tiny()).eval().double()
    idx = torch.randint(0, 97, (1, 6))
    emb = (model.wte(idx) + model.wpe(torch.arange(6))).detach().requires_grad_(True)
    x = emb
    for b in model.blocks[:2]:
        x = b(x)
    c = model.concept(x).c_hat
    s = torch.stack([x, c], 2).view(1, 12, -1)
    for b in model.blocks[2:]:
        s = b(s)
    t = 3
    g = torch.autograd.grad(s[0, 2 * t].sum(), emb, retain_graph=True)[0]  # token slot h_t
    assert g[0, t + 1 :].abs().max() == 0
    g2 = torch.autograd.grad(s[0, 2 * t + 1].sum(), emb)[0]  # concept slot c_t
    assert g2[0, t].abs().max() > 0 and g2[0, t + 1 :].abs().max() == 0


def test_steering_scales_the_chosen_logit_before_topk():
    torch.manual_seed(4)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (1, 8))
    base = model(idx)
    cid = int(torch.topk(base.concept_logits[0, -1], 20).indices[-1])  # ranked 20th, not selected
    assert cid not in base.concept_ids[0, -1].tolist()
    s = 50.0 if base.concept_logits[0, -1, cid] > 0 else -50.0
    o = model(idx, steer={cid: s}, steer_from=7)
    torch.testing.assert_close(o.concept_logits[0, -1, cid], base.concept_logits[0, -1, cid] * s)
    assert cid in o.concept_ids[0, -1].tolist()  # steered into the top k
    torch.testing.assert_close(o.logits[:, :7], base.logits[:, :7])  # earlier positions unsteered
    assert not torch.equal(o.logits[:, 7], base.logits[:, 7])


def test_presets_and_flops_ratio():
    """Paper shapes build (on the meta device) and CoCoMix costs more FLOPs than NTP at 69M."""
    with torch.device("meta"):
        co, ntp = GPT(get_preset("69m", "cocomix")), GPT(get_preset("69m", "ntp"))
    assert co.cfg.n_layer == 8 and co.cfg.d_model == 512 and co.cfg.concept.insert_layer == 3
    assert (ntp.cfg.d_model == 624 and get_preset("386m", "ntp").d_model == 1072
            and get_preset("1.38b", "kd").d_model == 2096)
    r = co.flops_per_token(1024) / ntp.flops_per_token(1024)
    assert 1.1 < r < 2.0
    # flops_per_token matches a direct count for a tiny NTP model: 6 * matmul params + attention.
    m = GPT(ModelConfig(vocab_size=100, block_size=16, n_layer=2, d_model=32, n_head=4))
    expected = 3 * (2 * (2 * 12 * 32 * 32 + 2 * 32 * 16) + 2 * 32 * 100)
    assert m.flops_per_token(16) == expected


def test_config_errors():
    with pytest.raises(ValueError, match="topk"):
        ConceptConfig(n_concepts=4, topk=8)
    with pytest.raises(ValueError, match="mix"):
        ConceptConfig(mix="concat")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="insert_layer"):
        ModelConfig(n_layer=2, concept=ConceptConfig(insert_layer=3))
    with pytest.raises(ValueError, match="ntp"):
        ConceptConfig(mix="none", concept_loss=False)


def test_dropout_trains_with_sdpa():
    torch.manual_seed(5)
    model = GPT(tiny(dropout=0.5)).train()
    idx = torch.randint(0, 97, (2, 8))
    a, b = model(idx).logits, model(idx).logits
    assert not torch.equal(a, b)
    loss = F.cross_entropy(a.flatten(0, 1), idx.flatten())
    loss.backward()

"""SparseAutoencoder: sparse vs dense paths, normalisation round trip, attribution helper, checks."""

from __future__ import annotations

import pytest
import torch

from sae import HookSpec, SparseAutoencoder
from sae.model import fraction_of_variance_unexplained


def _sae(activation="topk", normalize="layernorm", d=32, n=96, k=8, seed=0) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, n, activation, k if activation == "topk" else None, normalize=normalize)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.2 if name == "threshold"
                    else torch.randn(p.shape, generator=gen) * 0.3)
    return sae


@pytest.mark.parametrize("normalize", ["none", "layernorm", "constant", "sqrt_d"])
def test_sparse_and_dense_paths_agree(normalize):
    sae = _sae(normalize=normalize)
    sae.norm_scale = 0.7
    x = torch.randn(50, 32) * 3 + 1
    with torch.no_grad():
        ids, vals = sae.encode_topk(x)
        dense = sae.encode(x)
        assert ids.shape == (50, 8) and ids.dtype == torch.int64
        assert (vals[:, :-1] >= vals[:, 1:]).all(), "values must be sorted descending"
        scattered = torch.zeros_like(dense).scatter_(-1, ids, vals)
        torch.testing.assert_close(scattered, dense)
        assert ((dense != 0).sum(-1) <= 8).all()
        _, stats = sae.normalize_input(x)
        torch.testing.assert_close(sae.decode_sparse(ids, vals, stats), sae.decode(dense, stats), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x).x_hat, sae.decode(dense, stats), atol=1e-5, rtol=1e-5)


def test_topk_matches_naive_reference():
    sae = _sae()
    x = torch.randn(20, 32)
    with torch.no_grad():
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        xn = (x - mu) / (std + 1e-5)
        pre = (xn - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        top = pre.topk(8, dim=-1)
        c = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        x_hat = (c @ sae.W_dec + sae.b_dec) * std + mu
        torch.testing.assert_close(sae.pre_activations(x), pre, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x).x_hat, x_hat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_non_topk_sparse_path_is_the_largest_activations(activation):
    sae = _sae(activation, normalize="none")
    x = torch.randn(10, 32)
    with torch.no_grad():
        dense = sae.encode(x)
        ids, vals = sae.encode_topk(x, k=5)
        torch.testing.assert_close(vals, dense.topk(5, dim=-1).values)
        torch.testing.assert_close(torch.gather(dense, 1, ids), vals)
        if activation == "jumprelu":
            pre = sae.pre_activations(x)
            assert ((dense > 0) == (pre > sae.threshold) & (pre > 0)).all()
    with pytest.raises(ValueError, match="has no k"):
        sae.encode_topk(x)


@pytest.mark.parametrize("normalize", ["layernorm", "constant", "sqrt_d", "none"])
def test_normalisation_round_trip(normalize):
    sae = _sae(normalize=normalize)
    sae.norm_scale = 3.0
    x = torch.randn(16, 32) * 4 + 2
    xn, stats = sae.normalize_input(x)
    back = sae.denormalize(xn, stats)
    if normalize == "layernorm":
        # OpenAI divides by (std + eps) but multiplies back by std: exact up to eps / std
        assert torch.allclose(xn.mean(-1), torch.zeros(16), atol=1e-5)
        torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-5)
        std = x.std(-1, keepdim=True)
        torch.testing.assert_close((back - x.mean(-1, keepdim=True)) * (std + 1e-5) / std + x.mean(-1, keepdim=True), x)
    else:
        torch.testing.assert_close(back, x)
    if normalize == "sqrt_d":
        torch.testing.assert_close(xn.norm(dim=-1), torch.full((16,), 32**0.5))


def test_decode_sparse_gradients_match_dense():
    sae = _sae(normalize="none")
    x = torch.randn(12, 32)
    ids, vals = sae.encode_topk(x)
    sparse = sae.decode_sparse(ids, vals).pow(2).sum()
    g_sparse = torch.autograd.grad(sparse, [sae.W_dec, sae.W_enc, sae.b_dec])
    dense = sae.decode(sae.encode(x)).pow(2).sum()
    g_dense = torch.autograd.grad(dense, [sae.W_dec, sae.W_enc, sae.b_dec])
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fvu_and_fingerprint():
    x = torch.randn(100, 8)
    assert fraction_of_variance_unexplained(x, x).item() == 0
    assert abs(fraction_of_variance_unexplained(x, x.mean(0).expand_as(x)).item() - 1) < 1e-6
    a, b = _sae(seed=1), _sae(seed=1)
    assert a.fingerprint() == b.fingerprint()
    b.hook = HookSpec(2)
    assert a.fingerprint() != b.fingerprint()


def test_constructor_checks():
    with pytest.raises(ValueError, match="k=200 is larger than n_latents=100"):
        SparseAutoencoder(8, 100, "topk", 200)
    with pytest.raises(ValueError, match="unknown SAE activation"):
        SparseAutoencoder(8, 100, "gelu", None)
    with pytest.raises(ValueError, match="normalisation"):
        SparseAutoencoder(8, 100, "topk", 4, normalize="batchnorm")
    with pytest.raises(ValueError, match="input width 7"):
        _sae().encode(torch.randn(3, 7))
    with pytest.raises(ValueError, match="exceeds the SAE's own k"):
        _sae().encode_topk(torch.randn(3, 32), k=9)
    with pytest.raises(ValueError, match="hook location"):
        HookSpec(1, "resid_mid")

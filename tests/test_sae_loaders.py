"""Each SAE loader against the library that defines the format, fp32, atol 1e-5.

Stored fixtures (tests/fixtures/sae, written by make_fixtures.py with sae-lens 6.54 / eai-sparsify 1.3)
always run; the `live` tests regenerate them with the installed library and are skipped without it.
OpenAI's `sparse_autoencoder` is not on PyPI: its forward is restated below from its published
model.py (LN, TopK, Autoencoder) as a naive reference, and its `.pt` state dict is written here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import HookSpec, detect_format, load_sae, save_sae
from sae.model import SparseAutoencoder

FIXTURES = Path(__file__).parent / "fixtures" / "sae"
SAELENS_FIXTURES = ["saelens_standard", "saelens_topk_layernorm", "saelens_topk_rescaled",
                    "saelens_jumprelu_sqrtd", "saelens_old_topk"]
ALL_FIXTURES = SAELENS_FIXTURES + ["sparsify/layers.1"]
ATOL = 1e-5


def _check_against(sae: SparseAutoencoder, expected: dict[str, torch.Tensor]) -> None:
    x = expected["x"]
    with torch.no_grad():
        acts = sae.encode(x)
        torch.testing.assert_close(acts, expected["acts"], atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x).x_hat, expected["x_hat"], atol=ATOL, rtol=0)
        xn, stats = sae.normalize_input(x)
        torch.testing.assert_close(sae.decode(expected["acts"], stats), expected["x_hat"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_loader_matches_stored_library_outputs(name):
    d = FIXTURES / name
    sae = load_sae(d)
    assert sae.d_in == 8 and sae.n_latents == 24
    _check_against(sae, load_file(str(d / "expected.safetensors")))


def test_detected_formats_and_hooks():
    assert detect_format(FIXTURES / "saelens_standard") == "saelens"
    assert detect_format(FIXTURES / "sparsify" / "layers.1") == "sparsify"
    assert load_sae(FIXTURES / "saelens_standard").hook == HookSpec(1, "resid_post")
    # pre-6.0 hook_point blocks.2.hook_resid_pre is the output of block 1
    assert load_sae(FIXTURES / "saelens_old_topk").hook == HookSpec(1, "resid_post")
    assert load_sae(FIXTURES / "sparsify" / "layers.1").hook == HookSpec(1, "resid_post")
    with pytest.raises(ValueError, match="several hookpoints"):
        detect_format(FIXTURES / "sparsify")
    assert load_sae(FIXTURES / "saelens_topk_rescaled").metadata["folded"] == ["rescale_acts_by_decoder_norm"]


# ------------------------------------------------------------------------ live libraries
def _make_fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_live_saelens(tmp_path):
    pytest.importorskip("sae_lens")
    mk = _make_fixtures_module()
    for d in mk.make_saelens(tmp_path):
        x = torch.randn(7, mk.D_IN) * 3
        acts, x_hat = mk.saelens_outputs(d, x)
        _check_against(load_sae(d), {"x": x, "acts": acts, "x_hat": x_hat})
        # the stored fixture still matches what this library version computes
        stored = FIXTURES / d.name
        e = load_file(str(stored / "expected.safetensors"))
        acts_now, x_hat_now = mk.saelens_outputs(stored, e["x"])
        torch.testing.assert_close(acts_now, e["acts"], atol=ATOL, rtol=0)
        torch.testing.assert_close(x_hat_now, e["x_hat"], atol=ATOL, rtol=0)


def test_live_sparsify(tmp_path):
    pytest.importorskip("sparsify")
    mk = _make_fixtures_module()
    (d,) = mk.make_sparsify(tmp_path)
    x = torch.randn(7, mk.D_IN) * 3
    acts, x_hat = mk.sparsify_outputs(d, x)
    _check_against(load_sae(d), {"x": x, "acts": acts, "x_hat": x_hat})


@pytest.mark.parametrize("activation,normalize", [("topk", "layernorm"), ("relu", "none"), ("jumprelu", "sqrt_d")])
def test_our_format_is_read_by_saelens(tmp_path, activation, normalize):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae(activation, normalize)
    save_sae(sae, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    x = torch.randn(9, sae.d_in) * 2 + 1
    with torch.no_grad():
        acts = theirs.encode(x)
        torch.testing.assert_close(sae.encode(x), acts, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x).x_hat, theirs.decode(acts), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ our format
def _random_sae(activation="topk", normalize="layernorm", d=16, n=48, seed=0) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, n, activation, 5 if activation == "topk" else None, normalize=normalize,
                            hook=HookSpec(3, "mlp_out"))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.3 if name == "threshold"
                    else torch.randn(p.shape, generator=gen) * 0.4)
    return sae


def test_cocomix_round_trip_and_fingerprint(tmp_path):
    sae = _random_sae()
    save_sae(sae, tmp_path / "s")
    assert detect_format(tmp_path / "s") == "cocomix"
    back = load_sae(tmp_path / "s")
    assert back.fingerprint() == sae.fingerprint() and back.fingerprint().startswith("sha256:")
    assert back.hook == HookSpec(3, "mlp_out") and back.normalize == "layernorm" and back.k == 5
    entry = back.describe()
    assert entry["format"] == "cocomix" and entry["fingerprint"] == sae.fingerprint() and entry["n_latents"] == 48
    with torch.no_grad():
        back.b_enc[0] += 1e-3
    assert back.fingerprint() != sae.fingerprint()


def test_constant_normalisation_is_folded_on_save(tmp_path):
    sae = _random_sae(normalize="constant")
    sae.norm_scale = 0.25
    save_sae(sae, tmp_path / "s")
    back = load_sae(tmp_path / "s")
    assert back.normalize == "none"
    x = torch.randn(5, 16) * 4
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, atol=ATOL, rtol=1e-5)


# ------------------------------------------------------------------------ OpenAI
def _openai_reference(state: dict, x: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """openai/sparse_autoencoder model.py, restated: LN (unbiased std, eps added to std), then
    encode_pre_act = (x - pre_bias) @ encoder.T + latent_bias, TopK = topk then ReLU, scattered;
    decode = decoder(latents) + pre_bias, then * std + mu."""
    mu = std = None
    if normalize:
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    pre = torch.nn.functional.linear(x - state["pre_bias"], state["encoder.weight"], state["latent_bias"])
    if state.get("activation", "ReLU") == "TopK":
        top = torch.topk(pre, k=state["activation_state_dict"]["k"], dim=-1)
        latents = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    else:
        latents = torch.relu(pre)
    recons = torch.nn.functional.linear(latents, state["decoder.weight"]) + state["pre_bias"]
    if normalize:
        recons = recons * std + mu
    return latents, recons


def _openai_state(activation="TopK", d=12, n=40, k=6, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {
        "pre_bias": torch.randn(d, generator=gen),
        "encoder.weight": torch.randn(n, d, generator=gen) * 0.5,
        "latent_bias": torch.randn(n, generator=gen) * 0.5,
        "decoder.weight": torch.randn(d, n, generator=gen) * 0.5,
        "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
        "activation": activation,
    }
    if activation == "TopK":
        state["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return state


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_loader_matches_reference(tmp_path, activation):
    state = _openai_state(activation)
    path = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "5.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    sae = load_sae(path)
    assert detect_format(path) == "openai"
    # OpenAI's rule: TopK implies layer norm; the hook comes from the published path layout
    assert sae.normalize == ("layernorm" if activation == "TopK" else "none")
    assert sae.metadata["normalize_rule"] == sae.normalize
    assert sae.hook == HookSpec(5, "resid_post")
    x = torch.randn(10, 12) * 2 + 0.5
    latents, recons = _openai_reference(state, x, normalize=activation == "TopK")
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), latents, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x).x_hat, recons, atol=ATOL, rtol=0)


def test_openai_normalisation_override_is_recorded(tmp_path):
    state = _openai_state("TopK")
    torch.save(state, tmp_path / "sae.pt")
    sae = load_sae(tmp_path / "sae.pt", normalize="none")
    assert sae.normalize == "none" and sae.metadata["normalize_override"] == "none"
    assert sae.hook.layer is None
    x = torch.randn(4, 12)
    latents, recons = _openai_reference(state, x, normalize=False)
    with torch.no_grad():
        torch.testing.assert_close(sae(x).x_hat, recons, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ folding and bad input
def test_saelens_finetuning_scaling_factor_is_folded(tmp_path):
    d = tmp_path / "old"
    shutil.copytree(FIXTURES / "saelens_old_topk", d)
    w = load_file(str(d / "sae_weights.safetensors"))
    sf = torch.linspace(0.5, 2.0, 24)
    save_file(w | {"scaling_factor": sf}, str(d / "sae_weights.safetensors"))
    cfg = json.loads((d / "cfg.json").read_text()) | {"finetuning_scaling_factor": True}
    (d / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(d)
    assert sae.metadata["folded"] == ["finetuning_scaling_factor"]
    x = torch.randn(5, 8)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    x_hat = (acts * sf) @ w["W_dec"] + w["b_dec"]  # SAELens <6: scaling factor applied before decode
    with torch.no_grad():
        torch.testing.assert_close(sae(x).x_hat, x_hat, atol=ATOL, rtol=0)


def _copy(tmp_path, name="saelens_topk_layernorm") -> Path:
    d = tmp_path / "c"
    shutil.copytree(FIXTURES / name, d)
    return d


def _edit_cfg(d: Path, **changes) -> None:
    cfg = json.loads((d / "cfg.json").read_text()) | changes
    (d / "cfg.json").write_text(json.dumps(cfg))


def test_bad_inputs_name_file_and_problem(tmp_path):
    d = _copy(tmp_path)
    w = load_file(str(d / "sae_weights.safetensors"))
    # NaN in weights
    save_file(w | {"W_dec": w["W_dec"].clone().fill_(float("nan"))}, str(d / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"c.*W_dec.*NaN"):
        load_sae(d)
    # missing tensor
    save_file({k: v for k, v in w.items() if k != "b_enc"}, str(d / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"c.*missing tensor 'b_enc'"):
        load_sae(d)
    save_file(w, str(d / "sae_weights.safetensors"))
    # k larger than n_latents
    _edit_cfg(d, k=100)
    with pytest.raises(ValueError, match=r"c.*k=100 is larger than n_latents=24"):
        load_sae(d)
    # unknown architecture
    _edit_cfg(d, architecture="gated", k=4)
    with pytest.raises(ValueError, match=r"c.*architecture 'gated'"):
        load_sae(d)
    # a normalisation that cannot be folded without its factor
    _edit_cfg(d, architecture="topk", normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="expected_average_only_in"):
        load_sae(d)
    assert load_sae(d, normalize="none").normalize == "none"
    with pytest.raises(ValueError, match="does not exist"):
        load_sae(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown SAE format"):
        load_sae(d, format="onnx")


def test_d_in_mismatch_with_teacher_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae.hooks import check_sae_matches_model

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50))
    sae = load_sae(FIXTURES / "saelens_standard")
    with pytest.raises(ValueError, match=r"saelens_standard.*d_in=8.*width 64"):
        check_sae_matches_model(sae, model, source=sae.source)

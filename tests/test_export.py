"""``python -m trainer.export``: NTP/KD students load as a standard GPT2LMHeadModel and CoCoMix students
through trust_remote_code, both with our logits; CoCoMix generation and steering equal trainer.generate's;
the model card states the run; --out follows the operating contract (docs/export.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.config import ConceptConfig, ModelConfig, TrainConfig
from trainer.export import MARKER, cli
from trainer.export import main as export_main
from trainer.generate import generate
from trainer.model import GPT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71, 69, 39, 93, 75]


def tok_info(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from common.teacher import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {"name": str(tokenizer_dir), "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
            "eos_id": tok.eos_token_id}


def random_ckpt(path: Path, tokenizer: dict, concept: ConceptConfig | None, bias: bool = True, vocab: int = 512,
                seed: int = 0) -> GPT:
    """A random student (weights perturbed off their init, so biases and layer norms matter) saved as a
    trainer checkpoint at ``path`` (a run's ckpt/ directory)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, block_size=48, n_layer=4, d_model=32, n_head=4, bias=bias, concept=concept)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mode = "cocomix" if concept else "ntp"
    checkpoint.save(path, model, torch.optim.AdamW(model.parameters()),
                    {"model": cfg.to_dict(), "tokenizer": tokenizer, "train": {"mode": mode}, "step": 5},
                    {"step": 5, "tokens": 1234})
    return model


def load_hf(d: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir) -> dict:
    return tok_info(tiny_tokenizer_dir)


@pytest.mark.parametrize("bias", [True, False])
def test_ntp_student_is_a_gpt2(tmp_path, tokenizer, bias):
    ours = random_ckpt(tmp_path / "ckpt", tokenizer, None, bias=bias)
    export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as ours
    x = torch.randint(0, 512, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)
    from transformers import AutoTokenizer

    from common.teacher import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer_fingerprint(tok) == tokenizer["fingerprint"]
    assert tok.encode("The cat sat", add_special_tokens=False) == \
        AutoTokenizer.from_pretrained(tokenizer["name"]).encode("The cat sat", add_special_tokens=False)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["eos_token_id"] == tokenizer["eos_id"] and cfg["n_positions"] == 48


def test_gpt2_greedy_generation_equals_trainer_generate(tmp_path, tokenizer):
    ours = random_ckpt(tmp_path / "ckpt", tokenizer, None, seed=3)
    export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    hf = load_hf(tmp_path / "hf")
    prompt = TOKENS[:6]
    want = generate(ours, prompt, 20, temperature=0.0, eos_id=tokenizer["eos_id"]).tokens
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert got == want


MIXES = [ConceptConfig(n_concepts=64, insert_layer=2, topk=6, mix="interleave"),
         ConceptConfig(n_concepts=64, insert_layer=1, topk=6, mix="add"),
         ConceptConfig(n_concepts=64, insert_layer=3, topk=6, mix="none")]


@pytest.mark.parametrize("concept", MIXES, ids=[c.mix for c in MIXES])
def test_cocomix_student_loads_with_remote_code(tmp_path, tokenizer, concept):
    ours = random_ckpt(tmp_path / "ckpt", tokenizer, concept)
    export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "CocomixForCausalLM"
    from transformers import AutoTokenizer

    from common.teacher import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert tokenizer_fingerprint(tok) == tokenizer["fingerprint"]
    x = torch.randint(0, 512, (3, 48), generator=torch.Generator().manual_seed(1))
    steer = {7: 5.0, 20: -3.0}
    with torch.no_grad():
        a, b = ours(x), hf(x)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.concept_logits, a.concept_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(b.concept_ids, a.concept_ids)
        # A steer argument equals the trainer's steering of the same positions.
        a_s, b_s = ours(x, steer=steer, steer_from=10), hf(x, steer=steer, steer_from=10)
        torch.testing.assert_close(b_s.logits, a_s.logits, rtol=1e-5, atol=1e-5)
        if concept.mix != "none":  # steering a mixed concept changes the next-token logits
            assert not torch.allclose(a_s.logits, a.logits)
        # Left padding (batched generation): a padded row's real tokens score as they do alone.
        mask = torch.ones_like(x)
        mask[1, :9] = 0
        padded = hf(x, attention_mask=mask).logits
        alone = ours(x[1:2, 9:]).logits
        torch.testing.assert_close(padded[1, 9:], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[0], a.logits[0], rtol=1e-5, atol=1e-5)
        # The KV cache, fed in pieces (several tokens, one, the rest), with padding and steering.
        cache = sys.modules[type(hf).__module__].CocomixCache(4)
        pieces = [hf(x[:, a_:b_], attention_mask=mask[:, :b_], steer=steer, steer_from=10, cocomix_cache=cache)
                  for a_, b_ in ((0, 20), (20, 21), (21, 48))]
        torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1),
                                   hf(x, attention_mask=mask, steer=steer, steer_from=10).logits, rtol=1e-5, atol=1e-5)
        assert cache.n_tokens == 48


def test_cocomix_generate_and_steering_equal_trainer_generate(tmp_path, tokenizer):
    concept = ConceptConfig(n_concepts=64, insert_layer=2, topk=6)
    ours = random_ckpt(tmp_path / "ckpt", tokenizer, concept, seed=4)
    eos = tokenizer["eos_id"]
    steer = {11: 40.0, 5: -20.0}
    export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf_steered"),
                 "--steer", "11=40", "--steer", "5=-20"])
    hf, hf_steered = load_hf(tmp_path / "hf"), load_hf(tmp_path / "hf_steered")
    assert json.loads((tmp_path / "hf_steered" / "config.json").read_text())["steer"] == {"5": -20.0, "11": 40.0}
    prompt = TOKENS[:7]
    ids = torch.tensor([prompt])
    base = generate(ours, prompt, 24, temperature=0.0, eos_id=eos).tokens
    steered = generate(ours, prompt, 24, temperature=0.0, steer=steer, eos_id=eos).tokens
    assert base != steered  # otherwise the comparisons below could not tell steering apart
    assert hf.generate(ids, max_new_tokens=24, do_sample=False)[0, 7:].tolist() == base
    assert hf.generate(ids, max_new_tokens=24, do_sample=False, steer=steer)[0, 7:].tolist() == steered
    assert hf_steered.generate(ids, max_new_tokens=24, do_sample=False)[0, 7:].tolist() == steered
    assert hf_steered.generate(ids, max_new_tokens=24, do_sample=False, steer={})[0, 7:].tolist() == base
    # Without the KV cache (recomputing every step): the same tokens and step logits.
    for kw in ({}, {"steer": steer}):
        a = hf.generate(ids, max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True,
                        **kw)
        b = hf.generate(ids, max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True,
                        use_cache=False, **kw)
        assert torch.equal(a.sequences, b.sequences)
        for x, y in zip(a.scores, b.scores, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # A batch with left padding generates what each prompt generates alone, with and without the cache.
    short = TOKENS[10:14]
    batch = torch.tensor([prompt, [eos] * 3 + short])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    alone = generate(ours, short, 8, temperature=0.0, steer=steer, eos_id=eos).tokens
    for use_cache in (True, False):
        out = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=eos,
                          steer=steer, use_cache=use_cache)
        assert out[1, 7:7 + len(alone)].tolist() == alone
        assert out[0, 7:].tolist() == steered[:8]
    # Beam search recomputes (transformers reorders only its own cache) and still runs.
    assert hf.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False).shape == (1, 11)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """Tiny NTP, KD and CoCoMix students trained 12 steps on synthetic shards recorded with the tiny BPE
    tokenizer (evaluated at steps 6 and 12)."""
    from trainer.loop import train
    from trainer.synthetic import write_manifest

    d = tmp_path_factory.mktemp("trained")
    m = write_manifest(d / "data", windows=64, val_windows=8, seq_len=32, vocab=512, n_concepts=128,
                       tokenizer=tok_info(tiny_tokenizer_dir))
    runs = {}
    for mode in ("ntp", "kd", "cocomix"):
        train(TrainConfig(shards=str(m), out_dir=str(d / mode), mode=mode, preset="tiny", steps=12, micro_batch=4,
                          lr=3e-3, warmup_steps=2, eval_every=6, eval_windows=8, workers=0, progress=False))
        runs[mode] = d / mode
    return runs


@pytest.mark.parametrize("mode", ["ntp", "kd", "cocomix"])
def test_trained_student_exports_with_its_card(trained, tmp_path, mode):
    run = trained[mode]
    export_main(["--ckpt", str(run / "ckpt"), "--out", str(tmp_path / "hf")])
    ours, _ = checkpoint.load_model_from(run / "ckpt")
    hf = load_hf(tmp_path / "hf")
    x = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.eval()(x).logits, rtol=1e-5, atol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [6, 12]
    assert f"| mode | {mode} |" in card
    assert str(run.parent / "data" / "manifest.json") in card
    assert f"| tokens seen | {12 * 4 * 32} |" in card
    for r in vals:
        assert f"| {r['step']} | {r['val_loss']:.4f} |" in card
    assert type(hf).__name__ == ("CocomixForCausalLM" if mode == "cocomix" else "GPT2LMHeadModel")
    if mode == "cocomix":
        assert "val_concept_loss" in card and "trust_remote_code=True" in card
    if mode == "kd":
        assert "val_kd_loss" in card


def test_a_rerun_writes_the_same_bytes(trained, tmp_path):
    for name in ("a", "b"):
        export_main(["--ckpt", str(trained["cocomix"] / "ckpt"), "--out", str(tmp_path / name)])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "modeling_cocomix.py" in files and MARKER in files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_step_directory_and_the_command_line(trained, tmp_path):
    """A step directory works as --ckpt, and `python -m trainer.export` runs as a command."""
    step_dir = checkpoint.resolve(trained["ntp"] / "ckpt")
    r = subprocess.run([sys.executable, "-m", "trainer.export", "--ckpt", str(step_dir), "--out", str(tmp_path / "hf")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "GPT2LMHeadModel" in r.stderr
    assert json.loads((tmp_path / "hf" / MARKER).read_text())["checkpoint"] == str(step_dir)


# -- the operating contract ---------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_out_is_replaced_only_when_ours_and_asked(tmp_path, tokenizer, capsys):
    random_ckpt(tmp_path / "ckpt", tokenizer, None)
    args = ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
    assert run_cli(args, capsys)[0] == 0
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    rc, err = run_cli(args, capsys)
    assert rc == 2 and err.startswith("error:") and "\n" not in err and "already holds an export" in err
    assert err.endswith(f"--out {tmp_path / 'hf'} --overwrite")
    random_ckpt(tmp_path / "ckpt2", tokenizer, None, seed=9)
    assert run_cli(["--ckpt", str(tmp_path / "ckpt2"), "--out", str(tmp_path / "hf"), "--overwrite"], capsys)[0] == 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != before
    assert not any(p.name.startswith(".hf.export") for p in tmp_path.iterdir())
    # A file of the user's inside the export: never removed, even with --overwrite.
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    rc, err = run_cli(args + ["--overwrite"], capsys)
    assert rc == 2 and "notes.txt" in err and (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def test_out_that_is_not_ours_is_refused(tmp_path, tokenizer, capsys):
    random_ckpt(tmp_path / "ckpt", tokenizer, None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_text("x")
    rc, err = run_cli(["--ckpt", str(tmp_path / "ckpt"), "--out", str(foreign), "--overwrite"], capsys)
    assert rc == 2 and "weights.bin" in err and "did not write" in err
    assert (foreign / "weights.bin").read_text() == "x"
    (tmp_path / "file").write_text("x")
    rc, err = run_cli(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "file")], capsys)
    assert rc == 2 and "is a file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["--ckpt", str(tmp_path / "ckpt"), "--out", str(empty)], capsys)[0] == 0
    assert (empty / "config.json").is_file()


def test_a_stale_temporary_directory_is_replaced(tmp_path, tokenizer):
    random_ckpt(tmp_path / "ckpt", tokenizer, None)
    stale = tmp_path / ".hf.export-tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    assert not stale.exists() and (tmp_path / "hf" / "model.safetensors").stat().st_size > 100


def test_user_mistakes_are_one_line_errors(tmp_path, tokenizer, capsys):
    random_ckpt(tmp_path / "ntp", tokenizer, None)
    random_ckpt(tmp_path / "coco", tokenizer, ConceptConfig(n_concepts=64, insert_layer=2, topk=6))
    out = ["--out", str(tmp_path / "hf")]
    cases = [
        (["--ckpt", str(tmp_path / "missing")] + out, "does not exist"),
        (["--ckpt", str(tmp_path / "ntp")] + out + ["--steer", "3=2"], "needs a CoCoMix checkpoint"),
        (["--ckpt", str(tmp_path / "coco")] + out + ["--steer", "3:2"], "ID=SCALE"),
        (["--ckpt", str(tmp_path / "coco")] + out + ["--steer", "64=2"], "outside [0, 64)"),
        (["--ckpt", str(tmp_path / "coco")] + out + ["--tokenizer", str(tmp_path / "no-tok")], "tokenizer"),
    ]
    for argv, want in cases:
        rc, err = run_cli(argv, capsys)
        assert rc == 2 and err.startswith("error:") and "\n" not in err and want in err, (argv, err)
        assert not (tmp_path / "hf").exists()
    synthetic = json.loads((tmp_path / "ntp" / "step-000005" / "config.json").read_text())
    synthetic["tokenizer"] = {"name": "synthetic", "fingerprint": "synthetic:0", "vocab_size": 512, "eos_id": 0}
    (tmp_path / "ntp" / "step-000005" / "config.json").write_text(json.dumps(synthetic))
    rc, err = run_cli(["--ckpt", str(tmp_path / "ntp")] + out, capsys)
    assert rc == 2 and "--tokenizer" in err
    rc, _ = run_cli(["--ckpt", str(tmp_path / "ntp"), "--tokenizer", tokenizer["name"]] + out, capsys)
    assert rc == 0


def test_remote_code_is_self_contained():
    """The files copied into an export import only the standard library, torch, transformers and each
    other: an export loads where this project is not installed."""
    import ast

    allowed = {"__future__", "dataclasses", "typing", "math", "torch", "transformers"}
    for f in (ROOT / "trainer" / "hf_remote").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in ("configuration_cocomix",), f"{f.name}: from .{node.module}"
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed, f"{f.name}: from {node.module}"
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), f"{f.name}: import"

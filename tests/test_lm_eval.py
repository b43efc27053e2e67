"""Exported students under lm-evaluation-harness, offline: a loglikelihood task, a multiple-choice task
and a rolling-loglikelihood (WikiText-style) task from tests/fixtures/lm_eval/ (a YAML and a JSONL each)
run through `lm_eval --model hf` on an exported NTP student (GPT2LMHeadModel) and an exported CoCoMix
student (trust_remote_code); the harness's log-likelihoods equal our own computation (docs/export.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_export import random_ckpt, tok_info
from trainer.config import ConceptConfig
from trainer.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ("cocomix_tiny_lambada", "cocomix_tiny_choice", "cocomix_tiny_wikitext")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                       reason="lm-evaluation-harness is not installed: pip install -e '.[eval]'"),
]


def offline_env(home: Path) -> dict[str, str]:
    """No hub at all: every Hugging Face cache in a fresh directory, every library offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def lm_eval(model_dir: Path, out: Path, home: Path, remote: bool) -> tuple[dict, dict[str, list[dict]]]:
    """Run the `lm_eval` command as a user would (from the repository root); returns the results and
    the logged samples per task."""
    args = f"pretrained={model_dir},dtype=float32" + (",trust_remote_code=True" if remote else "")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", args, "--tasks", ",".join(TASKS),
           "--include_path", str(FIXTURES), "--device", "cpu", "--batch_size", "4", "--output_path", str(out),
           "--log_samples"]
    r = subprocess.run(cmd, cwd=ROOT, env=offline_env(home), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    results = [p for p in out.rglob("results_*.json")]
    assert len(results) == 1, list(out.rglob("*"))
    samples = {t: [json.loads(line) for f in out.rglob(f"samples_{t}_*.jsonl") for line in f.read_text().splitlines()]
               for t in TASKS}
    return json.loads(results[0].read_text()), samples


def our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context) under our own model, tokenised as the harness does (the
    continuation's tokens are those of context+continuation after the context's)."""
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(tok.encode(context, add_special_tokens=False))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def our_rolling_loglikelihood(model, ids: list[int], prefix: int, n_ctx: int) -> float:
    """log p(whole text) scored as the harness's rolling windows are: ``n_ctx`` tokens predicted per
    window, the first window after ``prefix``, each window reading the ``n_ctx`` inputs that end just
    before its last target (so a short last window sees earlier tokens again)."""
    padded = [prefix, *ids]  # padded[i] is the input that predicts ids[i]
    total = 0.0
    for s in range(0, len(ids), n_ctx):
        e = min(s + n_ctx, len(ids))
        inp = torch.tensor([padded[max(0, e - n_ctx):e]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0].float(), -1)[-(e - s):]
        total += float(sum(logp[i, t] for i, t in enumerate(ids[s:e])))
    return total


@pytest.mark.parametrize("mode", ["ntp", "cocomix"])
def test_lm_eval_runs_offline_on_an_exported_student(tmp_path, tiny_tokenizer_dir, mode):
    from transformers import AutoTokenizer

    concept = ConceptConfig(n_concepts=64, insert_layer=2, topk=6) if mode == "cocomix" else None
    ours = random_ckpt(tmp_path / "ckpt", tok_info(tiny_tokenizer_dir), concept)
    export_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    results, samples = lm_eval(tmp_path / "hf", tmp_path / "eval", tmp_path / "hf_home", remote=mode == "cocomix")
    res = results["results"]
    ll, mc = res["cocomix_tiny_lambada"], res["cocomix_tiny_choice"]
    assert 0.0 <= ll["acc,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert ll["perplexity,none"] > 1.0
    assert len(samples["cocomix_tiny_lambada"]) == 6 and len(samples["cocomix_tiny_choice"]) == 5
    assert 1.0 < res["cocomix_tiny_wikitext"]["word_perplexity,none"] < float("inf")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    for s in samples["cocomix_tiny_lambada"]:
        got = s["filtered_resps"][0][0]
        want = our_loglikelihood(ours, tok, s["doc"]["context"], s["doc"]["continuation"])
        assert abs(float(got) - want) < 1e-3, (s["doc"], got, want)
    for s in samples["cocomix_tiny_choice"]:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        context = f"Question: {s['doc']['question']}\nAnswer:"
        want = [our_loglikelihood(ours, tok, context, " " + c) for c in s["doc"]["choices"]]
        assert max(abs(a - b) for a, b in zip(lls, want, strict=True)) < 1e-3, (s["doc"], lls, want)
        assert s["acc"] == float(int(torch.tensor(want).argmax()) == s["doc"]["label"])
    # Rolling windows of the model's context (48 positions): the long page needs several.
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    lengths = []
    for s in samples["cocomix_tiny_wikitext"]:
        ids = tok.encode(s["doc"]["page"], add_special_tokens=False)
        lengths.append(len(ids))
        want = our_rolling_loglikelihood(ours, ids, prefix, ours.cfg.block_size)
        assert abs(float(s["filtered_resps"][0]) - want) < 1e-3, (len(ids), s["filtered_resps"], want)
    assert min(lengths) < 48 < 2 * 48 < max(lengths)

"""Losses against brute-force references, the LR schedule, tensors from shard dtypes, and the
import boundary (training never loads teacher code)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.data import to_torch
from trainer.loop import lr_at
from trainer.objectives import activation_labels, concept_label_mask, concept_loss, kd_loss

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_concept_loss_matches_per_label_cross_entropy_and_masks():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 30)
    ids = torch.randint(0, 30, (2, 5, 4))
    scores = torch.rand(2, 5, 4)
    # all valid: (1/K) sum_i CE(z, I_i), mean over positions
    valid = concept_label_mask(ids, scores)
    ref = sum(F.cross_entropy(z.flatten(0, 1), ids[..., i].flatten()) for i in range(4)) / 4
    torch.testing.assert_close(concept_loss(z, ids, valid), ref)
    # -inf scores (the extraction's "no label") and negative ids are masked
    scores[0, 1, 2:] = -float("inf")
    scores[1, 4, :] = -float("inf")
    ids[1, 0, 0] = -1
    valid = concept_label_mask(ids, scores)
    assert valid.sum() == 40 - 2 - 4 - 1
    ce = -F.log_softmax(z, -1).gather(-1, ids.clamp(min=0))
    torch.testing.assert_close(concept_loss(z, ids, valid), ce[valid].mean())


def test_kd_loss_is_the_kl_of_the_coarsened_distributions():
    torch.manual_seed(1)
    V, k = 50, 5
    logits = torch.randn(2, 3, V)
    teacher = torch.softmax(torch.randn(2, 3, V) * 2, -1)
    top_p, top_ids = torch.topk(teacher, k, -1)
    got = kd_loss(logits, top_ids, top_p.log())
    q = torch.softmax(logits, -1)
    # brute force: distributions over k + 1 outcomes (the top-k ids, everything else)
    qk = q.gather(-1, top_ids)
    P = torch.cat([top_p, 1 - top_p.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    ref = (P * (P.log() - Q.log())).sum(-1).mean()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # It is a lower bound of the full KL, and zero when the student equals the teacher.
    full = (teacher * (teacher.log() - q.log())).sum(-1).mean()
    assert got <= full + 1e-6
    assert kd_loss(teacher.log(), top_ids, top_p.log()).abs() < 1e-5


def test_activation_labels_take_the_largest_positive_activations():
    mix_ids = torch.tensor([[[5, 9, 2, 7]]])
    mix_vals = torch.tensor([[[0.5, 3.0, 0.0, 1.0]]])
    ids, valid = activation_labels(mix_ids, mix_vals, 3)
    assert ids.tolist() == [[[9, 7, 5]]] and valid.all()
    ids, valid = activation_labels(mix_ids, mix_vals, 4)
    assert valid.tolist() == [[[True, True, True, False]]]  # a zero activation is not a label


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(lr=1.0)
    lrs = [lr_at(s, cfg, total=100, warmup=10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_to_torch_dtypes():
    bf = torch.tensor([1.5, -float("inf")], dtype=torch.bfloat16)
    batch = {
        "tokens": np.array([[1, 65000]], dtype=np.uint16),
        "concept_ids": np.array([[3, 4]], dtype=np.uint16),
        "concept_scores": bf.view(torch.int16).numpy().view(np.uint16)[None],
        "kd_logprobs": np.array([[-0.5, -1.0]], dtype=np.float16),
    }
    out = to_torch(batch, {"tokens": "uint16", "concept_ids": "uint16", "concept_scores": "bfloat16",
                           "kd_logprobs": "float16"})
    assert out["tokens"].dtype == torch.int64 and out["tokens"][0, 1] == 65000
    assert out["concept_scores"].dtype == torch.float32 and out["concept_scores"][0].tolist() == [1.5, -float("inf")]
    assert out["kd_logprobs"].dtype == torch.float32
    from shards.fields import as_float32

    assert as_float32(batch["concept_scores"], "bfloat16").tolist() == [[1.5, -float("inf")]]


def test_training_imports_no_teacher_code(tmp_path):
    """Importing trainer.run and training a few steps loads neither transformers, pipeline nor sae."""
    code = f"""
import sys
import torch
import trainer.run
from trainer.synthetic import make_arrays  # numpy only
from shards import FieldSpec, Manifest, write_shard
arrs = make_arrays(8, 8, 64, 32)
m = Manifest(kind="concepts", seq_len=8, tokenizer={{"name": "x", "fingerprint": "x", "vocab_size": 64, "eos_id": 0}},
             fields={{"tokens": FieldSpec("uint16", (9,)), "concept_ids": FieldSpec("uint16", (8, 4)),
                     "concept_scores": FieldSpec("float16", (8, 4))}},
             field_parts={{"tokens": "t", "concept_ids": "t", "concept_scores": "t"}},
             teacher={{}}, hook={{}}, sae={{"n_latents": 32}}, attribution={{"k_attr": 4}})
for split in ("train", "val"):
    part = write_shard(r"{tmp_path}/" + split + ".arrow", m.part_fields("t"), {{k: arrs[k] for k in m.fields}})
    m.add_shard(split, 8, {{"t": part}})
m.save(r"{tmp_path}/manifest.json")
trainer.run.main(["--shards", r"{tmp_path}/manifest.json", "--out-dir", r"{tmp_path}/o", "--steps", "2",
                  "--micro-batch", "2", "--workers", "0", "--eval-windows", "2", "--no-progress"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "pipeline", "sae"))
print("BAD", bad)
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BAD []" in r.stdout
    assert (tmp_path / "o" / "ckpt" / "step-000002" / "model.safetensors").is_file()


def test_cli_flags_are_frozen_and_documented():
    """Renaming a flag breaks users' scripts: change this list on purpose only."""
    from trainer.run import build_parser

    p = build_parser()
    flags = sorted(o for a in p._actions for o in a.option_strings if o.startswith("--"))
    assert flags == [
        "--beta1", "--beta2", "--ckpt-every", "--compile", "--concept-loss", "--concept-topk", "--device", "--dropout",
        "--eval-every", "--eval-windows", "--grad-accum", "--grad-clip", "--halt-after", "--held-out", "--help",
        "--insert-layer", "--labels", "--lambda-concept", "--lambda-kd", "--log-every", "--loss-chunk", "--lr",
        "--max-tokens", "--micro-batch",
        "--min-lr-ratio", "--mix", "--mode", "--no-compile", "--no-concept-loss", "--no-pause", "--no-progress",
        "--no-tensorboard", "--out-dir", "--pause", "--permute-labels", "--preset", "--progress", "--resume", "--seed",
        "--shards", "--steps", "--tensorboard", "--verify", "--wandb", "--wandb-entity", "--wandb-mode", "--wandb-name",
        "--warmup-steps", "--weight-decay", "--width", "--workers",
    ]
    assert all(a.help for a in p._actions), "every flag has a help text (the config field's docstring)"
    assert "cosine decays to this fraction of the peak (paper 10%)" in " ".join(p.format_help().lower().split())

"""Kill-and-resume replays the uninterrupted run's losses bit for bit (CPU), dropout and epoch
boundaries included; the checkpoint records the sampler position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.synthetic import write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=40, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


def losses(out: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm, val loss, concept recall and its prior), the last line written for each
    step (a resumed run rewrites some)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"], r.get("val_loss"), r.get("val_concept_recall"),
                        r.get("val_concept_recall_prior")) for r in rows}


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_gives_identical_losses(data, tmp_path, workers):
    # 40 windows / (4 x 2) per step = 5 steps per epoch: 12 steps cross two epoch boundaries.
    kw = dict(shards=str(data), preset="tiny", mode="cocomix", steps=12, micro_batch=4, grad_accum=2, dropout=0.1,
              lr=3e-3, warmup_steps=3, eval_every=3, eval_windows=8, workers=workers, progress=False)
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    # "Killed" after step 7: the checkpoint of step 4 survives, steps 5-7 are lost and redone.
    part = train(TrainConfig(out_dir=str(tmp_path / "part"), ckpt_every=4, halt_after=7, **kw))
    assert part["step"] == 7
    state = torch.load(tmp_path / "part" / "ckpt" / "step-000004" / "state.pt", weights_only=False)
    assert state["step"] == 4 and state["sampler"] == {"step": 4, "epoch": 0, "batch_in_epoch": 4, "seed": 1337,
                                                       "windows": 40, "global_batch": 8}
    resumed = train(TrainConfig(out_dir=str(tmp_path / "part"), ckpt_every=4, resume="auto", **kw))
    assert resumed["step"] == 12 and full["step"] == 12
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # exact equality of losses, grad norms, val losses and concept recalls at every step
    assert all(a[s][3] is not None and a[s][4] is not None for s in (3, 6, 9, 12))  # evals after the resume too
    wa = load_file(str(checkpoint.latest(tmp_path / "full" / "ckpt") / "model.safetensors"))
    wb = load_file(str(checkpoint.latest(tmp_path / "part" / "ckpt") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_dropout_state_would_differ(data, tmp_path):
    """The check above can fail: resuming with a different RNG state changes the curve."""
    kw = dict(shards=str(data), preset="tiny", mode="cocomix", steps=6, micro_batch=4, grad_accum=2, dropout=0.1,
              lr=3e-3, eval_windows=0, workers=0, progress=False)
    train(TrainConfig(out_dir=str(tmp_path / "full"), **kw))
    train(TrainConfig(out_dir=str(tmp_path / "part"), ckpt_every=3, halt_after=3, **kw))
    rng = checkpoint.latest(tmp_path / "part" / "ckpt") / "rng-rank0.pt"
    torch.save({"torch": torch.Generator().manual_seed(999).get_state()}, rng)
    train(TrainConfig(out_dir=str(tmp_path / "part"), resume="auto", **kw))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert a[3] == b[3] and a[4] != b[4]

"""torchrun DDP with 2 CPU processes (gloo) matches one process with the same global batch, and
ranks read disjoint windows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint
from trainer.data import StepSampler
from trainer.synthetic import write_manifest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sampler_ranks_are_disjoint_and_cover_the_global_batch():
    s = StepSampler(n_windows=103, global_batch=12, seed=7)
    seen = []
    for step in range(s.batches_per_epoch):
        parts = [s.rank_indices(step, r, 3) for r in range(3)]
        assert all(len(p) == 4 for p in parts)
        assert np.array_equal(np.concatenate(parts), s.global_indices(step))
        seen += np.concatenate(parts).tolist()
    assert len(seen) == len(set(seen)) == 8 * 12  # one epoch: no window twice
    assert not np.array_equal(s.global_indices(0), s.global_indices(8))  # next epoch reshuffles
    assert np.array_equal(StepSampler(103, 12, 7).global_indices(13), s.global_indices(13))


@pytest.mark.parametrize("mode", ["cocomix", pytest.param("kd", marks=pytest.mark.slow)])
def test_ddp_two_ranks_match_single_process(tmp_path, mode):
    data = write_manifest(tmp_path / "d", windows=32, val_windows=8, seq_len=16, vocab=128, n_concepts=64)
    common = ["--shards", str(data), "--preset", "tiny", "--mode", mode, "--steps", "5", "--lr", "3e-3",
              "--warmup-steps", "1", "--eval-every", "5", "--eval-windows", "8", "--workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "trainer.run", *common, "--micro-batch", "4",
                    "--out-dir", str(tmp_path / "single")], check=True, env=env, cwd=ROOT, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "trainer.run", *common, "--micro-batch", "2", "--out-dir", str(tmp_path / "ddp")],
        check=True, env=env, cwd=ROOT, timeout=300,
    )
    single, ddp = _rows(tmp_path / "single"), _rows(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4, 5]
    for a, b in zip(single, ddp, strict=True):
        assert a["tokens"] == b["tokens"]
        for k in ("loss", "ntp_loss", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), (a["step"], k)
    assert ddp[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=2e-5)
    if mode == "cocomix":  # label counts and recall hits are summed over ranks (trainer/concept_metrics.py)
        assert ddp[-1]["val_concept_recall_prior"] == single[-1]["val_concept_recall_prior"]
        assert ddp[-1]["val_concept_recall"] == pytest.approx(single[-1]["val_concept_recall"], abs=0.02)
    ddp_ckpt = checkpoint.latest(tmp_path / "ddp" / "ckpt")
    assert ddp_ckpt.name == "step-000005"
    cfg = json.loads((ddp_ckpt / "config.json").read_text())
    assert cfg["world_size"] == 2
    assert (ddp_ckpt / "rng-rank0.pt").is_file() and (ddp_ckpt / "rng-rank1.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp" / "ckpt").iterdir()) == ["latest", "step-000005"]
    # The two runs end with the same weights (up to float summation order).
    from safetensors.torch import load_file

    wa = load_file(str(checkpoint.latest(tmp_path / "single" / "ckpt") / "model.safetensors"))
    wb = load_file(str(ddp_ckpt / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_ddp_ranks_share_the_shard_verification_and_all_stop_on_a_bad_one(tmp_path):
    data = write_manifest(tmp_path / "d", windows=32, val_windows=8, seq_len=16, vocab=128, n_concepts=64)
    shard = tmp_path / "d" / "train-00001.concepts.arrow"  # the second of 6 parts: rank 1's share
    b = bytearray(shard.read_bytes())
    b[len(b) // 2] ^= 0xFF
    shard.write_bytes(bytes(b))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "trainer.run", "--shards", str(data), "--steps", "2", "--micro-batch", "2", "--eval-windows", "8",
         "--workers", "0", "--no-progress", "--out-dir", str(tmp_path / "o")],
        env=env, cwd=ROOT, timeout=300, capture_output=True, text=True,
    )
    assert r.returncode != 0
    assert "error: shard" in r.stderr and "train-00001.concepts.arrow" in r.stderr and "corrupted" in r.stderr
    assert "reported by another rank" in r.stderr  # rank 0 stopped too, without hashing that shard
    assert not (tmp_path / "o" / "metrics.jsonl").exists()

"""Each objective trains on real (synthetic-content) shards and its losses fall; the CLI trains,
evaluates, checkpoints, resumes and generates with steering."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.loop import train
from trainer.synthetic import write_manifest, write_word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    tok = write_word_tokenizer(d / "tokenizer", 256)
    return write_manifest(d / "arrow", windows=96, val_windows=16, seq_len=32, vocab=256, n_concepts=128, tokenizer=tok)


def run(manifest: Path, out: Path, **kw) -> list[dict]:
    base = dict(shards=str(manifest), out_dir=str(out), preset="tiny", steps=30, micro_batch=8, lr=3e-3,
                warmup_steps=2, eval_every=0, eval_windows=16, workers=0, progress=False)
    train(TrainConfig(**{**base, **kw}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def falls(rows: list[dict], key: str, margin: float) -> None:
    first = sum(r[key] for r in rows[:5]) / 5
    last = sum(r[key] for r in rows[-5:]) / 5
    assert last < first - margin, f"{key}: {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "ntp"},
        {"mode": "cocomix"},
        {"mode": "kd"},
        {"mode": "cocomix", "labels": "activation"},
        {"mode": "cocomix", "mix": "add"},
        {"mode": "cocomix", "mix": "none"},
        {"mode": "cocomix", "concept_loss": False},
    ],
    ids=["ntp", "cocomix", "kd", "activation-labels", "mix-add", "predict-only", "mix-only"],
)
def test_mode_trains_and_loss_falls(data, tmp_path, kw):
    rows = run(data, tmp_path, **kw)
    assert len(rows) == 30 and rows[-1]["step"] == 30 and rows[-1]["tokens"] == 30 * 8 * 32
    falls(rows, "ntp_loss", 0.3)
    if kw["mode"] == "cocomix" and kw.get("concept_loss", True):
        falls(rows, "concept_loss", 0.1)
    if kw["mode"] == "kd":
        falls(rows, "kd_loss", 0.1)
    assert "val_loss" in rows[-1] and rows[-1]["val_loss"] < math.log(256) - 0.2
    assert (tmp_path / "ckpt" / "step-000030" / "model.safetensors").is_file()
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["model"]["vocab_size"] == 256 and resolved["train"]["mode"] == kw["mode"]
    if kw["mode"] == "cocomix":
        assert resolved["model"]["concept"]["n_concepts"] == 128


def test_zarr_shards_and_grad_accum(tmp_path):
    m = write_manifest(tmp_path / "zarr", windows=48, val_windows=8, seq_len=16, vocab=128, n_concepts=64,
                       format="zarr")
    rows = run(m, tmp_path / "out", mode="cocomix", steps=8, micro_batch=4, grad_accum=2, eval_windows=8, workers=1)
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["tokens"] == 8 * 8 * 16


def test_cli_trains_evaluates_checkpoints_resumes_and_generates(data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "trainer.run", "--shards", str(data), "--preset", "tiny", "--mode", "cocomix",
            "--out-dir", str(out), "--steps", "10", "--micro-batch", "4", "--eval-every", "5", "--ckpt-every", "4",
            "--lr", "3e-3", "--workers", "2", "--no-progress"]
    # First process dies after 6 steps (the checkpoint of step 4 survives), the second resumes.
    subprocess.run(args + ["--halt-after", "6"], check=True, env=env, cwd=ROOT, timeout=300)
    assert (out / "ckpt" / "latest").read_text() == "step-000004\n"
    assert json.loads((out / "ckpt" / "step-000004" / "config.json").read_text())["step"] == 4
    subprocess.run(args + ["--resume", "auto"], check=True, env=env, cwd=ROOT, timeout=300)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))  # steps 5, 6 of the killed run were cut on resume
    assert {r["step"] for r in rows if "val_loss" in r} == {5, 10}
    assert json.loads((out / "ckpt" / "step-000010" / "config.json").read_text())["step"] == 10
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["latest", "step-000010"]  # the old one pruned
    g = subprocess.run(
        [sys.executable, "-m", "trainer.generate", "--ckpt", str(out / "ckpt"), "--prompt", "w1 w2 w3",
         "--steer", "5=8", "--max-new-tokens", "6", "--show-concepts", "3", "--temperature", "0", "--ignore-eos"],
        check=True, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    lines = g.stdout.strip().splitlines()
    assert lines[0].startswith("w1 w2 w3") and len(lines[0].split()) == 3 + 6
    shown = [json.loads(x) for x in lines[1:]]
    assert len(shown) == 6 and all(len(s["concepts"]) == 3 for s in shown)

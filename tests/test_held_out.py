"""--held-out NAME=MANIFEST: each set's LM loss is logged with val_loss, equals a hand computation on its
windows with the trained model, survives a resume unchanged; every user mistake is one error line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shards import load_manifest, open_split
from trainer.config import TrainConfig
from trainer.loop import Trainer, train
from trainer.run import cli
from trainer.synthetic import write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=24, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """A stage-1 tokens-only manifest of other text (another seed), same tokenizer, a val split of 6 windows."""
    return write_manifest(tmp_path_factory.mktemp("shards") / "o", windows=10, val_windows=6, seq_len=12, vocab=128,
                          seed=7, fields=["tokens"])


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> Path:
    """Tokens only, no val split: its train split is evaluated."""
    return write_manifest(tmp_path_factory.mktemp("shards") / "t", windows=9, val_windows=0, seq_len=16, vocab=128,
                          seed=3, fields=["tokens"])


def cfg(manifest: Path, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(manifest), out_dir=str(out), preset="tiny", mode="cocomix", steps=3, micro_batch=4,
                eval_every=2, eval_windows=8, workers=0, progress=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def hand_loss(model, manifest: Path, split: str, n: int) -> float:
    """The mean next-token CE over the first n windows of ``split``, all at once (windows are equally long)."""
    ds = open_split(load_manifest(manifest), split, fields=["tokens"])
    tok = torch.from_numpy(ds.get_batch(np.arange(min(n, len(ds))))["tokens"].astype(np.int64))
    ds.close()
    model.eval()
    with torch.no_grad():
        logits = model(tok[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), tok[:, 1:].flatten()).item()


@pytest.mark.parametrize("mode", ["ntp", "kd", "cocomix"])
def test_held_out_equals_val_on_the_same_data_and_a_hand_computation(data, other, train_only, tmp_path, mode):
    t = Trainer(cfg(data, tmp_path / "o", mode=mode,
                    held_out=[f"same={data}", f"other-corpus={other}", f"train_only={train_only}"]))
    summary = t.run()
    evals = [r for r in rows(tmp_path / "o") if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]
    keys = ("held_out/same/loss", "held_out/other-corpus/loss", "held_out/train_only/loss")
    for r in evals:  # in the same record as val_loss, at every evaluation
        assert all(k in r for k in keys)
        assert r["held_out/same/loss"] == pytest.approx(r["val_loss"], rel=1e-12)
    last = evals[-1]
    # the trained model (the final evaluation runs after the last step, nothing changes the weights after it)
    assert last["held_out/other-corpus/loss"] == pytest.approx(hand_loss(t.model, other, "val", 8), rel=1e-5)
    assert last["held_out/train_only/loss"] == pytest.approx(hand_loss(t.model, train_only, "train", 8), rel=1e-5)
    assert last["held_out/other-corpus/loss"] != pytest.approx(last["val_loss"], rel=1e-3)
    # in the summary train() returns
    assert all(summary["evals"][-1][k] == last[k] for k in keys)
    ident = json.loads((tmp_path / "o" / "config.json").read_text())["data"]["held_out"]
    assert ident["other-corpus"]["split"] == "val" and ident["other-corpus"]["windows"] == 6
    assert ident["train_only"]["split"] == "train" and ident["train_only"]["windows"] == 8


def test_a_complete_run_reports_the_held_out_values(data, other, tmp_path):
    c = cfg(data, tmp_path / "o", mode="ntp", steps=2, held_out=[f"o={other}"])
    first = train(c)
    again = train(c)  # nothing to do: the summary is read back from metrics.jsonl
    assert again["complete"] and again["evals"][-1]["held_out/o/loss"] == first["evals"][-1]["held_out/o/loss"]


def test_resume_logs_the_same_held_out_values(data, other, tmp_path):
    kw = dict(mode="cocomix", steps=6, eval_every=1, dropout=0.1, held_out=[f"o={other}"])
    train(cfg(data, tmp_path / "full", **kw))
    train(cfg(data, tmp_path / "part", ckpt_every=2, halt_after=3, **kw))
    train(cfg(data, tmp_path / "part", ckpt_every=2, **kw))

    def by_step(out):
        return {r["step"]: (r["loss"], r["val_loss"], r["held_out/o/loss"]) for r in rows(out)}

    a, b = by_step(tmp_path / "full"), by_step(tmp_path / "part")
    assert sorted(a) == list(range(1, 7)) and a == b


def test_a_changed_held_out_set_is_not_resumed_silently(data, other, tmp_path):
    kw = dict(mode="ntp", steps=4, held_out=[f"o={other}"])
    train(cfg(data, tmp_path / "o", ckpt_every=2, halt_after=2, **kw))
    with pytest.raises(ValueError, match="held_out"):
        train(cfg(data, tmp_path / "o", **{**kw, "held_out": [f"o={data}"]}))


def _error(capsys, argv: list[str]) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(data), "--out-dir", str(out), "--preset", "tiny", "--mode", "ntp", "--steps", "1",
            "--micro-batch", "4", "--eval-windows", "4", "--workers", "0", "--no-progress", *extra]


def test_user_errors_are_one_line_naming_the_set(data, tmp_path, capsys):
    out = tmp_path / "o"
    err = _error(capsys, _argv(data, out, "--held-out", f"gone={tmp_path / 'nope.json'}"))
    assert "--held-out gone" in err and "does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "--held-out b" in _error(capsys, _argv(data, out, "--held-out", f"b={bad}"))
    tok = write_manifest(tmp_path / "tok", windows=4, val_windows=2, seq_len=16, vocab=128, fields=["tokens"],
                         tokenizer={"name": "gpt2", "fingerprint": "gpt2:abc", "vocab_size": 128, "eos_id": 0})
    err = _error(capsys, _argv(data, out, "--held-out", f"web={tok}"))
    assert "--held-out web" in err and "another tokenizer" in err
    vocab = write_manifest(tmp_path / "vocab", windows=4, val_windows=2, seq_len=16, vocab=200, fields=["tokens"])
    assert "another tokenizer" in _error(capsys, _argv(data, out, "--held-out", f"v={vocab}"))
    long = write_manifest(tmp_path / "long", windows=4, val_windows=2, seq_len=200, vocab=128, fields=["tokens"])
    err = _error(capsys, _argv(data, out, "--held-out", f"long={long}"))
    assert "--held-out long" in err and "block_size 128" in err
    empty = write_manifest(tmp_path / "empty", windows=4, val_windows=0, seq_len=16, vocab=128, fields=["tokens"])
    j = json.loads(empty.read_text())
    j["splits"] = {}
    empty.write_text(json.dumps(j))
    err = _error(capsys, _argv(data, out, "--held-out", f"e={empty}"))
    assert "--held-out e" in err and "no windows" in err
    err = _error(capsys, _argv(data, out, "--eval-windows", "0", "--held-out", f"z={data}"))
    assert "--held-out z" in err and "--eval-windows" in err
    assert not out.exists()  # every check ran before anything was written


def test_cli_error_exit_2_without_a_traceback(data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer.run", *_argv(data, tmp_path / "o", "--held-out",
                        f"x={tmp_path / 'nope.json'}")], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.startswith("error: --held-out x") and "Traceback" not in r.stderr


def test_ddp_sums_held_out_over_ranks_with_permuted_labels(data, tmp_path):
    """Two gloo ranks == one process: the held-out loss (7 windows: ranks evaluate 4 and 3) and the
    permuted-label training losses (the permutation is a function of the window, not of the rank)."""
    import os
    import socket

    odd = write_manifest(tmp_path / "odd", windows=4, val_windows=7, seq_len=16, vocab=128, seed=9, fields=["tokens"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    common = ["--shards", str(data), "--preset", "tiny", "--mode", "cocomix", "--steps", "3", "--lr", "3e-3",
              "--eval-every", "3", "--eval-windows", "8", "--workers", "0", "--no-progress", "--permute-labels", "4",
              "--held-out", f"odd={odd}"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "trainer.run", *common, "--micro-batch", "4",
                    "--out-dir", str(tmp_path / "single")], check=True, env=env, cwd=root, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    "-m", "trainer.run", *common, "--micro-batch", "2", "--out-dir", str(tmp_path / "ddp")],
                   check=True, env=env, cwd=root, timeout=300)
    single, ddp = rows(tmp_path / "single"), rows(tmp_path / "ddp")
    for a, b in zip(single, ddp, strict=True):
        for k in ("loss", "concept_loss"):
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), (a["step"], k)
    assert ddp[-1]["held_out/odd/loss"] == pytest.approx(single[-1]["held_out/odd/loss"], rel=2e-5)

"""recipes/demo.py (`make demo`) end to end with tiny settings: tiny random teacher, tiny SAE, a few hundred windows."""

from __future__ import annotations

import json

import pytest

from recipes.demo import main
from tests.helpers import owt_documents, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local", "one_thread")


def test_demo_runs_end_to_end_and_reruns(tmp_path, tiny_teacher_dir, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", owt_documents(60))
    run, mdir = tmp_path / "run", tmp_path / "manifests"
    args = ["--run", str(run), "--manifests", str(mdir), "--corpus", str(corpus), "--teacher", str(tiny_teacher_dir),
            "--layer", "0", "--seq-len", "32", "--sae-latents", "64", "--sae-k", "8", "--sae-tokens", "8192",
            "--steps", "12", "--eval-every", "6", "--micro-batch", "4", "--prompt", "The city"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["windows"]["train"] >= 200 and summary["windows"]["val"] > 0  # a few hundred windows
    assert set(summary["students"]) == {"ntp", "cocomix"}
    for s in summary["students"].values():
        assert [t for t, _ in s["curve"]] == [6 * 4 * 32, 12 * 4 * 32]  # evaluations at steps 6 and 12
        assert all(v > 1.0 for _, v in s["curve"])  # real held-out losses (vocab 512: ~6 nats untrained)
    assert (run / "val_curves.png").stat().st_size > 1000
    assert (mdir / "demo.json").is_file() and (mdir / "demo-tokens.json").is_file()
    assert summary["generation"]["steer"].endswith("=10.0") and "steered" in out
    assert (run / "browser" / "index.html").is_file() and f"file://{run.absolute()}/browser/index.html" in out
    # Rerunning reuses every completed step: same SAE, same manifest, same curves.
    sae_mtime = (run / "sae" / "sae_weights.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["students"] == summary["students"]
    assert (run / "sae" / "sae_weights.safetensors").stat().st_mtime_ns == sae_mtime
    # Another corpus in the same run directory is refused with the way out, before any work.
    other = write_corpus(tmp_path / "other.txt", owt_documents(3))
    assert main(args[:4] + ["--corpus", str(other)] + args[6:]) == 2
    assert "make demo RUN=runs/other" in capsys.readouterr().err
    # So is another SAE size: the finished SAE is never silently reused for other settings.
    i = args.index("--sae-latents")
    assert main(args[: i + 1] + ["128"] + args[i + 2 :]) == 2
    err = capsys.readouterr().err
    assert "SAE with other settings" in err and "make demo RUN=runs/other" in err
    assert (run / "sae" / "sae_weights.safetensors").stat().st_mtime_ns == sae_mtime

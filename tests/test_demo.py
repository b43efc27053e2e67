"""recipes/demo.py (`make demo`) end to end with tiny settings: tiny random teacher, tiny SAE, a few hundred windows."""

from __future__ import annotations

import json

import pytest

from recipes.demo import main
from tests.helpers import owt_documents, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local", "one_thread")


def tensorboard_scalars(folder, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag, read back from the event files as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def test_demo_runs_end_to_end_and_reruns(tmp_path, tiny_teacher_dir, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt", owt_documents(60))
    run, mdir = tmp_path / "run", tmp_path / "manifests"
    args = ["--run", str(run), "--manifests", str(mdir), "--corpus", str(corpus), "--teacher", str(tiny_teacher_dir),
            "--layer", "0", "--seq-len", "32", "--sae-latents", "64", "--sae-k", "8", "--sae-tokens", "8192",
            "--steps", "12", "--eval-every", "6", "--micro-batch", "4", "--prompt", "The city", "--tensorboard"]
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
    # TensorBoard shows the demo's curves: the students' val_loss scalars equal their metrics.jsonl.
    for mode in ("ntp", "cocomix"):
        d = run / "students" / mode
        want = {m["step"]: m["val_loss"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in m}
        assert tensorboard_scalars(d / "tb", "val_loss") == pytest.approx(want) and len(want) == 2
    # The SAE's event file too (this tiny SAE trains fewer steps than its log interval: maybe no rows).
    sae_rows = {m["step"]: m["fvu"] for m in map(json.loads, (run / "sae" / "metrics.jsonl").read_text().splitlines())}
    assert list((run / "sae" / "tb").glob("events.out.tfevents.*"))
    assert tensorboard_scalars(run / "sae" / "tb", "fvu") == pytest.approx(sae_rows)
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

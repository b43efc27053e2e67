"""sae.train --out DIR when DIR already holds something, reruns, kill -9, a crash inside a checkpoint
save, and a full disk: nothing the user did not name is replaced, a rerun continues or repeats."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae import load_sae
from tests.helpers import owt_documents, write_corpus

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "sae"
SMALL = ["--layer", "1", "--n-latents", "64", "--k", "4", "--seq-len", "32", "--batch-size", "128",
         "--buffer-tokens", "512", "--threads", "1", "--warmup-steps", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher_dir):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sae_out")
    return tiny_teacher_dir, write_corpus(root / "corpus.txt", owt_documents(20))


def args(inputs, out: Path, *extra: str, max_tokens: int = 1024, every: int = 4) -> list[str]:
    teacher, corpus = inputs
    return ["--teacher", str(teacher), "--corpus", str(corpus), *SMALL, "--max-tokens", str(max_tokens),
            "--checkpoint-every", str(every), "--out", str(out), *extra]


def train(argv: list[str]) -> dict:
    from sae.train import main

    return main(argv)


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under d: its bytes and modification time."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def no_temporaries(d: Path) -> None:
    left = [str(p.relative_to(d)) for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
    assert not left, f"temporaries left in {d}: {left}"


def steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------- reruns and other people's files
def test_rerun_of_a_finished_run_changes_nothing(inputs, tmp_path):
    out = tmp_path / "run"
    first = train(args(inputs, out))
    before = snapshot(out)
    assert train(args(inputs, out)) == first  # the same command again: nothing to do, same summary
    assert train(args(inputs, out, "--resume")) == first  # --resume of a finished run: also nothing to do
    assert train(args(inputs, out, "--threads", "2")) == first  # threads do not change what is trained
    assert snapshot(out) == before
    no_temporaries(out)


@pytest.mark.parametrize("kind", ["another_sae", "user_files", "overwrite_another_sae"])
def test_directory_sae_train_did_not_write_is_refused_untouched(inputs, tmp_path, kind):
    out = tmp_path / "dir"
    if kind.endswith("another_sae"):
        shutil.copytree(FIXTURES / "saelens_standard", out)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
        (out / "metrics.jsonl").write_text("my own metrics\n")  # a name sae.train also writes
    before = snapshot(out)
    extra = ["--overwrite"] if kind.startswith("overwrite") else []
    with pytest.raises(ValueError, match="sae.train did not write") as e:
        train(args(inputs, out, *extra))
    assert "choose a new or empty --out" in str(e.value)
    assert snapshot(out) == before


def _suggested(message: str, label: str) -> list[str]:
    """The argv of the command a refusal suggests after ``label``."""
    tail = message.split(label, 1)[1]
    command = tail.split("; ", 1)[0].strip()
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "sae.train"], command
    return words[3:]


def test_another_run_is_refused_with_the_exact_commands(inputs, tmp_path):
    out = tmp_path / "run"
    train(args(inputs, out))
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(out)

    # other k: cannot be resumed; the message names the difference and the --overwrite command
    with pytest.raises(ValueError) as e:
        train(args(inputs, out, "--k", "8"))
    msg = str(e.value)
    assert "finished sae.train run with other settings (k=4 there, 8 here)" in msg and "--resume" not in msg
    assert snapshot(out) == before
    replace = _suggested(msg, "others stay): ")
    assert replace == [*args(inputs, out, "--k", "8"), "--overwrite"]
    train(replace)
    assert json.loads((out / "train_config.json").read_text())["k"] == 8 and load_sae(out).k == 8
    assert (out / "notes.txt").read_text() == "mine\n"  # --overwrite removed only what sae.train wrote
    assert steps(out) == list(range(1, 9))
    no_temporaries(out)

    # more tokens: the message offers to continue (--resume) as well
    with pytest.raises(ValueError) as e:
        train(args(inputs, out, "--k", "8", "--max-tokens", "2048"))
    msg = str(e.value)
    assert "max_tokens=1024 there, 2048 here" in msg
    resumed = train(_suggested(msg, "to continue it with these settings: "))
    assert resumed["tokens"] == 2048 and steps(out) == list(range(1, 17))


def test_an_attempt_that_never_checkpointed_is_replaced(inputs, tmp_path):
    """A run refused after it started (an empty corpus) left only its record: the corrected command runs."""
    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    teacher, _ = inputs
    with pytest.raises(ValueError, match="produced no window"):
        train(args((teacher, empty), out))
    assert train(args(inputs, out))["tokens"] == 1024
    assert steps(out) == list(range(1, 9))


# ---------------------------------------------------------------- kill -9, crashes inside a save
LONG = 32768  # 256 steps: long enough to kill mid-run


@pytest.fixture(scope="module")
def killed(inputs, tmp_path_factory):
    """A run killed (SIGKILL) right after its first checkpoint, and the uninterrupted run's summary."""
    root = tmp_path_factory.mktemp("killed")
    reference = train(args(inputs, root / "reference", max_tokens=LONG, every=8))
    out = root / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sae.train", *args(inputs, out, max_tokens=LONG, every=8)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists(), (
        "the run finished before the kill")
    return out, reference


def test_kill_9_then_the_same_command_gives_the_same_sae(inputs, killed, tmp_path, capsys):
    src, reference = killed
    out = tmp_path / "run"
    shutil.copytree(src, out)
    summary = train(args(inputs, out, max_tokens=LONG, every=8))
    assert "continuing the run" in capsys.readouterr().err
    assert summary["fingerprint"] == reference["fingerprint"] and summary["step"] == reference["step"]
    assert steps(out) == list(range(1, reference["step"] + 1))  # each step logged once
    no_temporaries(out)


@pytest.mark.parametrize("crash", ["after_first_rename", "tmp_incomplete", "old_left_over"])
def test_a_crash_inside_a_checkpoint_save_loses_nothing(inputs, killed, tmp_path, capsys, crash):
    """A save is: write checkpoint.tmp/ (state.pt last); checkpoint -> checkpoint.old; checkpoint.tmp ->
    checkpoint; remove checkpoint.old. Killed between any two of these, the rerun continues from the
    newest complete checkpoint, not from step 0."""
    src, reference = killed
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ckpt = out / "checkpoint"
    step = torch.load(ckpt / "state.pt", weights_only=False)["step"]
    if crash == "after_first_rename":  # complete checkpoint.tmp, checkpoint renamed away
        shutil.copytree(ckpt, out / "checkpoint.tmp")
        os.replace(ckpt, out / "checkpoint.old")
    elif crash == "tmp_incomplete":  # died while writing checkpoint.tmp (no state.pt yet)
        (out / "checkpoint.tmp").mkdir()
        shutil.copy(ckpt / "cfg.json", out / "checkpoint.tmp" / "cfg.json")
    else:  # died before removing checkpoint.old
        shutil.copytree(ckpt, out / "checkpoint.old")
    summary = train(args(inputs, out, max_tokens=LONG, every=8))
    assert f"from step {step} " in capsys.readouterr().err
    assert summary["fingerprint"] == reference["fingerprint"]
    no_temporaries(out)


# ---------------------------------------------------------------- a full disk
def _rlimit_fsize() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_full_disk_is_one_error_line_and_a_rerun_continues(inputs, tmp_path, capsys, how):
    disk = tmp_path / "disk"
    disk.mkdir()
    preexec = None
    if how == "tmpfs":
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                               capture_output=True).returncode != 0:
            pytest.skip("needs root and mount(8) for a 1 MiB tmpfs")
    else:
        preexec = _rlimit_fsize
    try:
        out = disk / "run"
        # a 4096-row shuffle buffer makes the first checkpoint's state.pt ~1.1 MB: too big for either limit
        argv = args(inputs, out, "--buffer-tokens", "4096", max_tokens=2048, every=8)
        if how == "tmpfs":  # the command's own entry point, in this process (a subprocess costs seconds)
            from sae.train import cli

            rc = cli(argv)
            stderr = capsys.readouterr().err
        else:  # the file-size limit must not apply to pytest itself
            r = subprocess.run([sys.executable, "-m", "sae.train", *argv], env=env(), capture_output=True, text=True,
                               preexec_fn=preexec, timeout=300)
            rc, stderr = r.returncode, r.stderr
        assert "Traceback" not in stderr and rc == 2, stderr[-3000:]
        errors = [ln for ln in stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0].startswith("error: ") and "free some space" in errors[0], errors
        assert str(out) in errors[0], errors
        assert "No space left on device" in errors[0] if how == "tmpfs" else "File too large" in errors[0]
        assert not (out / "summary.json").exists()
        no_temporaries(out)  # nothing half-written under a name a rerun would trust
        if how == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert train(argv)["tokens"] == 2048  # the same command, with room on the disk: it completes
        assert json.loads((out / "summary.json").read_text())["tokens"] == 2048
        assert load_sae(out).fingerprint() == json.loads((out / "summary.json").read_text())["fingerprint"]
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(disk)], check=False)

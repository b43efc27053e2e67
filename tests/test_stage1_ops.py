"""Stage 1 operated for real (issue 12): reruns, --overwrite, --manifest, kill -9, bad flags and
paths, a full disk, and memory on a single huge document. Stage 1 runs --in-process here (no Ray),
mostly in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.stage1 import TokenizeConfig, run
from shards.runlog import read_runs
from tests.helpers import owt_documents, write_corpus

ROOT = Path(__file__).resolve().parents[1]
T = 64


def cfg(tmp_path: Path, tok: Path, out: str = "out", **kw) -> TokenizeConfig:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus, owt_documents(12))
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("in_process", True)
    return TokenizeConfig(corpus=[str(corpus)], tokenizer=str(tok), out=str(tmp_path / out), seq_len=T, **kw)


def cli(*args: str, env: dict | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's code even when the command runs elsewhere (cwd).
    return subprocess.run([sys.executable, "-m", "pipeline.stage1", *args], cwd=popen.pop("cwd", ROOT),
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}, **popen)


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (zarr directories included) -> its bytes, the run log left out."""
    return {str(p.relative_to(d)): p.read_bytes()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "runs.jsonl"}


def one_error(r: subprocess.CompletedProcess) -> str:
    """The run failed like a user mistake should: exit 2, one error line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


# -- item 2: --overwrite replaces only what stage 1 wrote ------------------------------------------


def test_overwrite_removes_only_what_stage1_wrote(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "out"
    run(cfg(tmp_path, tiny_tokenizer_dir, shard_mb=0.01))
    old_shards = sorted(p.name for p in out.glob("train-*.arrow"))
    assert len(old_shards) > 2
    (out / ".train-00001.arrow.tmp-0123abcd").write_bytes(b"half a shard")  # a temporary of a killed run

    # A different dataset of ours: refused, naming what differs and the exact command to replace it.
    with pytest.raises(ValueError) as e:
        run(cfg(tmp_path, tiny_tokenizer_dir, shard_mb=0.02, seed=3))
    msg = str(e.value)
    assert "different dataset" in msg and "seed: 0 there, 3 now" in msg and "windows_per_shard" in msg
    assert f"run: python -m pipeline.stage1 --corpus {tmp_path / 'corpus.txt'}" in msg and "--seed 3 " in msg
    assert "--in-process --overwrite ; to keep it, pass another --out" in msg

    m = run(cfg(tmp_path, tiny_tokenizer_dir, shard_mb=0.02, seed=3, overwrite=True))
    assert m.settings["seed"] == 3
    names = sorted(p.name for p in out.iterdir())
    # Old shards beyond the new count are gone too (they were ours); the temporary as well.
    assert names == sorted(["manifest.json", "runs.jsonl", *[p.name for p in out.glob("*-*.arrow")]])
    assert len(list(out.glob("train-*.arrow"))) < len(old_shards)
    assert [r["outcome"] for r in read_runs(out)] == ["wrote", "wrote"]

    # A user's file in the directory: refused with or without --overwrite, never touched, and the
    # message does not push towards --overwrite (it would not remove the file).
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    for overwrite in (False, True):
        with pytest.raises(ValueError) as e:
            run(cfg(tmp_path, tiny_tokenizer_dir, shard_mb=0.02, seed=4, overwrite=overwrite))
        msg = str(e.value)
        assert "notes.txt" in msg and "plots/" in msg and "did not write" in msg and "--overwrite" not in msg
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots").is_dir()
    assert load_settings(out)["seed"] == 3  # the dataset there is untouched too

    # Shard-like names without our manifest or settings file are not ours either.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "train-00000.arrow").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match="did not write"):
        run(cfg(tmp_path, tiny_tokenizer_dir, out="lone", overwrite=True))
    assert (lone / "train-00000.arrow").read_bytes() == b"someone else's"


def test_overwrite_keeps_a_user_file_named_like_a_shard(tmp_path, tiny_tokenizer_dir):
    """Beside a dataset of ours, a file with a shard's name that is not a cocomix shard is the user's:
    refused with or without --overwrite, never removed (it was deleted by name before)."""
    out = tmp_path / "out"
    run(cfg(tmp_path, tiny_tokenizer_dir))
    (out / "train-00042.arrow").write_bytes(b"precious")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="did not write .*train-00042.arrow"):
            run(cfg(tmp_path, tiny_tokenizer_dir, seed=3, overwrite=overwrite))
    assert (out / "train-00042.arrow").read_bytes() == b"precious"


def load_settings(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["settings"]


def test_output_of_the_old_split_rule_is_a_different_dataset(tmp_path, tiny_tokenizer_dir):
    """A dataset written before stage 1 ran as tasks (ids <source>:<index>, one stream, train-00000 names):
    its settings lack split_rule and task_mb, so a rerun names both and --overwrite replaces its shards."""
    from pipeline.stage1_config import SPLIT_RULE

    out = tmp_path / "out"
    run(cfg(tmp_path, tiny_tokenizer_dir))
    m = json.loads((out / "manifest.json").read_text())
    for k in ("split_rule", "task_mb"):
        m["settings"].pop(k)
    for split in m["splits"].values():
        for sh in split["shards"]:
            old = sh["parts"]["tokens"]["path"].replace("-000000", "")
            (out / sh["parts"]["tokens"]["path"]).rename(out / old)
            sh["parts"]["tokens"]["path"] = old
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError) as e:
        run(cfg(tmp_path, tiny_tokenizer_dir))
    assert f"split_rule: None there, {SPLIT_RULE!r} now" in str(e.value) and "task_mb: None there" in str(e.value)
    assert (out / "train-00000.arrow").exists()
    run(cfg(tmp_path, tiny_tokenizer_dir, overwrite=True))
    assert not (out / "train-00000.arrow").exists() and (out / "train-000000-00000.arrow").exists()


def test_unfinished_run_is_redone_without_a_flag(tmp_path, tiny_tokenizer_dir):
    """A run killed before its manifest: settings file, some shards and a temporary are ours."""
    out = tmp_path / "out"
    ref = run(cfg(tmp_path, tiny_tokenizer_dir, out="ref", shard_mb=0.01))
    out.mkdir()
    (out / ".stage1-settings.json").write_text(json.dumps(ref.settings))
    # Shards are renamed into place only when whole, so a killed run leaves complete shards of ours.
    (out / "train-000000-00000.arrow").write_bytes((tmp_path / "ref" / "train-000000-00000.arrow").read_bytes())
    (out / "..stage1-settings.json.tmp-89abcdef").write_text("{")
    run(cfg(tmp_path, tiny_tokenizer_dir, shard_mb=0.01))
    assert tree(out) == tree(tmp_path / "ref")


def test_task_records_of_another_run_are_ours_a_users_file_among_them_is_not(tmp_path, tiny_tokenizer_dir):
    """stage1-tasks/ (records, val streams, temporaries) of an unfinished run of other settings is replaced
    without a flag; with a user's file inside, the folder is not ours and the run is refused, untouched."""
    ref = run(cfg(tmp_path, tiny_tokenizer_dir, out="ref"))
    out = tmp_path / "out"
    (out / "stage1-tasks").mkdir(parents=True)
    (out / ".stage1-settings.json").write_text(json.dumps({**ref.settings, "seed": 9}))
    (out / "stage1-tasks" / "t000000.json").write_text('{"task": {}}')
    (out / "stage1-tasks" / "t000000.val").write_bytes(b"\0" * 8)
    (out / "stage1-tasks" / ".t000001.val.tmp-0123abcd").write_bytes(b"\0")
    (out / "stage1-tasks" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write .*stage1-tasks/"):
        run(cfg(tmp_path, tiny_tokenizer_dir))
    assert (out / "stage1-tasks" / "notes.txt").read_text() == "mine"
    (out / "stage1-tasks" / "notes.txt").unlink()
    run(cfg(tmp_path, tiny_tokenizer_dir))
    assert tree(out) == tree(tmp_path / "ref")


# -- item 3: --manifest never replaces what is not this dataset's manifest -------------------------


def test_manifest_path_refuses_what_is_not_this_datasets_manifest(tmp_path, tiny_tokenizer_dir):
    base = run(cfg(tmp_path, tiny_tokenizer_dir, out="base"))
    other = run(cfg(tmp_path, tiny_tokenizer_dir, out="other", seed=5, manifest=str(tmp_path / "other.json")))
    concept = json.loads((tmp_path / "base" / "manifest.json").read_text())
    concept.update(kind="concepts", teacher={}, hook={}, sae={}, attribution={})
    targets = {
        "user-json": (b'{"my": "settings"}\n', "not a cocomix manifest"),
        "text": (b"some notes\n", "not JSON"),
        "binary": (b"\x89PNG\r\n\x1a\n\x00\xff", "binary"),
        "concept": (json.dumps(concept).encode(), "concepts manifest"),
        "other-dataset": ((tmp_path / "other.json").read_bytes(), "seed: 5 there, 0 now"),
    }
    for name, (data, why) in targets.items():
        p = tmp_path / f"{name}.json"
        p.write_bytes(data)
        with pytest.raises(ValueError) as e:
            run(cfg(tmp_path, tiny_tokenizer_dir, out="base", manifest=str(p)))
        assert why in str(e.value) and str(p) in str(e.value), (name, str(e.value))
        assert p.read_bytes() == data
        foreign = name in ("user-json", "text", "binary")
        # --overwrite may replace a cocomix manifest, never a user's file (and never suggests it).
        assert ("--overwrite" in str(e.value)) != foreign
        if foreign:
            with pytest.raises(ValueError, match="never replaces"):
                run(cfg(tmp_path, tiny_tokenizer_dir, out="base", manifest=str(p), overwrite=True))
            assert p.read_bytes() == data
        else:
            m = run(cfg(tmp_path, tiny_tokenizer_dir, out="base", manifest=str(p), overwrite=True))
            assert json.loads(p.read_text())["settings"] == m.settings == base.settings
    with pytest.raises(ValueError, match="is a directory"):
        run(cfg(tmp_path, tiny_tokenizer_dir, out="base", manifest=str(tmp_path)))
    # The same dataset's manifest: an idempotent rerun rewrites the same bytes.
    same = tmp_path / "other-dataset.json"
    before = same.read_bytes()
    run(cfg(tmp_path, tiny_tokenizer_dir, out="base", manifest=str(same)))
    assert same.read_bytes() == before
    assert other.settings != base.settings


# -- kill -9 at any instant, rerun: the same bytes -------------------------------------------------


def test_kill9_then_rerun_writes_the_same_bytes(tmp_path, tiny_tokenizer_dir):
    corpus = write_corpus(tmp_path / "big.txt", owt_documents(60) * 4)
    args = ["--corpus", str(corpus), "--tokenizer", str(tiny_tokenizer_dir), "--seq-len", str(T), "--in-process",
            "--shard-mb", "0.02", "--val-fraction", "0.1"]
    ref = cli(*args, "--out", str(tmp_path / "ref"), "--manifest", str(tmp_path / "mref" / "out.json"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "out"
    full = ["--out", str(out), "--manifest", str(tmp_path / "m" / "out.json")]
    p = subprocess.Popen([sys.executable, "-m", "pipeline.stage1", *args, *full], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "train-000000-00002.arrow").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill: use a larger corpus"
    assert (out / ".stage1-settings.json").exists()
    r = cli(*args, *full)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(out) == tree(tmp_path / "ref")  # shards and manifest.json, byte for byte
    assert (tmp_path / "m" / "out.json").read_text() == (
        (tmp_path / "mref" / "out.json").read_text().replace("../ref/", "../out/"))
    assert not [q for q in out.iterdir() if ".tmp-" in q.name] and not list((tmp_path / "m").glob(".*"))
    (log,) = read_runs(out)  # the killed run logged nothing; the timings live only here
    assert log["outcome"] == "wrote" and log["ray"] == "none" and "wall_s" not in (out / "manifest.json").read_text()


def test_kill9_resumes_per_task(tmp_path, tiny_tokenizer_dir):
    """Many tasks (--task-mb 0.03): killed once two task records are in, the same command resumes. Finished
    tasks are not redone (their shards keep their mtimes; runs.jsonl counts them), a finished task whose
    shard no longer verifies is redone, and every byte equals an uninterrupted run's."""
    from shards.records import read_records

    corpus = write_corpus(tmp_path / "big.txt", owt_documents(60) * 4)
    args = ["--corpus", str(corpus), "--tokenizer", str(tiny_tokenizer_dir), "--seq-len", str(T), "--in-process",
            "--shard-mb", "0.02", "--val-fraction", "0.1", "--task-mb", "0.03"]
    ref = cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert read_runs(tmp_path / "ref")[-1]["tasks"] > 8
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "pipeline.stage1", *args, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(read_records(out / "stage1-tasks")) < 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill: use a larger corpus"
    records = read_records(out / "stage1-tasks")
    assert len(records) >= 2
    shards = {sh["name"]: (out / sh["name"]).stat().st_mtime_ns for r in records.values() for sh in r["shards"]}
    # A finished task whose shard is damaged: redone (its record no longer verifies).
    damaged = records["t000000"]["shards"][0]["name"]
    data = bytearray((out / damaged).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / damaged).write_bytes(bytes(data))
    time.sleep(0.01)
    r = cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(out) == tree(tmp_path / "ref")
    assert not (out / "stage1-tasks").exists()
    kept = {n: (out / n).stat().st_mtime_ns for n in shards}
    assert kept[damaged] != shards[damaged]
    assert all(kept[n] == shards[n] for n in shards if not n.startswith(damaged.rsplit("-", 1)[0]))
    log = read_runs(out)[-1]
    assert log["outcome"] == "wrote" and log["tasks_reused"] == len(records) - 1


# -- bad flags and paths: one error line, exit 2, before heavy work ---------------------------------


def _bad_inputs(tmp_path: Path, tok: Path) -> dict[str, tuple[list[str], str]]:
    good = write_corpus(tmp_path / "good.txt", owt_documents(3))
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01binary" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "notok").mkdir()
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    out = str(tmp_path / "o")
    base = ["--tokenizer", str(tok), "--out", out, "--in-process"]
    g = ["--corpus", str(good)]
    return {
        "corpus missing": (["--corpus", str(tmp_path / "missing.txt"), *base], "does not exist"),
        "corpus binary": (["--corpus", str(tmp_path / "binary.txt"), *base], "looks binary"),
        "corpus empty": (["--corpus", str(tmp_path / "empty.txt"), *base], "is empty"),
        "corpus jsonl without text": (["--corpus", str(tmp_path / "nofield.jsonl"), *base], "has no field 'text'"),
        "seq-len 0": ([*g, *base, "--seq-len", "0"], "--seq-len must be positive"),
        "val-corpus missing": ([*g, *base, "--val-corpus", str(tmp_path / "nope.txt")], "does not exist"),
        "tokenizer path missing": ([*g, *base, "--tokenizer", str(tmp_path / "no-tok")], "does not exist"),
        "tokenizer dir without files": ([*g, *base, "--tokenizer", str(tmp_path / "notok")], "neither config.json"),
        "format unknown": ([*g, *base, "--format", "parquet"], "invalid choice"),
        "shard-mb 0": ([*g, *base, "--shard-mb", "0"], "--shard-mb must be positive"),
        "val-fraction 1": ([*g, *base, "--val-fraction", "1"], "--val-fraction"),
        "num-workers -1": ([*g, *base, "--num-workers", "-1"], "--num-workers"),
        "task-mb 0": ([*g, *base, "--task-mb", "0"], "--task-mb must be positive"),
        "delimiter empty": ([*g, *base, "--delimiter", ""], "--delimiter"),
        "zarr-chunk-windows 0": ([*g, *base, "--zarr-chunk-windows", "0"], "--zarr-chunk-windows"),
        "eos-token unknown": ([*g, *base, "--eos-token", "<|nope|>"], "<|nope|>"),
        "out is a file": ([*g, *base, "--out", str(tmp_path / "a-file")], "is a file, not a directory"),
        "out under a file": ([*g, *base, "--out", str(tmp_path / "a-file" / "sub")], "is a file, so no directory"),
        "manifest is a directory": ([*g, *base, "--manifest", str(tmp_path)], "is a directory"),
        "manifest under a file": ([*g, *base, "--manifest", str(tmp_path / "a-file" / "m.json")], "is a file, so no"),
    }


def test_bad_flags_and_paths_one_error_line(tmp_path, tiny_tokenizer_dir):
    cases = _bad_inputs(tmp_path, tiny_tokenizer_dir)
    # Two at a time: each is mostly Python start-up.
    procs = {}
    results = {}
    for name, (argv, _) in cases.items():
        procs[name] = subprocess.Popen([sys.executable, "-m", "pipeline.stage1", *argv], cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if len(procs) - len(results) >= 2:
            for n, p in procs.items():
                if n not in results:
                    results[n] = subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate())
    for n, p in procs.items():
        if n not in results:
            out, err = p.communicate(timeout=300)
            results[n] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    for name, (_, expected) in cases.items():
        r = results[name]
        line = one_error(r)
        assert expected in line, (name, line)
        # Checked before the tokenizer is used on the corpus or any output is written.
        assert "tokenizing with" not in r.stderr or name == "corpus jsonl without text", (name, r.stderr[-1000:])
    assert not (tmp_path / "o" / "manifest.json").exists()


def _mount_tmpfs(d: Path, opts: str) -> bool:
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
    return r.returncode == 0


def test_out_unwritable(tmp_path, tiny_tokenizer_dir):
    corpus = write_corpus(tmp_path / "c.txt", owt_documents(3))
    args = ["--corpus", str(corpus), "--tokenizer", str(tiny_tokenizer_dir), "--in-process"]
    ro = tmp_path / "ro"
    tested = False
    if _mount_tmpfs(ro, "ro,size=1m"):  # read-only even for root
        tested = True
        try:
            line = one_error(cli(*args, "--out", str(ro / "out")))
            assert "read-only file system" in line and str(ro) in line
            line = one_error(cli(*args, "--out", str(tmp_path / "o"), "--manifest", str(ro / "m.json")))
            assert "--manifest" in line and "read-only" in line
            assert not (tmp_path / "o").exists()  # refused before anything was written
        finally:
            subprocess.run(["umount", str(ro)], check=True)
    if os.geteuid() != 0:  # root ignores permission bits: only the read-only mount above tests it then
        tested = True
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = one_error(cli(*args, "--out", str(locked / "out")))
        assert "not writable" in line and str(locked) in line
    if not tested:
        pytest.skip("root without mount: no place here that root cannot write")


@pytest.mark.parametrize("how", ["tmpfs", "fsize"])
def test_disk_full(tmp_path, tiny_tokenizer_dir, how):
    """A full disk (256 KB tmpfs) or a file size limit (RLIMIT_FSIZE, EFBIG) mid-run: one error line
    naming the shard, no temporaries, no manifest a rerun would trust."""
    corpus = write_corpus(tmp_path / "c.txt", owt_documents(60) * 4)  # ~0.45 MB of shards
    out = tmp_path / "small" / "out"
    popen: dict = {}
    if how == "tmpfs":
        if not _mount_tmpfs(tmp_path / "small", "size=256k"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
    else:
        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # per file: below one shard
        popen["preexec_fn"] = limit
    try:
        r = cli("--corpus", str(corpus), "--tokenizer", str(tiny_tokenizer_dir), "--in-process", "--out", str(out),
                "--shard-mb", "0.05", "--seq-len", str(T), **popen)
        line = one_error(r)
        assert "could not write shard" in line and str(out) in line, line
        assert ("No space left" if how == "tmpfs" else "too large") in line, line
        left = sorted(p.name for p in out.iterdir())
        assert "manifest.json" not in left and not [n for n in left if ".tmp-" in n], left
        assert ".stage1-settings.json" in left  # an unfinished run: redone by the next one, never trusted
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(tmp_path / "small")], check=True)


# -- absolute paths of everything written ----------------------------------------------------------


def test_prints_absolute_paths(tmp_path, tiny_tokenizer_dir):
    write_corpus(tmp_path / "c.txt", owt_documents(6))
    r = cli("--corpus", "c.txt", "--tokenizer", str(tiny_tokenizer_dir), "--in-process", "--out", "rel/out",
            "--manifest", "m/x.json", "--seq-len", str(T), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in (f"shards: {tmp_path / 'rel' / 'out'}", f"manifest: {tmp_path / 'rel' / 'out' / 'manifest.json'}",
                 f"manifest copy: {tmp_path / 'm' / 'x.json'}", f"run log: {tmp_path / 'rel' / 'out' / 'runs.jsonl'}"):
        assert line in r.stdout.splitlines(), r.stdout


# -- memory: bounded by the piece size, not the document size --------------------------------------


def one_line_document(path: Path, mb: int) -> Path:
    import random

    words = "the of and to in a is that for it as was with be by on not he this are language model window".split()
    rng = random.Random(0)
    with open(path, "w") as f:
        n = 0
        while n < mb * 1_000_000:
            s = " ".join(rng.choice(words) for _ in range(2000)) + " "
            f.write(s)
            n += len(s)
        f.write("\n")
    return path


@pytest.mark.parametrize("mb", [10, pytest.param(50, marks=pytest.mark.slow)])
def test_memory_of_one_huge_line(tmp_path, tiny_tokenizer_dir, mb):
    peak, r = rss_of_stage1(tmp_path, tiny_tokenizer_dir, mb)
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"\nstage 1 --in-process on one {mb} MB line: peak RSS {peak:.0f} MB")
    assert peak < 600, f"peak RSS {peak:.0f} MB on a {mb} MB one-line document"
    m = json.loads((tmp_path / f"o{mb}" / "manifest.json").read_text())
    assert m["corpus"]["documents"] == 1 and m["corpus"]["forced_cuts"] == 0


# The child reports its own high-water mark (VmHWM of its post-exec address space). Not os.wait4's
# ru_maxrss: a child spawned with vfork starts on the parent's pages, so its maxrss includes the
# pytest process's RSS (674 MB reported for a 468 MB child late in the suite).
_PEAK = ("import runpy, sys\n"
         "sys.argv = ['pipeline.stage1', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('pipeline.stage1', run_name='__main__', alter_sys=True)\n"
         "finally:\n"
         "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]\n"
         "    print(f'PEAK_KB {hwm}', file=sys.stderr)\n")


def rss_of_stage1(tmp_path: Path, tok: Path, mb: int) -> tuple[float, subprocess.CompletedProcess]:
    """Run stage 1 in a child and read that child's own peak RSS (its VmHWM at exit)."""
    corpus = one_line_document(tmp_path / f"line{mb}.txt", mb)
    r = subprocess.run([sys.executable, "-c", _PEAK, "--in-process", "--corpus", str(corpus),
                        "--tokenizer", str(tok), "--out", str(tmp_path / f"o{mb}"), "--seq-len", str(T),
                        "--val-fraction", "0"], cwd=ROOT, capture_output=True, text=True)
    peak = [ln for ln in r.stderr.splitlines() if ln.startswith("PEAK_KB ")]
    assert peak, r.stderr[-2000:]
    return int(peak[-1].split()[1]) / 1024, r


def test_corpus_fingerprint_does_not_depend_on_pieces(tmp_path, tiny_tokenizer_dir):
    """A 1.1 MB document arrives in two pieces; the fingerprint hashes whole documents (id, text)."""
    import hashlib

    big = "\n".join(owt_documents(40)) * 20
    docs = [owt_documents(1)[0], big[:1_100_000].strip(), "last one"]
    write_corpus(tmp_path / "corpus.txt", docs)
    from common.corpus import CorpusConfig, iter_documents

    m = run(cfg(tmp_path, tiny_tokenizer_dir, val_fraction=0.0))
    # Each document's sha256 of (id, text), summed mod 2**256 (pipeline/stage1_task.py: any partition
    # gives the same sum); ids are byte offsets (common/corpus.py).
    ids = [i for i, _ in iter_documents(CorpusConfig([str(tmp_path / "corpus.txt")]))]
    h = sum(int.from_bytes(hashlib.sha256(i.encode() + b"\0" + d.encode() + b"\0").digest(), "big")
            for i, d in zip(ids, docs, strict=True)) % (1 << 256)
    assert m.corpus["fingerprint"] == "sha256:" + f"{h:064x}"[:16] and m.corpus["documents"] == 3

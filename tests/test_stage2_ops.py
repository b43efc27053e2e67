"""Operating stage 2 without losing anything (issue 12): what a rerun, a typo or a full disk does.

Nothing of the user's is replaced (``--manifest`` on a foreign file, ``--overwrite`` beside foreign
files), every input is checked before the teacher loads (token shards against their manifest), every
user mistake is one ``error:`` line with exit 2, and the manifest after an interrupted run is the same
bytes as an uninterrupted one's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import extract_driver
from pipeline.extract import main, run
from shards import checksum, load_manifest
from shards.runlog import read_runs
from tests.helpers import all_bytes, extract_config

pytestmark = pytest.mark.usefixtures("ray_local")
REPO = Path(__file__).resolve().parents[1]


def argv_of(stage2_data, teacher, out, *extra: str) -> list[str]:
    return ["--tokens", str(stage2_data / "tokens"), "--teacher", str(teacher), "--sae", str(stage2_data / "sae_a"),
            "--out", str(out), "--k-mix", "4", "--k-kd", "2", "--batch-size", "3", "--ray-address", "local", *extra]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main`` in this process (the session's Ray); a usage error's SystemExit counts as its code."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(rc: int, err: str) -> str:
    """Exit 2, and stderr ends with its only ``error:`` line (log lines may come before it)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert rc == 2 and len(lines) == 1 and last == lines[0] and "Traceback" not in err, (rc, err)
    return lines[0]


def no_temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- item 3: --manifest never replaces what is not a manifest of this extraction ------------------


FOREIGN = {
    "user_json": (b'{"my": "notes", "budget": 3}\n', "JSON object that is not a cocomix manifest"),
    "text": (b"hello, these are my notes\n", "not JSON"),
    "binary": (bytes(range(256)) * 4, "binary file"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_manifest_path_holding_a_user_file_is_refused(kind, overwrite, stage2_data, tiny_teacher_dir, tmp_path, capsys):
    blob, what = FOREIGN[kind]
    target = tmp_path / "mine.json"
    target.write_bytes(blob)
    extra = ["--manifest", str(target)] + (["--overwrite"] if overwrite else [])
    rc, _, err = cli(argv_of(stage2_data, tiny_teacher_dir, tmp_path / "out", *extra), capsys)
    line = one_error(rc, err)
    assert what in line and str(target) in line and "--overwrite" not in line  # never offered for a user's file
    assert "--manifest " + str(tmp_path / "mine-2.json") in line  # the exact command to continue
    assert target.read_bytes() == blob and not (tmp_path / "out").exists()


def test_manifest_path_holding_a_token_manifest_is_refused(stage2_data, tiny_teacher_dir, tmp_path, capsys):
    tokens = stage2_data / "tokens" / "manifest.json"
    before = tokens.read_bytes()
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli(argv_of(stage2_data, tiny_teacher_dir, tmp_path / "out", "--manifest", str(tokens), *extra),
                         capsys)
        line = one_error(rc, err)
        assert "tokens manifest" in line and "--overwrite" not in line
    assert tokens.read_bytes() == before


def test_damaged_or_other_extraction_manifest_is_refused_then_replaced_with_overwrite(
        stage2_data, tiny_teacher_dir, stage2_reference, tmp_path, capsys):
    ref = load_manifest(stage2_data / "ref" / "concepts.json")
    # A damaged cocomix manifest (it could be the user's edit): refused, not "rewritten"; --overwrite may replace it.
    damaged = tmp_path / "d.json"
    raw = json.loads((stage2_data / "ref" / "concepts.json").read_text())
    raw["splits"]["train"]["windows"] += 1
    damaged.write_text(json.dumps(raw))
    before = damaged.read_bytes()
    rc, _, err = cli(argv_of(stage2_data, tiny_teacher_dir, tmp_path / "out", "--manifest", str(damaged)), capsys)
    line = one_error(rc, err)
    assert "damaged cocomix manifest" in line and "--overwrite" in line and damaged.read_bytes() == before
    # Another extraction's manifest: refused naming the settings that differ.
    other = tmp_path / "o.json"
    shutil.copy(stage2_data / "ref" / "concepts.json", other)
    rc, _, err = cli(argv_of(stage2_data, tiny_teacher_dir, tmp_path / "out", "--manifest", str(other), "--attribution",
                             "activation"), capsys)
    line = one_error(rc, err)
    assert "different extraction" in line and "attribution (there: act_x_grad, this run: activation)" in line
    assert "--overwrite" in line and other.read_bytes() == (stage2_data / "ref" / "concepts.json").read_bytes()
    # --overwrite replaces a cocomix manifest (never a user's file), relative --out: absolute paths printed.
    os.chdir(tmp_path)
    try:
        rc, out, err = cli(argv_of(stage2_data, tiny_teacher_dir, "rel", "--manifest", "d.json", "--overwrite"), capsys)
    finally:
        os.chdir(REPO)
    assert rc == 0, err
    m = load_manifest(damaged)
    assert m.stats["complete"] and m.splits["train"].windows == ref.splits["train"].windows
    assert f"manifest: {damaged}" in out and f"concept shards: {tmp_path / 'rel' / 'concepts' / 'd'}" in out
    assert f"run log: {tmp_path / 'rel' / 'concepts' / 'd' / 'runs.jsonl'}" in out


# -- --overwrite removes only what stage 2 wrote ---------------------------------------------------


def test_overwrite_removes_only_what_stage2_wrote(stage2_data, tiny_teacher_dir, stage2_reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(stage2_data / "ref", out)  # a finished extraction: OUT/concepts.json + OUT/concepts/concepts/
    cdir = out / "concepts" / "concepts"
    (out / "my-notes.txt").write_text("keep me")  # beside the manifest: never touched
    argv = argv_of(stage2_data, tiny_teacher_dir, out, "--attribution", "activation")
    rc, _, err = cli(argv, capsys)
    line = one_error(rc, err)
    assert "different extraction" in line and "attribution" in line and "--overwrite" in line
    # A user's file in the concept directory: refused even with --overwrite, and --overwrite is not suggested.
    (cdir / "analysis.csv").write_text("a,b\n1,2\n")
    before = tree(out)
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli(argv + extra, capsys)
        line = one_error(rc, err)
        assert "analysis.csv" in line and "did not write" in line and "--overwrite" not in line
        assert tree(out) == before
    (cdir / "analysis.csv").unlink()
    # A user's file with a shard's name is judged by its content, not its name: refused, kept.
    (cdir / "train-00042.arrow").write_bytes(b"precious")
    rc, _, err = cli(argv + ["--overwrite"], capsys)
    assert "train-00042.arrow" in one_error(rc, err) and (cdir / "train-00042.arrow").read_bytes() == b"precious"
    (cdir / "train-00042.arrow").unlink()
    assert cli(argv + ["--overwrite"], capsys)[0] == 0
    assert (out / "my-notes.txt").read_text() == "keep me"
    m = load_manifest(out / "concepts.json")
    assert m.attribution["variant"] == "activation" and m.stats["complete"]
    assert sorted(p.name for p in cdir.iterdir()) == sorted(
        ["extraction.json", "runs.jsonl"]
        + [sh.parts["concepts"].path.name for s in m.splits.values() for sh in s.shards])
    assert len(read_runs(cdir)) == 1  # the old run log went with the extraction it described


# -- item 7: deterministic manifests, no temporaries --------------------------------------------------


def test_interrupted_runs_write_the_same_manifest_bytes(stage2_data, tiny_teacher_dir, stage2_reference):
    """Interrupted after k shards (the state a kill leaves: a manifest listing k shards, a shard renamed
    but unlisted, temporaries in OUT and the concept directory), then the same command: the manifest and
    every shard are the bytes of an uninterrupted run, and no temporary survives."""
    ref_manifest = (stage2_data / "ref" / "concepts.json").read_bytes()
    assert b"created" not in ref_manifest and b"wall_s" not in ref_manifest and b"throughput" not in ref_manifest
    for k in (2, 5):  # OUT beside stage2_data/ref, so the token shards' relative paths match too
        cfg = extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / f"interrupted-{k}"), batch_size=2)
        # a finished run, cut back below to what a kill after k shards leaves
        shutil.copytree(stage2_data / "ref", cfg.out)
        (cfg.concept_dir / "runs.jsonl").unlink(missing_ok=True)
        m = load_manifest(cfg.manifest_path)
        shards = [(name, sh) for name, s in m.splits.items() for sh in s.shards]
        for split in m.splits.values():
            split.shards, split.windows, split.tokens = [], 0, 0
        for name, sh in shards[:k]:
            m.add_shard(name, sh.windows, sh.parts)
        m.stats = {"complete": False}
        m.save(cfg.manifest_path)
        (cfg.concept_dir / f".{shards[-1][1].parts['concepts'].path.name}.tmp-0123abcd").write_bytes(b"partial")
        (cfg.manifest_path.parent / ".concepts.json.tmp-89abcdef").write_text("{")
        run(cfg)
        assert cfg.manifest_path.read_bytes() == ref_manifest, k
        assert all_bytes(cfg.concept_dir) == stage2_reference
        assert not no_temporaries(Path(cfg.out))
        assert [r["shards"]["verified"] for r in read_runs(cfg.concept_dir)] == [k]


# -- inputs checked before the teacher loads ----------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_damaged_token_shard_stops_before_any_work(damage, stage2_data, tiny_teacher_dir, tmp_path, capsys):
    shutil.copytree(stage2_data / "tokens", tmp_path / "tokens")
    tm = load_manifest(tmp_path / "tokens")
    victim = tm.splits["val"].shards[-1].parts["tokens"].path  # the last one: workers would do the others first
    blob = bytearray(victim.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
        victim.write_bytes(bytes(blob))
    elif damage == "truncate":
        victim.write_bytes(bytes(blob[:-8]))
    else:
        victim.unlink()
    argv = argv_of(stage2_data, tiny_teacher_dir, tmp_path / "out")
    argv[1] = str(tmp_path / "tokens")
    rc, _, err = cli(argv, capsys)
    assert not (tmp_path / "out").exists()  # no manifest, no concept directory: no worker ever started
    line = one_error(rc, err)
    assert str(victim) in line and "token shard" in line


def test_token_verification_cost(tmp_path):
    """sha256 of token shards: the cost of checking every input before the first teacher forward."""
    import time

    blob = os.urandom(1 << 20) * 64  # 64 MiB
    (tmp_path / "s.bin").write_bytes(blob)
    t0 = time.perf_counter()
    checksum(tmp_path / "s.bin")
    per_gb = (time.perf_counter() - t0) / (len(blob) / 1e9)
    print(f"token shard verification: {per_gb:.2f} s per GB")
    assert per_gb < 30  # a sanity bound on a shared 2-core machine, not a benchmark


# -- --out / --manifest that cannot be written ----------------------------------------------------------


def test_out_and_manifest_that_cannot_be_directories(stage2_data, tiny_teacher_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cases = {
        "out is a file": ([str(afile)], [], "is a file"),
        "out under a file": ([str(afile / "sub")], [], "is a file"),
        "manifest under a file": ([str(tmp_path / "o1")], ["--manifest", str(afile / "m.json")], "is a file"),
        "manifest is a directory": ([str(tmp_path / "o2")], ["--manifest", str(tmp_path)], "is a directory"),
    }
    for name, (out, extra, what) in cases.items():
        rc, _, err = cli(argv_of(stage2_data, tiny_teacher_dir, out[0], *extra), capsys)
        line = one_error(rc, err)
        assert what in line, (name, line)
    assert afile.read_text() == "mine" and not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few pages (root only): the real ENOSPC, for the driver and the Ray workers alike."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and mount(8) to make a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_one_error_and_a_rerun_completes(stage2_data, tiny_teacher_dir, stage2_reference, small_disk,
                                                      capsys, monkeypatch):
    out = small_disk / "out"
    argv = argv_of(stage2_data, tiny_teacher_dir, out)
    need = sum(len(b) for b in stage2_reference.values())
    assert need > 48 * 1024, "the test data must not fit on the small disk"
    # Before any work: the shards cannot fit, nothing is created.
    rc, _, err = cli(argv, capsys)
    assert "kB free" in one_error(rc, err) and not out.exists()
    # Mid-run (the estimate bypassed, as when another program fills the disk): one line, nothing half-written.
    monkeypatch.setattr(extract_driver, "check_space", lambda p, todo: None)
    rc, _, err = cli(argv, capsys)
    line = one_error(rc, err)
    assert "No space left on device" in line and "rerun the same command" in line
    assert not no_temporaries(small_disk)
    if (out / "concepts.json").exists():  # every shard a rerun would trust is whole
        m = load_manifest(out / "concepts.json")
        assert not m.stats.get("complete")
        for s in m.splits.values():
            for sh in s.shards:
                assert checksum(sh.parts["concepts"].path) == sh.parts["concepts"].checksum
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert cli(argv, capsys)[0] == 0
    assert all_bytes(out / "concepts" / "concepts") == stage2_reference
    got, ref = load_manifest(out / "concepts.json"), load_manifest(stage2_data / "ref" / "concepts.json")
    assert got.stats == ref.stats and [
        sh.parts["concepts"].checksum for s in got.splits.values() for sh in s.shards] == [
        sh.parts["concepts"].checksum for s in ref.splits.values() for sh in s.shards]


# -- every user mistake: exit 2, one error line, no traceback --------------------------------------------


def _mistakes(stage2_data, teacher, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (argv, a phrase the error line must hold)."""
    (tmp / "notes.json").write_text('{"mine": 1}')
    (tmp / "notes.txt").write_text("just text")
    (tmp / "afile").write_text("x")
    (tmp / "nomodel").mkdir(exist_ok=True)
    base = argv_of(stage2_data, teacher, tmp / "out")

    def with_(flag: str, *values: str) -> list[str]:
        i = base.index(flag)
        return base[:i] + [flag, *values] + base[i + 2:]

    def without(flag: str) -> list[str]:
        i = base.index(flag)
        return base[:i] + base[i + 2:]

    concept_manifest = str(stage2_data / "ref" / "concepts.json")
    return {
        "missing sae path": (with_("--sae", str(tmp / "no-sae")), "does not exist"),
        "sae is a text file": (with_("--sae", str(tmp / "notes.txt")), "notes.txt"),
        "teacher dir without a model": (with_("--teacher", str(tmp / "nomodel")), "nomodel"),
        "teacher path missing": (with_("--teacher", str(tmp / "no-teacher")), "does not exist"),
        "tokens is a concept manifest": (with_("--tokens", concept_manifest), "concepts manifest, not stage-1 output"),
        "tokens dir missing": (with_("--tokens", str(tmp / "none")), "does not exist"),
        "tokens is a user json": (with_("--tokens", str(tmp / "notes.json")), "not a valid manifest"),
        "tokens is a text file": (with_("--tokens", str(tmp / "notes.txt")), "not valid JSON"),
        "tokens and corpus together": (base + ["--corpus", str(tmp / "notes.txt")], "exactly one of --tokens"),
        "neither tokens nor corpus": (without("--tokens"), "exactly one of --tokens"),
        "batch size zero": (with_("--batch-size", "0"), "--batch-size must be >= 1"),
        "batch size negative": (with_("--batch-size", "-4"), "--batch-size must be >= 1"),
        "batch size not a number": (with_("--batch-size", "abc"), "--batch-size"),
        "num workers negative": (base + ["--num-workers", "-1"], "--num-workers must be >= 0"),
        "k-attr zero": (base + ["--k-attr", "0"], "--k-attr must be >= 1"),
        "k-mix above sae k": (with_("--k-mix", "16"), "--k-mix 16 > SAE k 8"),
        "layer out of range": (base + ["--layer", "7"], "out of range"),
        "unknown format": (base + ["--format", "parquet"], "--format"),
        "unknown attribution": (base + ["--attribution", "magic"], "--attribution"),
        "cuda without gpus": (base + ["--device", "cuda"], "--device cuda"),
        "unknown flag": (base + ["--bogus", "1"], "--bogus"),
        "missing teacher": (without("--teacher"), "--teacher"),
        "val corpus without corpus": (base + ["--val-corpus", str(tmp / "notes.txt")],
                                      "--val-corpus goes with --corpus"),
        "corpus file missing": (without("--tokens") + ["--corpus", str(tmp / "nope.txt")], "nope.txt"),
        "seq len zero": (without("--tokens") + ["--corpus", str(tmp / "notes.txt"), "--seq-len", "0"], "--seq-len"),
        "out is a file": (with_("--out", str(tmp / "afile")), "is a file"),
        "manifest is a user file": (base + ["--manifest", str(tmp / "notes.json")], "not a cocomix manifest"),
    }


MISTAKES = [
    "missing sae path", "sae is a text file", "teacher dir without a model", "teacher path missing",
    "tokens is a concept manifest", "tokens dir missing", "tokens is a user json", "tokens is a text file",
    "tokens and corpus together", "neither tokens nor corpus", "batch size zero", "batch size negative",
    "batch size not a number", "num workers negative", "k-attr zero", "k-mix above sae k", "layer out of range",
    "unknown format", "unknown attribution", "cuda without gpus", "unknown flag", "missing teacher",
    "val corpus without corpus", "corpus file missing", "seq len zero", "out is a file", "manifest is a user file",
]


def test_mistake_table_is_complete(stage2_data, tiny_teacher_dir, tmp_path):
    assert sorted(_mistakes(stage2_data, tiny_teacher_dir, tmp_path)) == sorted(MISTAKES)


@pytest.mark.parametrize("name", MISTAKES)
def test_user_mistakes_are_one_error_line(name, stage2_data, tiny_teacher_dir, stage2_reference, tmp_path, capsys):
    argv, phrase = _mistakes(stage2_data, tiny_teacher_dir, tmp_path)[name]
    rc, _, err = cli(argv, capsys)
    assert phrase in one_error(rc, err)
    assert not (tmp_path / "out").exists() and (tmp_path / "notes.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("case", ["unknown teacher", "batch size not a number", "tokens is a concept manifest"])
def test_user_mistakes_in_the_real_cli(case, stage2_data, tiny_teacher_dir, stage2_reference, tmp_path):
    """`python pipeline/extract.py` itself: stderr holds one error line and no traceback."""
    cases = {
        "unknown teacher": (["--teacher", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
        "batch size not a number": (["--batch-size", "abc"], "--batch-size"),
        "tokens is a concept manifest": (["--tokens", str(stage2_data / "ref" / "concepts.json")], "concepts manifest"),
    }
    extra, phrase = cases[case]
    argv = argv_of(stage2_data, tiny_teacher_dir, tmp_path / "out") + extra  # argparse: the last value wins
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, str(REPO / "pipeline" / "extract.py"), *argv], capture_output=True, text=True,
                       env=env, timeout=300)
    line = one_error(p.returncode, p.stderr)
    assert phrase in line and not (tmp_path / "out").exists()

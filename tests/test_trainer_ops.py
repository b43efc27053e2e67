"""Operating the trainer for real (issue 12): reruns, another run in --out-dir, resume on other data,
a death at any instant of a checkpoint save, Ctrl-C, a full disk, corrupted shards, bad options.
Each user mistake ends with exit 2 and one ``error:`` line, never a traceback."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.loop import train
from trainer.synthetic import write_manifest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=40, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


def args(manifest: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--shards", str(manifest), "--out-dir", str(out), "--preset", "tiny", "--steps", str(steps),
            "--micro-batch", "4", "--eval-windows", "8", "--eval-every", "2", "--ckpt-every", "2", "--workers", "0",
            "--no-progress", *extra]


def _as_main(main, argv: list[str], catch: tuple[type[BaseException], ...]) -> int:
    """What ``python -m`` did before the ``cli`` functions existed (at 86129a6, for the before/after
    table): the caught exceptions as ``error:`` + 2, anything else a traceback + 1."""
    try:
        main(argv)
    except catch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m trainer.run ARGS`` in this process: (exit code, stderr)."""
    import trainer.run

    rc = trainer.run.cli(argv) if hasattr(trainer.run, "cli") else _as_main(trainer.run.main, argv, (ValueError,))
    return rc, capsys.readouterr().err


def one_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under d: (mtime_ns, bytes)."""
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ck = out / "ckpt"
    d = ck / (ck / "latest").read_text().strip() if (ck / "latest").is_file() else ck
    return load_file(str(d / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps_in(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    """Final weights of uninterrupted runs, by step count."""
    out = {}
    for steps in (4, 6):
        d = tmp_path_factory.mktemp(f"ref{steps}")
        from trainer.run import main

        main(args(data, d / "o", steps=steps))
        out[steps] = final_weights(d / "o")
    return out


# -- item 1: an out-dir holding another run ------------------------------------------------------


def test_finished_run_rerun_is_complete_and_untouched(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(args(data, out), capsys)[0] == 0
    before = snapshot(out)
    rc, err = cli(args(data, out), capsys)
    assert rc == 0 and "run complete" in err and str(out) in err and "step 4/4" in err
    rc, err = cli(args(data, out, "--resume", "auto"), capsys)
    assert rc == 0 and "run complete" in err
    assert snapshot(out) == before  # nothing rewritten


@pytest.mark.parametrize(
    "extra,key",
    [
        (["--mode", "ntp"], "mode: checkpoint 'cocomix', this run 'ntp'"),
        (["--lr", "1e-3"], "lr: checkpoint 0.0006, this run 0.001"),
        (["--preset", "small"], "model.d_model: checkpoint 64, this run 128"),
        (["--seed", "1"], "seed: checkpoint 1337, this run 1"),
        (["--eval-windows", "4"], "eval_windows: checkpoint 8, this run 4"),
        (["--mix", "add"], "model.concept: checkpoint"),
    ],
)
def test_another_run_in_the_out_dir_is_refused(data, tmp_path, capsys, extra, key):
    out = tmp_path / "o"
    assert cli(args(data, out), capsys)[0] == 0
    before = snapshot(out)
    for resume in ([], ["--resume", "auto"]):
        rc, err = cli(args(data, out, *extra, *resume), capsys)
        line = one_error(err)
        assert rc == 2 and str(out) in line and key in line and "finished run" in line and "another --out-dir" in line
    assert snapshot(out) == before


def test_another_unfinished_run_names_the_way_out(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(args(data, out, "--halt-after", "2"), capsys)[0] == 0
    before = snapshot(out)
    rc, err = cli(args(data, out, "--lr", "1e-3"), capsys)
    line = one_error(err)
    assert rc == 2 and "at step 2 of 4" in line and "another --out-dir" in line and "--resume auto" in line
    assert snapshot(out) == before


def test_other_data_in_the_out_dir_is_refused(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(args(data, out), capsys)[0] == 0
    other = write_manifest(tmp_path / "d2", windows=40, val_windows=8, seq_len=16, vocab=128, n_concepts=64, seed=5)
    rc, err = cli(args(other, out), capsys)
    assert rc == 2 and "data.tokens_checksums: shard train-00000 differs" in one_error(err)


def test_same_unfinished_run_continues_with_or_without_resume(data, tmp_path, capsys, reference):
    """Choice: rerunning the killed command continues the same run (as every stage of the project
    does); nothing is lost, the steps after the checkpoint are redone bit for bit."""
    for resume in ([], ["--resume", "auto"]):
        out = tmp_path / f"o{len(resume)}"
        assert cli(args(data, out, "--halt-after", "3"), capsys)[0] == 0  # checkpoint at 2, step 3 lost
        rc, err = cli(args(data, out, *resume), capsys)
        assert rc == 0 and "continuing the run" in err and "from step 2/4" in err
        assert steps_in(out) == [1, 2, 3, 4]
        assert same_weights(final_weights(out), reference[4])


def test_resume_from_an_earlier_checkpoint_never_replaces_a_later_one(data, tmp_path, capsys, reference):
    out = tmp_path / "o"
    assert cli(args(data, out, "--halt-after", "2"), capsys)[0] == 0
    early = tmp_path / "early"
    shutil.copytree(out / "ckpt" / "step-000002", early)
    assert cli(args(data, out, "--halt-after", "2"), capsys)[0] == 0  # now at step 4
    kept = snapshot(out)
    rc, err = cli(args(data, out, "--resume", str(early)), capsys)
    assert rc == 2 and "holds this run at step 4, later than that checkpoint" in one_error(err)
    assert snapshot(out) == kept
    assert cli(args(data, tmp_path / "branch", "--resume", str(early)), capsys)[0] == 0  # another out-dir: fine
    assert same_weights(final_weights(tmp_path / "branch"), reference[4]) and steps_in(tmp_path / "branch") == [3, 4]


def test_free_settings_may_differ_on_resume(data, tmp_path, capsys, reference):
    out = tmp_path / "o"
    assert cli(args(data, out, "--halt-after", "2"), capsys)[0] == 0
    extra = ["--workers", "1", "--log-every", "3", "--eval-every", "0", "--ckpt-every", "0", "--verify", "lazy"]
    assert cli(args(data, out, *extra), capsys)[0] == 0
    assert same_weights(final_weights(out), reference[4])


def test_every_setting_is_classified_in_one_place():
    from trainer.config import DERIVED_KEYS, FREE_KEYS, RESUME_KEYS

    groups = [set(RESUME_KEYS), set(DERIVED_KEYS), set(FREE_KEYS)]
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # disjoint
    assert set().union(*groups) == {f.name for f in fields(TrainConfig)}
    assert TrainConfig().out_dir == "runs/student" and TrainConfig().verify == "open"


def test_foreign_files_in_the_out_dir_are_never_replaced(data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own config"}')
    rc, err = cli(args(data, out), capsys)
    assert rc == 2 and "not a trainer run record" in one_error(err)
    assert (out / "config.json").read_text() == '{"my": "own config"}'
    # A new run never starts among somebody else's files (it used to train beside them)...
    other = tmp_path / "o2"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, err = cli(args(data, other), capsys)
    assert rc == 2 and "did not write (notes.txt)" in one_error(err) and sorted(os.listdir(other)) == ["notes.txt"]
    # ...but a note the user adds beside a run of ours is kept, and the run is still recognised.
    ours = tmp_path / "o3"
    assert cli(args(data, ours), capsys)[0] == 0
    (ours / "notes.txt").write_text("mine")
    rc, err = cli(args(data, ours), capsys)
    assert rc == 0 and "run complete" in err and (ours / "notes.txt").read_text() == "mine"


# -- item 4: resume accepts exactly the same data -------------------------------------------------


def _rewrite_shard(manifest: Path, split: str, i: int, part: str, seed: int) -> None:
    """Replace one shard part with other valid windows and update the manifest's checksum."""
    from shards import load_manifest, write_shard
    from trainer.synthetic import make_arrays

    m = load_manifest(manifest)
    sh = m.splits[split].shards[i]
    specs = m.part_fields(part)
    arrs = make_arrays(sh.windows, m.seq_len, 128, 64, seed=seed)
    sh.parts[part] = write_shard(sh.parts[part].path, specs, {k: arrs[k] for k in specs})
    m.save(manifest)


@pytest.mark.parametrize(
    "split,i,part,key",
    [
        ("train", 1, "concepts", "data.concepts_checksums: shard train-00001 differs"),
        ("train", 0, "tokens", "data.tokens_checksums: shard train-00000 differs"),
        ("val", 0, "concepts", "data.concepts_checksums: shard val-00000 differs"),
    ],
)
def test_resume_on_other_shards_is_refused(data, tmp_path, capsys, split, i, part, key):
    d = tmp_path / "d"
    shutil.copytree(data.parent, d)
    out = tmp_path / "o"
    assert cli(args(d / "manifest.json", out, "--halt-after", "2"), capsys)[0] == 0
    _rewrite_shard(d / "manifest.json", split, i, part, seed=99)
    rc, err = cli(args(d / "manifest.json", out, "--resume", "auto"), capsys)
    assert rc == 2 and key in one_error(err)


def test_resume_on_other_provenance_is_refused(data, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(data.parent, d)
    out = tmp_path / "o"
    assert cli(args(d / "manifest.json", out, "--halt-after", "2"), capsys)[0] == 0
    j = json.loads((d / "manifest.json").read_text())
    j["attribution"]["variant"] = "activation"
    j["hook"]["layer"] = 3
    (d / "manifest.json").write_text(json.dumps(j))
    rc, err = cli(args(d / "manifest.json", out, "--resume", "auto"), capsys)
    line = one_error(err)
    assert rc == 2 and "data.attribution: checkpoint 'synthetic', this manifest 'activation'" in line
    assert "data.hook_layer: checkpoint 0, this manifest 3" in line


def test_moved_data_with_the_same_bytes_resumes(data, tmp_path, capsys, reference):
    out = tmp_path / "o"
    assert cli(args(data, out, "--halt-after", "2"), capsys)[0] == 0
    moved = tmp_path / "moved"
    shutil.copytree(data.parent, moved)
    assert cli(args(moved / "manifest.json", out, "--resume", "auto"), capsys)[0] == 0
    assert same_weights(final_weights(out), reference[4])


def test_data_identity_is_compact(data, tmp_path):
    train(TrainConfig(**_kw(data, tmp_path / "o")))
    cfg = json.loads((tmp_path / "o" / "ckpt" / "step-000004" / "config.json").read_text())
    ident = cfg["data"]
    assert set(ident["checksums"]) == {"tokens", "concepts"}
    # only val-00000 is evaluated
    assert ident["shards"]["concepts"] == {"train": [ident["shards"]["concepts"]["train"][0],
                                                     ident["shards"]["concepts"]["train"][1]],
                                           "val": [ident["shards"]["concepts"]["val"][0]]}
    assert all(len(h) == 12 for h in ident["shards"]["tokens"]["train"])
    assert ident["k_attr"] == 4 and ident["attribution"] == "synthetic" and ident["hook_layer"] == 0
    assert len(json.dumps(ident)) < 1200


def _kw(manifest: Path, out: Path, **kw) -> dict:
    return dict(shards=str(manifest), out_dir=str(out), preset="tiny", steps=4, micro_batch=4, eval_windows=4,
                eval_every=2, ckpt_every=2, workers=0, progress=False) | kw


# -- item 5: a death at every step of a checkpoint save -------------------------------------------

_CRASH_SCRIPT = r'''
import json, os, shutil, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
import trainer.checkpoint as ck
from trainer.config import TrainConfig
from trainer.loop import train

manifest, root = sys.argv[1], Path(sys.argv[2])
KILL_SAVE = 2  # die during the save of step 4 (the step-2 checkpoint is complete)
state = {"saves": 0, "ops": 0, "kill": None, "active": False}

def instrument(mod, name):
    orig = getattr(mod, name)
    def wrapped(*a, **k):
        if state["active"]:
            if state["ops"] == state["kill"]:
                os._exit(17)  # dies before this operation, like kill -9
            state["ops"] += 1
        return orig(*a, **k)
    setattr(mod, name, wrapped)

# Every operation that changes what is on disk (fsync only matters for power loss, not a process
# death), however the code under test does it (the code at 86129a6 used Path.rename).
for mod, name in [(os, "replace"), (os, "rename"), (shutil, "rmtree"), (ck, "save_model"), (torch, "save"),
                  (Path, "rename"), (Path, "replace"), (Path, "mkdir"), (Path, "write_text"), (Path, "unlink"),
                  ]:
    instrument(mod, name)
orig_save = ck.save
def counting_save(*a, **k):
    state["saves"] += 1
    state["active"] = state["saves"] == KILL_SAVE and state["kill"] is not None
    out = orig_save(*a, **k)
    if state["active"] and state["ops"] == state["kill"]:
        os._exit(17)  # dies right after the save returned
    state["active"] = False
    return out
ck.save = counting_save

def kw(out):
    return dict(shards=manifest, out_dir=str(out), preset="tiny", steps=6, micro_batch=4, eval_windows=0,
                ckpt_every=2, workers=0, progress=False, dropout=0.1)

def weights(out):
    c = out / "ckpt"
    d = c / (c / "latest").read_text().strip() if (c / "latest").is_file() else c
    return load_file(str(d / "model.safetensors"))

def child(fn):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except BaseException as e:
            print("child failed:", repr(e), file=sys.stderr, flush=True)
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

ref = root / "ref"
train(TrainConfig(**kw(ref)))  # in this process: the forked children start warm (one thread, no pool to break)
want = weights(ref)
results = []
for i in range(100):
    out = root / f"kill{i}"
    def killed():
        state["kill"], state["saves"], state["ops"] = i, 0, 0
        train(TrainConfig(**kw(out)))
    rc = child(killed)
    if rc == 0:  # the save had fewer than i operations: every point is covered
        break
    assert rc == 17, rc
    loaded = []
    orig_load = ck.load_state
    def spy(path, *a, **k):
        s = orig_load(path, *a, **k)
        loaded.append(int(s["step"]))
        return s
    ck.load_state = spy
    def resumed():
        train(TrainConfig(**kw(out), resume="auto"))
        w = weights(out)
        ok = w.keys() == want.keys() and all(torch.equal(w[k], want[k]) for k in w)
        left = sorted(p.name for p in (out / "ckpt").iterdir())
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        (root / f"result{i}.json").write_text(json.dumps({"loaded": loaded, "same": ok, "left": left, "steps": steps}))
    assert child(resumed) == 0
    ck.load_state = orig_load
    results.append(json.loads((root / f"result{i}.json").read_text()) | {"point": i})
print(json.dumps(results))
'''


def test_a_death_at_every_step_of_a_save_resumes_bit_identically(data, tmp_path):
    """A subprocess trains 6 steps (checkpoints at 2, 4, 6) and dies with os._exit before the i-th
    file-system operation of the step-4 save, for every i; `--resume auto` must then continue from
    step 2 or 4 (never lose the step-2 checkpoint) and end with the uninterrupted run's weights."""
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(data), str(tmp_path)], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) >= 8, results  # every operation of a save was a death point
    for res in results:
        assert res["loaded"] in ([2], [4]), res  # the previous complete checkpoint at least
        assert res["same"], res  # bit-identical to the uninterrupted run
        assert res["left"] == ["latest", "step-000006"], res  # no stray temporary or old directory
        assert res["steps"] == [1, 2, 3, 4, 5, 6], res  # each step once in metrics.jsonl
    assert {tuple(r["loaded"]) for r in results} == {(2,), (4,)}


def test_pointer_missing_falls_back_to_the_newest_complete_step(data, tmp_path):
    from trainer import checkpoint

    train(TrainConfig(**_kw(data, tmp_path / "o", halt_after=2)))
    ck = tmp_path / "o" / "ckpt"
    (ck / "latest").unlink()
    assert checkpoint.latest(ck) == step2(ck)
    shutil.copytree(step2(ck), ck / ".step-000004.tmp")  # an unfinished save: never loaded
    assert checkpoint.resolve(ck) == step2(ck)
    (ck / "latest").write_text("step-000009\n")
    with pytest.raises(ValueError, match="step-000009.*named by.*incomplete"):
        checkpoint.resolve(ck)


# -- item 6: metrics.jsonl holds each step once ---------------------------------------------------


def test_metrics_hold_each_step_once_after_resume(data, tmp_path):
    out = tmp_path / "o"
    train(TrainConfig(**_kw(data, out, steps=6, halt_after=5)))  # checkpoint at 4, step 5 redone
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.2')  # a line torn by a crash
    train(TrainConfig(**_kw(data, out, steps=6, resume="auto")))
    assert steps_in(out) == [1, 2, 3, 4, 5, 6]


# -- corrupted shards stop before step 0 ----------------------------------------------------------


def _corrupt(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("shard,subprocess_", [("train-00001.tokens.arrow", True),
                                               ("train-00000.concepts.arrow", False),
                                               ("val-00000.concepts.arrow", False)])
def test_corrupted_shard_stops_before_step_0(data, tmp_path, capsys, shard, subprocess_):
    d = tmp_path / "d"
    shutil.copytree(data.parent, d)
    _corrupt(d / shard)
    out = tmp_path / "o"
    argv = ["--shards", str(d / "manifest.json"), "--out-dir", str(out), "--steps", "6", "--micro-batch", "4",
            "--eval-windows", "8", "--no-progress"]  # default --workers 2 and --verify
    if subprocess_:
        r = subprocess.run([sys.executable, "-m", "trainer.run", *argv], env=ENV, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        rc, err = r.returncode, r.stderr
    else:
        rc, err = cli(argv, capsys)
    line = one_error(err)
    assert rc == 2 and shard in line and "corrupted" in line
    assert not (out / "metrics.jsonl").exists()  # no step trained


@pytest.mark.parametrize("workers", [0, 2])
def test_lazy_verification_in_a_worker_is_one_line(data, tmp_path, capsys, workers):
    d = tmp_path / "d"
    shutil.copytree(data.parent, d)
    _corrupt(d / "train-00001.tokens.arrow")
    rc, err = cli(args(d / "manifest.json", tmp_path / "o", "--verify", "lazy", "--workers", str(workers), steps=6),
                  capsys)
    line = one_error(err)
    assert rc == 2 and "train-00001.tokens.arrow" in line and "corrupted" in line and "DataLoader" not in err


def test_open_split_limit_and_parallel_verification(data, tmp_path):
    from shards import load_manifest, open_split

    m = load_manifest(data)
    ds = open_split(m, "val", verify="open", fields=["tokens"], limit=3)
    assert len(ds) == 3 and len(ds.shards) == 1 and ds.get_batch([0, 2])["tokens"].shape == (2, 17)
    d = tmp_path / "d"
    shutil.copytree(data.parent, d)
    _corrupt(d / "val-00001.concepts.arrow")  # beyond the evaluated windows, and not a tokens part
    m = load_manifest(d / "manifest.json")
    open_split(m, "val", verify="open", fields=["tokens", "concept_ids"], limit=4)
    open_split(m, "val", verify="open", fields=["tokens"])
    _corrupt(d / "train-00000.concepts.arrow")
    _corrupt(d / "train-00001.concepts.arrow")
    with pytest.raises(ValueError, match=r"train-00000.concepts.arrow.*corrupted.*\(and 1 more bad shard"):
        open_split(m, "train", verify="open", fields=["concept_ids"])


# -- Ctrl-C, full disk, an out-dir that is a file -------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_saves_and_says_how_to_continue(data, tmp_path, capsys, workers):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "trainer.run", *args(data, out, "--workers", str(workers), "--ckpt-every", "0",
                                                        "--eval-every", "0", steps=5000)]
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(steps_in(out)) >= 3):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert ("Traceback" not in err and "interrupted at step" in err and "saved checkpoint" in err
            and "rerun the same command" in err)
    step = steps_in(out)[-1]
    ck = out / "ckpt"
    assert (ck / "latest").read_text().strip() == f"step-{step:06d}"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", f"step-{step:06d}"]  # nothing half-written
    rc, err = cli(args(data, out, "--workers", str(workers), "--ckpt-every", "0", "--eval-every", "0",
                       "--halt-after", "1", steps=5000), capsys)
    assert rc == 0 and f"from step {step}/5000" in err, err
    assert steps_in(out) == list(range(1, step + 2))


def _limited(limit: int):
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death

    return pre


def test_full_disk_while_saving_keeps_the_previous_checkpoint(data, tmp_path, capsys, reference):
    out = tmp_path / "o"
    assert cli(args(data, out, "--halt-after", "2"), capsys)[0] == 0
    ck = out / "ckpt"
    kept = snapshot(ck)
    assert (step2(ck) / "model.safetensors").stat().st_size > 64_000
    r = subprocess.run([sys.executable, "-m", "trainer.run", *args(data, out)], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=300, preexec_fn=_limited(64_000))  # every file may hold 64 kB
    line = one_error(r.stderr)
    assert r.returncode == 2 and "step-000004" in line and "model.safetensors" in line and "File too large" in line
    assert "step-000002" in line and "intact" in line
    assert snapshot(ck) == kept  # the previous checkpoint and its pointer, untouched; no temporary left
    assert cli(args(data, out), capsys)[0] == 0  # space again: the same command continues
    assert same_weights(final_weights(out), reference[4])


def test_no_space_left_while_saving(data, tmp_path, capsys, monkeypatch):
    """ENOSPC (a full disk rather than a file size limit), raised where safetensors writes."""
    import errno

    import trainer.checkpoint as ck

    out = tmp_path / "o"
    assert cli(args(data, out, "--halt-after", "2"), capsys)[0] == 0
    kept = snapshot(out / "ckpt")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_model", full)
    rc, err = cli(args(data, out), capsys)
    line = one_error(err)
    assert rc == 2 and "No space left on device" in line and "step-000004" in line and "step-000002" in line
    assert snapshot(out / "ckpt") == kept


def test_full_disk_while_logging_metrics(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(args(data, out, "--halt-after", "12", steps=16), capsys)[0] == 0
    size = (out / "metrics.jsonl").stat().st_size
    assert (out / "config.json").stat().st_size < size  # the limit below stops the metrics line only
    r = subprocess.run([sys.executable, "-m", "trainer.run", *args(data, out, steps=16)], env=ENV, cwd=ROOT,
                       # step 13 does not fit
                       capture_output=True, text=True, timeout=300, preexec_fn=_limited(size + 100))
    line = one_error(r.stderr)
    assert r.returncode == 2 and "metrics.jsonl" in line and "File too large" in line and "step-000012" in line
    assert (out / "ckpt" / "latest").read_text() == "step-000012\n"
    assert cli(args(data, out, steps=16), capsys)[0] == 0  # a torn line is dropped on resume
    assert steps_in(out) == list(range(1, 17))


def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    for out in (f, f / "sub"):
        # The manifest does not exist: the out-dir is checked before any data is loaded.
        rc, err = cli(["--shards", str(tmp_path / "nope.json"), "--out-dir", str(out), "--steps", "2"], capsys)
        line = one_error(err)
        assert rc == 2 and "--out-dir" in line and str(f) in line and "is a file" in line
    assert f.read_text() == "mine"


def test_out_dir_that_is_a_checkpoint_directory(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(args(data, out), capsys)[0] == 0
    kept = snapshot(out)
    for wrong in (out / "ckpt", out / "ckpt" / "step-000004"):
        rc, err = cli(args(data, wrong), capsys)
        assert rc == 2 and "is a checkpoint directory" in one_error(err)
    assert snapshot(out) == kept


# -- every user-facing error of trainer.run: exit 2, one line, no traceback -----------------------


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--lr", "-1"], "--lr must be > 0"),
        (["--log-every", "0"], "--log-every must be >= 1"),
        (["--eval-every", "-1"], "--eval-every must be >= 0"),
        (["--workers", "-2"], "--workers must be >= 0"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["--resume", "/nonexistent/ckpt"], "checkpoint '/nonexistent/ckpt' does not exist"),
        (["--micro-batch", "64"], "fewer than one global batch"),
        (["--preset", "huge"], "unknown preset"),
        (["--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_run_cli_errors_are_one_line(data, tmp_path, capsys, extra, match):
    if extra[:1] == ["--device"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, err = cli(args(data, tmp_path / "o", *extra), capsys)
    assert rc == 2 and match in one_error(err)


def test_run_cli_error_for_a_missing_manifest_and_another_runs_checkpoint(data, tmp_path, capsys):
    rc, err = cli(args(tmp_path / "nope.json", tmp_path / "o"), capsys)
    assert rc == 2 and "does not exist" in one_error(err)
    assert cli(args(data, tmp_path / "a"), capsys)[0] == 0
    rc, err = cli(args(data, tmp_path / "b", "--lr", "1e-3", "--resume", str(tmp_path / "a" / "ckpt")), capsys)
    line = one_error(err)
    assert rc == 2 and "is of another run" in line and "lr: checkpoint 0.0006, this run 0.001" in line


def test_run_cli_subprocess_reports_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "trainer.run", "--shards", "nope.json", "--out-dir", str(f)],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr


# -- trainer.generate -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_ckpts(tmp_path_factory) -> dict[str, Path]:
    """A CoCoMix and an NTP run on synthetic data decoded by a word tokenizer."""
    from trainer.synthetic import write_word_tokenizer

    d = tmp_path_factory.mktemp("gen")
    tok = write_word_tokenizer(d / "tok", 128)
    m = write_manifest(d / "data", windows=16, val_windows=4, seq_len=16, vocab=128, n_concepts=64, tokenizer=tok)
    runs = {}
    for mode in ("cocomix", "ntp"):
        train(TrainConfig(**_kw(m, d / mode, steps=2, eval_windows=0, mode=mode)))
        runs[mode] = d / mode / "ckpt"
    return runs


def step2(ck: Path) -> Path:
    """The step-2 checkpoint of a run's ckpt directory (the flat layout of 86129a6: the directory)."""
    return ck / "step-000002" if (ck / "step-000002").is_dir() else ck


def gen(argv: list[str], capsys) -> tuple[int, str, str]:
    import trainer.generate

    rc = trainer.generate.cli(argv) if hasattr(trainer.generate, "cli") else _as_main(trainer.generate.main, argv, ())
    o = capsys.readouterr()
    return rc, o.out, o.err


def test_generate_from_run_dir_step_dir_and_without_optimiser_state(gen_ckpts, tmp_path, capsys):
    base = ["--prompt", "w1 w2", "--max-new-tokens", "3", "--temperature", "0", "--ignore-eos"]
    ck = gen_ckpts["cocomix"]
    outs = []
    for where in (ck, step2(ck)):
        rc, out, err = gen(["--ckpt", str(where), *base, "--steer", "5=3"], capsys)
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1] and outs[0].startswith("w1 w2")
    light = tmp_path / "light"
    light.mkdir()
    for f in ("model.safetensors", "config.json"):  # what one shares for inference: no state.pt
        shutil.copy(step2(ck) / f, light / f)
    rc, out, err = gen(["--ckpt", str(light), *base], capsys)
    assert rc == 0 and out.startswith("w1 w2"), err


def test_generate_errors_are_one_line(gen_ckpts, tmp_path, capsys):
    ck, ntp = gen_ckpts["cocomix"], gen_ckpts["ntp"]
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    shutil.copy(step2(ck) / "config.json", no_model / "config.json")
    torn = tmp_path / "torn"
    shutil.copytree(step2(ck), torn)
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:1000])
    bad_json = tmp_path / "bad_json"
    shutil.copytree(step2(ck), bad_json)
    (bad_json / "config.json").write_text("{")
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "latest").write_text("step-000007\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "nope")], "--ckpt", "does not exist"),
        ([str(no_model)], "--ckpt", "model.safetensors missing"),
        ([str(torn)], "--ckpt", "cannot be loaded"),
        ([str(bad_json)], "--ckpt", "not valid JSON"),
        ([str(dangling)], "--ckpt", "step-000007"),
        ([str(empty)], "--ckpt", "holds no complete checkpoint"),
        ([str(ck), "--steer", "abc"], "--steer", "ID=SCALE"),
        ([str(ck), "--steer", "5"], "--steer", "ID=SCALE"),
        ([str(ck), "--steer", "99999999=2"], "--steer", "outside [0, 64)"),
        ([str(ck), "--steer=-1=2"], "--steer", "outside"),
        ([str(ck), "--steer", "3=nan"], "--steer", "finite"),
        ([str(ntp), "--steer", "3=2"], "--steer", "no concept block"),
        ([str(ck), "--temperature", "-0.5"], "--temperature", ">= 0"),
        ([str(ck), "--top-k", "-1"], "--top-k", ">= 0"),
        ([str(ck), "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
        ([str(ck), "--max-new-tokens", "100000"], "--max-new-tokens", "block_size"),
        ([str(ck), "--show-concepts", "-3"], "--show-concepts", ">= 0"),
    ]
    for argv, flag, match in cases:
        rc, _, err = gen(["--ckpt", *argv, "--prompt", "w1"], capsys)
        line = one_error(err)
        assert rc == 2 and match in line, (argv, line)
        assert flag in line or argv[0] in line, (argv, line)  # names the flag or the file


def test_generate_cli_subprocess_reports_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer.generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "x"],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
            and "Traceback" not in r.stderr)

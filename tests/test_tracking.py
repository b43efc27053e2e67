"""Experiment tracking (common/tracking.py) in trainer.run and sae.train: TensorBoard event files read
back equal metrics.jsonl, with no step twice after a resume; W&B in offline mode (never a server)
writes the same rows and the config, and a rerun continues the same W&B run; a missing package is one
error line before any work; a sink failing mid-run warns once and the run goes on; rank 0 only."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import tracking
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.synthetic import write_manifest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- readers
def tb_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard shows it (its EventAccumulator, purges applied); a step seen
    twice under a tag fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def wandb_records(run_dir: Path):
    """The records of an offline W&B run file (``run-ID.wandb``: a LevelDB-style log of protobuf
    ``Record`` messages, 32 KiB blocks, 7-byte headers; W&B's own datastore format)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # padding at the end of a block
            pos += left
            continue
        if pos + 7 + n > len(data):  # a record still being written
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_run(run_dir: Path) -> tuple[str, dict[str, object], dict[int, dict[str, float]]]:
    """(run id, config, {step: logged values}) of one offline W&B run directory. W&B's service process
    may still be writing the file when ``finish()`` has returned: read once its exit record is there."""
    deadline = time.monotonic() + 60
    while True:
        records = list(wandb_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    run_id, config, history = "", {}, {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[int(items["_step"])] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, config, history


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def numeric(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def assert_tb_equals_metrics(tb: dict[str, dict[int, float]], metrics: list[dict]) -> None:
    expected: dict[str, dict[int, float]] = {}
    for r in metrics:
        for k, v in numeric(r).items():
            expected.setdefault(k, {})[r["step"]] = v
    assert sorted(tb) == sorted(expected)
    for tag, by_step in expected.items():
        assert sorted(tb[tag]) == sorted(by_step), tag
        for step, v in by_step.items():  # TensorBoard scalars are float32
            assert tb[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-30), (tag, step)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode with its files in tmp: nothing reaches a server, nothing outside tmp."""
    pytest.importorskip("wandb")
    d = tmp_path / "wandb-home"
    d.mkdir()
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(d))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(d / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(d / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(d / "data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    yield d
    import wandb

    wandb.teardown()  # W&B keeps one service and its settings per process: the next test starts afresh


def block_packages(monkeypatch, *names: str) -> None:
    """Make ``import NAME`` (and its submodules) fail as if the package were not installed."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


# ---------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=24, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


def cfg(manifest: Path, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(manifest), out_dir=str(out), preset="tiny", mode="cocomix", steps=6, micro_batch=4,
                eval_every=2, eval_windows=8, ckpt_every=2, workers=0, progress=False)
    return TrainConfig(**{**base, **kw})


def test_trainer_tensorboard_equals_metrics_and_a_resume_shows_each_step_once(data, tmp_path):
    """The end-to-end proof: a run stopped after step 3 (checkpoint at 2) and rerun logs steps 3..6
    again; TensorBoard shows every metrics.jsonl value (losses, lr, grad norm, tokens/s, concept loss,
    validation per held-out set) at its step, once."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    train(cfg(data, out, tensorboard=True, halt_after=3))
    first = tb_scalars(out / "tb")
    assert sorted(first["loss"]) == [1, 2, 3]
    train(cfg(data, out, tensorboard=True))
    metrics = rows(out)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    tb = tb_scalars(out / "tb")
    assert_tb_equals_metrics(tb, metrics)
    for tag in ("loss", "ntp_loss", "concept_loss", "lr", "grad_norm", "tokens_per_s", "val_loss",
                "val_concept_loss"):
        assert tag in tb
    assert sorted(tb["val_loss"]) == [2, 4, 6]
    assert len(list((out / "tb").iterdir())) == 2  # one event file per process
    # The replayed step 3 is the rerun's value (bit-exact resume: the same as the first attempt's).
    assert tb["loss"][3] == pytest.approx(first["loss"][3], rel=1e-6)


def of_run(folder: Path, run_id: str) -> bool:
    """W&B names an offline run's folder offline-run-<date>_<time>-<id>, adding -1, -2 ... when two
    attempts of one run start within the same second."""
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?", folder.name) is not None


def test_trainer_wandb_offline_logs_the_rows_and_a_rerun_continues_the_run(data, tmp_path, offline_wandb):
    out = tmp_path / "o"
    train(cfg(data, out, wandb="cocomix-test", wandb_name="tiny", halt_after=3))
    saved = json.loads((out / tracking.WANDB_RUN).read_text())
    train(cfg(data, out, wandb="cocomix-test", wandb_name="tiny"))
    assert json.loads((out / tracking.WANDB_RUN).read_text()) == saved  # the same W&B run continues
    runs = sorted((offline_wandb / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(of_run(r, saved["id"]) for r in runs)
    assert not (out / "wandb").exists()  # WANDB_DIR wins over the run directory
    metrics = {r["step"]: numeric(r) for r in rows(out)}
    logged: dict[int, dict[str, float]] = {}
    for run in runs:
        run_id, config, history = wandb_run(run)
        assert run_id == saved["id"]
        assert config["train"]["mode"] == "cocomix" and config["total_steps"] == 6 and config["params"] > 0
        logged.update(history)  # the rerun's offline file starts at step 3 again; later values win on sync
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, values in logged.items():
        assert values == metrics[step], step  # JSON doubles: exactly the metrics.jsonl values
    assert "val_loss" in logged[6] and "concept_loss" in logged[1]


def test_a_failing_sink_warns_once_and_the_run_goes_on(data, tmp_path, monkeypatch, capfd):
    """A full disk under OUT/tb at step 3 (/dev/full): one warning, training and metrics.jsonl complete."""
    pytest.importorskip("tensorboard")
    real_log = tracking._TensorBoard.log

    def disk_fills(self, values, step):
        if step == 3:
            self._writer._writer = open("/dev/full", "wb")  # noqa: SIM115 (closed by the sink)
        real_log(self, values, step)

    monkeypatch.setattr(tracking._TensorBoard, "log", disk_fills)
    out = tmp_path / "o"
    summary = train(cfg(data, out, tensorboard=True))
    assert summary["step"] == 6 and [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: TensorBoard")]
    assert len(warnings) == 1 and "at step 3" in warnings[0] and "No space left" in warnings[0], err
    assert sorted(tb_scalars(out / "tb")["loss"]) == [1, 2]


def test_wandb_online_unavailable_falls_back_to_offline(tmp_path, offline_wandb, monkeypatch, capfd):
    """No API key / no network for --wandb-mode online: the rows are kept offline, with the sync command
    (the online attempt is simulated: a test never reaches a server)."""
    import wandb

    real_init = wandb.init

    def no_server(**kw):
        if kw.get("mode") != "offline":
            raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
        return real_init(**kw)

    monkeypatch.setattr(wandb, "init", no_server)
    opts = tracking.TrackingOptions(wandb="p", wandb_mode="online")
    t = tracking.start(opts, tmp_path, step=0, config={"a": 1}, run_name="r")
    t.log({"step": 1, "loss": 2.0}, 1)
    t.close()
    err = capfd.readouterr().err
    assert "warning: W&B online not available (No API key configured" in err and "wandb sync" in err
    (run,) = (offline_wandb / "wandb").glob("offline-run-*")
    assert wandb_run(run)[2] == {1: {"loss": 2.0}}


def _cli(module: str, argv: list[str], capfd) -> tuple[int, str]:
    import importlib

    code = importlib.import_module(module).cli(argv)
    return code, capfd.readouterr().err


def test_missing_packages_are_one_error_line_before_any_work(data, tmp_path, monkeypatch, capfd):
    block_packages(monkeypatch, "tensorboard", "wandb")
    base = ["--shards", str(data), "--steps", "2", "--micro-batch", "4", "--workers", "0", "--no-progress"]
    code, err = _cli("trainer.run", [*base, "--out-dir", str(tmp_path / "o"), "--tensorboard"], capfd)
    assert code == 2
    assert err.splitlines() == [err.strip()] and err.startswith("error: --tensorboard needs the tensorboard package")
    assert "pip install tensorboard" in err and "pip install -e '.[tensorboard]'" in err
    assert not (tmp_path / "o").exists()  # nothing written, nothing read
    code, err = _cli("trainer.run", [*base, "--out-dir", str(tmp_path / "o"), "--wandb", "p"], capfd)
    assert code == 2 and err.startswith("error: --wandb needs the wandb package") and "pip install wandb" in err
    # sae.train: refused before the teacher loads (this teacher does not even exist)
    code, err = _cli("sae.train", ["--teacher", str(tmp_path / "no-teacher"), "--layer", "0", "--corpus",
                                   str(tmp_path / "c.txt"), "--out", str(tmp_path / "s"), "--wandb", "p"], capfd)
    assert code == 2 and err.startswith("error: --wandb needs the wandb package"), err
    assert not (tmp_path / "s").exists()


def test_options_are_checked_where_they_are_declared(tmp_path, capfd):
    with pytest.raises(ValueError, match="--wandb-name configure.*add --wandb PROJECT"):
        tracking.TrackingOptions(wandb_name="x")
    with pytest.raises(ValueError, match="--wandb-mode must be online or offline"):
        tracking.TrackingOptions(wandb="p", wandb_mode="cloud")
    code, err = _cli("trainer.run", ["--shards", "m.json", "--wandb-mode", "offline"], capfd)
    assert code == 2 and err.startswith("error: --wandb-mode configure(s) W&B logging"), err
    for cls in (TrainConfig, __import__("sae.train_config", fromlist=["TrainConfig"]).TrainConfig):
        assert set(tracking.TRACKING_FIELDS) <= {f for f in cls.__dataclass_fields__}


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    """Another rank gets a tracker without sinks: nothing imported (the packages may be absent there),
    nothing written."""
    block_packages(monkeypatch, "tensorboard", "wandb")
    opts = tracking.TrackingOptions(tensorboard=True, wandb="p")
    t = tracking.start(opts, tmp_path, step=0, config={}, run_name="r", rank=1)
    assert not t
    t.log({"step": 1, "loss": 1.0}, 1)
    t.close()
    assert list(tmp_path.iterdir()) == []


def test_scalars_are_the_numeric_values_of_a_row():
    row = {"step": 4, "loss": 2.5, "tokens": 128, "ok": True, "note": "x", "heldout": {"wiki": {"loss": 3.0}}}
    assert tracking.scalars(row) == {"loss": 2.5, "tokens": 128.0, "heldout/wiki/loss": 3.0}


def test_the_module_imports_nothing_heavy():
    code = ("import sys, common.tracking, trainer.config; "
            "print([m for m in ('torch', 'tensorboard', 'wandb') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------- sae.train
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import tiny_teacher, write_word_corpus

    root = tmp_path_factory.mktemp("tiny")
    return tiny_teacher(root / "teacher"), write_word_corpus(root / "corpus.txt")


def test_sae_train_tensorboard_and_wandb_equal_metrics_after_a_crash_and_rerun(tiny, tmp_path, monkeypatch,
                                                                               offline_wandb):
    """A run killed at step 30 (checkpoint at 20) and rerun: FVU, AuxK, L0, dead fraction, lr in
    TensorBoard equal metrics.jsonl with each step once; W&B got the same rows in the same run;
    --overwrite replaces the curves."""
    pytest.importorskip("tensorboard")
    import sae.train as st

    teacher, corpus = tiny
    out = tmp_path / "s"
    argv = ["--teacher", str(teacher), "--corpus", str(corpus), "--layer", "1", "--n-latents", "256", "--k", "16",
            "--seq-len", "64", "--batch-size", "256", "--buffer-tokens", "2048", "--max-tokens", "10240",
            "--threads", "1", "--log-every", "5", "--checkpoint-every", "20", "--out", str(out),
            "--tensorboard", "--wandb", "sae-test"]
    real_step = st.Trainer.train_step

    def dies_at_30(self, x):
        if self.step == 30:
            raise RuntimeError("killed")
        return real_step(self, x)

    monkeypatch.setattr(st.Trainer, "train_step", dies_at_30)
    with pytest.raises(RuntimeError, match="killed"):
        st.main(argv)
    assert sorted(tb_scalars(out / "tb")["fvu"]) == [5, 10, 15, 20, 25, 30]
    monkeypatch.setattr(st.Trainer, "train_step", real_step)
    st.main(argv)
    metrics = rows(out)
    assert [r["step"] for r in metrics] == list(range(5, 41, 5))
    tb = tb_scalars(out / "tb")
    assert_tb_equals_metrics(tb, metrics)
    assert {"fvu", "auxk", "l0", "dead", "lr", "tokens", "wall_s"} <= set(tb)
    run_id = json.loads((out / tracking.WANDB_RUN).read_text())["id"]
    logged: dict[int, dict[str, float]] = {}
    for run in sorted(r for r in (offline_wandb / "wandb").glob("offline-run-*") if of_run(r, run_id)):
        rid, config, history = wandb_run(run)
        assert config["n_latents"] == 256 and config["lr_resolved"] > 0
        logged.update(history)
    assert logged == {r["step"]: numeric(r) for r in metrics}
    # --overwrite: the replaced run's event files go, a new W&B run starts
    st.main([*argv, "--max-tokens", "5120", "--overwrite"])
    assert sorted(tb_scalars(out / "tb")["fvu"]) == [5, 10, 15, 20]
    assert len(list((out / "tb").iterdir())) == 1
    assert json.loads((out / tracking.WANDB_RUN).read_text())["id"] != run_id


# ---------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_logs_from_rank_zero_only(tmp_path, offline_wandb):
    pytest.importorskip("tensorboard")
    data = write_manifest(tmp_path / "d", windows=32, val_windows=8, seq_len=16, vocab=128, n_concepts=64)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "trainer.run", "--shards", str(data), "--steps", "3", "--micro-batch", "2", "--eval-windows", "8",
         "--workers", "0", "--no-progress", "--out-dir", str(tmp_path / "o"), "--tensorboard", "--wandb", "ddp"],
        check=True, env=env, cwd=ROOT, timeout=300,
    )
    assert len(list((tmp_path / "o" / "tb").iterdir())) == 1
    assert len(list((offline_wandb / "wandb").glob("offline-run-*"))) == 1
    assert_tb_equals_metrics(tb_scalars(tmp_path / "o" / "tb"), rows(tmp_path / "o"))

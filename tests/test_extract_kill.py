"""Kill -9 of the extraction driver (and its embedded Ray) mid-run, then the same command again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.extract import run
from shards import load_manifest
from shards.runlog import read_runs
from tests.helpers import all_bytes, extract_config

pytestmark = pytest.mark.usefixtures("ray_local")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k", [2])
def test_kill_9_of_the_driver_then_rerun(k, stage2_data, tiny_teacher_dir, stage2_reference):
    """The real thing: `python pipeline/extract.py` killed with SIGKILL (with its embedded Ray) once the
    manifest lists k shards; the same command again writes the bytes of an uninterrupted run, manifest
    included, and leaves no temporary anywhere under OUT."""
    cfg = extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / f"killed-{k}"), batch_size=1)
    argv = [sys.executable, str(REPO / "pipeline" / "extract.py"), "--tokens", cfg.tokens, "--teacher", cfg.teacher,
            "--sae", cfg.sae, "--out", cfg.out, "--k-mix", "4", "--k-kd", "2", "--batch-size", "1",
            "--ray-address", "local"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(argv, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_mid_run = False
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                m = load_manifest(cfg.manifest_path)
                if sum(len(s.shards) for s in m.splits.values()) >= k:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_mid_run = not m.stats.get("complete", False)
                    break
            except ValueError:
                pass  # not written yet
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_mid_run, "the run ended before it could be killed (or never wrote a shard)"
    m = run(cfg)
    assert all_bytes(cfg.concept_dir) == stage2_reference
    assert cfg.manifest_path.read_bytes() == (stage2_data / "ref" / "concepts.json").read_bytes()
    assert not [p for p in Path(cfg.out).rglob("*") if ".tmp" in p.name]
    assert 0 < read_runs(cfg.concept_dir)[-1]["throughput"]["tokens"] < sum(s.tokens for s in m.splits.values())

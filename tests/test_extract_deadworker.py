"""A worker process killed mid-shard: Ray restarts the actor, the driver resubmits the shard."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.extract import run
from shards import load_manifest
from tests.helpers import all_bytes, extract_config

pytestmark = pytest.mark.usefixtures("ray_local")


def _descendants_running(name: str) -> list[int]:
    """Pids of this process's descendants whose title starts with ``name`` (Ray names busy workers
    ``ray::Class.method``); only processes this test session started."""
    me, found = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if not cmd.startswith(name):
                continue
            pid = int(d)
            while pid > 1:  # walk up the parents: is this one of ours?
                pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    found.append(int(d))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_dead_worker_is_retried(stage2_data, tiny_teacher_dir, stage2_reference, caplog):
    """SIGKILL of the worker process in the middle of a shard: Ray restarts the actor, the driver
    resubmits the shard, and the output is the same as an uninterrupted run."""
    import threading

    cfg = extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / "deadworker"), batch_size=1)
    killed: list[int] = []

    def killer():
        deadline = time.time() + 90
        while time.time() < deadline and not killed:
            if cfg.manifest_path.is_file():
                try:
                    done = sum(len(s.shards) for s in load_manifest(cfg.manifest_path).splits.values())
                except ValueError:
                    done = 0
                busy = _descendants_running("ray::ExtractWorker.run_shard")
                if done >= 1 and busy:
                    os.kill(busy[0], signal.SIGKILL)
                    killed.append(busy[0])
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    m = run(cfg)
    t.join()
    assert killed, "no busy worker was found to kill"
    assert any("worker died" in r.getMessage() for r in caplog.records)
    assert m.stats["complete"] and all_bytes(cfg.concept_dir) == stage2_reference

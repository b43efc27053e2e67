"""Every benchmark script runs end to end in its ``--smoke`` mode, as the README and ``make bench`` run
it: ``python bench/X.py`` from the repository root, in a subprocess (the script's folder first on
``sys.path``). A broken import cannot hide behind a working ``--help``: ``bench/sae.py`` once shadowed
the ``sae`` package and failed only at run time (docs/architecture.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# script -> (extra flags, a line its output must hold); "{teacher}" is the tiny teacher directory
# (tests/conftest.py), "{tmp}" a fresh temporary directory.
BENCHES = {
    "store": ([], "checksum (sha256) speed"),
    "stage1": (["--tokenizer", "{teacher}"], "shards byte-identical across variants: yes"),
    "sae_speed": (["--teacher", "{teacher}", "--layer", "1"], "stop after hook block"),
    "extract": (["--teacher", "{teacher}", "--layer", "1", "--json", "{tmp}/r.json"], "(a) ours vs reference"),
    "train": (["--threads", "1", "--json", "{tmp}/r.json"], "(c) loader"),
    "verify": (["--dir", "{tmp}/b"], "extrapolated open-time verification of a 10B tokens extraction"),
    "manifest": (["--dir", "{tmp}/m"], "stage 2 bookkeeping per shard (ms)"),
    "scale_model": (["--markdown"], "| stage | K = 1 | K = 8 | K = 64 |"),
}

# The keys of a bench's --json output that bench/scale_model.py reads (its Inputs class).
JSON_KEYS = {
    "extract": [("ours", "tokens_per_s"), ("setup", "torch_threads"), ("setup", "measured"), ("d_checksum_gb_per_s",)],
    "train": [("d_presets", "tiny", "cocomix", "tokens_per_s"), ("c_loader_windows_per_s_2workers",), ("shapes", "T")],
}


def test_every_bench_script_is_covered():
    assert sorted(BENCHES) == sorted(p.stem for p in (ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_smoke(name, tiny_teacher_dir, tmp_path):
    extra, expected = BENCHES[name]
    argv = [a.format(teacher=tiny_teacher_dir, tmp=tmp_path) for a in extra]
    r = subprocess.run([sys.executable, f"bench/{name}.py", "--smoke", *argv], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert expected in r.stdout, r.stdout[-3000:]
    for keys in JSON_KEYS.get(name, []):
        d = json.loads((tmp_path / "r.json").read_text())
        for k in keys:
            d = d[k]
        assert isinstance(d, (int, float)) or keys[-1] == "measured", (keys, d)
    if name == "verify":
        assert "GB/s" in r.stdout and "s/GB" in r.stdout
        assert not (tmp_path / "b").exists()  # the bench removes what it wrote

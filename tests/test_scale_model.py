"""bench/scale_model.py: the scaling model's arithmetic against a naive recomputation from its inputs,
the bytes per field against the manifests, and every missing or bad input named with its command."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stage1_config import TokenizeConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scale_model", ROOT / "bench" / "scale_model.py")
sm = importlib.util.module_from_spec(spec)
sys.modules["scale_model"] = sm  # dataclasses look their module up there
spec.loader.exec_module(sm)


def model(tmp_path: Path, drop: tuple[str, ...] = (), **over) -> dict:
    for name, d in sm.SMOKE.items():
        if name not in drop:
            (tmp_path / name).write_text(json.dumps(d))
    cfg = sm.ScaleConfig(results=str(tmp_path), gpu_figures=str(ROOT / "bench/results/h200-2026.json"),
                         manifests=[str(ROOT / "manifests/owt.json"), str(ROOT / "manifests/demo.json")], **over)
    return sm.compute(sm.Inputs(cfg))


def test_cells_against_a_naive_recomputation(tmp_path):
    res = model(tmp_path, cores_per_node=16, storage_gbps=3.0)
    s1, mb = sm.SMOKE["stage1.json"], sm.SMOKE["manifest.json"]
    owt = res["corpora"]["OpenWebText (9B tokens)"]
    m = json.loads((ROOT / "manifests/owt.json").read_text())
    corpus_bpt = m["corpus"]["bytes"] / sum(s["stream_tokens"] for s in m["splits"].values())
    # stage 1's defaults: 64 MB shards of 512 + 1 uint16 tokens; tasks of 64 MB of input, each writing its own
    shard = (64_000_000 // (513 * 2)) * 512
    defaults = {f.name: f.default for f in dataclasses.fields(TokenizeConfig)}
    per_task = defaults["task_mb"] * 1e6 / corpus_bpt if "task_mb" in defaults else 9e9
    tasks = math.ceil(9e9 / per_task)
    per_shard = 9e9 / (tasks * math.ceil(per_task / shard))
    assert owt["layout"]["tasks"] == tasks and owt["layout"]["tokens_per_shard"] == pytest.approx(per_shard)
    # stage 1 on 1 node: 15 workers (the driver keeps a core) vs the driver vs storage (corpus + tokens bytes)
    tok_parts = [sh["parts"]["tokens"] for s in m["splits"].values() for sh in s["shards"]]
    tok_bpt = 513 * 2 / 512 * sum(p["bytes"] for p in tok_parts) / (513 * 2 * sum(
        sh["windows"] for s in m["splits"].values() for sh in s["shards"]))
    limits = {"workers": 15 * s1["tokens_per_s"]["1"], "driver": per_shard / s1["driver_cpu_s_per_shard"],
              "storage": 3e9 / (corpus_bpt + tok_bpt)}
    cell = owt["rows"]["stage 1, K CPU nodes"]["1"]
    assert cell["bottleneck"] == min(limits, key=limits.get) == "workers"
    assert cell["wall_s"] == pytest.approx(9e9 / min(limits.values()), rel=1e-9)
    assert cell["unit_hours"] == pytest.approx(cell["wall_s"] * 16 / 3600)
    # stage 2 bf16 on 8 GPUs: the H200 figure x 8, plus the start-up sha256 of the token shards
    h200 = json.loads((ROOT / "bench/results/h200-2026.json").read_text())["stage2"]["tokens_per_s"]
    cell = owt["rows"]["stage 2, K GPUs, bf16"]["8"]
    startup = 9e9 * tok_bpt / 1e9 / min(8 * sm.SMOKE["extract.json"]["d_checksum_gb_per_s"], 3.0)  # 8 threads
    gpu = 8 * h200["bfloat16"]["ours"]
    assert gpu < per_shard / mb["bookkeeping_s_per_shard"]["10000"] and gpu < 3e9 / (tok_bpt + 146)
    assert cell["bottleneck"] == "GPUs"
    assert cell["wall_s"] == pytest.approx(startup + 9e9 / gpu, rel=1e-3)
    assert cell["unit_hours"] == pytest.approx(cell["wall_s"] * 8 / 3600)
    # stage 1 on 64 nodes: more workers than tasks, so the tasks bound the workers
    cell = owt["rows"]["stage 1, K CPU nodes"]["64"]
    assert tasks < 64 * 16 - 1 and any(f"{tasks:,} tasks" in n for n in cell["notes"])
    assert cell["limits"][0]["tokens_per_s"] == tasks * s1["tokens_per_s"]["1"]


def test_storage_per_field_from_the_manifests(tmp_path):
    st = model(tmp_path)["storage"]
    f = st["fields"]
    assert f["tokens"]["bytes_per_token"] == pytest.approx(2 * 513 / 512)
    assert (f["concept_ids"]["bytes_per_token"], f["concept_scores"]["bytes_per_token"]) == (8, 8)
    assert f["mix_ids"]["bytes_per_token"] + f["mix_vals"]["bytes_per_token"] == 4 * 32  # docs/data.md
    assert f["kd_ids"]["bytes_per_token"] + f["kd_logprobs"]["bytes_per_token"] == 6 * 32
    assert f["tokens"]["bytes"]["1T tokens"] == pytest.approx(1e12 * 2 * 513 / 512)
    assert st["totals"]["stage 2 labels only (--k-mix 0)"]["bytes_per_token"] == pytest.approx(18, rel=1e-3)
    assert 0 <= st["part_overhead"]["tokens"] < 0.01


def test_gpu_presets_without_a_measurement_are_marked_estimates(tmp_path):
    figs = model(tmp_path)["figures"]
    assert not figs["tr_tps_69m"]["source"].startswith("ESTIMATE")
    assert figs["tr_tps_386m"]["source"].startswith("ESTIMATE") and "--presets" in figs["tr_tps_386m"]["source"]
    (tmp_path / "train-gpu.json").write_text(json.dumps({
        "device": "NVIDIA H200", "measured": "2026-12-01", "shapes": {"T": 1024},
        "c_loader_windows_per_s_2workers": 1e4,
        "d_presets": {"386m": {"cocomix": {"tokens_per_s": 12345.0}}}}))
    figs = model(tmp_path)["figures"]
    assert figs["tr_tps_386m"] == {"value": 12345.0, "source": "train-gpu.json (NVIDIA H200, 2026-12-01)"}
    assert figs["tr_tps_1.38b"]["source"].startswith("ESTIMATE")


def test_missing_inputs_are_named_with_their_command(tmp_path):
    (tmp_path / "bad").mkdir()
    s1 = dict(sm.SMOKE["stage1.json"])
    del s1["driver_cpu_s_per_shard"]
    (tmp_path / "bad" / "stage1.json").write_text(json.dumps(s1))
    res = model(tmp_path / "bad", drop=("stage1.json", "manifest.json"))
    assert any("has no driver_cpu_s_per_shard: rerun `python bench/stage1.py --json" in m for m in res["missing"])
    assert any("manifest.json is missing: run `python bench/manifest.py --json" in m for m in res["missing"])
    md = sm.render(res, markdown=True)  # docs name no file that does not exist (tests/test_architecture.py)
    assert "Missing inputs: manifest.json, stage1.json;" in md and "bench/results/" not in md
    # a missing limit: the others give a lower bound, marked as such
    cell = res["corpora"]["1T tokens"]["rows"]["stage 1, K CPU nodes"]["8"]
    assert cell["needs"] == ["stage1.json (s1_driver_s_per_shard)"] and cell["lower_bound"]
    assert [lim["name"] for lim in cell["limits"]] == ["workers", "storage"]
    assert cell["wall_s"] == pytest.approx(1e12 / min(lim["tokens_per_s"] for lim in cell["limits"]))
    cell = res["corpora"]["1T tokens"]["rows"]["stage 2, K GPUs, fp32"]["8"]
    assert cell["needs"] == ["manifest.json (m_bookkeeping_s_per_shard)"] and cell["lower_bound"]
    assert cell["startup_s"] > 0  # the figures that are there still count
    # the throughput figure itself missing: no number at all
    (tmp_path / "bad2").mkdir()
    res = model(tmp_path / "bad2", drop=("stage1.json", "extract.json"))
    cell = res["corpora"]["1T tokens"]["rows"]["stage 2, K CPU nodes"]["1"]
    assert cell["wall_s"] is None and cell["needs"] == ["extract.json (s2_cpu_actor_tps, s2_cpu_actor_threads)"]
    cell = res["corpora"]["1T tokens"]["rows"]["train 69m CoCoMix, K GPUs"]["1"]  # --verify open's cost unknown
    assert cell["lower_bound"] and cell["needs"] == ["extract.json (checksum_gbps)"] and cell["startup_s"] == 0


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/scale_model.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_strict_and_bad_flags_are_one_line(tmp_path):
    r = run("--results", str(tmp_path), "--strict")
    assert r.returncode == 2 and r.stderr.startswith("error: 3 input(s) missing") and len(r.stderr.splitlines()) == 1
    assert "python bench/stage1.py --json bench/results/stage1.json" in r.stdout
    r = run("--storage-gbps", "0")
    assert r.returncode == 2 and r.stderr == "error: --storage-gbps must be > 0, got 0.0\n"
    (tmp_path / "stage1.json").write_text("{not json")
    r = run("--results", str(tmp_path))
    assert r.returncode == 2 and "stage1.json is not JSON" in r.stderr and "bench/stage1.py --json" in r.stderr



def test_update_replaces_only_the_marked_region(tmp_path):
    doc = tmp_path / "scaling.md"
    doc.write_text(f"# Title\n\nprose\n{sm.BEGIN}\nold table\n{sm.END}\nmore prose\n")
    sm.update_doc(doc, "new table")
    assert doc.read_text() == f"# Title\n\nprose\n{sm.BEGIN}\nnew table\n{sm.END}\nmore prose\n"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="no single .* region"):
        sm.update_doc(doc, "x")
    assert doc.read_text() == "no markers\n"


def test_inputs_of_the_wrong_kind_are_named(tmp_path):
    ex = json.loads(json.dumps(sm.SMOKE["extract.json"]))
    ex["setup"]["device"] = "cuda:0"  # a GPU run saved where the CPU figures go
    (tmp_path / "extract.json").write_text(json.dumps(ex))
    s1 = dict(sm.SMOKE["stage1.json"], driver_cpu_s_per_shard=None)
    (tmp_path / "stage1.json").write_text(json.dumps(s1))
    res = model(tmp_path, drop=("extract.json", "stage1.json"))
    assert any("extract.json was measured on cuda:0, not a CPU" in m and "extract-gpu.json" in m
               for m in res["missing"])
    assert any("driver_cpu_s_per_shard is None, not a number" in m for m in res["missing"])
    assert "checksum_gbps" not in res["figures"] and "s1_driver_s_per_shard" not in res["figures"]


def test_task_and_shard_sizes_can_be_modelled(tmp_path):
    lay = model(tmp_path, task_mb=512.0, shard_mb=100.0)["corpora"]["1T tokens"]["layout"]
    m = json.loads((ROOT / "manifests/owt.json").read_text())
    per_task = 512e6 / (m["corpus"]["bytes"] / sum(s["stream_tokens"] for s in m["splits"].values()))
    shard = (100_000_000 // (513 * 2)) * 512
    assert lay["tasks"] == math.ceil(1e12 / per_task)
    assert lay["shards"] == lay["tasks"] * math.ceil(per_task / shard) == lay["tasks"] * 3  # 118.6M / 49.9M
    with pytest.raises(ValueError, match="--shard-mb must be > 0"):
        sm.ScaleConfig(shard_mb=0)

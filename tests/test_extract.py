"""Stage 2 end to end on small real text with embedded Ray, a tiny random GPT-2 teacher (with a real
BPE tokenizer) and a random TopK SAE: records, manifest, SAE swap, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.extract import ExtractConfig, main, run
from pipeline.extract_runner import RunnerConfig, TeacherRunner
from sae import save_sae
from shards import load_manifest, open_split
from shards.runlog import read_runs
from tests.helpers import STAGE2_T as T
from tests.helpers import all_bytes, extract_config, owt_documents, random_sae, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


def test_end_to_end_records_match_the_runner(stage2_data, tiny_teacher_dir):
    cfg = extract_config(stage2_data, tiny_teacher_dir, manifest=str(stage2_data / "out" / "a.json"))
    run(cfg)
    m2 = load_manifest(stage2_data / "out" / "a.json")
    assert m2.kind == "concepts" and m2.stats["complete"] and m2.hook == {"layer": 1, "location": "resid_post"}
    assert m2.attribution["variant"] == "act_x_grad" and m2.sae["n_latents"] == 300
    tm = load_manifest(stage2_data / "tokens")
    assert {k: s.windows for k, s in m2.splits.items()} == {k: s.windows for k, s in tm.splits.items()}
    # Token shards are referenced, not copied; concept shards live in OUT/concepts/<manifest stem>/.
    sh = m2.splits["train"].shards[0]
    assert sh.parts["tokens"].path == tm.splits["train"].shards[0].parts["tokens"].path
    assert sh.parts["concepts"].path.parent == (stage2_data / "out" / "concepts" / "a").resolve()
    raw = json.loads((stage2_data / "out" / "a.json").read_text())
    assert not raw["splits"]["train"]["shards"][0]["parts"]["tokens"]["path"].startswith("/")
    expected = {"tokens": ("uint16", (T + 1,)), "concept_ids": ("uint16", (T, 4)),
                "concept_scores": ("float16", (T, 4)), "mix_ids": ("uint16", (T, 4)), "mix_vals": ("float16", (T, 4)),
                "kd_ids": ("int32", (T, 2)), "kd_logprobs": ("float16", (T, 2)), "teacher_nll": ("float16", (T,))}
    assert {k: (v.dtype, v.shape) for k, v in m2.fields.items()} == expected

    # Every window's records equal a direct runner call on its tokens (same teacher, same SAE).
    runner = TeacherRunner(RunnerConfig(teacher=str(tiny_teacher_dir), sae=str(stage2_data / "sae_a"), device="cpu",
                                        k_mix=4, k_kd=2))
    short = 0
    for split in ("train", "val"):
        ds = open_split(m2, split, verify="open")
        batch = ds.get_batch(range(len(ds)))
        ref, _ = runner.run(batch["tokens"])
        for name, arr in ref.items():
            assert batch[name].tobytes() == arr.tobytes(), (split, name)
        ids, scores = batch["concept_ids"], batch["concept_scores"]
        missing = scores == -np.inf  # the trainer's rule: a slot is invalid exactly when its score is -inf
        assert missing.any() and (ids[missing] == 0).all() and (scores[~missing] > 0).all()
        short += int(missing.any(-1).sum())
    lab = m2.stats["labels"]
    assert lab["tokens"] == sum(s.tokens for s in m2.splits.values()) and lab["tokens_short"] == short
    assert 0 < lab["latents_used"] <= 300 and set(m2.stats) == {"complete", "labels"}  # nothing run-dependent
    assert read_runs(cfg.concept_dir)[-1]["throughput"]["tokens_per_s"] > 0  # timings go to the run log


def test_rerun_skips_and_swap_sae_writes_a_second_manifest(stage2_data, tiny_teacher_dir):
    cfg_a = extract_config(stage2_data, tiny_teacher_dir, manifest=str(stage2_data / "out" / "a.json"))
    run(cfg_a)
    before = all_bytes(cfg_a.concept_dir)
    first = cfg_a.manifest_path.read_bytes()
    run(cfg_a)  # everything verified and skipped: no worker starts, the manifest's bytes stay
    last = read_runs(cfg_a.concept_dir)[-1]
    assert "throughput" not in last and last["shards"]["to_do"] == 0 and last["outcome"] == "complete"
    assert cfg_a.manifest_path.read_bytes() == first and all_bytes(cfg_a.concept_dir) == before

    cfg_b = extract_config(stage2_data, tiny_teacher_dir, sae=str(stage2_data / "sae_b"),
                           manifest=str(stage2_data / "out" / "b.json"), attribution="activation")
    mb = run(cfg_b)
    assert mb.sae["n_latents"] == 200 and mb.hook["layer"] == 0 and mb.attribution["variant"] == "activation"
    ma = load_manifest(stage2_data / "out" / "a.json")  # still valid, untouched
    for m_ in (ma, mb):
        ds = open_split(m_, "train", verify="open")
        assert len(ds) == ma.splits["train"].windows
    assert ma.splits["train"].shards[0].parts["tokens"].path == mb.splits["train"].shards[0].parts["tokens"].path
    assert all_bytes(cfg_a.concept_dir) == before

    # The same manifest name with a different SAE is a different extraction: refused, nothing written.
    with pytest.raises(ValueError, match="different extraction"):
        run(extract_config(stage2_data, tiny_teacher_dir, sae=str(stage2_data / "sae_b"),
                           manifest=str(stage2_data / "out" / "a.json")))
    assert all_bytes(cfg_a.concept_dir) == before


def test_corpus_runs_stage1_then_stage2(tmp_path, tiny_teacher_dir, stage2_data):
    corpus = write_corpus(tmp_path / "c.txt", owt_documents(4))
    argv = ["--corpus", str(corpus), "--teacher", str(tiny_teacher_dir), "--sae", str(stage2_data / "sae_a"),
            "--out", str(tmp_path / "o"), "--manifest", str(tmp_path / "o" / "owt.json"), "--seq-len", "16",
            "--k-mix", "0", "--ray-address", "local"]
    assert main(argv) == 0
    m = load_manifest(tmp_path / "o" / "owt.json")
    assert (tmp_path / "o" / "tokens" / "manifest.json").is_file()
    assert set(m.fields) == {"tokens", "concept_ids", "concept_scores", "teacher_nll"}
    assert main(argv) == 0  # stage 1 and stage 2 both reused
    # A held-out file forms the val split when stage 1 runs from here too.
    valid = write_corpus(tmp_path / "v.txt", owt_documents(6)[4:])
    argv2 = [a.replace(str(tmp_path / "o"), str(tmp_path / "o2")) for a in argv] + ["--val-corpus", str(valid)]
    assert main(argv2) == 0
    m2 = load_manifest(tmp_path / "o2" / "owt.json")
    assert m2.splits["val"].extra["documents"] == 2 and m2.splits["train"].extra["documents"] == 4


def test_bad_inputs_are_refused_before_any_work(stage2_data, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "bad"

    def refused(match, **kw):
        with pytest.raises(ValueError, match=match):
            run(extract_config(stage2_data, kw.pop("teacher", tiny_teacher_dir), out=str(out), **kw))
        assert not (out / "concepts").exists()

    wide = random_sae(d=32, c=100, k=8, layer=0)
    save_sae(wide, tmp_path / "wide")
    refused("d_in 32 != teacher width 64", sae=str(tmp_path / "wide"))
    refused("out of range", layer=7)
    with pytest.raises(ValueError, match="--val-corpus goes with --corpus"):
        extract_config(stage2_data, tiny_teacher_dir, out=str(out), val_corpus=["v.txt"])
    refused("--k-attr 9 > SAE k 8", k_attr=9)
    refused("--k-mix 16 > SAE k 8", k_mix=16)
    refused("does not exist", sae=str(tmp_path / "nope"))
    refused("does not exist", tokens=str(tmp_path / "no-tokens"))
    # Token shards made by another tokenizer (GPT-2-style teacher dir with a different vocabulary).
    other_tok = tmp_path / "other"
    shutil.copytree(tiny_teacher_dir, other_tok)
    tj = json.loads((other_tok / "tokenizer.json").read_text())
    tj["model"]["vocab"]["zzz_extra"] = len(tj["model"]["vocab"])
    (other_tok / "tokenizer.json").write_text(json.dumps(tj))
    refused("tokenizer mismatch", teacher=str(other_tok))
    with pytest.raises(ValueError, match="exactly one of"):
        ExtractConfig(teacher="t", sae="s", out="o")
    assert main(["--tokens", str(stage2_data / "tokens"), "--teacher", str(tiny_teacher_dir), "--sae",
                 str(stage2_data / "sae_a"), "--out", str(out), "--k-attr", "0", "--ray-address", "local"]) == 2
    assert "--k-attr must be >= 1" in capsys.readouterr().err


def test_cluster_config_is_a_valid_ray_cluster_yaml():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipeline" / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own schema check (raises on a bad field)
    assert raw["file_mounts"] == {"~/cocomix": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert any("pip install" in c and "-e ~/cocomix" in c for c in raw["setup_commands"])
    assert raw["available_node_types"]["gpu.worker"]["node_config"]["InstanceType"].startswith("g5")


def test_entry_script_runs_alone(tmp_path):
    """`ray submit` copies only extract.py: a copy outside the repository must still work."""
    import subprocess
    import sys

    script = tmp_path / "extract.py"
    shutil.copy(Path(__file__).resolve().parents[1] / "pipeline" / "extract.py", script)
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "--k-attr" in out.stdout and "--attribution" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pipeline.extract", "--tokens", "x", "--corpus", "y", "--teacher",
                          "t", "--sae", "s", "--out", "o"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "exactly one of --tokens" in out.stderr

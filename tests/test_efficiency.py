"""recipes/efficiency.py: the comparisons against hand-computed curves, every committed config, and the
whole experiment end to end with a tiny random teacher."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from recipes import compare as cmp
from recipes import efficiency as eff
from recipes.steps import first_documents
from tests.helpers import owt_documents, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def curve(points):
    return [{"tokens": t, "flops": f, "val_loss": v} for t, f, v in points]


def test_tokens_to_reach_interpolates_and_says_never():
    c = curve([(100, 1000, 6.0), (200, 2000, 5.0), (300, 3000, 4.5)])
    assert cmp.x_to_reach(c, 5.5, "tokens") == pytest.approx(150.0)
    assert cmp.x_to_reach(c, 5.5, "flops") == pytest.approx(1500.0)
    assert cmp.x_to_reach(c, 6.5, "tokens") == 100.0  # already there at the first evaluation
    assert cmp.x_to_reach(c, 4.0, "tokens") is None
    # A non-monotone curve: the first crossing counts.
    bumpy = curve([(100, 1, 6.0), (200, 2, 4.0), (300, 3, 5.0), (400, 4, 3.0)])
    assert cmp.x_to_reach(bumpy, 4.5, "tokens") == pytest.approx(175.0)


def test_compare_at_equal_tokens_and_equal_flops():
    ntp = curve([(100, 1000, 6.0), (200, 2000, 5.0), (300, 3000, 4.6)])
    # CoCoMix costs 1.5x the FLOPs per token and learns faster per token.
    coco = curve([(100, 1500, 5.5), (200, 3000, 4.6), (300, 4500, 4.2)])
    c = cmp.compare(ntp, coco)
    assert c["tokens_to_reach_base_final"] == pytest.approx(200.0)
    assert c["tokens_saved_fraction"] == pytest.approx(1 / 3)
    assert c["flops_to_reach_base_final"] == pytest.approx(3000.0)
    assert c["flops_saved_fraction"] == pytest.approx(0.0)
    # Equal FLOPs = NTP's whole budget (3000): NTP 4.6 vs CoCoMix at its 200-token point, 4.6.
    assert c["equal_flops"] == {"flops": 3000, "base_val_loss": pytest.approx(4.6), "val_loss": pytest.approx(4.6)}
    assert c["base_tokens_to_reach_final"] is None  # NTP never gets to CoCoMix's 4.2
    worse = cmp.compare(ntp, curve([(100, 1000, 6.5), (200, 2000, 5.5), (300, 3000, 4.9)]))
    assert worse["tokens_to_reach_base_final"] is None and worse["tokens_saved_fraction"] is None
    # ...but NTP reaches the slower student's final 4.9 a quarter of the way from 200 to 300 tokens.
    assert worse["base_tokens_to_reach_final"] == pytest.approx(225.0)
    assert worse["base_flops_to_reach_final"] == pytest.approx(2250.0)
    assert cmp.loss_at(ntp, 2500, "flops") == pytest.approx(4.8)
    assert cmp.loss_at(ntp, 5000, "flops") is None


def test_equivalent_tokens_and_their_trend():
    ntp = curve([(100, 1, 6.0), (200, 2, 5.0), (300, 3, 4.5), (400, 4, 4.2)])
    slow = curve([(100, 1, 6.5), (200, 2, 5.5), (300, 3, 5.0), (400, 4, 4.6)])
    eq = cmp.equivalent_tokens(ntp, slow)
    assert eq[0] == {"tokens": 100, "base_tokens": None, "ratio": None}  # worse than NTP's first evaluation
    assert eq[1]["base_tokens"] == pytest.approx(150.0) and eq[1]["ratio"] == pytest.approx(0.75)
    assert eq[2]["base_tokens"] == pytest.approx(200.0) and eq[3]["base_tokens"] == pytest.approx(280.0)
    fast = curve([(100, 1, 5.0), (200, 2, 4.1)])
    assert cmp.equivalent_tokens(ntp, fast)[0]["base_tokens"] == pytest.approx(200.0)
    assert cmp.equivalent_tokens(ntp, fast)[1]["ratio"] is None  # beyond NTP's whole run: unknown
    # A ratio growing as tokens^0.5 from 0.25 reaches parity 16x later; a shrinking one never does.
    pts = [{"tokens": t, "ratio": 0.25 * (t / 100) ** 0.5} for t in (100, 200, 400, 800)]
    trend = cmp.extrapolate_ratio(pts, tail=1.0)
    assert trend["slope"] == pytest.approx(0.5) and trend["parity_tokens"] == pytest.approx(1600.0)
    down = cmp.extrapolate_ratio([{"tokens": t, "ratio": 1 / t} for t in (1, 2, 3, 4)], tail=1.0)
    assert down["slope"] == pytest.approx(-1.0) and down["parity_tokens"] is None
    assert cmp.extrapolate_ratio(pts[:2], tail=1.0)["slope"] is None  # too few points to fit


def test_mean_curve_over_seeds():
    a = curve([(100, 1, 6.0), (200, 2, 5.0)])
    b = curve([(100, 1, 5.0), (200, 2, 4.0), (300, 3, 3.0)])
    m = cmp.mean_curve([a, b])
    assert [p["val_loss"] for p in m] == [5.5, 4.5] and [p["tokens"] for p in m] == [100, 200]
    assert m[0]["val_loss_std"] == pytest.approx(0.7071, abs=1e-4)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.json")), ids=lambda p: p.name)
def test_committed_configs_load(path):
    cfg = eff.EfficiencyConfig.load(path)
    assert cfg.baseline in cfg.student_arms() and cfg.seeds and cfg.description


def test_the_ablation_config_names_every_arm_of_the_study():
    cfg = eff.EfficiencyConfig.load(ROOT / "recipes" / "configs" / "ablations-cpu.json")
    arms = cfg.student_arms()
    assert {a["mode"] for a in arms.values()} == {"ntp", "cocomix", "kd"}
    assert {n for n, a in arms.items() if len(a["seeds"]) >= 2} >= {"ntp", "cocomix", "permuted-labels"}
    settings = [{k: v for k, v in a.items() if k != "seeds"} for a in arms.values()]
    for s in ({"mode": "cocomix", "mix": "none"}, {"mode": "cocomix", "concept_loss": False},
              {"mode": "cocomix", "mix": "add"}, {"mode": "cocomix", "labels": "activation"},
              {"mode": "ntp", "pause": True}, {"mode": "kd", "pause": True}, {"mode": "kd"}):
        assert s in settings
    assert cfg.k_mix >= cfg.k_attr and set(cfg.held_out) and cfg.extraction is None


def _cfg(**kw):
    return {"name": "x", "corpus": ["a"], "val_corpus": ["b"]} | kw


@pytest.mark.parametrize("bad, message", [
    ({"arms": {"cocomix": {"mode": "cocomix"}}}, "baseline 'ntp' is not one of the arms"),
    ({"arms": {"ntp": {"mode": "ntp", "mx": "add"}}}, "arm 'ntp': unknown keys \\['mx'\\]"),
    ({"arms": {"ntp": {"width": 136}}}, "arm 'ntp' must be an object with a mode"),
    ({"arms": {"ntp": {"mode": "ntp", "mix": "add"}}}, "arm 'ntp': --mix/--concept-topk only apply"),
    ({"arms": {"ntp": {"mode": "ntp"}, "p": {"mode": "cocomix", "pause": True}}}, "arm 'p': --pause applies"),
    ({"arms": {"ntp": {"mode": "ntp", "seeds": []}}}, "arm 'ntp': seeds must be a non-empty list"),
    ({"arms": {"n/tp": {"mode": "ntp"}}, "baseline": "n/tp"}, "arm name 'n/tp'"),
    ({"held_out": {"val": ["x.txt"]}}, "held_out name 'val'"),
    ({"train_documents": 0}, "train_documents must be >= 1"),
])
def test_bad_arms_and_held_out_sets_are_refused(tmp_path, bad, message):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(_cfg(**bad)))
    with pytest.raises(ValueError, match=message):
        eff.EfficiencyConfig.load(p)


def test_arms_and_modes_flags_are_checked(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(_cfg(arms={"ntp": {"mode": "ntp"}, "add": {"mode": "cocomix", "mix": "add"}})))
    assert eff.main(["--config", str(p), "--modes", "ntp"]) == 2
    assert "choose among them with --arms" in capsys.readouterr().err
    assert eff.main(["--config", str(p), "--arms", "ntp", "pause"]) == 2
    assert "--arms: ['pause'] not in" in capsys.readouterr().err
    assert eff.main(["--config", str(p), "--arms", "add"]) == 2
    assert "baseline 'ntp' is not one of the arms" in capsys.readouterr().err
    q = tmp_path / "m.json"
    q.write_text(json.dumps(_cfg()))
    assert eff.main(["--config", str(q), "--arms", "ntp"]) == 2
    assert "names no arms" in capsys.readouterr().err


def test_a_missing_held_out_corpus_is_refused_before_any_work(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(_cfg(held_out={"code": [str(tmp_path / "nowhere" / "*.py")]})))
    assert eff.main(["--config", str(p), "--out", str(tmp_path / "run")]) == 2
    assert "held_out code: corpus glob" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_first_documents_slices_reuses_and_refuses(tmp_path):
    src = write_corpus(tmp_path / "c.txt", ["one\ntwo", "three", "four"])
    assert first_documents([str(src)], None, tmp_path / "out") == [str(src)]
    (dst,) = first_documents([str(src)], 2, tmp_path / "out")
    assert Path(dst).name == "c.txt" and Path(dst).read_text() == "one\ntwo\n<|endoftext|>\nthree\n<|endoftext|>\n"
    mtime = Path(dst).stat().st_mtime_ns
    assert first_documents([str(src)], 2, tmp_path / "out") == [dst] and Path(dst).stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="holds another slice"):
        first_documents([str(src)], 1, tmp_path / "out")
    assert Path(dst).stat().st_mtime_ns == mtime  # refused, not replaced
    with pytest.raises(ValueError, match="hold only 3"):
        first_documents([str(src)], 5, tmp_path / "other")
    # Across sources: the first source's documents, then the next's.
    src2 = write_corpus(tmp_path / "d.txt", ["five"])
    (both,) = first_documents([str(src), str(src2)], 4, tmp_path / "both")
    text = Path(both).read_text()
    assert text.count("<|endoftext|>") == 4 and text.endswith("five\n<|endoftext|>\n")


def test_bad_configs_are_refused(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"name": "x", "corpus": ["a"], "val_corpus": ["b"], "stpes": 3}))
    with pytest.raises(ValueError, match="unknown keys \\['stpes'\\]"):
        eff.EfficiencyConfig.load(p)
    p.write_text(json.dumps({"name": "x", "corpus": ["a"], "val_corpus": ["b"], "modes": ["cocomix"]}))
    with pytest.raises(ValueError, match="must include ntp"):
        eff.EfficiencyConfig.load(p)
    with pytest.raises(ValueError, match="cannot read config"):
        eff.EfficiencyConfig.load(tmp_path / "missing.json")
    p.write_text(json.dumps({"extends": "missing.json", "max_tokens": 5}))
    with pytest.raises(ValueError, match="cannot read config .*missing.json"):
        eff.EfficiencyConfig.load(p)


def test_a_config_extends_another():
    base = eff.EfficiencyConfig.load(ROOT / "recipes" / "configs" / "cpu.json")
    longer = eff.EfficiencyConfig.load(ROOT / "recipes" / "configs" / "cpu-long.json")
    changed = {k for k, v in asdict(longer).items() if v != asdict(base)[k]}
    assert changed == {"name", "description", "extraction", "max_tokens", "eval_every"}
    assert longer.max_tokens == 983_040 and longer.extraction == "../cocomix-runs/efficiency-cpu"


@pytest.mark.usefixtures("ray_local", "one_thread")
def test_experiment_end_to_end_with_a_tiny_teacher(tmp_path, tiny_teacher_dir, capsys):
    docs = owt_documents(16)  # ~40k tokens of the tiny tokenizer: every stage sees real text, stage 2 stays short
    train, valid = write_corpus(tmp_path / "train.txt", docs[:12]), write_corpus(tmp_path / "valid.txt", docs[12:])
    cfg = {
        "name": "tiny", "description": "test", "corpus": [str(train)], "val_corpus": [str(valid)],
        "teacher": str(tiny_teacher_dir), "layer": 0, "seq_len": 32, "shard_mb": 0.002, "sae_latents": 64, "sae_k": 8,
        "sae_tokens": 4096, "sae_buffer_tokens": 2048, "sae_batch_size": 256, "teacher_batch": 8, "k_kd": 8, "k_mix": 4,
        "device": "cpu", "preset": "tiny", "seeds": [0], "max_tokens": 12 * 4 * 32, "micro_batch": 4,
        "eval_every": 6, "eval_windows": 4, "manifest": str(tmp_path / "manifests" / "owt.json"),
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = ["--config", str(tmp_path / "c.json"), "--out", str(out)]
    assert eff.main(args) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "report.json").read_text())
    assert r["data"]["val"]["documents"] == 4 and r["data"]["train"]["documents"] == 12
    assert set(r["students"]) == {"ntp", "cocomix", "kd"} and set(r["vs_ntp"]) == {"cocomix", "kd"}
    for s in r["students"].values():
        assert [p["tokens"] for p in s["curve"]] == [6 * 4 * 32, 12 * 4 * 32]
        assert all(1.0 < p["val_loss"] < 10.0 for p in s["curve"])
    # CoCoMix's extra block costs FLOPs per token; the report carries the trainer's own count.
    assert r["students"]["cocomix"]["flops_per_token"] != r["students"]["ntp"]["flops_per_token"]
    assert (out / "efficiency.png").stat().st_size > 1000 and "cocomix vs NTP" in printed
    manifest = json.loads((tmp_path / "manifests" / "owt.json").read_text())
    assert manifest["attribution"]["k_kd"] == 8 and manifest["hook"]["layer"] == 0
    assert not manifest["shards_root"].startswith("/") if "shards_root" in manifest else True

    # A second seed trains only the new students; the first seed's runs and the SAE are reused.
    sae_mtime = (out / "sae" / "sae_weights.safetensors").stat().st_mtime_ns
    ntp0 = (out / "students" / "ntp-seed0" / "metrics.jsonl").read_text()
    assert eff.main(args + ["--seeds", "0", "1", "--modes", "ntp", "cocomix"]) == 0
    r2 = json.loads((out / "report.json").read_text())
    assert (out / "sae" / "sae_weights.safetensors").stat().st_mtime_ns == sae_mtime
    assert (out / "students" / "ntp-seed0" / "metrics.jsonl").read_text() == ntp0
    assert set(r2["students"]) == {"ntp", "cocomix"} and not (out / "students" / "kd-seed1").exists()
    finals = r2["students"]["ntp"]["final_val_loss"]
    assert set(finals) == {"0", "1"} and finals["0"] != finals["1"]
    assert r2["students"]["ntp"]["final_val_loss_mean"] == pytest.approx((finals["0"] + finals["1"]) / 2)

    # Another budget on the same labels: `extraction` reuses stage 1, the SAE and stage 2 of `out`.
    longer = cfg | {"name": "tiny-longer", "extraction": str(out), "modes": ["ntp"], "max_tokens": 18 * 4 * 32}
    (tmp_path / "longer.json").write_text(json.dumps(longer))
    assert eff.main(["--config", str(tmp_path / "longer.json"), "--out", str(tmp_path / "longer")]) == 0
    r3 = json.loads((tmp_path / "longer" / "report.json").read_text())
    assert r3["students"]["ntp"]["curve"][-1]["tokens"] == 18 * 4 * 32 and r3["data"] == r["data"]
    assert not (tmp_path / "longer" / "tokens").exists() and not (tmp_path / "longer" / "sae").exists()
    assert (out / "sae" / "sae_weights.safetensors").stat().st_mtime_ns == sae_mtime
    capsys.readouterr()
    (tmp_path / "other.json").write_text(json.dumps(longer | {"sae_latents": 128}))
    assert eff.main(["--config", str(tmp_path / "other.json"), "--out", str(tmp_path / "other")]) == 2
    assert "SAE with other settings" in capsys.readouterr().err
    (tmp_path / "none.json").write_text(json.dumps(longer | {"extraction": str(tmp_path / "nowhere")}))
    assert eff.main(["--config", str(tmp_path / "none.json"), "--out", str(tmp_path / "none")]) == 2
    assert "run its config first" in capsys.readouterr().err

    # Arms on the same labels: ablations, the pause baseline, the permuted-label control, a held-out set.
    arms = cfg | {"name": "tiny-arms", "extraction": str(out), "max_tokens": 6 * 4 * 32,
                  "held_out": {"more": [str(train)]},
                  "arms": {"ntp": {"mode": "ntp"}, "narrow": {"mode": "ntp", "width": 48},
                           "add": {"mode": "cocomix", "mix": "add"}, "act": {"mode": "cocomix", "labels": "activation"},
                           "perm": {"mode": "cocomix", "permute_labels": 0, "seeds": [0, 1]},
                           "pause": {"mode": "ntp", "pause": True}, "kd-pause": {"mode": "kd", "pause": True}}}
    (tmp_path / "arms.json").write_text(json.dumps(arms))
    assert eff.main(["--config", str(tmp_path / "arms.json"), "--out", str(tmp_path / "arms")]) == 0
    printed = capsys.readouterr().out
    ra = json.loads((tmp_path / "arms" / "report.json").read_text())
    rows = ra["students"]
    assert list(rows) == list(arms["arms"]) and set(ra["vs_ntp"]) == set(rows) - {"ntp"}
    assert rows["perm"]["seeds"] == [0, 1] and rows["ntp"]["seeds"] == [0]
    assert rows["narrow"]["params"] < rows["ntp"]["params"]
    # The pause baseline has CoCoMix's backbone: more FLOPs per token than NTP at CoCoMix's width.
    assert rows["pause"]["flops_per_token"] > rows["narrow"]["flops_per_token"]
    for name, r in rows.items():
        assert 1.0 < r["final_held_out_loss"]["more"] < 10.0
        has_recall = r["settings"]["mode"] == "cocomix"
        assert (r["val_concept_recall"] is not None) == has_recall, name
        if has_recall:
            assert 0.0 <= r["val_concept_recall"] <= 1.0 and 0.0 < r["val_concept_recall_prior"] <= 1.0
    assert ra["vs_ntp"]["add"]["held_out_delta"]["more"] == pytest.approx(
        rows["add"]["final_held_out_loss"]["more"] - rows["ntp"]["final_held_out_loss"]["more"])
    assert (tmp_path / "arms" / "efficiency.png").stat().st_size > 1000 and "more " in printed
    assert "| narrow | ntp (width=48) |" in printed and "| **ntp** | ntp |" in printed  # the Markdown table
    assert "| perm | cocomix (permute_labels=0) |" in printed
    assert (tmp_path / "arms" / "held-out" / "more" / "manifest.json").is_file()
    # A rerun reuses every student and writes the same report.
    before = (tmp_path / "arms" / "report.json").read_text()
    assert eff.main(["--config", str(tmp_path / "arms.json"), "--out", str(tmp_path / "arms")]) == 0
    after = json.loads((tmp_path / "arms" / "report.json").read_text())
    assert after["students"] == json.loads(before)["students"]

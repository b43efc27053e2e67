"""The steering evaluation (pipeline/steering.py) end to end on a tiny teacher, SAE and CoCoMix student:
the report, its counts against a direct labelling by stage 2's runner, its intervals, the browser page
that shows it, and every user mistake as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.steering import arm_stats, label_counts, main, paired_diff, wilson
from shards import load_manifest

pytestmark = pytest.mark.usefixtures("ray_local", "one_thread")


@pytest.fixture(scope="module")
def students(extraction, tmp_path_factory) -> dict[str, Path]:
    """Tiny CoCoMix and NTP students trained a few steps on the extraction."""
    from trainer.config import TrainConfig
    from trainer.loop import train

    root = tmp_path_factory.mktemp("students")
    out = {}
    for mode in ("cocomix", "ntp"):
        train(TrainConfig(shards=str(extraction), out_dir=str(root / mode), mode=mode, preset="tiny", steps=4,
                          micro_batch=4, eval_every=4, eval_windows=4, workers=0, progress=False))
        out[mode] = root / mode / "ckpt"
    return out


def test_wilson_matches_known_values():
    # The roots of (p - k/n)^2 = z^2 p (1 - p) / n (the score test inverted), solved separately.
    for (k, n), (lo, hi) in {(0, 10): (0.0, 0.27753), (5, 10): (0.23659, 0.76341), (10, 10): (0.72246, 1.0),
                             (3, 40): (0.02584, 0.19864)}.items():
        got = wilson(k, n)
        assert got[0] == pytest.approx(lo, abs=1e-5) and got[1] == pytest.approx(hi, abs=1e-5)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_arm_stats_intervals_hold_the_estimate():
    rng = np.random.default_rng(0)
    hits, n = rng.integers(0, 5, 30), np.full(30, 10)
    acts = rng.random(30) * hits
    s = arm_stats(hits, acts, n, rng.integers(0, 30, size=(500, 30)))
    assert s["token_rate"] == hits.sum() / 300 and s["mean_act"] == pytest.approx(acts.sum() / 300)
    for key in ("token_rate", "sample_rate", "mean_act"):
        lo, hi = s[f"{key}_ci"]
        assert lo <= s[key] <= hi and lo < hi


def test_paired_difference_resamples_prompts_jointly():
    """Identical arms: every resample's difference is 0 (independent resampling of the arms would not give that)."""
    rng = np.random.default_rng(1)
    num, den = rng.integers(0, 4, 20).astype(float), np.full(20, 8)
    idx = rng.integers(0, 20, size=(300, 20))
    d = paired_diff((num, den), (num, den), idx)
    assert d == {"value": 0.0, "ci": (0.0, 0.0)}
    shifted = paired_diff((num + 1, den), (num, den), idx)
    assert shifted["value"] == pytest.approx(20 / 160) and shifted["ci"] == pytest.approx((20 / 160, 20 / 160))


def test_steering_end_to_end(extraction, students, tiny_teacher_dir, stage2_data, tmp_path, capsys):
    from pipeline.browse import main as browse_main

    out = tmp_path / "report.json"
    args = ["--ckpt", str(students["cocomix"]), "--manifest", str(extraction), "--concepts", "3,17",
            "--scales", "1000,-1000", "--out", str(out), "--samples", "5", "--prompt-tokens", "4", "--new-tokens", "6",
            "--bootstrap", "200", "--teacher", str(tiny_teacher_dir), "--sae", str(stage2_data / "sae_a")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "concept" in printed and "95% intervals" in printed and str(out.absolute()) in printed
    rep = json.loads(out.read_text())
    assert rep["schema"] == "cocomix.steering/1" and rep["prompts"]["n"] == 5
    assert [(r["concept"], r["scale"]) for r in rep["results"]] == [(3, 1e3), (3, -1e3), (17, 1e3), (17, -1e3)]
    for r in rep["results"]:
        for arm in ("steered", "unsteered"):
            a = r[arm]
            assert a["samples"] == 5 and a["tokens"] == 5 * 5  # 6 new tokens, the last has no target
            for key in ("token_rate", "sample_rate", "mean_act"):
                lo, hi = a[f"{key}_ci"]
                assert lo - 1e-12 <= a[key] <= hi + 1e-12
        assert r["unsteered"] == rep["results"][0 if r["concept"] == 3 else 2]["unsteered"]
        assert len(r["examples"]) == 2
        for key in ("token_rate", "mean_act"):
            d = r["difference"][key]
            assert d["value"] == pytest.approx(r["steered"][key] - r["unsteered"][key], abs=1e-12)
            assert d["ci"][0] - 1e-12 <= d["value"] <= d["ci"][1] + 1e-12
    # A large scale changes what the student writes (same prompts, same sampling seeds).
    assert any(e["steered"] != e["unsteered"] for r in rep["results"] for e in r["examples"])
    # The same command again refuses to replace the report without --overwrite; with it, same bytes.
    before = out.read_bytes()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0 and out.read_bytes() == before
    capsys.readouterr()
    # The browser shows the report on the steered concepts' pages.
    site = tmp_path / "site"
    assert browse_main(["--manifest", str(extraction), "--out", str(site), "--steering", str(out),
                        "--no-progress"]) == 0
    for c in (3, 17):
        page = site / "c" / f"{c}.html"
        if page.is_file():
            assert "Steering" in page.read_text() and "report.json" in page.read_text()


def test_label_counts_equal_a_direct_labelling(extraction, tiny_teacher_dir, stage2_data):
    """The counts behind the report, against stage 2's runner applied to each sequence alone."""
    from pipeline.extract_runner import RunnerConfig, TeacherRunner

    m = load_manifest(extraction)
    runner = TeacherRunner(RunnerConfig(teacher=str(tiny_teacher_dir), sae=str(stage2_data / "sae_a"),
                                        layer=m.hook["layer"], k_attr=4, k_mix=8, device="cpu"))
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 512, n).tolist() for n in (9, 9, 12, 9)]
    starts = [3, 4, 5, 3]
    concepts = list(range(0, 300, 7))
    hits, acts, npos = label_counts(runner, seqs, starts, concepts, batch=2)
    for i, s in enumerate(seqs):
        rec, _ = runner.run(np.asarray([s]))
        assert npos[i] == len(s) - 1 - starts[i]
        for j, c in enumerate(concepts):
            h = sum(1 for t in range(starts[i], len(s) - 1) for r in range(4)
                    if rec["concept_ids"][0, t, r] == c and np.isfinite(rec["concept_scores"][0, t, r]))
            a = sum(float(rec["mix_vals"][0, t, q]) for t in range(starts[i], len(s) - 1) for q in range(8)
                    if rec["mix_ids"][0, t, q] == c)
            assert hits[i, j] == h and acts[i, j] == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert hits.sum() > 0 and acts.sum() > 0


def test_mistakes_are_one_line(extraction, students, tmp_path, capsys):
    base = ["--ckpt", str(students["cocomix"]), "--manifest", str(extraction), "--concepts", "3", "--scales", "5",
            "--out", str(tmp_path / "r.json"), "--prompt-tokens", "4"]
    mine = tmp_path / "mine.json"
    mine.write_text('{"a": 1}')
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n\n")

    def with_(**kw):
        args = list(base)
        for k, v in kw.items():
            flag = "--" + k.replace("_", "-")
            if flag in args:
                args[args.index(flag) + 1] = v
            else:
                args += [flag, v]
        return args

    for args, words in (
        (with_(concepts="a,b"), "--concepts"),
        (with_(concepts="3,3"), "--concepts"),
        (with_(concepts="100000"), "outside"),
        (with_(scales="x"), "--scales"),
        (with_(scales="nan"), "--scales"),
        (with_(samples="0"), "--samples"),
        (with_(prompt_tokens="40"), "--prompt-tokens"),
        (with_(out=str(mine)), "not a steering report"),
        (with_(ckpt=str(students["ntp"])), "concept block"),
        (with_(ckpt=str(tmp_path)), "--ckpt"),
        (with_(prompts=str(prompts)), "no prompt"),
        (with_(prompts=str(tmp_path / "none.txt")), "does not exist"),
        (with_(new_tokens="500"), "block_size"),
        (with_(device="tpu"), "tpu"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (args, err)
    assert mine.read_text() == '{"a": 1}' and not (tmp_path / "r.json").exists()

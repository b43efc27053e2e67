"""Every check before (and during) training fails with a clear ValueError."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shards import load_manifest
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.run import main as run_main
from trainer.synthetic import write_manifest
from trainer.validate import build_model_config, check_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("shards") / "d", windows=24, val_windows=8, seq_len=16, vocab=128,
                          n_concepts=64)


def cfg(manifest: Path | str, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(manifest), out_dir=str(out), preset="tiny", mode="cocomix", steps=2, micro_batch=4,
                eval_windows=8, workers=0, progress=False)
    return TrainConfig(**{**base, **kw})


def copy(data: Path, dst: Path) -> Path:
    shutil.copytree(data.parent, dst)
    return dst / "manifest.json"


def test_missing_manifest(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train(cfg(tmp_path / "nope.json", tmp_path))


def test_bad_schema_names_the_field(data, tmp_path):
    m = copy(data, tmp_path / "d")
    j = json.loads(m.read_text())
    j["seq_len"] = -3
    del j["tokenizer"]["vocab_size"]
    m.write_text(json.dumps(j))
    with pytest.raises(ValueError, match=r"seq_len(.|\n)*tokenizer.vocab_size"):
        train(cfg(m, tmp_path / "o"))


def test_corrupted_shard_before_training_names_it(data, tmp_path):
    m = copy(data, tmp_path / "d")
    shard = sorted((tmp_path / "d").glob("train-00001.concepts.arrow"))[0]
    b = bytearray(shard.read_bytes())
    b[len(b) // 2] ^= 0xFF
    shard.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="train-00001.concepts.arrow.*corrupted"):
        train(cfg(m, tmp_path / "o", verify="open"))


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupted_shard_mid_run_names_it(data, tmp_path, workers):
    """Lazy verification: the run starts, and fails when the bad shard is first needed."""
    m = copy(data, tmp_path / "d")
    shard = tmp_path / "d" / "train-00001.tokens.arrow"
    b = bytearray(shard.read_bytes())
    b[-100] ^= 0xFF
    shard.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="train-00001.tokens.arrow.*corrupted"):
        train(cfg(m, tmp_path / "o", verify="lazy", workers=workers, steps=6))


@pytest.mark.parametrize(
    "fields,kw,match",
    [
        (["tokens"], {"mode": "cocomix"},
         r"--mode cocomix --labels attribution needs field\(s\) \['concept_ids', 'concept_scores'\]"),
        (["tokens", "concept_ids", "concept_scores"], {"mode": "kd"},
         r"--mode kd needs field\(s\) \['kd_ids', 'kd_logprobs'\]"),
        (["tokens", "concept_ids", "concept_scores"], {"mode": "cocomix", "labels": "activation"},
         r"needs field\(s\) \['mix_ids', 'mix_vals'\]"),
    ],
)
def test_fields_the_mode_needs(tmp_path, fields, kw, match):
    m = write_manifest(tmp_path / "d", windows=8, val_windows=4, seq_len=8, vocab=64, n_concepts=32, fields=fields)
    with pytest.raises(ValueError, match=match):
        train(cfg(m, tmp_path / "o", **kw))
    # ntp trains on a tokens-only manifest
    if fields == ["tokens"]:
        train(cfg(m, tmp_path / "o2", mode="ntp", micro_batch=2))


def test_vocab_concepts_and_seq_len_against_the_model(data):
    from shards import load_manifest

    man = load_manifest(data)
    tc = cfg(data, Path("/tmp/unused"))
    mc = build_model_config(tc, man)
    # Sized from the manifest (so check_manifest does not re-check these): vocab padded to 64, the
    # concept predictor to sae.n_latents, positions to seq_len.
    assert mc.vocab_size == 128 and mc.concept.n_concepts == 64 and mc.block_size >= 16
    check_manifest(tc, man, mc)
    del man.sae["n_latents"]
    with pytest.raises(ValueError, match="sae.n_latents is missing"):
        check_manifest(tc, man, build_model_config(tc, man))


def test_token_ids_beyond_the_vocab_name_the_shard(tmp_path):
    """A manifest that under-reports its vocabulary: the first batch with a larger id fails."""
    m = write_manifest(tmp_path / "d", windows=16, val_windows=4, seq_len=16, vocab=256, n_concepts=64)
    j = json.loads(m.read_text())
    j["tokenizer"]["vocab_size"] = 100  # padded to 128 < 256
    m.write_text(json.dumps(j))
    with pytest.raises(ValueError, match=r"token id \d+ >= vocab 128 in shard\(s\) .*train-0000[01].tokens.arrow"):
        train(cfg(m, tmp_path / "o"))


def test_concept_ids_beyond_n_latents_name_the_shard(tmp_path):
    m = write_manifest(tmp_path / "d", windows=16, val_windows=4, seq_len=16, vocab=128, n_concepts=200)
    j = json.loads(m.read_text())
    j["sae"]["n_latents"] = 50
    m.write_text(json.dumps(j))
    with pytest.raises(ValueError, match=r"concept_ids \d+ >= n_concepts 50 in shard\(s\)"):
        train(cfg(m, tmp_path / "o"))


def test_resume_checkpoint_that_does_not_match(data, tmp_path):
    train(cfg(data, tmp_path / "o", steps=2))
    with pytest.raises(ValueError, match=r"holds a finished run that differs from this one(.|\n)*"
                                         r"lr: checkpoint 0.0006, this run 0.001"):
        train(cfg(data, tmp_path / "o", steps=2, lr=1e-3, resume="auto"))
    with pytest.raises(ValueError, match=r"model.d_model: checkpoint 64, this run 128"):
        train(cfg(data, tmp_path / "o", steps=2, preset="small", resume="auto"))
    with pytest.raises(ValueError, match=r"schedule length: checkpoint 2 steps, this run 5"):
        train(cfg(data, tmp_path / "o", steps=5, resume="auto"))
    with pytest.raises(ValueError, match=r"global batch"):
        train(cfg(data, tmp_path / "o", steps=2, micro_batch=2, resume="auto"))
    with pytest.raises(ValueError, match=r"incomplete: state.pt missing"):
        (tmp_path / "o" / "ckpt" / "step-000002" / "state.pt").unlink()
        train(cfg(data, tmp_path / "o", steps=2, resume=str(tmp_path / "o" / "ckpt")))


def test_run_configuration_errors(data, tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(cfg(data, tmp_path / "o", micro_batch=32))
    with pytest.raises(ValueError, match="no steps to run"):
        train(cfg(data, tmp_path / "o", steps=0, max_tokens=10))
    with pytest.raises(ValueError, match="only apply to --mode cocomix"):
        cfg(data, tmp_path / "o", mode="ntp", mix="add")
    with pytest.raises(ValueError, match="unknown preset"):
        train(cfg(data, tmp_path / "o", preset="huge"))
    with pytest.raises(ValueError, match="no val windows"):
        m = write_manifest(tmp_path / "nv", windows=8, val_windows=0, seq_len=8, vocab=64, n_concepts=32)
        j = json.loads(m.read_text())
        j["splits"].pop("val", None)
        m.write_text(json.dumps(j))
        train(cfg(m, tmp_path / "o", micro_batch=2))
    with pytest.raises(SystemExit):
        run_main(["--shards", str(data), "--mode", "mlm"])
    with pytest.raises(SystemExit):
        run_main(["--mode", "ntp"])  # --shards is required


def test_tensorboard_without_the_package_says_how_to_install(data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        train(cfg(data, tmp_path / "o", tensorboard=True))
        assert any((tmp_path / "o" / "tb").iterdir())
        return
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(cfg(data, tmp_path / "o", tensorboard=True))


def test_empty_val_split_is_refused_when_evaluating(tmp_path):
    m = write_manifest(tmp_path / "ev", windows=8, val_windows=0, seq_len=8, vocab=64, n_concepts=32)
    j = json.loads(m.read_text())
    j["splits"]["val"] = {"windows": 0, "tokens": 0, "shards": []}  # what stage 1 writes for a tiny corpus
    m.write_text(json.dumps(j))
    with pytest.raises(ValueError, match="no val windows"):
        train(cfg(m, tmp_path / "o", micro_batch=2))
    train(cfg(m, tmp_path / "o2", micro_batch=2, eval_windows=0))  # fine without evaluation


def test_unfinished_extraction_is_refused(data):
    from shards import load_manifest

    man = load_manifest(data)
    tc = cfg(data, Path("/tmp/unused"))
    mc = build_model_config(tc, man)
    check_manifest(tc, man, mc)  # the synthetic manifest is complete
    man.stats["complete"] = False  # what stage 2 writes until its last shard is in
    with pytest.raises(ValueError, match="has not finished"):
        check_manifest(tc, man, mc)


def test_no_budget_means_one_epoch(data, tmp_path):
    windows = load_manifest(data).splits["train"].windows
    summary = train(cfg(data, tmp_path / "o", steps=0, max_tokens=0, eval_windows=0))
    assert (summary["step"] == windows // 4 >= 2
            and summary["tokens"] == summary["step"] * 4 * load_manifest(data).seq_len)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer.run", "--shards", str(tmp_path / "nope.json")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr

"""Every user mistake tried on `python -m sae.train` and `python -m sae.eval`, each run as the real
command in its own process: exit status 2, exactly one `error:` line on stderr naming the flag or
file, no traceback, and nothing started (no progress bar, no --out created).

Start-up (importing torch and transformers) costs seconds per process on a shared machine, so the table
runs in one driver process that imports once and forks a child per case; each child runs the module as
``python -m`` does (``runpy``, ``__name__ == "__main__"``) with its own stdout, stderr and exit status.
A few cases also run as plain ``python -m`` subprocesses, to check the entry points themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import owt_documents, write_corpus

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "sae"
TRAIN = ["--n-latents", "64", "--k", "4", "--seq-len", "32", "--batch-size", "128", "--buffer-tokens", "512",
         "--max-tokens", "1024", "--threads", "1", "--checkpoint-every", "4", "--warmup-steps", "2"]


def make_token_dir(root: Path, teacher: Path, seq_len: int = 32, n: int = 24) -> Path:
    """A stage-1 token dataset (manifest + one Arrow shard) of the tiny tokenizer, train split only."""
    from common.teacher import load_tokenizer, separator_token_id
    from sae.data import iter_corpus_windows
    from shards import FieldSpec, Manifest, write_shard

    corpus = write_corpus(root / "tok_corpus.txt", owt_documents(20))
    tok = load_tokenizer(str(teacher))
    eos = separator_token_id(tok)
    windows = np.stack(list(iter_corpus_windows([str(corpus)], tok, seq_len + 1, eos))[:n])
    m = Manifest(kind="tokens", seq_len=seq_len, tokenizer={"name": "tiny", "fingerprint": "sha256:0",
                 "vocab_size": len(tok), "eos_id": eos}, fields={"tokens": FieldSpec("uint16", (seq_len + 1,))},
                 field_parts={"tokens": "tokens"})
    out = root / "tokens"
    out.mkdir()
    part = write_shard(out / "tokens-00000.arrow", m.part_fields("tokens"), {"tokens": windows.astype(np.uint16)})
    m.add_shard("train", len(windows), {"tokens": part})
    m.save(out / "manifest.json")
    return out


def save_random_sae(path: Path, d: int = 64, c: int = 64, k: int = 4, layer: int | None = 1,
                    poison: float | None = None) -> Path:
    import torch

    from sae import HookSpec, SparseAutoencoder, save_sae

    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(d, c, "topk", k, normalize="layernorm", hook=HookSpec(layer))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn(p.shape, generator=g) / d**0.5)
    save_sae(sae, path)
    if poison is not None:  # a NaN / inf written into the weights file, as a diverged run would leave it
        from safetensors.torch import load_file, save_file

        t = load_file(str(path / "sae_weights.safetensors"))
        t["W_dec"][3, 5] = poison
        save_file(t, str(path / "sae_weights.safetensors"))
    return path


@dataclass
class World:
    """Paths the cases refer to."""

    root: Path
    teacher: Path
    corpus: Path
    tokens: Path
    sae: Path
    finished: Path

    def out(self, name: str) -> Path:
        return self.root / "outs" / name


def _build_world(root: Path, teacher: Path) -> World:
    corpus = write_corpus(root / "corpus.txt", owt_documents(20))
    tokens = make_token_dir(root, teacher)
    sae = save_random_sae(root / "sae_ok")
    # damaged SAE directories
    shutil.copytree(sae, root / "sae_cfg_only")
    (root / "sae_cfg_only" / "sae_weights.safetensors").unlink()
    shutil.copytree(sae, root / "sae_weights_only")
    (root / "sae_weights_only" / "cfg.json").unlink()
    shutil.copytree(sae, root / "sae_corrupt")
    w = root / "sae_corrupt" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated copy
    shutil.copytree(sae, root / "sae_bad_json")
    (root / "sae_bad_json" / "cfg.json").write_text('{"d_in": 64,')
    save_random_sae(root / "sae_nan", poison=float("nan"))
    save_random_sae(root / "sae_inf", poison=float("inf"))
    save_random_sae(root / "sae_layer5", layer=5)
    save_random_sae(root / "sae_no_layer", layer=None)
    shutil.copytree(FIXTURES / "saelens_standard", root / "sae_other_width")  # d_in=8
    # an sae.train run that has not finished: its record and a checkpoint, no final SAE
    unfinished = root / "sae_unfinished"
    (unfinished / "checkpoint").mkdir(parents=True)
    (unfinished / "train_config.json").write_text(json.dumps({"lr_resolved": 1e-3}))
    # --out targets
    (root / "outs").mkdir()
    (root / "a_file.txt").write_text("mine\n")
    (root / "empty.txt").write_text("")
    user = root / "outs" / "user_files"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    shutil.copytree(FIXTURES / "saelens_standard", root / "outs" / "other_sae")
    (root / "eval_out_dir").mkdir()
    # a finished run of the TRAIN settings
    from sae.train import main as train_main

    finished = root / "outs" / "finished"
    train_main(["--teacher", str(teacher), "--corpus", str(corpus), "--layer", "1", "--out", str(finished), *TRAIN])
    # the same run, interrupted, with a checkpoint cut short (a copy that ran out of space, say)
    damaged = root / "outs" / "damaged_checkpoint"
    shutil.copytree(finished, damaged)
    (damaged / "summary.json").unlink()
    state = damaged / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    return World(root, teacher, corpus, tokens, sae, finished)


def train(w: World, *extra: str, out: str = "new", layer: str | None = "1", source: str = "corpus") -> list[str]:
    data = ["--corpus", str(w.corpus)] if source == "corpus" else ["--tokens", str(w.tokens)]
    args = ["--teacher", str(w.teacher), *data, *TRAIN, "--out", str(w.out(out) if "/" not in out else out)]
    return [*args, *(["--layer", layer] if layer is not None else []), *extra]


def evaluate(w: World, *extra: str, sae: str | None = None) -> list[str]:
    return ["--sae", sae or str(w.sae), "--teacher", str(w.teacher), "--corpus", str(w.corpus), "--seq-len", "32",
            "--max-tokens", "64", "--out", str(w.root / "eval_out_dir" / "eval.json"), *extra]


# (case id, module, argv from the World, text the error line must contain)
CASES = [
    # ---- sae.train: flags
    ("train-layer-99", "sae.train", lambda w: train(w, layer="99", out="l99"), "--layer 99 is out of range"),
    ("train-layer-minus-3", "sae.train", lambda w: train(w, layer="-3", out="lm3"), "-2..-1 counting from the last"),
    ("train-layer-missing", "sae.train", lambda w: train(w, layer=None, out="lnone"), "--layer is required"),
    ("train-layer-not-int", "sae.train", lambda w: train(w, layer="last", out="lstr"), "--layer"),
    ("train-k-zero", "sae.train", lambda w: train(w, "--k", "0", out="k0"), "--k=0"),
    ("train-k-above-latents", "sae.train",
     lambda w: train(w, "--k", "65", out="k65"), "--k=65 must be in 1..n_latents=64"),
    ("train-n-latents-zero", "sae.train", lambda w: train(w, "--n-latents", "0", out="n0"), "--n-latents=0"),
    ("train-lr-zero", "sae.train", lambda w: train(w, "--lr", "0", out="lr0"), "--lr=0.0"),
    ("train-lr-negative", "sae.train", lambda w: train(w, "--lr", "-0.001", out="lrneg"), "--lr=-0.001"),
    ("train-lr-nan", "sae.train", lambda w: train(w, "--lr", "nan", out="lrnan"), "--lr=nan"),
    ("train-batch-zero", "sae.train", lambda w: train(w, "--batch-size", "0", out="b0"), "--batch-size=0"),
    ("train-max-tokens-small", "sae.train", lambda w: train(w, "--max-tokens", "10", out="mt"), "--max-tokens=10"),
    ("train-warmup-negative", "sae.train", lambda w: train(w, "--warmup-steps", "-1", out="wu"), "--warmup-steps=-1"),
    ("train-k-aux-zero", "sae.train", lambda w: train(w, "--k-aux", "0", out="kaux"), "--k-aux=0"),
    ("train-teacher-dtype", "sae.train",
     lambda w: train(w, "--teacher-dtype", "int8", out="dt"), "--teacher-dtype='int8'"),
    ("train-device-cuda-99", "sae.train", lambda w: train(w, "--device", "cuda:99", out="dev"), "--device cuda:99"),
    ("train-device-unknown", "sae.train", lambda w: train(w, "--device", "tpu", out="dev2"), "--device 'tpu'"),
    ("train-seq-len-too-long", "sae.train",
     lambda w: train(w, "--seq-len", "4096", out="sl"), "--seq-len 4096 is longer"),
    # ---- sae.train: inputs
    ("train-teacher-unknown", "sae.train",
     lambda w: ["--teacher", "no-such-teacher", "--corpus", str(w.corpus), "--layer", "1", "--out", str(w.out("t1"))],
     "--teacher 'no-such-teacher'"),
    ("train-teacher-missing-dir", "sae.train",
     lambda w: ["--teacher", str(w.root / "missing"), "--corpus", str(w.corpus), "--layer", "1",
                "--out", str(w.out("t2"))],
     "--teacher"),
    ("train-teacher-is-sae", "sae.train",
     lambda w: ["--teacher", str(w.sae), "--corpus", str(w.corpus), "--layer", "1", "--out", str(w.out("t3"))],
     "--teacher"),
    ("train-corpus-missing", "sae.train",
     lambda w: ["--teacher", str(w.teacher), "--corpus", str(w.root / "missing.txt"), "--layer", "1",
                "--out", str(w.out("c1"))],
     "--corpus"),
    ("train-tokens-missing", "sae.train",
     lambda w: ["--teacher", str(w.teacher), "--tokens", str(w.root / "no_tokens"), "--layer", "1",
                "--out", str(w.out("c2"))],
     "--tokens"),
    ("train-tokens-no-split", "sae.train",
     lambda w: train(w, "--split", "val", source="tokens", out="c3"), "--split 'val'"),
    ("train-corpus-empty", "sae.train",
     lambda w: ["--teacher", str(w.teacher), "--corpus", str(w.root / "empty.txt"), *TRAIN, "--layer", "1",
                "--out", str(w.root / "empty_corpus_run")], "produced no window"),
    ("train-corpus-and-tokens", "sae.train",
     lambda w: train(w, "--tokens", str(w.tokens), out="c4"), "exactly one of --corpus or --tokens"),
    # ---- sae.train: --out
    ("train-out-is-file", "sae.train", lambda w: train(w, out=str(w.root / "a_file.txt")), "is a file"),
    ("train-out-under-file", "sae.train", lambda w: train(w, out=str(w.root / "a_file.txt" / "sub")), "is a file"),
    ("train-out-other-sae", "sae.train",
     lambda w: train(w, out="other_sae"), "did not write (an SAE written by something else)"),
    ("train-out-user-files", "sae.train", lambda w: train(w, out="user_files"), "notes.txt"),
    ("train-out-other-run", "sae.train", lambda w: train(w, "--k", "8", out="finished"), "k=4 there, 8 here"),
    ("train-resume-changed-k", "sae.train",
     lambda w: train(w, "--k", "8", "--resume", out="finished"), "--resume: k=8 differs"),
    ("train-damaged-checkpoint", "sae.train",
     lambda w: train(w, out="damaged_checkpoint"), "cannot read the checkpoint"),
    ("train-resume-nothing", "sae.train", lambda w: train(w, "--resume", out="fresh_resume"), "--resume"),
    ("train-resume-and-overwrite", "sae.train",
     lambda w: train(w, "--resume", "--overwrite", out="finished"), "pass only one"),
    ("train-flag-not-a-number", "sae.train", lambda w: train(w, "--k", "four", out="kstr"), "--k"),
    # ---- sae.eval: the SAE
    ("eval-sae-missing", "sae.eval", lambda w: evaluate(w, sae=str(w.root / "no_sae")), "does not exist"),
    ("eval-sae-cfg-without-weights", "sae.eval",
     lambda w: evaluate(w, sae=str(w.root / "sae_cfg_only")), "copy its weights file too"),
    ("eval-sae-weights-without-cfg", "sae.eval",
     lambda w: evaluate(w, sae=str(w.root / "sae_weights_only")), "copy its cfg.json too"),
    ("eval-sae-corrupt-weights", "sae.eval",
     lambda w: evaluate(w, sae=str(w.root / "sae_corrupt")), "truncated or corrupt"),
    ("eval-sae-bad-json", "sae.eval", lambda w: evaluate(w, sae=str(w.root / "sae_bad_json")), "invalid JSON"),
    ("eval-sae-nan", "sae.eval", lambda w: evaluate(w, sae=str(w.root / "sae_nan")), "NaN or inf"),
    ("eval-sae-inf", "sae.eval", lambda w: evaluate(w, sae=str(w.root / "sae_inf")), "NaN or inf"),
    ("eval-sae-other-width", "sae.eval",
     lambda w: evaluate(w, sae=str(w.root / "sae_other_width")), "d_in=8 does not match the teacher's width 64"),
    ("eval-sae-layer-beyond-teacher", "sae.eval",
     lambda w: evaluate(w, sae=str(w.root / "sae_layer5")), "hook layer 5 is out of range"),
    ("eval-sae-no-layer", "sae.eval", lambda w: evaluate(w, sae=str(w.root / "sae_no_layer")), "pass --layer"),
    ("eval-sae-unfinished-run", "sae.eval",
     lambda w: evaluate(w, sae=str(w.root / "sae_unfinished")), "has not finished"),
    ("eval-sae-is-teacher", "sae.eval", lambda w: evaluate(w, sae=str(w.teacher)), "cfg.json"),
    # ---- sae.eval: flags and inputs
    ("eval-layer-99", "sae.eval", lambda w: evaluate(w, "--layer", "99"), "--layer 99 is out of range"),
    ("eval-layer-minus-3", "sae.eval", lambda w: evaluate(w, "--layer", "-3"), "-2..-1 counting from the last"),
    ("eval-teacher-unknown", "sae.eval",
     lambda w: ["--sae", str(w.sae), "--teacher", "no-such-teacher", "--corpus", str(w.corpus)],
     "--teacher 'no-such-teacher'"),
    ("eval-corpus-missing", "sae.eval",
     lambda w: ["--sae", str(w.sae), "--teacher", str(w.teacher), "--corpus", str(w.root / "missing.txt"),
                "--out", str(w.root / "eval_out_dir" / "e.json")], "--corpus"),
    ("eval-tokens-missing", "sae.eval",
     lambda w: ["--sae", str(w.sae), "--teacher", str(w.teacher), "--tokens", str(w.root / "no_tokens"),
                "--out", str(w.root / "eval_out_dir" / "e.json")], "--tokens"),
    ("eval-tokens-no-split", "sae.eval",
     lambda w: ["--sae", str(w.sae), "--teacher", str(w.teacher), "--tokens", str(w.tokens),
                "--out", str(w.root / "eval_out_dir" / "e.json")], "--split 'val'"),
    ("eval-corpus-empty", "sae.eval",
     lambda w: ["--sae", str(w.sae), "--teacher", str(w.teacher), "--corpus", str(w.root / "empty.txt"),
                "--out", str(w.root / "eval_out_dir" / "e.json")], "produced no window"),
    ("eval-max-tokens-zero", "sae.eval", lambda w: evaluate(w, "--max-tokens", "0"), "--max-tokens"),
    ("eval-seq-len-one", "sae.eval", lambda w: evaluate(w, "--seq-len", "1"), "--seq-len=1"),
    ("eval-seq-len-too-long", "sae.eval", lambda w: evaluate(w, "--seq-len", "4096"), "--seq-len 4096 is longer"),
    ("eval-dense-threshold", "sae.eval", lambda w: evaluate(w, "--dense-threshold", "1.5"), "--dense-threshold=1.5"),
    ("eval-device-cuda-99", "sae.eval", lambda w: evaluate(w, "--device", "cuda:99"), "--device cuda:99"),
    ("eval-out-dir-missing", "sae.eval",
     lambda w: evaluate(w, "--out", str(w.root / "nowhere" / "e.json")), "does not exist"),
    ("eval-out-user-file", "sae.eval",
     lambda w: evaluate(w, "--out", str(w.root / "a_file.txt")), "not written by this command"),
    ("eval-out-is-dir", "sae.eval", lambda w: evaluate(w, "--out", str(w.root / "eval_out_dir")), "is a directory"),
]


# Imports once, then forks one child per case; prints {case id: [exit status, stdout, stderr]} as JSON.
DRIVER = r"""
import json, os, runpy, sys, tempfile, warnings
import torch, transformers, sae.train, sae.eval, shards  # noqa: the imports the children share
from transformers import AutoConfig  # noqa
cases = json.load(sys.stdin)
out = {}
pending = list(cases.items())
running = {}
while pending or running:
    while pending and len(running) < 2:
        cid, (module, argv) = pending.pop(0)
        files = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
        pid = os.fork()
        if pid == 0:
            os.dup2(files[0].fileno(), 1)
            os.dup2(files[1].fileno(), 2)
            sys.argv = [module, *argv]
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
            code = 0
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        running[pid] = (cid, files)
    pid, status = os.wait()
    cid, files = running.pop(pid)
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read())
    out[cid] = [os.waitstatus_to_exitcode(status), *texts]
print(json.dumps(out))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run_all(cases: dict[str, tuple[str, list[str]]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    r = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases), cwd=cwd, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {cid: subprocess.CompletedProcess([m, *a], rc, so, se)
            for cid, (m, a) in cases.items() for rc, so, se in [json.loads(r.stdout)[cid]]}


def _run(module: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


# Also run as plain `python -m` subprocesses: the entry points' own exit status and stderr.
PLAIN = ("train-out-other-run", "eval-sae-nan")


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_teacher_dir):
    """Builds the World once and runs every case."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sae_cli")
    w = _build_world(root, tiny_teacher_dir)
    finished_before = {p.name: p.read_bytes() for p in w.finished.iterdir() if p.is_file()}
    argvs = {cid: build(w) for cid, _, build, _ in CASES}
    out = _run_all({cid: (module, argvs[cid]) for cid, module, _, _ in CASES}, root)
    modules = {cid: module for cid, module, _, _ in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        plain = dict(zip(PLAIN, pool.map(lambda c: _run(modules[c], argvs[c], root), PLAIN), strict=True))
    out |= {f"plain:{cid}": r for cid, r in plain.items()}
    finished_after = {p.name: p.read_bytes() for p in w.finished.iterdir() if p.is_file()}
    return w, argvs, out, finished_before, finished_after


@pytest.mark.parametrize("cid,module,expected", [(c, m, e) for c, m, _, e in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_error_line_and_exit_2(results, cid, module, expected):
    w, argvs, out, _, _ = results
    for key in (cid, f"plain:{cid}"):
        if key in out:
            _check(out[key], key, module, expected, argvs[cid])


def _check(r: subprocess.CompletedProcess, cid: str, module: str, expected: str, argv: list[str]) -> None:
    both = r.stdout + r.stderr
    assert "Traceback" not in both, f"{cid}: traceback\n{r.stderr[-3000:]}"
    assert r.returncode == 2, f"{cid}: exit {r.returncode}\n{r.stderr[-2000:]}"
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, f"{cid}: {len(errors)} error lines\n{r.stderr[-2000:]}"
    assert expected in errors[0], f"{cid}: {errors[0]!r} lacks {expected!r}"
    assert errors[0].startswith(("error: ", f"python -m {module}: error: ")), (
        f"{cid}: not a line of its own: {errors[0]!r}")
    assert f"{module}:" not in r.stderr.replace(f"python -m {module}:", ""), f"{cid}: work started (progress bar)"
    if module == "sae.train" and "/outs/" in argv[argv.index("--out") + 1]:
        out_dir = Path(argv[argv.index("--out") + 1])
        if out_dir.name not in ("finished", "user_files", "other_sae", "damaged_checkpoint"):
            assert not out_dir.exists(), f"{cid}: created {out_dir} although the input was refused"


def test_refusals_left_the_finished_run_untouched(results):
    """The cases aimed at a finished run (other settings, --resume with another k, --resume with
    --overwrite) changed none of its files, and the other directories still hold only what they held."""
    w, _, _, before, after = results
    assert before == after
    assert sorted(os.listdir(w.out("user_files"))) == ["notes.txt"]
    assert sorted(os.listdir(w.out("other_sae"))) == sorted(os.listdir(FIXTURES / "saelens_standard"))
    assert (w.root / "a_file.txt").read_text() == "mine\n"

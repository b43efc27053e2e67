"""Stage 1 end to end on small real text with embedded Ray."""

from __future__ import annotations

import numpy as np
import pytest

from common.corpus import CorpusConfig, iter_documents
from pipeline.stage1 import TokenizeConfig, in_val, main, run
from shards import load_manifest, open_split
from shards.runlog import read_runs
from tests.helpers import owt_documents, write_corpus

pytestmark = pytest.mark.usefixtures("ray_local")
T = 64


def stage1(tmp_path, tok, docs, name="out", **kw):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus, docs)
    kw.setdefault("val_fraction", 0.2)
    cfg = TokenizeConfig(corpus=[str(corpus)], tokenizer=str(tok), out=str(tmp_path / name), seq_len=T, **kw)
    return run(cfg)


def stream(manifest, split):
    ds = open_split(manifest, split, verify="open")
    if len(ds) == 0:
        return np.zeros(0, dtype=np.int64)
    w = np.stack([ds[i]["tokens"] for i in range(len(ds))]).astype(np.int64)
    # Consecutive windows share one token: the last target of window i is the first input of i + 1.
    assert all(w[i, -1] == w[i + 1, 0] for i in range(len(w) - 1))
    return np.concatenate([w[0], *[x[1:] for x in w[1:]]])


def test_round_trip_and_token_counts(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    docs = owt_documents(40)
    m = stage1(tmp_path, tiny_tokenizer_dir, docs, shard_mb=0.02)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    eos = m.tokenizer["eos_id"]
    assert tok.convert_ids_to_tokens(eos) == "<|endoftext|>"
    # Ids as whole-file reading gives them (corpus.txt@<byte offset>): the split hashes them.
    ids = [i for i, _ in iter_documents(CorpusConfig([str(tmp_path / "corpus.txt")]))]
    assert len(ids) == len(docs) and ids[0] == "corpus.txt@0"
    for split in ("train", "val"):
        mine = [d for i, d in zip(ids, docs, strict=True) if in_val(i, 0, 0.2) == (split == "val")]
        expected = np.concatenate([np.append(tok(d, add_special_tokens=False)["input_ids"], eos) for d in mine])
        s = m.splits[split]
        got = stream(m, split)
        # The stream is packed in order; only the tail that cannot fill a window is dropped.
        np.testing.assert_array_equal(got, expected[: len(got)])
        assert s.extra["stream_tokens"] == len(expected) == s.windows * T + 1 + s.extra["tail_tokens"]
        assert s.tokens == s.windows * T and s.extra["documents"] == len(mine)
        assert s.extra["tail_tokens"] < T + 1
        # Decoding the windows gives back the documents joined by EOS.
        text = tok.decode(got.tolist())
        joined = "<|endoftext|>".join(mine) + "<|endoftext|>"
        assert joined.startswith(text)
    assert len(m.splits["train"].shards) > 1  # small shard size forces several shards
    assert m.corpus["documents"] == 40 and m.stats == {}  # timings live in the run log, not the manifest
    (log,) = read_runs(tmp_path / "out")
    assert log["outcome"] == "wrote" and log["tokens_per_s"] > 0 and log["ray"] == "embedded"


def test_val_corpus_forms_the_val_split(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    docs = owt_documents(30)
    write_corpus(tmp_path / "train.txt", docs[:24])
    write_corpus(tmp_path / "valid.txt", docs[24:])
    cfg = TokenizeConfig(corpus=[str(tmp_path / "train.txt")], val_corpus=[str(tmp_path / "valid.txt")],
                         tokenizer=str(tiny_tokenizer_dir), out=str(tmp_path / "out"), seq_len=T, val_fraction=0.5)
    m = run(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    eos = m.tokenizer["eos_id"]
    for split, mine in (("train", docs[:24]), ("val", docs[24:])):
        # Every document of a file goes to that file's split, whatever --val-fraction says.
        expected = np.concatenate([np.append(tok(d, add_special_tokens=False)["input_ids"], eos) for d in mine])
        got = stream(m, split)
        np.testing.assert_array_equal(got, expected[: len(got)])
        assert m.splits[split].extra["documents"] == len(mine)
    assert m.corpus["val_sources"] == [str(tmp_path / "valid.txt")] and m.corpus["documents"] == 30
    # The same files in swapped roles are a different dataset.
    swapped = TokenizeConfig(corpus=[str(tmp_path / "valid.txt")], val_corpus=[str(tmp_path / "train.txt")],
                             tokenizer=str(tiny_tokenizer_dir), out=str(tmp_path / "out2"), seq_len=T)
    assert run(swapped).corpus["fingerprint"] != m.corpus["fingerprint"]
    with pytest.raises(ValueError, match="does not exist|not found|no such"):
        run(TokenizeConfig(corpus=[str(tmp_path / "train.txt")], val_corpus=[str(tmp_path / "missing.txt")],
                           tokenizer=str(tiny_tokenizer_dir), out=str(tmp_path / "out3"), seq_len=T))


def test_split_is_stable_when_documents_are_added():
    ids = [f"c.txt@{1000 * i}" for i in range(5000)]
    val = {i for i in ids if in_val(i, 0, 0.05)}
    assert 150 < len(val) < 350
    more = ids + [f"d.txt@{1000 * i}" for i in range(1000)]
    assert {i for i in more[:5000] if in_val(i, 0, 0.05)} == val
    assert {i for i in ids if in_val(i, 1, 0.05)} != val  # the seed salts the hash


def tree(d) -> dict[str, bytes]:
    """Every file under ``d`` -> its bytes (zarr directories included), the run log left out."""
    return {str(p.relative_to(d)): p.read_bytes()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "runs.jsonl"}


def windows(manifest, split):
    ds = open_split(manifest, split, verify="open")
    return np.stack([ds[i]["tokens"] for i in range(len(ds))]) if len(ds) else np.zeros((0, T + 1))


def test_bytes_identical_across_worker_counts_and_formats(tmp_path, tiny_tokenizer_dir):
    """In-process, 1 and 2 Ray workers over the same partition (several tasks of 20 KB): every file's
    bytes, manifest included, are the same; Zarr holds the same token streams."""
    docs = owt_documents(30)
    kw = dict(task_mb=0.02, shard_mb=0.02)
    c = stage1(tmp_path, tiny_tokenizer_dir, docs, "local", in_process=True, **kw)
    a = stage1(tmp_path, tiny_tokenizer_dir, docs, "w1", num_workers=1, batch_chars=2000, **kw)
    stage1(tmp_path, tiny_tokenizer_dir, docs, "w2", num_workers=2, batch_chars=5000, **kw)
    z = stage1(tmp_path, tiny_tokenizer_dir, docs, "z", format="zarr", zarr_chunk_windows=4, **kw)
    assert c.corpus["tasks"] > 3 and len({sh.parts["tokens"].path.name.split("-")[1] for sh in
                                         c.splits["train"].shards}) > 3  # shards of several tasks
    ref = tree(tmp_path / "local")
    assert "manifest.json" in ref and not any("stage1-tasks" in k for k in ref)
    assert tree(tmp_path / "w1") == ref and tree(tmp_path / "w2") == ref
    assert [r["num_workers"] for r in (read_runs(tmp_path / n)[-1] for n in ("local", "w1", "w2"))] == [1, 1, 2]
    for split in ("train", "val"):
        np.testing.assert_array_equal(windows(a, split), windows(z, split))
    stream(c, "val")  # one stream, packed by the driver: consecutive windows share a token
    # The fingerprint does not depend on the partition; the packing (train tails per task) does.
    one = stage1(tmp_path, tiny_tokenizer_dir, docs, "one_task", in_process=True, shard_mb=0.02)
    assert one.corpus["fingerprint"] == c.corpus["fingerprint"] and one.corpus["tasks"] == 1
    assert one.splits["val"].windows == c.splits["val"].windows  # val is packed once, from every task's stream
    s = c.splits["train"]
    assert s.extra["stream_tokens"] == s.windows * T + s.extra["packed_streams"] + s.extra["tail_tokens"]


def test_rerun_reuses_refuses_and_overwrites(tmp_path, tiny_tokenizer_dir, capsys):
    docs = owt_documents(10)
    m1 = stage1(tmp_path, tiny_tokenizer_dir, docs)
    mtime = m1.path.stat().st_mtime_ns
    m2 = stage1(tmp_path, tiny_tokenizer_dir, docs)
    assert m2.path.stat().st_mtime_ns == mtime  # complete and verified: nothing rewritten
    with pytest.raises(ValueError, match="different dataset"):
        stage1(tmp_path, tiny_tokenizer_dir, docs, seed=7)
    m3 = stage1(tmp_path, tiny_tokenizer_dir, docs, seed=7, overwrite=True)
    assert m3.settings["seed"] == 7
    assert [r["outcome"] for r in read_runs(tmp_path / "out")] == ["wrote", "reused", "wrote"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="did not write") as e:
        stage1(tmp_path, tiny_tokenizer_dir, docs, name="other", overwrite=True)
    assert "keep.txt" in str(e.value) and "--overwrite" not in str(e.value)
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"


def test_bad_corpus_inputs_via_cli(tmp_path, tiny_tokenizer_dir, capsys):
    out = str(tmp_path / "o")
    assert main(["--corpus", str(tmp_path / "missing.txt"), "--tokenizer", str(tiny_tokenizer_dir), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n  \n<|endoftext|>\n")
    assert main(["--corpus", str(tmp_path / "empty.txt"), "--tokenizer", str(tiny_tokenizer_dir), "--out", out]) == 2
    assert "no documents (2 empty" in capsys.readouterr().err
    write_corpus(tmp_path / "tiny.txt", ["hi"])
    assert main(["--corpus", str(tmp_path / "tiny.txt"), "--tokenizer", str(tiny_tokenizer_dir), "--out", out + "2",
                 "--val-fraction", "0"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert main(["--corpus", str(tmp_path / "tiny.txt"), "--tokenizer", str(tmp_path / "nope"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_counts_reach_the_manifest(tmp_path, tiny_tokenizer_dir):
    c = tmp_path / "corpus.txt"
    c.write_bytes(b"".join(d.encode() + b"\n<|endoftext|>\n" for d in owt_documents(8))
                  + b"bad \xff\n<|endoftext|>\n \n<|endoftext|>\n")
    m = stage1(tmp_path, tiny_tokenizer_dir, None)
    assert (m.corpus["documents"], m.corpus["utf8_replaced"], m.corpus["skipped_empty"]) == (9, 1, 1)
    assert load_manifest(m.path).corpus == m.corpus


@pytest.mark.slow
def test_owt_train_with_smollm2(tmp_path):
    """The issue's acceptance run: the whole OWT train sample with the real SmolLM2 tokenizer."""
    from pathlib import Path

    from common.teacher import load_tokenizer

    corpus = Path(__file__).resolve().parents[2] / "shared/data/owt-sample/owt_train.txt"
    if not corpus.exists():
        pytest.skip("OWT sample not present")
    m = run(TokenizeConfig(corpus=[str(corpus)], tokenizer="smollm2-135m", out=str(tmp_path / "o"), seq_len=512))
    tok = load_tokenizer("smollm2-135m")
    from common.corpus import CorpusConfig, iter_documents

    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1
                for _, t in iter_documents(CorpusConfig([str(corpus)])))
    assert sum(s.extra["stream_tokens"] for s in m.splits.values()) == total
    for s in m.splits.values():
        assert s.extra["stream_tokens"] == s.windows * 512 + s.extra["packed_streams"] + s.extra["tail_tokens"]


def test_a_task_error_on_ray_is_one_line(tmp_path, tiny_tokenizer_dir):
    """A bad record read by a Ray worker (a later task of the plan) reaches the user as the worker's own
    one-line ValueError, naming the file and the byte offset, not a Ray traceback."""
    import json

    lines = [json.dumps({"text": d}) for d in owt_documents(12)] + ["not json"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TokenizeConfig(corpus=[str(tmp_path / "c.jsonl")], tokenizer=str(tiny_tokenizer_dir),
                         out=str(tmp_path / "o"), seq_len=T, task_mb=0.01, num_workers=2)
    with pytest.raises(ValueError) as e:
        run(cfg)
    msg = str(e.value)
    assert "c.jsonl (the line at byte" in msg and "not valid JSON" in msg and "\n" not in msg, msg
    assert type(e.value) is ValueError

"""Corpus readers: every format, stable ids, and every kind of bad input counted or refused."""

from __future__ import annotations

import json

import pytest

from common.corpus import CorpusConfig, CorpusStats, iter_documents, iter_pieces
from tests.helpers import owt_documents, write_corpus


def read(paths, **kw):
    stats = CorpusStats()
    docs = list(iter_documents(CorpusConfig([str(p) for p in paths], **kw), stats))
    return docs, stats


def test_text_file_with_delimiters(tmp_path):
    docs = owt_documents(5)
    write_corpus(tmp_path / "a.txt", docs)
    got, stats = read([tmp_path / "a.txt"])
    assert [t for _, t in got] == docs
    # Ids are byte offsets (common/corpus.py): a range reader knows them without the file before it.
    starts = [0]
    for d in docs[:-1]:
        starts.append(starts[-1] + len((d + "\n<|endoftext|>\n").encode()))
    assert [i for i, _ in got] == [f"a.txt@{k}" for k in starts]
    assert stats.documents == 5 and stats.bytes == (tmp_path / "a.txt").stat().st_size


def test_custom_delimiter_and_doc_per_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("one\n===\ntwo\n")
    got, _ = read([tmp_path / "d" / "x.txt"], delimiter="===")
    assert [t for _, t in got] == ["one", "two"]
    (tmp_path / "d" / "y.txt").write_text("whole file\n\nsecond paragraph\n")
    got, _ = read([tmp_path / "d"], doc_per_file=True)
    assert got == [("x.txt@0", "one\n===\ntwo"), ("y.txt@0", "whole file\n\nsecond paragraph")]


def test_jsonl_parquet_dir_and_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = owt_documents(6)
    d = tmp_path / "c"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in docs[:3]))
    pq.write_table(pa.table({"body": docs[3:]}), d / "sub" / "b.parquet", row_group_size=1)
    got, stats = read([d], text_field="body")
    assert [t for _, t in got] == docs
    lens = [len(json.dumps({"body": t, "n": 1}) + "\n") for t in docs[:2]]
    assert [i for i, _ in got] == ["a.jsonl@0", f"a.jsonl@{lens[0]}", f"a.jsonl@{lens[0] + lens[1]}",
                                   "sub/b.parquet:0", "sub/b.parquet:1", "sub/b.parquet:2"]
    got2, _ = read([str(d) + "/**/*.parquet"], text_field="body")
    assert [t for _, t in got2] == docs[3:]
    with pytest.raises(ValueError, match="no column 'text'"):
        read([d / "sub" / "b.parquet"])


def test_hf_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = owt_documents(4)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(tmp_path / "hf")
    got, _ = read([tmp_path / "hf"])
    assert [t for _, t in got] == docs
    assert got[0][0] == "hf/train:0"
    with pytest.raises(ValueError, match="no split"):
        read([tmp_path / "hf"], hf_split="test")


def test_missing_path_and_binary_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read([tmp_path / "nope.txt"])
    (tmp_path / "b.txt").write_bytes(b"\x00\x01\x02 binary" * 100)
    with pytest.raises(ValueError, match="binary"):
        read([tmp_path / "b.txt"])
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        read([tmp_path / "e"])


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "u.txt").write_bytes(b"good doc\n<|endoftext|>\nbad \xff\xfe byte\n<|endoftext|>\n")
    got, stats = read([tmp_path / "u.txt"])
    assert got[1][1] == "bad \ufffd\ufffd byte"
    assert stats.utf8_replaced == 1 and stats.documents == 2


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "e.txt").write_text("a\n<|endoftext|>\n\n<|endoftext|>\n   \n<|endoftext|>\nb\n<|endoftext|>\n")
    got, stats = read([tmp_path / "e.txt"])
    assert [t for _, t in got] == ["a", "b"]
    assert stats.skipped_empty == 2
    # Ids are the documents' byte offsets, so they stay stable if another document is fixed.
    assert [i for i, _ in got] == ["e.txt@0", "e.txt@49"]


def test_bad_jsonl_lines(tmp_path):
    (tmp_path / "j.jsonl").write_text('{"text": "ok"}\nnot json\n[1]\n{"x": 1}\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"j.jsonl:2: line is not valid JSON"):
        read([tmp_path / "j.jsonl"])
    got, stats = read([tmp_path / "j.jsonl"], skip_bad_records=True)
    assert [t for _, t in got] == ["ok", "fine"]
    assert stats.skipped_bad_records == 3


def test_enormous_document_is_streamed_in_pieces(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    big = "\n".join(owt_documents(30))  # 45-150 KB of text as one document
    write_corpus(tmp_path / "big.txt", ["small one", big])
    cfg = CorpusConfig([str(tmp_path / "big.txt")], max_piece_chars=4096)
    pieces = list(iter_pieces(cfg))
    assert len(big) > 40_000 and len(pieces) - 1 >= len(big) // 8192
    assert max(len(p.text) for p in pieces) < 4096 + 10_000
    assert all(p.doc_id == "big.txt@24" for p in pieces[1:]) and [p.last for p in pieces].count(True) == 2
    assert "".join(p.text for p in pieces[1:]) == big
    # Cutting only before non-space line starts keeps byte-level BPE ids identical.
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = [i for p in pieces[1:] for i in tok(p.text, add_special_tokens=False)["input_ids"]]
    assert ids == tok(big, add_special_tokens=False)["input_ids"]


def test_one_huge_line_is_read_in_bounded_pieces(tmp_path, tiny_tokenizer_dir):
    """A single 300 KB line (no newline to cut at) arrives in pieces of at most 2 x max_piece_chars,
    cut before spaces, with the ids of the whole line (issue 12: one 20 MB line took 4.3 GB)."""
    from transformers import AutoTokenizer

    words = " ".join(owt_documents(40)).split()
    line = " ".join(words)[:300_000]
    (tmp_path / "line.txt").write_text(line + "\n<|endoftext|>\nsmall\n")
    stats = CorpusStats()
    pieces = list(iter_pieces(CorpusConfig([str(tmp_path / "line.txt")], max_piece_chars=8192), stats))
    assert "".join(p.text for p in pieces[:-1]) == line and pieces[-1].text == "small"
    assert len(pieces) > 300_000 // 16384 and max(len(p.text) for p in pieces) <= 2 * 8192
    assert stats.forced_cuts == 0 and stats.documents == 2
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = [i for p in pieces[:-1] for i in tok(p.text, add_special_tokens=False)["input_ids"]]
    assert ids == tok(line, add_special_tokens=False)["input_ids"]


def test_no_safe_cut_point_is_cut_anyway_and_counted(tmp_path):
    blob = ("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 2000)[:50_000] + "é" * 3000  # base64-like, then 2-byte chars
    (tmp_path / "b.txt").write_text(blob + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": blob}) + "\n")
    for f in ("b.txt", "b.jsonl"):
        stats = CorpusStats()
        pieces = list(iter_pieces(CorpusConfig([str(tmp_path / f)], max_piece_chars=4096), stats))
        assert "".join(p.text for p in pieces) == blob and max(len(p.text) for p in pieces) <= 2 * 4096
        assert stats.forced_cuts == len(pieces) - 1 > 0 and stats.utf8_replaced == 0


def test_pieces_keep_the_ids_of_a_tokenizer_that_merges_newlines(tmp_path):
    """SmolLM2's BPE merges "\\n\\n" when it ends the text, not before a word: a cut after a blank line
    changed the ids (the reader cut before any line starting with a non-space)."""
    from common.teacher import load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m")
    except ValueError as e:
        pytest.skip(f"SmolLM2 tokenizer not installed: {e}")
    doc = "\n\n".join(d.replace("\n\n", "\n") for d in owt_documents(20))  # paragraphs separated by blank lines
    write_corpus(tmp_path / "p.txt", [doc])
    pieces = list(iter_pieces(CorpusConfig([str(tmp_path / "p.txt")], max_piece_chars=2048)))
    assert len(pieces) > 5 and "".join(p.text for p in pieces) == doc
    ids = [i for p in pieces for i in tok(p.text, add_special_tokens=False)["input_ids"]]
    assert ids == tok(doc, add_special_tokens=False)["input_ids"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    pieces = list(iter_pieces(CorpusConfig([str(tmp_path / "p.jsonl")], max_piece_chars=2048)))
    ids = [i for p in pieces for i in tok(p.text, add_special_tokens=False)["input_ids"]]
    assert len(pieces) > 5 and ids == tok(doc, add_special_tokens=False)["input_ids"]


def test_empty_delimiter_is_refused():
    with pytest.raises(ValueError, match="--delimiter"):
        CorpusConfig(["x.txt"], delimiter="")

"""The partition of a corpus into stage-1 tasks (common/partition.py) and the range readers
(common/corpus.py ``read_range``): every document is read exactly once, by the range where it starts,
with the id and text whole-file reading gives it, for any task size; the plan depends on the input only."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from common.corpus import CorpusConfig, CorpusStats, iter_documents, iter_pieces
from common.partition import iter_task, plan
from tests.helpers import owt_documents, write_corpus

COUNTS = ("documents", "skipped_empty", "skipped_bad_records", "utf8_replaced", "bytes", "forced_cuts")


def whole(cfg: CorpusConfig) -> tuple[list[tuple[str, str, bool]], dict]:
    stats = CorpusStats()
    pieces = [(p.doc_id, p.text, p.last) for p in iter_pieces(cfg, stats)]
    return pieces, {k: getattr(stats, k) for k in COUNTS}


def by_tasks(cfg: CorpusConfig, task_bytes: int) -> tuple[list[tuple[str, str, bool]], dict, int]:
    """Every task's pieces, in task order, and the summed counts (as stage 1's driver sums records)."""
    tasks = plan(cfg, task_bytes)
    pieces, total = [], dict.fromkeys(COUNTS, 0)
    for t in tasks:
        stats = CorpusStats()
        pieces += [(p.doc_id, p.text, p.last) for p in iter_task(t, cfg, stats)]
        for k in COUNTS:
            total[k] += getattr(stats, k)
    return pieces, total, len(tasks)


def assert_same_for_every_size(cfg: CorpusConfig, sizes) -> int:
    ref = whole(cfg)
    most = 0
    for tb in sizes:
        pieces, counts, n = by_tasks(cfg, tb)
        assert (pieces, counts) == ref, tb
        most = max(most, n)
    return most


def tricky_text(newline: str) -> str:
    """Empty and blank documents, a delimiter at the very start, text that only looks like a delimiter,
    multi-byte characters, and a last document without a final newline."""
    nl = newline
    docs = ["", "first line" + nl + "second é line", "   ", "<|endoftext|> inside a line", "x<|endoftext|>",
            "ünïcödé " * 9, "", "a" + nl + nl + "b"]
    return (nl + "<|endoftext|>" + nl).join(docs) + nl + "<|endoftext|>" + nl + "tail without newline"


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_text_every_cut_reads_each_document_once(tmp_path, newline):
    f = tmp_path / "t.txt"
    f.write_bytes(tricky_text(newline).encode())
    cfg = CorpusConfig([str(f)])
    size = f.stat().st_size
    n = assert_same_for_every_size(cfg, range(1, size + 2))  # every cut point of the file
    assert n == size  # one byte per task: most tasks own no document
    ids = [i for i, _ in iter_documents(cfg)]
    text = f.read_bytes()
    # Ids are byte offsets: the document's text starts there.
    for i, t in iter_documents(cfg):
        off = int(i.rsplit("@", 1)[1])
        assert text[off:].decode("utf-8", "replace").startswith(t[:5])
    assert len(ids) == len(set(ids)) == 6
    # A cut exactly at a document's start: that document is the first of the range that starts there
    # (the first boundary at or after the cut), and the range before ends at it.
    for i in ids[1:]:
        b = int(i.rsplit("@", 1)[1])
        first, second = plan(cfg, b)[:2]
        assert [p.doc_id for p in iter_task(second, cfg, CorpusStats())][0] == i
        assert i not in [p.doc_id for p in iter_task(first, cfg, CorpusStats())]


def test_a_document_longer_than_its_range_belongs_where_it_starts(tmp_path):
    docs = owt_documents(6)
    big = "\n".join(owt_documents(12))  # ~30 KB: spans many 1 KB ranges
    write_corpus(tmp_path / "c.txt", [docs[0], big, *docs[1:]])
    cfg = CorpusConfig([str(tmp_path / "c.txt")], max_piece_chars=1024)  # the big document comes in pieces
    start = len((docs[0] + "\n<|endoftext|>\n").encode())
    tasks = plan(cfg, 1000)
    owners = [t for t in tasks if any(p.doc_id == f"c.txt@{start}" for p in iter_task(t, cfg, CorpusStats()))]
    assert len(tasks) > 30 and len(owners) == 1 and owners[0].ranges[0].start <= start < owners[0].ranges[0].end
    got = "".join(p.text for p in iter_task(owners[0], cfg, CorpusStats()) if p.doc_id == f"c.txt@{start}")
    assert got == big
    assert_same_for_every_size(cfg, [1000, 4096, 10_000, 1 << 30])


def test_jsonl_by_ranges(tmp_path):
    docs = owt_documents(8)
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(3, "")  # a blank line is skipped, not a record
    lines.insert(5, json.dumps({"text": "   "}))  # an empty document: skipped and counted
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = CorpusConfig([str(tmp_path / "a.jsonl")])
    size = (tmp_path / "a.jsonl").stat().st_size
    assert assert_same_for_every_size(cfg, [1, 100, 999, 5000, size, size + 1]) > 8
    # A bad line in a later range is named by its byte offset (its line number would need the file before it).
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n' * 50 + "not json\n")
    bad = CorpusConfig([str(tmp_path / "b.jsonl")])
    last = plan(bad, 100)[-1]
    with pytest.raises(ValueError, match=r"b.jsonl \(the line at byte 750\): line is not valid JSON"):
        list(iter_task(last, bad, CorpusStats()))


def test_parquet_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = owt_documents(9)
    pq.write_table(pa.table({"text": docs}), tmp_path / "b.parquet", row_group_size=2)  # 5 row groups
    cfg = CorpusConfig([str(tmp_path / "b.parquet")])
    one_each = plan(cfg, 1)
    assert [(t.ranges[0].start, t.ranges[0].end) for t in one_each] == [(g, g + 1) for g in range(5)]
    together = plan(cfg, 1 << 30)
    assert len(together) == 1 and [(r.start, r.end) for r in together[0].ranges] == [(0, 5)]  # merged
    pieces, _, _ = by_tasks(cfg, 1)
    assert [p[0] for p in pieces] == [f"b.parquet:{i}" for i in range(9)]
    assert_same_for_every_size(cfg, [1, 3000, 8000, 1 << 30])


def test_plan_depends_on_the_input_only(tmp_path):
    """Small files are grouped in order up to the task size; big ones cut into fixed ranges. The plan is
    the same every time (nothing about workers goes in), and ids equal whole-file reading's."""
    d = tmp_path / "c"
    d.mkdir()
    for k in range(5):
        write_corpus(d / f"s{k}.txt", [t[:1500] for t in owt_documents(2 + k)])
    write_corpus(d / "z_big.txt", owt_documents(40))
    (d / "m.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in owt_documents(3)))
    cfg = CorpusConfig([str(d)])
    tb = 20_000
    tasks = plan(cfg, tb)
    assert [asdict(t) for t in tasks] == [asdict(t) for t in plan(cfg, tb)]
    big = d / "z_big.txt"
    cuts = [r for t in tasks for r in t.ranges if r.source == "z_big.txt"]
    assert [r.start for r in cuts] == list(range(0, big.stat().st_size, tb)) and cuts[-1].end is None
    assert all(len(t.ranges) == 1 for t in tasks if t.ranges[0].source == "z_big.txt" and t.ranges[0].end)
    assert any(len(t.ranges) > 1 for t in tasks)  # small files grouped
    assert all(t.bytes <= tb or len(t.ranges) == 1 for t in tasks)
    assert [t.index for t in tasks] == list(range(len(tasks)))
    assert_same_for_every_size(cfg, [1000, tb, 1 << 30])
    with pytest.raises(ValueError, match="task size"):
        plan(cfg, 0)


def test_doc_per_file_is_one_range(tmp_path):
    (tmp_path / "x.txt").write_text("one\n<|endoftext|>\ntwo\n" * 200)
    cfg = CorpusConfig([str(tmp_path / "x.txt")], doc_per_file=True)
    assert len(plan(cfg, 10)) == 1
    assert_same_for_every_size(cfg, [10, 1 << 20])

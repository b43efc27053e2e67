"""Stage 2's bookkeeping (pipeline/extract_progress.py) without Ray: records and checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.extract_progress import CHECKPOINTS, Bookkeeper
from shards import ShardPart
from shards.records import read_records


def test_checkpoints_keep_the_bookkeeping_per_shard_constant(tmp_path, monkeypatch):
    """The manifest is assembled after every shard for small runs, ~32 times for a large one, and by time
    only when the last assembly's cost allows; each finished shard writes one record."""
    import pipeline.extract_progress as progress

    written = []
    real_write = progress.write_record
    def job(i: int):
        tok = ShardPart(path=tmp_path / "t", format="arrow", checksum=f"sha256:{i}", bytes=1)
        return SimpleNamespace(out=str(tmp_path / f"train-{i:05d}.arrow"), split="train", windows=2, tokens=tok,
                               format="arrow")

    part = ShardPart(path=tmp_path / "c", format="arrow", checksum="sha256:c", bytes=3)
    for total, saves in ((6, 6), (1000, CHECKPOINTS), (10_000, CHECKPOINTS)):
        calls = []
        if total > 6:  # the rate alone: no fsync'd files for 2,000 records
            monkeypatch.setattr(progress, "write_record", lambda *a: written.append(a[1]))
        book = Bookkeeper(tmp_path / f"rec-{total}", "sha256:s", total, lambda c=calls: c.append(1),
                          every_s=1e9, clock=lambda: 0.0)
        for i in range(min(total, 1000)):  # 1000 finished shards are enough to see the rate
            book.finished(job(i), part)
        assert len(calls) == min(total, 1000) // book.every, total  # the rest: at the end
        assert book.every == max(1, -(-total // CHECKPOINTS)) and -(-total // book.every) <= saves
    assert len(read_records(tmp_path / "rec-6")) == 6 and len(written) == 2000
    monkeypatch.setattr(progress, "write_record", real_write)
    assert read_records(tmp_path / "rec-6")["train-00005.arrow"] == {
        "split": "train", "windows": 2, "tokens_checksum": "sha256:5", "settings": "sha256:s", "format": "arrow",
        "checksum": "sha256:c", "bytes": 3}
    now = [0.0]
    calls = []
    book = Bookkeeper(tmp_path / "rec-t", "sha256:s", 10_000, lambda: calls.append(now[0]), every_s=60,
                      clock=lambda: now[0])
    book.cost = 10.0  # the last assembly took 10 s: a time-triggered one waits 20 x 10 s, not 60 s
    for t in (30.0, 100.0, 199.0, 201.0, 230.0):
        now[0] = t
        book.finished(job(int(t)), part)
    assert calls == [201.0]


def test_the_records_folder_is_ours_only_while_it_holds_only_records(tmp_path):
    """--overwrite removes a records folder of shard records (stage 2 wrote it); a folder named records
    that holds anything else is a user's: refused, named, kept."""
    import pytest

    from pipeline.extract_outputs import check_paths, prepare_concept_dir
    from pipeline.extract_plan import ExtractConfig
    from shards.records import write_record

    cfg = ExtractConfig(tokens=str(tmp_path / "tokens"), teacher="t", sae="s", out=str(tmp_path / "out"))
    rec = cfg.concept_dir / "records"
    write_record(rec, "train-00000.arrow", {"x": 1})
    (rec / ".train-00001.arrow.json.tmp").write_text("{")
    check_paths(cfg)  # ours: no refusal
    (rec / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files stage 2 did not write \(records\)"):
        check_paths(cfg)
    (rec / "notes.txt").unlink()
    cfg.overwrite = True
    prepare_concept_dir(cfg, {"a": 1})
    assert sorted(p.name for p in cfg.concept_dir.iterdir()) == ["extraction.json"]

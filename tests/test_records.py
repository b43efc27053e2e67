"""shards/records.py: one atomic JSON record per finished unit of work."""

from __future__ import annotations

import pytest

from shards.records import read_records, remove_records, write_record


def test_records_round_trip_in_key_order_and_same_bytes(tmp_path):
    d = tmp_path / "rec"
    assert read_records(d) == {}
    write_record(d, "b-00001", {"x": 2, "a": [1, 2]})
    p = write_record(d, "a-00000", {"x": 1})
    first = p.read_bytes()
    write_record(d, "a-00000", {"x": 1})
    assert p.read_bytes() == first  # sorted keys, no timestamps: a rerun writes the same bytes
    assert list(read_records(d)) == ["a-00000", "b-00001"]
    assert read_records(d)["b-00001"] == {"a": [1, 2], "x": 2}


def test_a_truncated_record_is_not_trusted(tmp_path):
    d = tmp_path / "rec"
    write_record(d, "ok", {"x": 1})
    (d / "torn.json").write_text('{"x": ')
    (d / ".ok.json.tmp").write_text("{}")
    assert list(read_records(d)) == ["ok"]


@pytest.mark.parametrize("key", ["", "../x", ".hidden", "a/b", "x" * 201])
def test_bad_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="record key"):
        write_record(tmp_path, key, {})


def test_remove_records_keeps_a_users_file(tmp_path):
    d = tmp_path / "rec"
    write_record(d, "a", {})
    (d / "notes.txt").write_text("mine")
    remove_records(d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    (d / "notes.txt").unlink()
    remove_records(d)
    assert not d.exists()

"""The shard store: Arrow / Zarr round trips, zero-copy reads, checksums, manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from shards import FieldSpec, Manifest, load_manifest, open_split, write_shard
from shards.arrow_store import ArrowShard
from shards.zarr_store import ZarrShard

T, K = 16, 4
FIELDS = {
    "tokens": FieldSpec("uint16", (T + 1,)),
    "concept_ids": FieldSpec("uint16", (T, K)),
    "concept_scores": FieldSpec("float16", (T, K)),
}
PARTS = {"tokens": "tokens", "concept_ids": "concepts", "concept_scores": "concepts"}
TOKENIZER = {"name": "t", "fingerprint": "sha256:0", "vocab_size": 1000, "eos_id": 0}


def random_windows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, 1000, (n, T + 1)).astype(np.uint16),
        "concept_ids": rng.integers(0, 4096, (n, T, K)).astype(np.uint16),
        "concept_scores": rng.standard_normal((n, T, K)).astype(np.float16),
    }


def build(tmp: Path, fmt: str, sizes=(37, 5), compression: str | None = None, chunk: int = 8) -> tuple[Manifest, dict]:
    m = Manifest(kind="tokens", seq_len=T, tokenizer=TOKENIZER, fields=FIELDS, field_parts=PARTS)
    allw = {k: [] for k in FIELDS}
    for k, n in enumerate(sizes):
        w = random_windows(n, seed=k)
        parts = {}
        for part in ("tokens", "concepts"):
            pf = m.part_fields(part)
            parts[part] = write_shard(tmp / f"{part}-{k}.{fmt}", pf, {f: w[f] for f in pf}, fmt,
                                      zarr_chunk_windows=chunk, zarr_compression=compression)
        m.add_shard("train", n, parts)
        for f in FIELDS:
            allw[f].append(w[f])
    m.save(tmp / "manifest.json")
    return m, {f: np.concatenate(v) for f, v in allw.items()}


@pytest.mark.parametrize("fmt,compression", [("arrow", None), ("zarr", None), ("zarr", "zstd")])
def test_round_trip_every_window(tmp_path, fmt, compression):
    _, expected = build(tmp_path, fmt, compression=compression)
    ds = open_split(load_manifest(tmp_path / "manifest.json"), "train", verify="open")
    assert len(ds) == 42
    for i in range(len(ds)):
        w = ds[i]
        for f in FIELDS:
            np.testing.assert_array_equal(w[f], expected[f][i])
            assert w[f].dtype == FIELDS[f].storage_dtype
    batch = ds.get_batch([0, 41, 36, 37])
    np.testing.assert_array_equal(batch["concept_ids"], expected["concept_ids"][[0, 41, 36, 37]])


def test_arrow_and_zarr_give_identical_arrays(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "z").mkdir()
    build(tmp_path / "a", "arrow")
    build(tmp_path / "z", "zarr", chunk=3)
    a = open_split(load_manifest(tmp_path / "a/manifest.json"), "train")
    z = open_split(load_manifest(tmp_path / "z/manifest.json"), "train")
    for i in range(len(a)):
        for f in FIELDS:
            np.testing.assert_array_equal(a[i][f], z[i][f])


def test_arrow_reads_are_zero_copy(tmp_path):
    w = random_windows(64)
    write_shard(tmp_path / "s.arrow", FIELDS, w, "arrow")
    shard = ArrowShard(tmp_path / "s.arrow")
    before = pa.total_allocated_bytes()
    views = [shard[i] for i in range(64)]
    assert pa.total_allocated_bytes() == before  # Arrow allocated nothing: the data stays in the map
    for v in views:
        for arr in v.values():
            assert not arr.flags.owndata and not arr.flags.writeable  # a view into the read-only map
    whole = shard.arrays()["tokens"]
    # The window view and the whole-shard array share the mapped bytes.
    assert np.shares_memory(whole, views[3]["tokens"])
    np.testing.assert_array_equal(whole, w["tokens"])


def test_uncompressed_zarr_window_reads_bypass_zarr_python(tmp_path, monkeypatch):
    w = random_windows(20)
    write_shard(tmp_path / "s.zarr", FIELDS, w, "zarr", zarr_chunk_windows=6)
    import zarr

    def boom(*a, **k):
        raise AssertionError("zarr-python called on the per-window path")

    monkeypatch.setattr(zarr, "open_group", boom)
    monkeypatch.setattr(zarr, "open_array", boom)
    shard = ZarrShard(tmp_path / "s.zarr")
    for i in range(20):
        np.testing.assert_array_equal(shard[i]["concept_scores"], w["concept_scores"][i])
        assert not shard[i]["tokens"].flags.owndata and not shard[i]["tokens"].flags.writeable


def test_compressed_zarr_is_decompressed_once_per_shard(tmp_path, monkeypatch):
    w = random_windows(20)
    write_shard(tmp_path / "s.zarr", FIELDS, w, "zarr", zarr_chunk_windows=6, zarr_compression="zstd")
    import zarr

    calls = []
    real = zarr.open_group
    monkeypatch.setattr(zarr, "open_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    shard = ZarrShard(tmp_path / "s.zarr")
    for i in range(20):
        np.testing.assert_array_equal(shard[i]["tokens"], w["tokens"][i])
    assert len(calls) == 1


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_shard_is_named(tmp_path, fmt, damage):
    m, _ = build(tmp_path, fmt)
    part = m.splits["train"].shards[1].parts["concepts"]
    target = part.path if part.path.is_file() else sorted(
        p for p in part.path.rglob("*") if p.is_file() and p.name == "0")[0]
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    m2 = load_manifest(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match=rf"{part.path.name}.*(corrupted|checksum)"):
        open_split(m2, "train", verify="open")
    ds = open_split(m2, "train", verify="lazy")
    ds[0]  # shard 0 is intact and readable
    with pytest.raises(ValueError, match=part.path.name):
        ds[40]


def test_manifest_paths_are_relative_and_survive_a_move(tmp_path):
    build(tmp_path / "a", "arrow")
    raw = json.loads((tmp_path / "a/manifest.json").read_text())
    for sh in raw["splits"]["train"]["shards"]:
        for p in sh["parts"].values():
            assert not Path(p["path"]).is_absolute()
    shutil.move(tmp_path / "a", tmp_path / "b")
    ds = open_split(load_manifest(tmp_path / "b"), "train", verify="open")
    assert len(ds) == 42


def _valid_json(tmp_path) -> dict:
    build(tmp_path, "arrow")
    return json.loads((tmp_path / "manifest.json").read_text())


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(schema="cocomix.manifest/99"), "newer than this code"),
        (lambda d: d.update(schema="other/1"), "schema"),
        (lambda d: d.pop("tokenizer"), "tokenizer"),
        (lambda d: d["tokenizer"].pop("vocab_size"), "tokenizer.vocab_size"),
        (lambda d: d.update(seq_len=0), "seq_len"),
        (lambda d: d["fields"]["tokens"].update(shape=[5]), "fields.tokens.shape"),
        (lambda d: d["fields"]["concept_ids"].update(dtype="int8"), "fields.concept_ids"),
        (lambda d: d["splits"]["train"].update(windows=1), "splits.train.windows"),
        (lambda d: d["splits"]["train"]["shards"][0]["parts"].pop("concepts"), r"shards\[0\].parts"),
        (lambda d: d["splits"]["train"]["shards"][0]["parts"]["tokens"].update(path="/abs/x"), "relative"),
        (lambda d: d["splits"]["train"]["shards"][0]["parts"]["tokens"].update(format="csv"), "format"),
        (lambda d: d.update(kind="concepts"), "teacher"),
    ],
)
def test_manifest_validation_names_the_field(tmp_path, mutate, message):
    d = _valid_json(tmp_path)
    mutate(d)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        load_manifest(tmp_path / "bad.json")


def test_manifest_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_manifest(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path / "x.json")


def test_missing_shard_and_wrong_fields(tmp_path):
    m, _ = build(tmp_path, "arrow")
    m.splits["train"].shards[0].parts["tokens"].path.unlink()
    with pytest.raises(ValueError, match="missing"):
        open_split(load_manifest(tmp_path / "manifest.json"), "train", verify="open")
    # Lazy verification still finds a missing file when the split is opened, before any window is read.
    with pytest.raises(ValueError, match=r"1 shard file\(s\) of split 'train' missing, first .*tokens"):
        open_split(load_manifest(tmp_path / "manifest.json"), "train")
    with pytest.raises(ValueError, match="no split"):
        open_split(m, "val")
    with pytest.raises(ValueError, match="no field"):
        open_split(m, "train", fields=["kd_ids"])
    # A shard whose stored fields differ from what the reader expects.
    with pytest.raises(ValueError, match="field 'tokens'"):
        ArrowShard(m.splits["train"].shards[1].parts["concepts"].path, {"tokens": FIELDS["tokens"]})


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_streaming_writer_bytes_do_not_depend_on_append_sizes(tmp_path, fmt):
    from shards import PartWriter, checksum

    w = random_windows(50)
    sums = []
    for j, sizes in enumerate([(50,), (1, 20, 29), (7,) * 7 + (1,)]):
        writer = PartWriter(tmp_path / f"s{j}.{fmt}", FIELDS, 50, format=fmt, rows_per_batch=16, zarr_chunk_windows=4)
        start = 0
        for n in sizes:
            writer.append({k: v[start : start + n] for k, v in w.items()})
            start += n
        part = writer.close()
        sums.append(part.checksum)
        assert part.checksum == checksum(part.path)
    assert sums[0] == sums[1] == sums[2]
    m = Manifest(kind="tokens", seq_len=T, tokenizer=TOKENIZER, fields=FIELDS, field_parts={k: "all" for k in FIELDS})
    m.add_shard("train", 50, {"all": part})
    ds = open_split(m, "train")
    idx = [49, 0, 16, 15, 33, 33]
    batch = ds.get_batch(idx)  # several record batches: grouped fancy indexing
    for f in FIELDS:
        np.testing.assert_array_equal(batch[f], w[f][idx])
        np.testing.assert_array_equal(ds[17][f], w[f][17])
    with pytest.raises(ValueError, match="announced"):
        bad = PartWriter(tmp_path / f"bad.{fmt}", FIELDS, 3, format=fmt)
        bad.append({k: v[:2] for k, v in w.items()})
        bad.close()
    assert not list(tmp_path.glob(".bad*"))  # the temporary output is gone


# -- manifests and splits of 10,000+ shards (issue 14; bench/manifest.py measures the costs) ----------


def _many_shards(tmp: Path, n: int) -> Path:
    """A manifest of ``n`` one-window shards; every shard file is a hard link to one of two real
    shards (identical bytes, so one checksum each), which makes 10,000 shards take a second to build."""
    w = random_windows(1)
    m = Manifest(kind="tokens", seq_len=T, tokenizer=TOKENIZER, fields=FIELDS, field_parts=PARTS)
    src = {p: write_shard(tmp / f"src-{p}.arrow", m.part_fields(p), {f: w[f] for f in m.part_fields(p)})
           for p in ("tokens", "concepts")}
    for p in src:
        (tmp / p).mkdir()
    for i in range(n):
        parts = {}
        for p, part in src.items():
            path = tmp / p / f"train-{i:05d}.arrow"
            path.hardlink_to(part.path)
            parts[p] = type(part)(path=path, format="arrow", checksum=part.checksum, bytes=part.bytes)
        m.add_shard("train", 1, parts)
    return m.save(tmp / "manifest.json")


def test_a_10k_shard_split_opens_no_shard_before_a_window_is_read(tmp_path, monkeypatch):
    import shards.dataset as dataset

    path = _many_shards(tmp_path, 10_000)
    m = load_manifest(path)
    assert len(m.splits["train"].shards) == 10_000
    assert m.splits["train"].shards[9_999].parts["concepts"].path == (tmp_path / "concepts" / "train-09999.arrow")
    opened, hashed = [], []
    real_open, real_verify = dataset.open_shard, dataset.verify_part
    monkeypatch.setattr(dataset, "open_shard", lambda p, *a: opened.append(p) or real_open(p, *a))
    monkeypatch.setattr(dataset, "verify_part", lambda part: hashed.append(part.path) or real_verify(part))
    ds = open_split(m, "train", max_open=3)
    assert len(ds) == 10_000 and ds.open_shards == 0 and not opened and not hashed
    for i in (0, 4_321, 9_999, 17):
        assert ds[i]["tokens"].shape == (T + 1,)
    assert ds.locate(4_321) == (4_321, 0)
    assert [p.name for p in opened[::2]] == ["train-00000.arrow", "train-04321.arrow", "train-09999.arrow",
                                             "train-00017.arrow"]
    assert len(hashed) == 8 and ds.open_shards == 3  # two parts per shard; at most max_open open
    batch = ds.get_batch([0, 1, 2, 3, 9_998])
    assert batch["concept_ids"].shape == (5, T, K) and ds.open_shards == 3
    assert len(hashed) == 2 * 8  # shard 0 was closed (least recently used) and reopened, not hashed again


def test_lazy_verification_with_eviction(tmp_path):
    """A shard's checksum is checked before its data is first used, once: an evicted, reopened shard is
    not hashed again, and a damaged one fails when it is first read, naming the file."""
    build(tmp_path, "arrow", sizes=(3, 4, 5))
    m = load_manifest(tmp_path / "manifest.json")
    bad = m.splits["train"].shards[1].parts["concepts"].path
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a value, not the footer: readable, only the checksum tells
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="concepts-1.arrow.* is corrupted"):
        open_split(m, "train", verify="open")
    ds = open_split(m, "train", verify="lazy", max_open=1)
    assert ds[0]["tokens"].shape == (T + 1,) and ds[11]["tokens"].shape == (T + 1,)
    assert ds.open_shards == 1
    with pytest.raises(ValueError, match="concepts-1.arrow.* is corrupted"):
        ds[3]
    with pytest.raises(ValueError, match="concepts-1.arrow.* is corrupted"):
        ds.get_batch([0, 4])
    only_tokens = open_split(m, "train", verify="lazy", fields=["tokens"], max_open=1)
    assert only_tokens[4]["tokens"].shape == (T + 1,)  # a part this dataset does not read is not checked
    assert open_split(m, "train", verify="none")[4]["concept_ids"].shape == (T, K)
    with pytest.raises(ValueError, match="max_open must be >= 1"):
        open_split(m, "train", max_open=0)


def test_part_paths_resolve_their_folder_once(tmp_path):
    """Each folder of a manifest is resolved (symlinks followed) and the file name kept as written."""
    build(tmp_path / "real", "arrow", sizes=(2, 3))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    m = load_manifest(tmp_path / "link" / "manifest.json")
    assert [sh.parts["tokens"].path for sh in m.splits["train"].shards] == [
        (tmp_path / "real" / "tokens-0.arrow").resolve(), (tmp_path / "real" / "tokens-1.arrow").resolve()]
    nested = tmp_path / "nested"
    nested.mkdir()
    m.save(nested / "m.json")  # relative paths climb out of nested/ and back into real/
    data = json.loads((nested / "m.json").read_text())
    assert data["splits"]["train"]["shards"][1]["parts"]["concepts"]["path"] == "../real/concepts-1.arrow"
    assert open_split(load_manifest(nested / "m.json"), "train", verify="open")[4]["tokens"].shape == (T + 1,)


def test_manifest_text_is_json_dumps_indent_2(tmp_path):
    """Manifest.save renders shard lists from templates (shards.manifest.dumps): the same text as
    json.dumps(indent=2), for any split, an empty one, non-ASCII names and entries of another shape."""
    from shards.manifest import dumps

    m, _ = build(tmp_path, "zarr", sizes=(2, 3))
    shard = m.splits["train"].shards[0]
    (tmp_path / "é 1").mkdir()
    shard.parts["tokens"].path = tmp_path / "é 1" / 'x"y.zarr'
    m.add_shard("val", 2, shard.parts)
    m.splits["empty"] = type(m.splits["train"])()
    data = m.to_json(tmp_path)
    assert dumps(data) == json.dumps(data, indent=2)
    assert '"\\u00e9 1/x\\"y.zarr"' in dumps(data)
    data["splits"]["val"]["shards"][0]["note"] = {"a": [1, 2]}  # not the usual shape: json writes it all
    assert dumps(data) == json.dumps(data, indent=2)
    assert dumps({"splits": {}}) == json.dumps({"splits": {}}, indent=2)

"""Run once, resume always: byte-identical output whatever the batch size, worker count or crash."""

from __future__ import annotations

import pytest

from pipeline.extract import run
from shards import load_manifest, open_split
from shards.runlog import read_runs
from tests.helpers import all_bytes, extract_config

pytestmark = pytest.mark.usefixtures("ray_local")


def test_independent_of_batch_size_and_workers(stage2_data, tiny_teacher_dir, stage2_reference):
    cfg = extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / "two"), batch_size=1, num_workers=2)
    run(cfg)
    assert read_runs(cfg.concept_dir)[-1]["throughput"]["num_workers"] == 2
    assert all_bytes(cfg.concept_dir) == stage2_reference and len(stage2_reference) >= 5


def test_zarr_holds_the_same_records(stage2_data, tiny_teacher_dir, stage2_reference):
    z = run(extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / "zarr"), format="zarr", batch_size=7))
    a = load_manifest(stage2_data / "ref" / "concepts.json")
    for split in ("train", "val"):
        dz, da = open_split(z, split, verify="open"), open_split(a, split)
        bz, ba = dz.get_batch(range(len(dz))), da.get_batch(range(len(da)))
        assert all(bz[k].tobytes() == ba[k].tobytes() for k in ba)


def test_resume_after_a_crash_redoes_only_what_is_missing(stage2_data, tiny_teacher_dir, stage2_reference):
    cfg = extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / "crash"), batch_size=3)
    run(cfg)
    # Rebuild the state a crash leaves: the manifest lists only the first two train shards; shard 2 was
    # renamed into place but never recorded; shard 3 was never written; a listed shard is corrupted;
    # a temporary file is left behind.
    m = load_manifest(cfg.manifest_path)
    train = m.splits["train"]
    kept = train.shards[:2]
    train.shards, train.windows = kept, sum(s.windows for s in kept)
    train.tokens = train.windows * m.seq_len
    m.stats = {"complete": False}
    m.save(cfg.manifest_path)
    (cfg.concept_dir / "train-00003.arrow").unlink()
    corrupt = cfg.concept_dir / "val-00000.arrow"
    blob = bytearray(corrupt.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(blob))
    (cfg.concept_dir / ".train-00004.arrow.tmp-deadbeef").write_bytes(b"partial")

    m2 = run(cfg)
    assert all_bytes(cfg.concept_dir) == stage2_reference
    assert not list(cfg.concept_dir.glob(".*tmp*"))
    full = load_manifest(stage2_data / "ref" / "concepts.json")
    redo = full.splits["train"].windows - sum(s.windows for s in kept) + full.splits["val"].shards[0].windows
    assert read_runs(cfg.concept_dir)[-1]["throughput"]["tokens"] == redo * m.seq_len
    assert m2.stats["complete"] and m2.stats["labels"] == full.stats["labels"]


# -- progress records (pipeline/extract_progress.py): resume from them, the same manifest bytes ------------


def _cut_to_records(cfg, ref_out, keep: int) -> list:
    """The state a kill leaves mid-run: OUT copied from a finished run, the manifest cut back to its first
    checkpoint (no shard listed, complete false) and one record per shard for the first ``keep`` shards.
    Returns the shards in manifest order, as (split, Shard)."""
    import json
    import shutil
    from pathlib import Path

    from pipeline.extract_progress import settings_digest
    from shards.records import write_record

    shutil.copytree(ref_out, cfg.out)
    (cfg.concept_dir / "runs.jsonl").unlink(missing_ok=True)
    m = load_manifest(cfg.manifest_path)
    shards = [(name, sh) for name, s in m.splits.items() for sh in s.shards]
    digest = settings_digest(json.loads((cfg.concept_dir / "extraction.json").read_text()))
    for split, sh in shards[:keep]:
        c = sh.parts["concepts"]
        write_record(cfg.concept_dir / "records", Path(c.path).name,
                     {"split": split, "windows": sh.windows, "tokens_checksum": sh.parts["tokens"].checksum,
                      "settings": digest, "format": c.format, "checksum": c.checksum, "bytes": c.bytes})
    for s in m.splits.values():
        s.shards, s.windows, s.tokens = [], 0, 0
    m.stats = {"complete": False}
    m.save(cfg.manifest_path)
    return shards


def test_resume_from_records(stage2_data, tiny_teacher_dir, stage2_reference):
    """Records say which shards are done: a recorded shard whose checksum still holds is kept, one whose
    file was damaged is redone, a torn record or one of other settings counts for nothing, a shard on disk
    with no record is redone; the manifest comes out as the bytes of an uninterrupted run and the records
    folder is gone."""
    cfg = extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / "records"), batch_size=2)
    shards = _cut_to_records(cfg, stage2_data / "ref", keep=4)
    assert len(shards) >= 6
    rec = cfg.concept_dir / "records"
    names = [sh.parts["concepts"].path.name for _, sh in shards]
    damaged = cfg.concept_dir / names[0]
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    (rec / f"{names[1]}.json").write_text('{"split": "tr')  # torn by a copy tool
    other = rec / f"{names[2]}.json"
    other.write_text(other.read_text().replace('"settings":"sha256:', '"settings":"sha256:0'))
    (rec / f".{names[4]}.json.tmp").write_text("{")  # a record write killed half way

    m = run(cfg)
    assert cfg.manifest_path.read_bytes() == (stage2_data / "ref" / "concepts.json").read_bytes()
    assert all_bytes(cfg.concept_dir) == stage2_reference
    assert not rec.exists() and m.stats["complete"]
    last = read_runs(cfg.concept_dir)[-1]
    assert last["shards"]["verified"] == 1  # only names[3]: 0 damaged, 1 torn, 2 other settings, 4+ unrecorded
    assert sorted(s["shard"].rsplit("/", 1)[-1] for s in last["per_shard"]) == sorted(names[:3] + names[4:])


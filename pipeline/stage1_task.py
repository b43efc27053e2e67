"""Stage 1's unit of work: one task of the partition (common/partition.py), run by a Ray worker or, with
``--in-process``, by the driver itself; the same function either way.

A task reads its ranges, tokenizes (the tokenizer is built once per worker process and cached),
routes each document to train or val (``in_val`` on its id, or by the corpus it came from), packs its
own train windows into shards named after the task (``train-<task>-<k>.arrow``) and stores its val
documents' tokens as a small stream file (``stage1-tasks/t<task>.val``), which the driver packs into the
val split at the end, in task order: val windows do not depend on the partition and no val tail is
dropped per task. Last, it writes its record (shards/records.py): the shards with their checksums,
the counts, and a digest of its documents for the corpus fingerprint. A task whose record is there
and whose files verify is not run again (resume after a kill).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.corpus import CorpusStats
from common.partition import Task, iter_task
from pipeline.stage1_config import TokenizeConfig, in_val
from pipeline.stage1_encode import Encoder
from pipeline.stage1_pack import Packer, shard_ext, write_token_shard
from shards import FieldSpec, ShardPart, verify_part
from shards.atomic import fsync_path
from shards.checksum import checksum
from shards.records import write_record

log = logging.getLogger("pipeline.stage1")  # one logger name for all of stage 1's modules

TASKS_DIR = "stage1-tasks"
"""Folder of --out holding the task records and val streams of an unfinished run (removed at the end)."""
_DIGEST_MOD = 1 << 256


def task_key(index: int) -> str:
    return f"t{index:06d}"


def train_shard_name(index: int, k: int, ext: str) -> str:
    return f"train-{index:06d}-{k:05d}.{ext}"


def val_stream_name(index: int) -> str:
    return f"{task_key(index)}.val"


@dataclass
class TaskContext:
    """What every task of a run shares (shipped once to the cluster)."""

    cfg: TokenizeConfig
    out: str
    """Absolute --out."""
    spec: FieldSpec
    """The tokens field: dtype and (seq_len + 1,)."""
    windows_per_shard: int
    eos: int
    tokenizer_key: str
    """The tokenizer's fingerprint: the key of the per-process encoder cache."""


_encoders: dict[str, Encoder] = {}


def encoder_for(ctx: TaskContext, payload: Callable[[], tuple[str, object]]) -> Encoder:
    """The tokenizer, built once per worker process (``payload`` is fetched only on the first task)."""
    enc = _encoders.get(ctx.tokenizer_key)
    if enc is None:
        enc = _encoders[ctx.tokenizer_key] = Encoder(payload())
    return enc


def add_digests(digests: list[str]) -> str:
    """Documents' digests combined: the sum of their sha256 values mod 2**256. Each document's hash
    covers its id (which fixes its place in the corpus) and text, so the sum identifies the corpus
    whatever the partition, and tasks combine theirs without seeing each other's."""
    return f"{sum(int(d, 16) for d in digests) % _DIGEST_MOD:064x}"


def verified(ctx: TaskContext, task: Task, rec: dict | None) -> bool:
    """Whether ``rec`` is this task's record and every file it lists is there with its checksum."""
    if rec is None or rec.get("task") != task.to_json():
        return False
    out = Path(ctx.out)
    try:
        for sh in rec["shards"]:
            verify_part(ShardPart(out / sh["name"], ctx.cfg.format, sh["checksum"], sh["bytes"]))
        v = rec["val"]
        if v["file"] is not None and checksum(out / TASKS_DIR / v["file"]) != v["checksum"]:
            raise ValueError(f"{v['file']}: checksum mismatch")
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("task %d: its files do not verify (%s); running it again", task.index, e)
        return False
    return True


class _ValStream:
    """A task's val tokens (EOS included), appended to a temporary file renamed into place at the end."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.f = None
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray, eos: int | None) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.tmp, "wb")
        if eos is not None:
            ids = np.append(ids, eos)
            self.documents += 1
        self.f.write(ids.astype(self.dtype).tobytes())
        self.tokens += len(ids)

    def close(self) -> dict[str, Any]:
        if self.f is None:
            return {"file": None, "tokens": 0, "documents": 0, "checksum": None}
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        return {"file": self.path.name, "tokens": self.tokens, "documents": self.documents,
                "checksum": checksum(self.path)}

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.tmp.unlink(missing_ok=True)


def run_task(ctx: TaskContext, task: Task, previous: dict | None,
             payload: Callable[[], tuple[str, object]]) -> tuple[dict, bool]:
    """Run ``task`` unless ``previous`` (its record from an earlier run) verifies; returns (record,
    reused). Errors a user can fix are ``ValueError`` naming the file."""
    if verified(ctx, task, previous):
        return previous, True
    cfg, out = ctx.cfg, Path(ctx.out)
    enc = encoder_for(ctx, payload)
    dtype = ctx.spec.storage_dtype
    ext = shard_ext(cfg)
    shards: list[dict[str, Any]] = []

    def write_train(windows: np.ndarray) -> None:
        name = train_shard_name(task.index, len(shards), ext)
        part = write_token_shard(out / name, ctx.spec, windows, cfg)
        shards.append({"name": name, "windows": len(windows), "checksum": part.checksum, "bytes": part.bytes})

    train = Packer(cfg.seq_len, dtype, ctx.windows_per_shard, write_train)
    val = _ValStream(out / TASKS_DIR / val_stream_name(task.index), dtype)
    # None: by the hash of the id; else every document of this task goes to that split.
    route = "val" if task.role == "val" else ("train" if cfg.val_corpus else None)
    tag = b"val\0" if task.role == "val" else b""  # moving a file between roles changes the fingerprint
    stats = CorpusStats()
    digest = 0
    doc_hash: Any = None

    def consume(batch: list) -> None:
        nonlocal digest, doc_hash
        for piece, ids in zip(batch, enc.encode([p.text for p in batch]), strict=True):
            if doc_hash is None:
                doc_hash = hashlib.sha256(tag + piece.doc_id.encode() + b"\0")
            doc_hash.update(piece.text.encode() + (b"\0" if piece.last else b""))
            split = route or ("val" if in_val(piece.doc_id, cfg.seed, cfg.val_fraction) else "train")
            (train if split == "train" else val).add(ids, ctx.eos if piece.last else None)
            if piece.last:
                digest = (digest + int.from_bytes(doc_hash.digest(), "big")) % _DIGEST_MOD
                doc_hash = None

    corpus_cfg = cfg.corpus_config()
    try:
        batch: list = []
        chars = 0
        for piece in iter_task(task, corpus_cfg, stats):
            batch.append(piece)
            chars += len(piece.text)
            if chars >= cfg.batch_chars:
                consume(batch)
                batch, chars = [], 0
        if batch:
            consume(batch)
        train.finish()
        val_rec = val.close()
    except BaseException:
        val.abort()
        raise
    counts = stats.to_json()
    counts.pop("files")
    record = {
        "task": task.to_json(),
        "shards": shards,
        "train": {"documents": train.documents, "stream_tokens": train.stream_tokens, "windows": train.windows,
                  "tail_tokens": train.tail_tokens},
        "val": val_rec,
        "corpus": counts,
        "digest": f"{digest:064x}",
    }
    try:
        write_record(out / TASKS_DIR, task_key(task.index), record)
    except OSError as e:
        raise ValueError(f"could not write the record of task {task.index} in {str(out / TASKS_DIR)!r}: {e.strerror}; "
                         "free space and rerun the same command") from e
    return record, False


def run_remote(ctx: TaskContext, payload_box: list, task: Task, previous: dict | None) -> tuple[dict, bool]:
    """:func:`run_task` in a Ray worker; ``payload_box`` holds the tokenizer's object ref, inside a
    list so that Ray does not fetch it for every task (only the first task of a process does)."""
    import ray

    return run_task(ctx, task, previous, lambda: ray.get(payload_box[0]))

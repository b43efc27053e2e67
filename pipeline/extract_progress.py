"""Stage 2's progress: one record per finished concept shard, and the manifest assembled from them.

A manifest rewritten after every shard costs O(n^2) bytes over a run of n shards (issue 14; tens of
GB at 10,000 shards). Instead, each finished shard is recorded once, in
``OUT/concepts/NAME/records/<shard file name>.json`` (shards/records.py: atomic, never rewritten), and
the manifest (``stats.complete`` false) is assembled from every finished shard at checkpoints:

- after every ``ceil(n / CHECKPOINTS)`` finished shards of a run of n (after each shard for a run of
  up to 32 shards, as before), or
- when ``CHECKPOINT_S`` seconds passed since the last checkpoint, but never more often than
  ``COST_FACTOR`` times the last assembly's own cost,

so the bookkeeping per shard (a record write and a 1/ceil(n/32) share of an O(n) assembly) does not
grow with n (``python bench/manifest.py`` measures it at 100 and 10,000 shards). When the last shard
is in, the complete manifest is written and the records folder removed: a finished extraction is
its manifest. A rerun (pipeline/extract_plan.py ``finished_shards``) trusts a shard listed by a
record or by the manifest only after its checksum holds again (docs/data.md, "The manifest").
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.extract_worker import ShardJob
from shards import ShardPart
from shards.records import write_record

CHECKPOINTS = 32
"""Manifest assemblies per run by shard count (each costs O(n): 32 of them cost O(32 n) in all)."""
CHECKPOINT_S = 600.0
"""Also assemble after this many seconds with new shards (the manifest shows progress to a reader)."""
COST_FACTOR = 20.0
"""A time-triggered checkpoint waits at least this many times the last assembly's cost (<= 5 %)."""


def settings_digest(settings: dict) -> str:
    """Short digest of Plan.settings, stored in each record: a record of another extraction is ignored."""
    return "sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def record_key(job: ShardJob) -> str:
    """A job's record name: its concept shard's file name (``train-00003.arrow``)."""
    return Path(job.out).name


def shard_record(job: ShardJob, part: ShardPart, digest: str) -> dict[str, Any]:
    """What a record holds: enough to rebuild the manifest entry and to check that it still applies."""
    return {"split": job.split, "windows": job.windows, "tokens_checksum": job.tokens.checksum, "settings": digest,
            "format": part.format, "checksum": part.checksum, "bytes": part.bytes}


def part_from_record(job: ShardJob, rec: dict[str, Any], digest: str) -> ShardPart | None:
    """The concept part a record says ``job`` produced, or None when the record is of another job
    (other settings, token shard, window count or format) or malformed."""
    try:
        same = (rec["settings"] == digest and rec["split"] == job.split and rec["windows"] == job.windows
                and rec["tokens_checksum"] == job.tokens.checksum and rec["format"] == job.format)
        if not same or not isinstance(rec["checksum"], str) or not isinstance(rec["bytes"], int):
            return None
        return ShardPart(path=Path(job.out), format=rec["format"], checksum=rec["checksum"], bytes=rec["bytes"])
    except (KeyError, TypeError):
        return None


class Bookkeeper:
    """Records each finished shard and assembles the manifest (``save``) at checkpoints."""

    def __init__(self, folder: Path, digest: str, total: int, save: Callable[[], Any],
                 every_s: float = CHECKPOINT_S, clock: Callable[[], float] = time.perf_counter) -> None:
        self.folder, self.digest, self.save, self.every_s, self.clock = folder, digest, save, every_s, clock
        self.every = max(1, math.ceil(total / CHECKPOINTS))
        """Finished shards between two assemblies."""
        self.pending = 0
        """Shards recorded since the last assembly."""
        self.last = clock()
        self.cost = 0.0
        """Seconds the last assembly took."""
        self.checkpoints = 0

    def finished(self, job: ShardJob, part: ShardPart) -> None:
        """Record one finished shard (written once, atomically) and assemble the manifest when due."""
        write_record(self.folder, record_key(job), shard_record(job, part, self.digest))
        self.pending += 1
        if self.due():
            self.checkpoint()

    def due(self) -> bool:
        if self.pending >= self.every:
            return True
        return self.pending > 0 and self.clock() - self.last >= max(self.every_s, COST_FACTOR * self.cost)

    def checkpoint(self) -> None:
        """Assemble the manifest from every finished shard now."""
        t = self.clock()
        self.save()
        self.last = self.clock()
        self.cost = self.last - t
        self.pending = 0
        self.checkpoints += 1

"""A corpus cut into tasks that depend on the input only, never on the number of workers.

Stage 1 runs one independent task per entry of this plan (pipeline/stage1_task.py): each reads its
ranges, tokenizes, packs and writes its own shards. So that the bytes written do not depend on the
cluster, the plan is a function of the corpus files and ``task_bytes`` alone:

- a text or JSONL file larger than ``task_bytes`` is cut into fixed byte ranges ``[k * task_bytes,
  (k + 1) * task_bytes)``; the readers (common/corpus.py ``read_range``) move each cut to the next
  document boundary, so every document belongs to exactly one range (the one where it starts, even
  when it is longer than a range);
- a Parquet file is cut into its row groups (sizes from the file's metadata);
- consecutive smaller pieces (files, the last range of a big file, row groups) are grouped into one
  task until the next would take it past ``task_bytes``;
- a text file read with ``--doc-per-file`` is one document, so one piece; a HF dataset (saved or
  hub-streamed) cannot be cut by bytes and is one task of its own.

Planning asks the store as little as it can: file sizes come with the listing of a prefix or a glob
(common/corpus_sources.py ``sized_sources``), and the one lookup left per file, a Parquet footer, runs
for all files on threads (common/storage.py ``map_ordered``) with results in input order, so the plan
of 10,000 objects costs the listing plus one round of concurrent footer reads, and is the same plan a
serial walk gives (tests/test_storage.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from common.corpus import CorpusConfig, CorpusStats, Piece, read_range
from common.corpus_sources import open_parquet, sized_sources, source_size
from common.storage import map_ordered


@dataclass(frozen=True)
class Range:
    """A slice of one corpus source: bytes [start, end) of a text / JSONL file, row groups [start,
    end) of a Parquet file, or a whole HF dataset (0, None). ``end`` None: to the end of the source."""

    kind: str
    location: str
    source: str
    start: int = 0
    end: int | None = None
    size: int | None = None
    """Bytes of the whole source file when planned: a file changed since is another plan (a resumed
    run does not trust the records of its tasks)."""

    def to_json(self) -> list:
        return [self.source, self.start, self.end, self.size]


@dataclass
class Task:
    """One unit of stage-1 work: consecutive ranges of the corpus, in corpus order."""

    index: int
    """Position in the plan: shard names and the manifest's shard order follow it."""
    role: str
    """``corpus`` (documents routed by the hash of their id) or ``val`` (all of --val-corpus's)."""
    ranges: list[Range] = field(default_factory=list)
    bytes: int = 0
    """Bytes of input (text / JSONL bytes, Parquet row groups' uncompressed size): for progress."""

    def to_json(self) -> dict:
        """What identifies the task in its record: a record of another plan is not this task's."""
        return {"index": self.index, "role": self.role, "ranges": [r.to_json() for r in self.ranges]}


@dataclass
class _Unit:
    range: Range
    bytes: int
    alone: bool = False


def _row_group_bytes(location: str) -> list[int]:
    """Uncompressed bytes of each row group of a Parquet file, from its footer."""
    with open_parquet(location) as pf:
        meta = pf.metadata
        return [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]


def _units(cfg: CorpusConfig, task_bytes: int) -> Iterator[_Unit]:
    sources = sized_sources(cfg.paths)
    parquet = list(dict.fromkeys(loc for kind, loc, _, _ in sources if kind == "parquet"))
    groups = dict(zip(parquet, map_ordered(_row_group_bytes, parquet), strict=True))
    for kind, location, source, known in sources:
        size = known if known is not None or kind not in ("text", "jsonl", "parquet") else source_size(location)
        if kind in ("text", "jsonl") and not (kind == "text" and cfg.doc_per_file):
            n = max(1, -(-size // task_bytes))
            for k in range(n):
                end = None if k == n - 1 else (k + 1) * task_bytes
                yield _Unit(Range(kind, location, source, k * task_bytes, end, size),
                            (size if end is None else end) - k * task_bytes)
        elif kind == "text":
            yield _Unit(Range(kind, location, source, size=size), size)
        elif kind == "parquet":
            for g, nbytes in enumerate(groups[location]):
                yield _Unit(Range(kind, location, source, g, g + 1, size), nbytes)
        else:
            yield _Unit(Range(kind, location, source), 0, alone=True)


def plan(cfg: CorpusConfig, task_bytes: int, role: str = "corpus", first_index: int = 0) -> list[Task]:
    """The tasks of a corpus, in corpus order, numbered from ``first_index`` (module docstring)."""
    if task_bytes < 1:
        raise ValueError(f"task size must be positive, got {task_bytes} bytes")
    tasks: list[Task] = []
    cur: Task | None = None
    for u in _units(cfg, task_bytes):
        if cur is not None and (u.alone or cur.bytes + u.bytes > task_bytes):
            tasks.append(cur)
            cur = None
        if cur is None:
            cur = Task(first_index + len(tasks), role)
        last = cur.ranges[-1] if cur.ranges else None
        if last is not None and last.location == u.range.location and last.end == u.range.start:
            cur.ranges[-1] = Range(last.kind, last.location, last.source, last.start, u.range.end, last.size)
        else:
            cur.ranges.append(u.range)
        cur.bytes += u.bytes
        if u.alone:
            tasks.append(cur)
            cur = None
    if cur is not None:
        tasks.append(cur)
    return tasks


def sources_of(tasks: list[Task]) -> list[str]:
    """The source ids the tasks read, in order, each once (the manifest's ``corpus.files``)."""
    return list(dict.fromkeys(r.source for t in tasks for r in t.ranges))


def iter_task(task: Task, cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Piece]:
    """The task's documents, in corpus order, as pieces (common/corpus.py); counts go to ``stats``."""
    for r in task.ranges:
        yield from read_range(r.kind, r.location, r.source, cfg, stats, r.start, r.end)

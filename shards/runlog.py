"""Run logs: one JSON line per invocation of a stage (when, how long, how fast, what came out).

Manifests hold only what the shards decide, so that a rerun after a kill writes the same bytes
(README, "Safe to operate"); everything that differs between two runs of the same command, such as
wall time, throughput or the Ray mode, goes here instead: appended, never rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

RUN_LOG = "runs.jsonl"
"""The log's name inside an output directory (stage 1: OUT/, stage 2: OUT/concepts/NAME/)."""

log = logging.getLogger(__name__)


def append_run(directory: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` to ``directory``'s run log. A failure (full disk) only warns: the run's
    outcome stands, only its timings go unrecorded."""
    path = Path(directory) / RUN_LOG
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError as e:
        log.warning("could not append to %s: %s", path, e)


def read_runs(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """``directory``'s run log, oldest first; a line cut short by a kill mid-append is skipped."""
    path = Path(directory) / RUN_LOG
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs

"""One stage-2 worker (a Ray actor): a TeacherRunner, loaded once, turning token shards into concept
shards, one whole shard per call, written atomically by this worker alone (docs/architecture.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.extract_runner import BatchStats, RunnerConfig, TeacherRunner, record_fields
from shards import FieldSpec, PartWriter, ShardPart, open_shard, verify_part


@dataclass(frozen=True)
class ShardJob:
    """One token shard to turn into its concept shard."""

    key: str
    """Concept part path relative to the manifest (unique; also the progress key)."""
    split: str
    tokens: ShardPart
    """The token shard (checksum verified before use)."""
    token_spec: FieldSpec
    windows: int
    out: str
    """Absolute path of the concept part to write."""
    format: str
    seq_len: int
    batch_size: int
    zarr_chunk_windows: int = 16
    zarr_compression: str | None = None


@dataclass
class ShardResult:
    key: str
    part: ShardPart
    stats: BatchStats
    seconds: float


class ExtractWorker:
    """Heavy state (teacher + SAE) in ``__init__``; ``run_shard`` does one shard."""

    def __init__(self, cfg: RunnerConfig, threads: int | None = None, progress=None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors
        self.runner = TeacherRunner(cfg)
        self.progress = progress
        """Optional Ray actor handle with ``set(key, tokens_done)`` for the driver's progress bar."""

    def ready(self) -> str:
        """Called once after construction, so load errors surface before any shard is handed out."""
        return str(self.runner.device)

    def run_shard(self, job: ShardJob) -> ShardResult:
        import torch

        t0 = time.perf_counter()
        verify_part(job.tokens)
        reader = open_shard(job.tokens.path, job.tokens.format, {"tokens": job.token_spec})
        if len(reader) != job.windows:
            raise ValueError(f"token shard {job.tokens.path} has {len(reader)} windows, "
                             f"the manifest says {job.windows}")
        tokens = reader.arrays()["tokens"]  # (n, T+1), a view over the mapped file
        fields = record_fields(job.seq_len, self.runner.n_latents, self.runner.cfg)
        try:
            writer = PartWriter(job.out, fields, job.windows, format=job.format,
                                zarr_chunk_windows=job.zarr_chunk_windows, zarr_compression=job.zarr_compression)
        except OSError as e:
            reader.close()
            raise ValueError(f"writing concept shard {job.out}: {e.strerror or e}; free some space (or pass another "
                             "--out) and rerun the same command: finished shards are kept") from e
        stats = BatchStats()
        try:
            for s in range(0, job.windows, job.batch_size):
                try:
                    records, batch_stats = self.runner.run(np.asarray(tokens[s : s + job.batch_size]))
                except torch.cuda.OutOfMemoryError as e:
                    hint = " (or --k-kd)" if self.runner.cfg.k_kd else ""
                    raise ValueError(
                        f"out of GPU memory at --batch-size {job.batch_size} on {self.runner.device}: "
                        f"lower --batch-size{hint}"
                    ) from e
                writer.append(records)
                stats.add(batch_stats)
                if self.progress is not None:
                    self.progress.set.remote(job.key, stats.tokens)
            part = writer.close()
        except OSError as e:
            # disk full / read-only: a ValueError reaches the CLI as one line (extract_driver._our_error)
            writer.abort()
            raise ValueError(f"writing concept shard {job.out}: {e.strerror or e}; free some space (or pass another "
                             "--out) and rerun the same command: finished shards are kept") from e
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
        return ShardResult(key=job.key, part=part, stats=stats, seconds=time.perf_counter() - t0)


class Progress:
    """Tokens done per shard, reported by workers and polled by the driver (a Ray actor)."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}

    def set(self, key: str, tokens: int) -> None:
        self.done[key] = tokens

    def total(self) -> int:
        return sum(self.done.values())

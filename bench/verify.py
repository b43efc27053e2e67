"""What verifying every shard before step 0 costs (trainer.run's default `--verify open`).

    python bench/verify.py [--gb 1.5] [--threads 1,2,4,8] [--dir /tmp/cocomix-bench-verify] [--smoke]

Writes token + concept shards with `shards.write_shard` at the README's field sizes (T = 512; tokens
2 B/token; concepts: K_attr = 4 ids + scores, teacher NLL, k_mix = 32 ids + values = 146 B/token),
then times `shards.verify_parts` (sha256 of every part, what the trainer runs at open) with 1..N
threads, side by side: warm (files in the page cache, as right after an extraction) and cold (each
file evicted with posix_fadvise(DONTNEED) first: the disk's read speed enters). Prints GB/s, seconds
per GB and the extrapolation to a 10B-token extraction. `--smoke` writes a few MB (the test suite
runs it). The directory is removed at the end (only what the bench wrote); an existing non-empty
`--dir` is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shards import FieldSpec, ShardPart, write_shard  # noqa: E402
from shards.dataset import verify_parts  # noqa: E402

T, K_ATTR, K_MIX = 512, 4, 32
TOKENS = {"tokens": FieldSpec("uint16", (T + 1,))}
CONCEPTS = {
    "concept_ids": FieldSpec("uint16", (T, K_ATTR)),
    "concept_scores": FieldSpec("float16", (T, K_ATTR)),
    "teacher_nll": FieldSpec("float16", (T,)),
    "mix_ids": FieldSpec("uint16", (T, K_MIX)),
    "mix_vals": FieldSpec("float16", (T, K_MIX)),
}
README_BYTES_PER_TOKEN = {"k_mix 32 (README, OWT measured)": 2 + 146, "labels only, --k-mix 0": 2 + 20}


def window_block(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in {**TOKENS, **CONCEPTS}.items():
        if s.storage_dtype == np.uint16 and s.dtype != "float16":
            out[k] = rng.integers(0, 4608, (n, *s.shape), dtype=np.uint16)
        else:
            out[k] = rng.standard_normal((n, *s.shape)).astype(np.float16)
    return out


def write_dataset(root: Path, total_bytes: float, shard_windows: int) -> list[ShardPart]:
    per_window = sum(s.nbytes for s in {**TOKENS, **CONCEPTS}.values())
    n_shards = max(1, round(total_bytes / (per_window * shard_windows)))
    block = window_block(shard_windows)
    parts = []
    for i in range(n_shards):
        block["tokens"][:, 0] = i  # every shard has other bytes
        parts.append(write_shard(root / "tokens" / f"train-{i:05d}.arrow", TOKENS, {k: block[k] for k in TOKENS}))
        parts.append(write_shard(root / "concepts" / f"train-{i:05d}.arrow", CONCEPTS, {k: block[k] for k in CONCEPTS}))
    return parts


def evict(parts: list[ShardPart]) -> None:
    for p in parts:
        fd = os.open(p.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_verify(parts: list[ShardPart], threads: int, cold: bool) -> float:
    if cold:
        evict(parts)
    else:
        verify_parts(parts, threads)  # warm the page cache
    t = time.perf_counter()
    verify_parts(parts, threads)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.5, help="dataset size to write (GB)")
    p.add_argument("--threads", default="1,2,4,8", help="thread counts to compare")
    p.add_argument("--shard-windows", type=int, default=1250, help="windows per shard (1250: ~93 MB)")
    p.add_argument("--dir", default="/tmp/cocomix-bench-verify")
    p.add_argument("--smoke", action="store_true", help="a few MB, 1-2 threads: checks the script runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.gb, a.threads, a.shard_windows = 0.006, "1,2", 20
    root = Path(a.dir)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: --dir {root} exists and is not empty: choose another --dir")
    threads = [int(x) for x in a.threads.split(",")]
    created = not root.exists()
    try:
        t = time.perf_counter()
        parts = write_dataset(root, a.gb * 1e9, a.shard_windows)
        nbytes = sum(p.bytes for p in parts)
        print(f"wrote {len(parts) // 2} token + {len(parts) // 2} concept shards, {nbytes / 1e9:.2f} GB "
              f"({nbytes / (len(parts) // 2 * a.shard_windows * T):.0f} B/token), in {time.perf_counter() - t:.1f} s; "
              f"{os.cpu_count()} CPUs")
        print(f"\n{'threads':>7s} {'warm GB/s':>10s} {'warm s/GB':>10s} {'cold GB/s':>10s} {'cold s/GB':>10s}")
        best = 0.0
        for n in threads:
            warm = nbytes / 1e9 / time_verify(parts, n, cold=False)
            cold = nbytes / 1e9 / time_verify(parts, n, cold=True)
            best = max(best, cold)
            print(f"{n:7d} {warm:10.2f} {1 / warm:10.2f} {cold:10.2f} {1 / cold:10.2f}")
        print("\nextrapolated open-time verification of a 10B tokens extraction (cold, best thread count):")
        for name, bpt in README_BYTES_PER_TOKEN.items():
            gb = 10e9 * bpt / 1e9
            print(f"  {name:34s} {bpt:4d} B/token -> {gb:7.0f} GB: {gb / best / 60:6.1f} min at {best:.2f} GB/s")
    finally:  # only what this bench wrote
        for sub in ("tokens", "concepts"):
            shutil.rmtree(root / sub, ignore_errors=True)
        if created:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Random window reads: Arrow (mmap) vs Zarr (raw, zstd) vs zarr-python per window vs a raw memmap.

    python bench/store.py [--windows 10000] [--reads 10000] [--dir /tmp/cocomix-bench-store]
    python bench/store.py --smoke     # a few windows in a fresh temporary directory: checks the script runs

Each store holds the same windows (513 tokens + 512x4 concept ids + 512x4 scores, the labels-only
record of docs/data.md); every read copies the window into a batch buffer, as the trainer does.
Numbers are per window, warm page cache, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shards import FieldSpec, checksum, open_shard, write_shard  # noqa: E402
from shards.checksum import disk_bytes  # noqa: E402

T, K = 512, 4
FIELDS = {
    "tokens": FieldSpec("uint16", (T + 1,)),
    "concept_ids": FieldSpec("uint16", (T, K)),
    "concept_scores": FieldSpec("float16", (T, K)),
}


def make_windows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Zipf-like ids compress like real token / concept streams, unlike uniform noise.
    return {
        "tokens": np.minimum(rng.zipf(1.2, (n, T + 1)), 49151).astype(np.uint16),
        "concept_ids": np.minimum(rng.zipf(1.3, (n, T, K)), 4607).astype(np.uint16),
        "concept_scores": np.abs(rng.standard_normal((n, T, K))).astype(np.float16),
    }


def time_reads(get, order: np.ndarray) -> float:
    out = {k: np.empty(f.shape, f.storage_dtype) for k, f in FIELDS.items()}
    for i in order[:200]:  # warm-up: page cache, lazily mapped chunks
        w = get(int(i))
    t = time.perf_counter()
    for i in order:
        w = get(int(i))
        for k in FIELDS:
            out[k][...] = w[k]
    return (time.perf_counter() - t) / len(order)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=10_000)
    p.add_argument("--reads", type=int, default=10_000)
    p.add_argument("--zarr-python-reads", type=int, default=500, help="fewer: ~1 ms each")
    p.add_argument("--dir", default="/tmp/cocomix-bench-store")
    p.add_argument("--smoke", action="store_true",
                   help="64 windows in a fresh temporary directory: checks the script runs")
    a = p.parse_args()
    if a.smoke:  # tests/test_bench.py: never the shared default --dir, which this bench empties
        a.windows, a.reads, a.zarr_python_reads = 64, 64, 8
        a.dir = tempfile.mkdtemp(prefix="cocomix-bench-store-")
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    w = make_windows(a.windows)
    t = time.perf_counter()
    stores = {
        "arrow (mmap)": ("arrow", write_shard(root / "s.arrow", FIELDS, w, "arrow")),
        "zarr raw (chunk files mmapped)": ("zarr", write_shard(root / "raw.zarr", FIELDS, w, "zarr",
                                                               zarr_chunk_windows=16)),
        "zarr zstd (decompressed once)": ("zarr", write_shard(root / "zstd.zarr", FIELDS, w, "zarr",
                                                              zarr_chunk_windows=16, zarr_compression="zstd")),
    }
    print(f"wrote {len(stores)} stores of {a.windows} windows in {time.perf_counter() - t:.1f} s")
    memmaps = {}
    for k in FIELDS:
        path = root / f"{k}.npy"
        np.save(path, w[k])
        memmaps[k] = np.load(path, mmap_mode="r")
    order = np.random.default_rng(1).integers(0, a.windows, a.reads)
    rows = []
    base = time_reads(lambda i: {k: v[i] for k, v in memmaps.items()}, order)
    rows.append(("raw .npy memmap (baseline)", base, sum(disk_bytes(root / f"{k}.npy") for k in FIELDS)))
    for name, (fmt, part) in stores.items():
        shard = open_shard(part.path, fmt)
        rows.append((name, time_reads(shard.__getitem__, order), part.bytes))
    import zarr

    g = zarr.open_group(str(root / "raw.zarr"), mode="r")
    arrays = {k: g[k] for k in FIELDS}
    rows.append(("zarr raw through zarr-python",
                 time_reads(lambda i: {k: v[i] for k, v in arrays.items()}, order[: a.zarr_python_reads]),
                 stores["zarr raw (chunk files mmapped)"][1].bytes))
    t = time.perf_counter()
    checksum(stores["arrow (mmap)"][1].path)
    ck = (time.perf_counter() - t) / (stores["arrow (mmap)"][1].bytes / 1e6)
    print(f"\n{'store':34s} {'us/window':>10s} {'vs memmap':>10s} {'MB on disk':>11s} {'bytes/token':>12s}")
    for name, dt, nbytes in rows:
        print(f"{name:34s} {dt * 1e6:10.1f} {dt / base:9.2f}x {nbytes / 1e6:11.1f} {nbytes / (a.windows * T):12.1f}")
    print(f"\nchecksum (sha256) speed: {1 / ck:.0f} MB/s; every read copies a window into a batch buffer")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

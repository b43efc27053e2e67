"""What manifests and loaders cost at 10,000 shards, and stage 2's bookkeeping per shard (issue 14).

    python bench/manifest.py [--shards 10000] [--small 100] [--dir DIR] [--json PATH] [--smoke]

Writes ``--shards`` tiny real Arrow shards (one or two windows each, T = 16; a token part and a concept
part, every shard's tokens holding its own number) with a token manifest and a concept manifest, in a
temporary directory (removed at the end). Then, side by side:

- in a fresh subprocess each (so the figures are not the parent's): ``load_manifest`` (read + validate)
  of the concept manifest, ``open_split(train)`` (time and RSS growth, from /proc/self/status VmRSS),
  a few windows read across the range (each must come from the right shard), and the trainer's data
  identity (trainer.validate.data_identity, a digest over every shard's checksum);
- stage 2's bookkeeping per finished shard, with the real driver functions (pipeline.extract_plan
  make_jobs, pipeline.extract_driver build_manifest, pipeline.extract_progress Bookkeeper): one record
  written per shard plus the manifest assembled at checkpoints and at the end, at ``--small`` and at
  ``--shards`` shards; next to it the scheme it replaced (the whole manifest rewritten after every
  shard), measured at ``--small`` and estimated at ``--shards`` from timed saves at 12 sizes.

Prints a table and PASS/FAIL against issue 14's figures (load + validate < 2 s; open_split < 2 s and
< 200 MB; bookkeeping per shard at --shards not above 2x its value at --small). ``--json PATH`` writes
the figures (load_s, open_split_s, open_split_mb, bookkeeping_s_per_shard per size, ...) for
bench/scale_model.py. ``--smoke``: 60 and 12 shards (the test suite runs it). Timings are as noisy as
the machine is loaded: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shards import FieldSpec, Manifest, ShardPart  # noqa: E402

T = 16
TOKENS = {"tokens": FieldSpec("uint16", (T + 1,))}
CONCEPTS = {"concept_ids": FieldSpec("uint16", (T, 4)), "concept_scores": FieldSpec("float16", (T, 4))}
TOKENIZER = {"name": "bench", "fingerprint": "sha256:bench", "vocab_size": 4096, "eos_id": 0}
LIMITS = {"load_s": 2.0, "open_split_s": 2.0, "open_split_mb": 200.0, "bookkeeping_growth": 2.0}
"""Issue 14's figures: seconds, MB of RSS growth, and the ratio of bookkeeping per shard (large / small)."""


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover (not Linux)


# -- the synthetic dataset -------------------------------------------------------------------------


def _arrow_bytes(fields: dict[str, FieldSpec], arrays: dict[str, np.ndarray]) -> bytes:
    """One shard in memory, with the schema and metadata shards.PartWriter writes (no fsync per file:
    20,000 of them would time the disk, not the manifest)."""
    import pyarrow as pa

    from shards.arrow_store import _META_KEY

    columns = [pa.field(k, pa.list_(pa.from_numpy_dtype(s.storage_dtype), s.numel)) for k, s in fields.items()]
    schema = pa.schema(columns, metadata={_META_KEY: json.dumps({k: v.to_json() for k, v in fields.items()}).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        cols = [pa.FixedSizeListArray.from_arrays(pa.array(arrays[k].reshape(-1)), s.numel) for k, s in fields.items()]
        w.write_batch(pa.RecordBatch.from_arrays(cols, names=list(fields)))
    return sink.getvalue().to_pybytes()


def _part(path: Path, data: bytes) -> ShardPart:
    path.write_bytes(data)
    return ShardPart(path=path, format="arrow", checksum="sha256:" + hashlib.sha256(data).hexdigest(), bytes=len(data))


def write_dataset(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` shards (every 10th in val) and their token and concept manifests; shard i's tokens are i."""
    tm = Manifest(kind="tokens", seq_len=T, tokenizer=TOKENIZER, fields=dict(TOKENS), field_parts={"tokens": "tokens"})
    cm = Manifest(kind="concepts", seq_len=T, tokenizer=TOKENIZER, fields={**TOKENS, **CONCEPTS},
                  field_parts={"tokens": "tokens", **{k: "concepts" for k in CONCEPTS}},
                  teacher={"name": "bench", "fingerprint": "sha256:t"}, hook={"layer": 1, "location": "resid_post"},
                  sae={"n_latents": 4096, "fingerprint": "sha256:s"}, attribution={"variant": "bench", "k_attr": 4})
    for d in ("tokens", "concepts"):
        (root / d).mkdir(parents=True)
    counters: dict[str, int] = {}
    for i in range(n):
        split = "val" if i % 10 == 9 else "train"
        k = counters[split] = counters.get(split, -1) + 1
        w = 1 + i % 2
        tok = _part(root / "tokens" / f"{split}-{k:05d}.arrow",
                    _arrow_bytes(TOKENS, {"tokens": np.full((w, T + 1), i % 4096, np.uint16)}))
        con = _part(root / "concepts" / f"{split}-{k:05d}.arrow",
                    _arrow_bytes(CONCEPTS, {"concept_ids": np.full((w, T, 4), i % 4096, np.uint16),
                                            "concept_scores": np.ones((w, T, 4), np.float16)}))
        tm.add_shard(split, w, {"tokens": tok})
        cm.add_shard(split, w, {"tokens": tok, "concepts": con})
    return tm.save(root / "tokens" / "manifest.json"), cm.save(root / "concepts.json")


# -- loading: one fresh process --------------------------------------------------------------------


def measure_loading(manifest: Path) -> dict:
    """In this process: load + validate, open_split, windows across the range, the trainer's identity."""
    from shards import load_manifest, open_split

    base = _rss_mb()
    t = time.perf_counter()
    m = load_manifest(manifest)
    load_s = time.perf_counter() - t
    loaded = _rss_mb()
    t = time.perf_counter()
    ds = open_split(m, "train")
    open_s = time.perf_counter() - t
    opened = _rss_mb()
    assert ds.open_shards == 0, "open_split opened a shard before any window was read"
    n = len(ds)
    ds[0]  # the first read ever pays pyarrow's one-time setup: not a per-shard cost
    picks = sorted({n // 4, n // 2, 3 * n // 4, n - 1} - {0})
    t = time.perf_counter()
    for i in picks:  # shard k of train is global shard k + k // 9 (every 10th is val): its tokens say so
        k, _ = ds.locate(i)
        assert int(ds[i]["tokens"][0]) == (k + k // 9) % 4096, f"window {i} came from the wrong shard"
    read_ms = (time.perf_counter() - t) / len(picks) * 1e3
    from trainer.validate import data_identity  # after the figures above: it imports torch

    t = time.perf_counter()
    data_identity(m, ["tokens", "concept_ids", "concept_scores"], eval_windows=64)
    identity_s = time.perf_counter() - t
    return {"shards": sum(len(s.shards) for s in m.splits.values()), "manifest_mb": manifest.stat().st_size / 1e6,
            "load_s": load_s, "load_mb": loaded - base, "open_split_s": open_s, "open_split_mb": opened - loaded,
            "read_ms_per_window": read_ms, "data_identity_s": identity_s}


def loading_in_subprocess(manifest: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", str(manifest)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise SystemExit(f"the measuring subprocess failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- stage 2's bookkeeping -------------------------------------------------------------------------


def _plan(token_manifest: Manifest, out: Path, n: int):
    """A stage-2 Plan over the first ``n`` token shards (no teacher: the bookkeeping needs none)."""
    from pipeline.extract_plan import ExtractConfig, Plan

    tm = Manifest(kind="tokens", seq_len=token_manifest.seq_len, tokenizer=token_manifest.tokenizer,
                  fields=token_manifest.fields, field_parts=token_manifest.field_parts)
    shards = [(name, sh) for name, s in token_manifest.splits.items() for sh in s.shards][:n]
    for name, sh in shards:
        tm.add_shard(name, sh.windows, sh.parts)
    cfg = ExtractConfig(tokens=str(token_manifest.path), teacher="bench", sae="bench", out=str(out), k_mix=0)
    settings = {"teacher": "sha256:t", "layer": 1, "sae": "sha256:s", "attribution": cfg.attribution,
                "k_attr": cfg.k_attr, "k_mix": 0, "k_kd": 0, "score_dtype": cfg.score_dtype, "precision": "fp32",
                "format": "arrow", "zarr": None, "tokens": "sha256:bench"}
    teacher = {"name": "bench", "fingerprint": "sha256:t", "architecture": "x", "n_layers": 2, "width": 8,
               "vocab_size": 4096}
    return Plan(cfg, tm, teacher, {"n_latents": 4096, "fingerprint": "sha256:s"}, 1, settings, False)


def _fake_part(job) -> ShardPart:
    return ShardPart(path=Path(job.out), format="arrow",
                     checksum="sha256:" + hashlib.sha256(job.out.encode()).hexdigest(), bytes=1000 + job.windows)


def bookkeeping(token_manifest: Manifest, out: Path, n: int) -> dict:
    """Stage 2's bookkeeping for a run of ``n`` shards, as the driver does it: per finished shard, a
    record (Bookkeeper.finished: manifest assembled at checkpoints), then the complete manifest and the
    records removed. Returns seconds per shard and the manifest assemblies made."""
    from pipeline.extract_driver import build_manifest
    from pipeline.extract_outputs import RECORDS_DIR
    from pipeline.extract_plan import make_jobs
    from pipeline.extract_progress import Bookkeeper, settings_digest
    from shards.records import remove_records

    p = _plan(token_manifest, out, n)
    jobs = make_jobs(p)
    done: dict[str, ShardPart] = {}
    parts = {j.key: _fake_part(j) for j in jobs}  # the workers' results (not timed: not bookkeeping)
    records = p.cfg.concept_dir / RECORDS_DIR
    book = Bookkeeper(records, settings_digest(p.settings), len(jobs),
                      lambda: build_manifest(p, done, jobs, {"complete": False}).save(p.cfg.manifest_path))
    t = time.perf_counter()
    book.checkpoint()  # the run's first manifest (the driver writes it before the first shard)
    for job in jobs:
        done[job.key] = parts[job.key]
        book.finished(job, parts[job.key])
    m = build_manifest(p, done, jobs, {"complete": True})
    m.save(p.cfg.manifest_path)
    remove_records(records)
    seconds = time.perf_counter() - t
    return {"s_per_shard": seconds / n, "assemblies": book.checkpoints + 1, "manifest_mb":
            p.cfg.manifest_path.stat().st_size / 1e6}


def rewrite_every_shard(token_manifest: Manifest, out: Path, n: int, samples: int | None = None) -> dict:
    """The scheme records replace: the whole manifest saved after every shard. Measured over all ``n``
    saves, or estimated from ``samples`` saves at sizes spread over 1..n (mean cost x n)."""
    from pipeline.extract_driver import build_manifest
    from pipeline.extract_plan import make_jobs

    p = _plan(token_manifest, out, n)
    jobs = make_jobs(p)
    sizes = list(range(1, n + 1)) if samples is None else sorted({max(1, round(n * (i + 0.5) / samples))
                                                                  for i in range(samples)})
    seconds, written = 0.0, 0
    for k in sizes:
        done = {j.key: _fake_part(j) for j in jobs[:k]}
        t = time.perf_counter()
        build_manifest(p, done, jobs, {"complete": False}).save(p.cfg.manifest_path)
        seconds += time.perf_counter() - t
        written += p.cfg.manifest_path.stat().st_size
    scale = n / len(sizes)
    return {"s_per_shard": seconds * scale / n, "bytes_written": written * scale, "estimated": samples is not None}


# -- report ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=10_000, help="shards of the large manifest (issue 14: 10,000)")
    ap.add_argument("--small", type=int, default=100, help="shards of the small one, for the side-by-side columns")
    ap.add_argument("--dir", default=None, help="where to write (default: a new temporary directory; removed)")
    ap.add_argument("--json", default=None, help="write the figures here (bench/scale_model.py reads them)")
    ap.add_argument("--smoke", action="store_true", help="60 and 12 shards: seconds, for the test suite")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure_loading(Path(a.child))))
        return 0
    if a.smoke:
        a.shards, a.small = 60, 12
    if not 1 <= a.small < a.shards:
        ap.error(f"--small must be between 1 and --shards - 1, got {a.small}")
    if a.dir and Path(a.dir).exists() and any(Path(a.dir).iterdir()):
        ap.error(f"--dir {a.dir} is not empty; pass an empty or new directory")
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="cocomix-bench-manifest-"))
    from shards import load_manifest

    load1 = os.getloadavg()[0]
    try:
        sizes = (a.small, a.shards)
        figures: dict[int, dict] = {}
        for n in sizes:
            t = time.perf_counter()
            tokens_path, concepts_path = write_dataset(root / f"data-{n}", n)
            print(f"wrote {n:,} shards (x2 parts) and their manifests in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr)
            f = loading_in_subprocess(concepts_path)
            tm = load_manifest(tokens_path)
            f["bookkeeping"] = bookkeeping(tm, root / f"stage2-{n}", n)
            f["rewrite"] = rewrite_every_shard(tm, root / f"rewrite-{n}", n, None if n <= 200 else 12)
            figures[n] = f
    finally:
        shutil.rmtree(root, ignore_errors=True)
    small, large = figures[a.small], figures[a.shards]
    growth = large["bookkeeping"]["s_per_shard"] / max(small["bookkeeping"]["s_per_shard"], 1e-12)

    def row(name: str, key, fmt: str) -> None:
        vals = [key(figures[n]) for n in sizes]
        print(f"{name:<44}" + "".join(f"{format(v, fmt):>14}" for v in vals))

    print(f"manifests at scale: {a.small:,} vs {a.shards:,} shards (python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {load1:.1f})")
    print(f"{'':<44}{a.small:>14,}{a.shards:>14,}")
    row("manifest size (MB)", lambda f: f["manifest_mb"], ".2f")
    row("load_manifest + validate (s)", lambda f: f["load_s"], ".3f")
    row("  RSS growth (MB)", lambda f: f["load_mb"], ".1f")
    row("open_split(train) (s)", lambda f: f["open_split_s"], ".3f")
    row("  RSS growth (MB)", lambda f: f["open_split_mb"], ".1f")
    row("first read in a shard (ms: verify + open)", lambda f: f["read_ms_per_window"], ".2f")
    row("trainer data identity (s)", lambda f: f["data_identity_s"], ".3f")
    row("stage 2 bookkeeping per shard (ms)", lambda f: f["bookkeeping"]["s_per_shard"] * 1e3, ".2f")
    row("  manifest assemblies per run", lambda f: f["bookkeeping"]["assemblies"], "d")
    row("before: manifest rewritten per shard (ms)", lambda f: f["rewrite"]["s_per_shard"] * 1e3, ".2f")
    row("  bytes written by those rewrites (MB)", lambda f: f["rewrite"]["bytes_written"] / 1e6, ",.0f")
    if large["rewrite"]["estimated"]:
        print(f"(the {a.shards:,}-shard 'before' figures are estimated from 12 timed saves at spread sizes)")
    checks = {
        f"load + validate {a.shards:,} shards < {LIMITS['load_s']:g} s": large["load_s"] < LIMITS["load_s"],
        f"open_split < {LIMITS['open_split_s']:g} s": large["open_split_s"] < LIMITS["open_split_s"],
        f"open_split RSS growth < {LIMITS['open_split_mb']:g} MB": large["open_split_mb"] < LIMITS["open_split_mb"],
        f"bookkeeping per shard at {a.shards:,} <= {LIMITS['bookkeeping_growth']:g}x at {a.small:,} "
        f"(got {growth:.2f}x)": growth <= LIMITS["bookkeeping_growth"],
    }
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    if a.json:
        out = {"measured": time.strftime("%Y-%m-%d", time.gmtime()), "machine": f"{platform.machine()}, "
               f"{os.cpu_count()} CPUs", "shards": a.shards, "small": a.small, "load_average": load1,
               "cpus": os.cpu_count(),
               "load_s": large["load_s"], "load_mb": large["load_mb"], "open_split_s": large["open_split_s"],
               "open_split_mb": large["open_split_mb"], "read_ms_per_window": large["read_ms_per_window"],
               "data_identity_s": large["data_identity_s"], "manifest_mb": large["manifest_mb"],
               "bookkeeping_s_per_shard": {str(n): figures[n]["bookkeeping"]["s_per_shard"] for n in sizes},
               "rewrite_s_per_shard": {str(n): figures[n]["rewrite"]["s_per_shard"] for n in sizes},
               "pass": all(checks.values())}
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"figures: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

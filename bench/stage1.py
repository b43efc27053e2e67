"""Stage-1 throughput: tasks run in the driver (no Ray) vs 1 vs 2 Ray workers, same corpus, side by side;
the driver's CPU time per shard; the tail tokens packing per task drops; and stage 1's peak memory on a
single huge document.

    python bench/stage1.py [--corpus PATH ...] [--copies 4] [--tokenizer smollm2-135m] [--seq-len 512] [--task-mb 1]
                           [--tail-seq-lens 512 1024] [--tail-task-mb 0.25 1 4 64] [--json bench/results/stage1.json]
    python bench/stage1.py --memory 20 50 [--code OTHER_CHECKOUT]
    python bench/stage1.py --smoke --tokenizer DIR   # a small generated corpus: checks the script runs

Tokens/s counts documents' tokens plus EOS, from the first task submitted to the manifest saved (the
driver's one-off tokenizer load and Ray start-up are excluded), as logged in OUT/runs.jsonl. Ray's
worker processes are started by a warm-up run first, so the figures are the steady state of a long run
(a worker process builds its tokenizer once, on its first task). The driver's CPU time (its
``time.process_time`` over the same span, logged in runs.jsonl: submitting, tracking, packing val,
assembling and saving the manifest) is divided by the shards written. The timed runs read ``--copies``
copies of the corpus (links under distinct names: 17 MB, ~4M tokens for the OWT sample), so a run lasts
seconds, not the ~1.8 s of one copy, where waiting for the last task and each worker's first one weigh
on a 2-worker ratio (1.65x on one copy vs 1.74x on four, idle machine, 2026-11-29). Each variant runs ``--repeats``
times, interleaved, and the best run is shown (the load of a shared machine drifts). Tokens per CPU second
(of this process and the embedded Ray's processes, from /proc) does not depend on that load: equal for 1
and 2 workers means a second worker adds no work per token. Every variant must write byte-identical
files, manifest included; the script checks that.

Tail tokens: each task packs its own train stream, so each drops the tail that fills no last window
(< seq_len + 1 tokens). One tokenization pass gives every document's length; the plan of each
``--tail-task-mb`` then says which task owns which document (common/partition.py), so the tails of every
(seq_len, task size) pair are exact without writing shards; the measured run's tail is checked against it.

``--memory MB...``: for each size, one document of that many MB on a single line (words and spaces,
no newline), stage 1 ``--in-process`` in a child process; prints the child's peak RSS (its own
VmHWM: os.wait4's maxrss would include the parent's pages when the child is spawned with vfork).
``--code DIR`` runs the stage 1 of another checkout (e.g. ``git worktree add /tmp/old 86129a6``) for a
before / after comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.raylib import init_ray  # noqa: E402
from pipeline.stage1 import TokenizeConfig, run  # noqa: E402
from shards.runlog import read_runs  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/owt-sample/owt_train.txt"


def one_line_document(path: Path, mb: float) -> Path:
    words = "the of and to in a is that for it as was with be by on not he this are language model window".split()
    rng = random.Random(0)
    with open(path, "w") as f:
        n = 0
        while n < mb * 1e6:
            s = " ".join(rng.choice(words) for _ in range(2000)) + " "
            f.write(s)
            n += len(s)
        f.write("\n")
    return path


# Runs stage 1 as `python -m` would (cwd first on sys.path: that checkout's pipeline package) and
# reports the peak of the child's own address space.
_PEAK = ("import runpy, sys\n"
         "sys.argv = ['pipeline.stage1', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('pipeline.stage1', run_name='__main__', alter_sys=True)\n"
         "finally:\n"
         "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]\n"
         "    print(f'PEAK_KB {hwm}', file=sys.stderr)\n")


def memory(sizes: list[float], tokenizer: str, seq_len: int, code: Path) -> None:
    print(f"stage 1 --in-process of {code} on one-line documents, tokenizer {tokenizer}, seq_len {seq_len}")
    print(f"{'document':>10s} {'peak RSS MB':>12s} {'wall s':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in sizes:
            corpus = one_line_document(Path(tmp) / f"line{mb}.txt", mb)
            t = time.perf_counter()
            # cwd first on sys.path: `python -m` imports that checkout's pipeline package.
            r = subprocess.run([sys.executable, "-c", _PEAK, "--in-process", "--corpus", str(corpus),
                                "--tokenizer", tokenizer, "--out", f"{tmp}/o{mb}", "--seq-len", str(seq_len),
                                "--val-fraction", "0"], cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
            peak = [ln for ln in r.stderr.splitlines() if ln.startswith("PEAK_KB ")]
            if r.returncode != 0 or not peak:
                print(f"{mb:>8g} MB failed: {r.stderr[-500:]}")
                continue
            print(f"{mb:>8g} MB {int(peak[-1].split()[1]) / 1024:12,.0f} {time.perf_counter() - t:8.1f}")

def smoke_corpus(path: Path, docs: int = 40) -> Path:
    """A small corpus of random words, documents separated by <|endoftext|> lines (``--smoke``)."""
    rng = random.Random(0)
    words = "the of and to in a is that for it language model concept sparse teacher student token".split()
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(50, 150))) + "\n<|endoftext|>\n"
                            for _ in range(docs)), encoding="utf-8")
    return path


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants (the embedded Ray: raylet, GCS,
    workers), from /proc: what a run got of the machine, whatever else loads it (0 without /proc)."""
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    parent, cpu = {}, {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., utime, stime
            parent[int(d)], cpu[int(d)] = int(f[1]), (int(f[11]) + int(f[12])) / tick
    total = 0.0
    for pid, c in cpu.items():
        q = pid
        while q > 1 and q != me:
            q = parent.get(q, 0)
        total += c if q == me else 0.0
    return total


def tree(d: Path) -> dict[str, bytes]:
    """Every file a run wrote (zarr directories included), the run log left out."""
    return {str(p.relative_to(d)): p.read_bytes()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "runs.jsonl"}


def tail_sweep(corpus: list[str], tokenizer: str, seq_lens: list[int], task_mbs: list[float]) -> list[dict]:
    """Train tail tokens dropped per task for each (seq_len, task size), from one tokenization pass."""
    from common.corpus import CorpusStats
    from common.partition import iter_task, plan
    from common.teacher import load_tokenizer, resolve_teacher
    from pipeline.stage1 import Encoder, encoder_payload, in_val

    cfg = TokenizeConfig(corpus=corpus, tokenizer=tokenizer, out="unused")
    ccfg = cfg.corpus_config()
    enc = Encoder(encoder_payload(load_tokenizer(resolve_teacher(tokenizer))))
    length: dict[str, int] = {}  # train documents' tokens + EOS, by id (the same ids for every partition)
    for t in plan(ccfg, 1 << 62):
        pieces = list(iter_task(t, ccfg, CorpusStats()))
        for p, ids in zip(pieces, enc.encode([p.text for p in pieces]), strict=True):
            if not in_val(p.doc_id, cfg.seed, cfg.val_fraction):
                length[p.doc_id] = length.get(p.doc_id, 0) + len(ids) + p.last
    total = sum(length.values())
    rows = []
    for mb in task_mbs:
        streams = []
        for t in plan(ccfg, max(1, int(mb * 1e6))):
            ids = {p.doc_id for p in iter_task(t, ccfg, CorpusStats())}
            streams.append(sum(length.get(i, 0) for i in ids))
        for T in seq_lens:
            tails = [n - ((n - 1) // T * T + 1) if n > T else n for n in streams]
            rows.append({"seq_len": T, "task_mb": mb, "tasks": len(streams), "train_tokens": total,
                         "tail_tokens": sum(tails), "per_task": sum(tails) / len(streams),
                         "fraction": sum(tails) / total})
    return rows


def linked_copies(corpus: list[str], copies: int, folder: Path) -> list[str]:
    """``copies`` copies of the corpus files as symbolic links with distinct names in one folder (so
    their documents get distinct ids: a source id is the path relative to the folder given)."""
    from common.corpus_sources import expand_sources

    folder.mkdir(parents=True)
    for k in range(copies):
        for i, (_, location, _) in enumerate(expand_sources(corpus)):
            (folder / f"copy{k}-{i:04d}-{Path(location).name}").symlink_to(Path(location).absolute())
    return [str(folder)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", default=[str(DEFAULT)])
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--copies", type=int, default=4,
                   help="the timed runs read this many copies of --corpus (distinct names, linked, not copied)")
    p.add_argument("--task-mb", type=float, default=1.0,
                   help="task size of the timed runs (4 copies of the 4.2 MB OWT sample: 20 tasks)")
    p.add_argument("--tail-seq-lens", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--tail-task-mb", type=float, nargs="+", default=[0.25, 1.0, 4.0, 64.0])
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each variant; the best is shown")
    p.add_argument("--json", type=Path, help="write the figures here (bench/scale_model.py reads them)")
    p.add_argument("--memory", type=float, nargs="+", metavar="MB",
                   help="peak RSS on one-line documents of these sizes")
    p.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                   help="checkout whose stage 1 --memory runs")
    p.add_argument("--smoke", action="store_true",
                   help="a small generated corpus, seq-len 32, in the driver only: checks the script runs")
    a = p.parse_args()
    if a.memory:
        memory(a.memory, a.tokenizer, a.seq_len, a.code)
        return
    logging.basicConfig(level=logging.WARNING)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, in every variant
    variants = [("in the driver (no Ray)", "in_process", {"in_process": True}),
                ("Ray, 1 worker", "1", {"num_workers": 1}), ("Ray, 2 workers", "2", {"num_workers": 2})]
    load_before = os.getloadavg()
    if a.smoke:  # the driver only: starting Ray alone takes ~15 s here (stage 1 on Ray: tests/test_stage1.py)
        variants = variants[:1]
    else:
        # Ray starts its workers at nice 15 (its worker_niceness default): on a shared machine they would
        # get a fraction of the CPU the driver-only variant gets. Same niceness for every variant.
        os.environ.setdefault("RAY_worker_niceness", "0")
        init_ray("local")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            a.corpus, a.seq_len, a.task_mb = [str(smoke_corpus(Path(tmp) / "smoke.txt"))], 32, 0.002
            a.tail_seq_lens, a.tail_task_mb = [32, 64], [0.002, 0.005]
        else:  # warm-up: Ray's worker processes start (and build their tokenizer) before any clock runs
            run(TokenizeConfig(corpus=[str(smoke_corpus(Path(tmp) / "warm.txt", 400))], tokenizer=a.tokenizer,
                               out=f"{tmp}/warm", seq_len=32, task_mb=0.01, num_workers=2))
        timed = a.corpus if a.smoke or a.copies <= 1 else linked_copies(a.corpus, a.copies, Path(tmp) / "copies")
        # Interleaved repeats, best of each: on a shared machine the load drifts during a run.
        for rep in range(1 if a.smoke else a.repeats):
            for name, key, kw in variants:
                out = Path(f"{tmp}/{key}-{rep}")
                cpu = cpu_seconds()
                m = run(TokenizeConfig(corpus=timed, tokenizer=a.tokenizer, out=str(out), seq_len=a.seq_len,
                                       task_mb=a.task_mb, **kw))
                cpu = cpu_seconds() - cpu
                shards = sum(len(s.shards) for s in m.splits.values())
                log = read_runs(out)[-1]  # timings live in the run log, not in the manifest
                row = {"name": name, "key": key, "tps": log["tokens_per_s"], "wall": log["wall_s"],
                       "tokens_per_cpu_s": log["tokens"] / max(cpu, 1e-9),
                       "cpu_per_shard": log["driver_cpu_s"] / shards, "shards": shards, "tasks": log["tasks"],
                       "tail": m.splits["train"].extra["tail_tokens"], "files": tree(out)}
                if rep == 0:
                    rows.append(row)
                else:
                    old = next(r for r in rows if r["key"] == key)
                    assert row["files"] == old["files"], "files differ between repeats"
                    if row["tps"] > old["tps"]:
                        rows[rows.index(old)] = row
        identical = all(r["files"] == rows[0]["files"] for r in rows)
        tails = tail_sweep(a.corpus, a.tokenizer, sorted(set(a.tail_seq_lens) | {a.seq_len}),
                           sorted(set(a.tail_task_mb) | {a.task_mb}))
        # The sweep's arithmetic checked against the timed run (its copies make other tasks).
        measured = tails if timed is a.corpus else tail_sweep(timed, a.tokenizer, [a.seq_len], [a.task_mb])
        measured = next(t for t in measured if t["seq_len"] == a.seq_len and t["task_mb"] == a.task_mb)
        assert measured["tail_tokens"] == rows[0]["tail"], (measured, rows[0]["tail"])
    load_after = os.getloadavg()
    base = rows[0]["tps"]
    copies = "" if timed is a.corpus else f" x {a.copies} copies"
    print(f"\ncorpus: {a.corpus}{copies}, {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; seq_len {a.seq_len}, --task-mb {a.task_mb:g} ({rows[0]['tasks']} tasks, "
          f"{rows[0]['shards']} shards)\n"
          f"{'variant':24s} {'tokens/s':>10s} {'wall s':>8s} {'vs driver':>10s} {'driver CPU s/shard':>19s} "
          f"{'tokens/CPU s':>13s}")
    for r in rows:
        print(f"{r['name']:24s} {r['tps']:10,.0f} {r['wall']:8.1f} {r['tps'] / base:9.2f}x {r['cpu_per_shard']:19.4f} "
              f"{r['tokens_per_cpu_s']:13,.0f}")
    by = {r["key"]: r for r in rows}
    if "2" in by:
        print(f"2 workers vs 1 worker: {by['2']['tps'] / by['1']['tps']:.2f}x (tokens per CPU second, Ray's own "
              f"processes and the driver included: {by['2']['tokens_per_cpu_s'] / by['1']['tokens_per_cpu_s']:.2f}x; "
              "near 1 means a second worker adds no work per token: the wall-time ratio is what the free cores "
              "allowed)")
    print(f"\ntrain tail tokens dropped (each task packs its own stream; val is packed once, by the driver)\n"
          f"{'seq_len':>7s} {'--task-mb':>9s} {'tasks':>6s} {'tail tokens':>11s} {'per task':>9s} {'of train':>9s}")
    for t in tails:
        print(f"{t['seq_len']:7d} {t['task_mb']:9g} {t['tasks']:6d} {t['tail_tokens']:11,d} {t['per_task']:9.1f} "
              f"{t['fraction']:9.3%}")
    per_task = next(t for t in tails if t["seq_len"] == a.seq_len and t["task_mb"] == a.task_mb)["per_task"]
    assert identical, "files differ between variants"
    print("shards byte-identical across variants: yes (every file written, manifest included)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        rec = {"measured": datetime.date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(),
               "load_average": [round(x, 2) for x in (*load_before, *load_after)],
               "corpus": a.corpus, "tokenizer": a.tokenizer, "seq_len": a.seq_len, "task_mb": a.task_mb,
               "tasks": rows[0]["tasks"], "shards": rows[0]["shards"],
               "tokens_per_s": {r["key"]: r["tps"] for r in rows},
               "tokens_per_cpu_s": {r["key"]: round(r["tokens_per_cpu_s"], 1) for r in rows},
               "driver_cpu_s_per_shard": max(r["cpu_per_shard"] for r in rows if r["key"] != "in_process")
               if len(rows) > 1 else rows[0]["cpu_per_shard"],
               "copies": 1 if timed is a.corpus else a.copies,
               "tail_tokens_per_partition": per_task, "tail_tokens": tails,
               "bytes_identical": identical}
        a.json.write_text(json.dumps(rec, indent=2) + "\n")
        print(f"figures: {a.json}")


if __name__ == "__main__":
    main()

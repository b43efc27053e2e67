"""Stage-1 throughput: a plain single-process loop vs 1 vs 2 Ray tokenizer actors, same corpus;
and stage 1's peak memory on a single huge document.

    python bench/stage1.py [--corpus PATH ...] [--tokenizer smollm2-135m] [--seq-len 512]
    python bench/stage1.py --memory 20 50 [--code OTHER_CHECKOUT]
    python bench/stage1.py --smoke --tokenizer DIR   # a small generated corpus: checks the script runs

Tokens/s counts documents' tokens plus EOS, from the first batch to the last window written (the
driver's one-off tokenizer load and Ray start-up are excluded; actor start-up is included), as
logged in OUT/runs.jsonl. All runs must produce byte-identical shards; the script checks that too.

``--memory MB...``: for each size, one document of that many MB on a single line (words and spaces,
no newline), stage 1 ``--in-process`` in a child process; prints the child's peak RSS (its own
VmHWM: os.wait4's maxrss would include the parent's pages when the child is spawned with vfork).
``--code DIR`` runs the stage 1 of another checkout (e.g. ``git worktree add /tmp/old 86129a6``) for a
before / after comparison.
"""

from __future__ import annotations

import argparse
import logging
import os
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", default=[str(DEFAULT)])
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--memory", type=float, nargs="+", metavar="MB",
                   help="peak RSS on one-line documents of these sizes")
    p.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1],
                   help="checkout whose stage 1 --memory runs")
    p.add_argument("--smoke", action="store_true",
                   help="a small generated corpus, seq-len 32, the plain loop only: checks the script runs")
    a = p.parse_args()
    if a.memory:
        memory(a.memory, a.tokenizer, a.seq_len, a.code)
        return
    logging.basicConfig(level=logging.WARNING)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, in every variant
    variants = [("plain loop (no Ray)", {"in_process": True}), ("Ray, 1 actor", {"num_workers": 1}),
                ("Ray, 2 actors", {"num_workers": 2})]
    if a.smoke:  # the plain loop only: starting Ray alone takes ~15 s here (stage 1 on Ray: tests/test_stage1.py)
        variants = variants[:1]
    else:
        init_ray("local")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            a.corpus, a.seq_len = [str(smoke_corpus(Path(tmp) / "smoke.txt"))], 32
        for name, kw in variants:
            out = f"{tmp}/{len(rows)}"
            m = run(TokenizeConfig(corpus=a.corpus, tokenizer=a.tokenizer, out=out, seq_len=a.seq_len, **kw))
            sums = [pt.checksum for s in m.splits.values() for sh in s.shards for pt in sh.parts.values()]
            log = read_runs(out)[-1]  # timings live in the run log, not in the manifest
            rows.append((name, log["tokens_per_s"], log["wall_s"], sums))
    base = rows[0][1]
    print(f"\ncorpus: {a.corpus}, {os.cpu_count()} CPUs\n"
          f"{'variant':22s} {'tokens/s':>10s} {'wall s':>8s} {'vs plain':>9s}")
    for name, tps, wall, _ in rows:
        print(f"{name:22s} {tps:10,.0f} {wall:8.1f} {tps / base:8.2f}x")
    if len(rows) == 3:
        print(f"2 actors vs 1 actor: {rows[2][1] / rows[1][1]:.2f}x")
    assert all(r[3] == rows[0][3] for r in rows), "shards differ between variants"
    print("shards byte-identical across variants: yes")


if __name__ == "__main__":
    main()

"""Stage-1 throughput: a plain single-process loop vs 1 vs 2 Ray tokenizer actors, same corpus.

    python bench/stage1.py [--corpus PATH ...] [--tokenizer smollm2-135m] [--seq-len 512]

Tokens/s counts documents' tokens plus EOS, from the first batch to the last window written (the
driver's one-off tokenizer load and Ray start-up are excluded; actor start-up is included). All
runs must produce byte-identical shards; the script checks that too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.raylib import init_ray  # noqa: E402
from pipeline.tokenize import TokenizeConfig, run  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/owt-sample/owt_train.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", default=[str(DEFAULT)])
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=512)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, in every variant
    init_ray("local")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in [("plain loop (no Ray)", {"in_process": True}), ("Ray, 1 actor", {"num_workers": 1}),
                         ("Ray, 2 actors", {"num_workers": 2})]:
            m = run(TokenizeConfig(corpus=a.corpus, tokenizer=a.tokenizer, out=f"{tmp}/{len(rows)}", seq_len=a.seq_len, **kw))
            sums = [pt.checksum for s in m.splits.values() for sh in s.shards for pt in sh.parts.values()]
            rows.append((name, m.stats["tokens_per_s"], m.stats["wall_s"], sums))
    base = rows[0][1]
    print(f"\ncorpus: {a.corpus}, {os.cpu_count()} CPUs\n{'variant':22s} {'tokens/s':>10s} {'wall s':>8s} {'vs plain':>9s}")
    for name, tps, wall, _ in rows:
        print(f"{name:22s} {tps:10,.0f} {wall:8.1f} {tps / base:8.2f}x")
    print(f"2 actors vs 1 actor: {rows[2][1] / rows[1][1]:.2f}x")
    assert all(r[3] == rows[0][3] for r in rows), "shards differ between variants"
    print("shards byte-identical across variants: yes")


if __name__ == "__main__":
    main()

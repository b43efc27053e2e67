"""`make demo`: the main job on the embedded default, in one run directory.

The default corpus needs no download: the Python reference manual's topic pages that every CPython
ships in ``pydoc_data.topics`` (79 documents, ~465 KB of English prose and code, PSF licence).
``--corpus PATH`` (``make demo CORPUS=...``) uses any corpus the readers accept instead.
Rerunning reuses whatever is already complete in the run directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def python_docs_corpus(path: Path) -> Path:
    """Write the stdlib's pydoc topics as a text corpus (one topic per document)."""
    from pydoc_data.topics import topics

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{text.strip()}\n<|endoftext|>\n" for _, text in sorted(topics.items())), encoding="utf-8")
        tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="run directory holding every artefact")
    p.add_argument("--corpus", nargs="+", default=None, help="corpus paths (default: the Python docs topics)")
    p.add_argument("--teacher", default="smollm2-135m", help="teacher (its tokenizer is used)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--manifest", default="manifests/demo-tokens.json", help="where to save a copy of the manifest")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from .tokenize import TokenizeConfig, run

    run_dir = Path(a.run)
    corpus = a.corpus or [str(python_docs_corpus(run_dir / "corpus" / "python-docs.txt"))]
    t0 = time.perf_counter()
    print(f"[1/1] stage 1: tokenising {corpus} with {a.teacher}'s tokenizer", flush=True)
    try:
        m = run(TokenizeConfig(corpus=corpus, tokenizer=a.teacher, out=str(run_dir / "tokens"), seq_len=a.seq_len,
                               val_fraction=0.05, manifest=a.manifest))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\nsummary")
    print(f"  corpus: {m.corpus['documents']} documents, {m.corpus['bytes']:,} bytes")
    for name, s in m.splits.items():
        print(f"  {name}: {s.windows} windows x {m.seq_len} tokens in {len(s.shards)} shard(s)")
    print(f"  manifest: {m.path}")
    print(f"  wall time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

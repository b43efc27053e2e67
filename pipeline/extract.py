#!/usr/bin/env python
"""Stage 2 entry point: teacher + SAE concept extraction over token shards, on Ray.

Runs the same three ways, with the same arguments (see ``--help``):

    ray submit pipeline/cluster.yaml pipeline/extract.py -- --tokens DIR --teacher ... --sae ... --out ...
    python pipeline/extract.py ARGS
    python -m pipeline.extract ARGS

``ray submit`` copies only this file to the head node (NOTES.md), so it stays a thin script over the
installed ``cocomix`` package (``pip install -e .`` on every node; see pipeline/cluster.yaml).
"""

import os
import sys

# `python pipeline/extract.py` puts pipeline/ first on sys.path, where our tokenize.py would shadow the
# standard library's `tokenize`; the package is imported from its installed location instead.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def main() -> int:
    try:
        from pipeline.concepts import main as extract_main
    except ImportError as e:
        print(f"error: the cocomix package is not installed here ({e}); run `pip install -e .` in the "
              "repository (on a Ray cluster: the cluster config's setup_commands do it)", file=sys.stderr)
        return 2
    return extract_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

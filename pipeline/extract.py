#!/usr/bin/env python
"""Stage 2 entry point: teacher + SAE concept extraction over token shards, on Ray.

Runs the same three ways, with the same arguments (see ``--help``):

    ray submit pipeline/cluster.yaml pipeline/extract.py -- --tokens DIR --teacher ... --sae ... --out ...
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipeline/extract.py ARGS
    python pipeline/extract.py ARGS
    python -m pipeline.extract ARGS

``ray submit`` copies only this file to the head node (NOTES.md), so it stays a thin script over the
installed ``cocomix`` package (``pip install -e '.[cluster]'`` on every node; see pipeline/cluster.yaml,
or pipeline/cluster-local.yaml without Docker). ``ray job submit --working-dir .`` runs it from Ray's copy
of the checkout, where relative paths are refused (pipeline/raylib.py: check_job_paths).
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
        # Seen with `ray submit` on nodes without Docker: the login shell's python was the system one.
        print(f"error: the cocomix package is not importable by {sys.executable} ({e}); run `pip install -e "
              "'.[cluster]'` in the repository with this python, or put the environment that has it first on "
              "PATH (on a Ray cluster without Docker: pipeline/cluster-local.yaml activates it from ~/.bashrc; "
              "for `ray job submit`, start the head from that environment)", file=sys.stderr)
        return 2
    return extract_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

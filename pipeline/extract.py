#!/usr/bin/env python
"""Stage 2 entry point: teacher + SAE concept extraction over token shards, on Ray.

Runs the same three ways, with the same arguments (see ``--help``):

    ray submit pipeline/cluster.yaml pipeline/extract.py -- --tokens DIR --teacher ... --sae ... --out ...
    ray job submit --address http://HEAD:8265 --working-dir . -- python pipeline/extract.py ARGS
    python pipeline/extract.py ARGS
    python -m pipeline.extract ARGS

``ray submit`` copies only this file to the head node (docs/operations.md), so it stays a thin script over the
installed ``cocomix`` package (``pip install -e '.[cluster]'`` on every node; see pipeline/cluster.yaml,
or pipeline/cluster-local.yaml without Docker). ``ray job submit --working-dir .`` runs it from Ray's copy
of the checkout, where relative paths are refused (pipeline/raylib.py: check_job_paths).
"""

import sys

# The stage-2 API under its one name: `from pipeline.extract import ExtractConfig, run`. Imported on
# first use, so that this file runs (and explains a missing package) where cocomix is not installed.
# The modules behind it: extract_plan (config, inputs, jobs, resume), extract_outputs (what --out and
# --manifest may hold), extract_driver (run on Ray, manifest, CLI), extract_worker, extract_runner.
_API = {"ExtractConfig": "pipeline.extract_plan", "run": "pipeline.extract_driver",
        "build_parser": "pipeline.extract_driver"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline.extract' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    try:
        from pipeline.extract_driver import main as extract_main
    except ImportError as e:
        # Seen with `ray submit` on nodes without Docker: the login shell's python was the system one.
        print(f"error: the cocomix package is not importable by {sys.executable} ({e}); run `pip install -e "
              "'.[cluster]'` in the repository with this python, or put the environment that has it first on "
              "PATH (on a Ray cluster without Docker: pipeline/cluster-local.yaml activates it from ~/.bashrc; "
              "for `ray job submit`, start the head from that environment)", file=sys.stderr)
        return 2
    return extract_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

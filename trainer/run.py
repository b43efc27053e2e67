"""Train the student from shards: ``python -m trainer.run --shards MANIFEST [--mode cocomix] ...``.

Under ``torchrun --nproc_per_node N -m trainer.run ...`` every rank runs this with disjoint windows.
The teacher and the SAE are never loaded: this module imports neither ``transformers`` models nor
``pipeline`` / ``sae``.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from trainer.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m trainer.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_args(p, TrainConfig, required=("shards",))
    return p


def main(argv: list[str] | None = None) -> dict:
    """Train; raises ValueError (or OSError) for a user mistake, trainer.loop.Interrupted on Ctrl-C."""
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(TrainConfig, args)
    from trainer.loop import train  # after parsing, so --help stays fast

    try:
        summary = train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    last = summary.get("last", {})
    if cfg.progress and not summary.get("complete"):
        print(
            json.dumps({k: summary[k] for k in ("step", "tokens", "out_dir", "params")} | {"last": last}),
            file=sys.stderr,
        )
    return summary


def cli(argv: list[str] | None = None) -> int:
    """``python -m trainer.run``: exit 0 when trained (or already complete), 2 with one ``error:``
    line for a user mistake (bad option, data, out-dir, full disk), 130 on Ctrl-C (trainer.loop.Interrupted
    says what was saved)."""
    return run_cli(main, argv, interrupted="interrupted before training started: nothing was written")


if __name__ == "__main__":
    sys.exit(cli())

"""Train the student from shards: ``python -m trainer.run --shards MANIFEST [--mode cocomix] ...``.

Under ``torchrun --nproc_per_node N -m trainer.run ...`` every rank runs this with disjoint windows.
The teacher and the SAE are never loaded: this module imports neither ``transformers`` models nor
``pipeline`` / ``sae``.
"""

from __future__ import annotations

import argparse
import json
import sys

from shards.cli import add_dataclass_args, dataclass_from_args
from trainer.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_args(p, TrainConfig, required=("shards",))
    return p


def main(argv: list[str] | None = None) -> dict:
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
    if cfg.progress:
        print(json.dumps({k: summary[k] for k in ("step", "tokens", "out_dir", "params")} | {"last": last}), file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a bad manifest, shard, checkpoint or option: the message says what to do
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""The shard store shared by the pipeline and the trainer: fields, Arrow / Zarr shards, manifests.

Dependency-light on purpose (numpy, pyarrow, zarr): the trainer imports it without pulling in any
teacher code.

    m = load_manifest("manifests/owt.json")
    ds = open_split(m, "train")          # checksums verified per shard before first use
    ds[0]["tokens"]                      # (seq_len + 1,) numpy view into the mapped shard
"""

from .checksum import checksum
from .dataset import WindowDataset, open_shard, open_split, verify_part, write_shard
from .fields import FieldSpec, id_dtype, token_dtype
from .manifest import Manifest, Shard, ShardPart, Split, load_manifest, validate
from .writer import PartWriter

__all__ = [
    "FieldSpec",
    "Manifest",
    "PartWriter",
    "Shard",
    "ShardPart",
    "Split",
    "WindowDataset",
    "checksum",
    "id_dtype",
    "load_manifest",
    "open_shard",
    "open_split",
    "token_dtype",
    "validate",
    "verify_part",
    "write_shard",
]

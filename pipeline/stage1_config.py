"""Stage 1's settings: the one config (every flag of ``python -m pipeline.stage1``, validated here),
the train / val routing rule, and the settings record that decides every byte of the output.

Which settings go into the record, and which do not (paths, worker counts, shard size in MB: the
record holds ``windows_per_shard`` instead), is what makes a rerun reuse, refuse or redo an output
(pipeline/stage1_out.py; docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from common.corpus import CorpusConfig
from pipeline.outputs import command_line as _command_line
from shards.options import StoreOptions

PROG = ("python", "-m", "pipeline.stage1")
"""How a refusal spells the command (pipeline/outputs.py: command_line)."""


@dataclass
class TokenizeConfig(StoreOptions):
    corpus: list[str]
    """Corpus files, directories, globs, saved HF datasets or hf:NAME."""
    tokenizer: str
    """Teacher whose tokenizer to use: HF hub id, model directory, .gguf file, or smollm2-135m."""
    out: str
    """Output directory for shards and manifest.json."""
    seq_len: int = 512
    """Tokens the student predicts per window (each window stores seq_len + 1 tokens)."""
    val_fraction: float = 0.005
    """Fraction of documents in the validation split, chosen by a hash of the document id."""
    val_corpus: list[str] | None = None
    """A held-out corpus whose documents form the val split (e.g. owt_valid.txt); every document
    of --corpus then goes to train and --val-fraction is not used."""
    seed: int = 0
    """Salt of the split hash."""
    shard_mb: float = 64.0
    """Target shard size in MB."""
    task_mb: float = 64.0
    """Input per task in MB (bytes of text / JSONL, Parquet row groups grouped up to it): the unit of
    parallel work and of resume (common/partition.py). Each task packs its own train windows, so this
    decides the bytes and is recorded in the settings."""
    num_workers: int = 0
    """Tasks run at once (0 = one per CPU of the Ray cluster)."""
    batch_chars: int = 1 << 18
    """Characters of text per tokenizer call."""
    eos_token: str | None = None
    """Token appended after every document (default: <|endoftext|> if in the vocabulary, else EOS)."""
    text_field: str = "text"
    """JSONL field / Parquet or HF column holding the text."""
    delimiter: str = "<|endoftext|>"
    """Line separating documents in text files."""
    doc_per_file: bool = False
    """Each text file is one document."""
    skip_bad_records: bool = False
    """Skip and count bad JSONL lines instead of failing."""
    hf_split: str = "train"
    """Split of a HF dataset to read."""
    overwrite: bool = False
    """Replace a different dataset of stage 1 in --out (only the files stage 1 wrote there, never
    other files) and a cocomix manifest of another dataset at --manifest."""
    ray_address: str | None = None
    """Ray address (default: RAY_ADDRESS, a running cluster, else embedded; 'local' forces embedded)."""
    in_process: bool = False
    """Tokenize in the driver process, without Ray (debugging, benchmarks)."""
    manifest: str | None = None
    """Also save the manifest here (e.g. manifests/NAME.json), with shard paths relative to it."""

    def __post_init__(self) -> None:
        super().__post_init__()  # --format / --zarr-*: shards.options.StoreOptions
        if self.seq_len < 1:
            raise ValueError(f"--seq-len must be positive, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_mb <= 0:
            raise ValueError("--shard-mb must be positive")
        if not self.task_mb * 1e6 >= 1:
            raise ValueError(f"--task-mb must be positive, got {self.task_mb}")
        if self.num_workers < 0:
            raise ValueError("--num-workers must be >= 0")
        if self.batch_chars < 1:
            raise ValueError(f"--batch-chars must be positive, got {self.batch_chars}")
        if not self.out:
            raise ValueError("--out is empty: pass the output directory")
        self.corpus_config()  # validates --delimiter and friends

    @property
    def task_bytes(self) -> int:
        """``--task-mb`` in bytes: the partition's unit (common/partition.py)."""
        return max(1, int(self.task_mb * 1e6))

    def corpus_config(self, paths: list[str] | None = None) -> CorpusConfig:
        return CorpusConfig(
            paths=list(paths if paths is not None else self.corpus),
            text_field=self.text_field,
            delimiter=self.delimiter,
            doc_per_file=self.doc_per_file,
            skip_bad_records=self.skip_bad_records,
            hf_split=self.hf_split,
        )


SPLIT_RULE = "sha256(seed:id) < fraction; id = source@byte (text, JSONL), source:row (Parquet, HF)"
"""The train / val routing rule, recorded in the settings: ids were ``source:index`` before stage 1
ran as tasks (issue 14), so a rerun into an older output names the difference."""


def in_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Deterministic split by document id (common/corpus.py: ``source@byte`` or ``source:row``):
    adding documents never moves old ones."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") < val_fraction * 2**64


# Settings that do not change a byte of the shards: a rerun with other values reuses the output.
# (shard_mb is replaced by the windows_per_shard it implies, the tokenizer path by its fingerprint.)
_NOT_SETTINGS = ("out", "num_workers", "batch_chars", "overwrite", "ray_address", "shard_mb", "tokenizer", "manifest",
                 "in_process")


def settings_record(cfg: TokenizeConfig, tok_info: dict, windows_per_shard: int) -> dict:
    """The settings stored in the manifest (and in the settings file of an unfinished run)."""
    d = asdict(cfg)
    for k in _NOT_SETTINGS:
        d.pop(k)
    d.update(tokenizer=tok_info, windows_per_shard=windows_per_shard, split_rule=SPLIT_RULE)
    return json.loads(json.dumps(d))


def command_line(cfg: TokenizeConfig) -> str:
    """The shell command that runs ``cfg`` (flags that differ from the defaults), for messages."""
    return _command_line(PROG, cfg)

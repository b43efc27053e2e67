"""``sae.train``'s settings: one dataclass, each field documented and validated here (the command's
flags are generated from it by common/cli.py). The recipe they configure is described in sae/train.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from common.tracking import TrackingOptions
from sae.hooks import LOCATIONS


@dataclass
class TrainConfig(TrackingOptions):
    """The SAE run (tracking flags --tensorboard, --wandb ...: common/tracking.py's TrackingOptions)."""

    teacher: str = ""
    """Teacher: HF hub id, model directory, .gguf file or alias (smollm2-135m)."""
    layer: int | None = None
    """Block whose output (or sublayer output, see --location) the SAE reads: 0-based; -1 is the last
    block, -2 the one before (as in Python), recorded as the non-negative index. Required."""
    location: str = "resid_post"
    """Hook location: resid_post, attn_out or mlp_out."""
    corpus: list[str] = field(default_factory=list)
    """Text corpus (files separated by <|endoftext|> lines, jsonl, parquet); or use --tokens."""
    tokens: str | None = None
    """Stage-1 token shard directory (with manifest.json); alternative to --corpus."""
    split: str = "train"
    """Split of --tokens to read."""
    n_latents: int = 4608
    """Number of SAE latents."""
    k: int = 32
    """Active latents per token (TopK)."""
    max_tokens: int = 1_000_000
    """Training tokens (activations) in total."""
    out: str = ""
    """Output directory."""
    seq_len: int = 256
    """Window length when reading --corpus (stage-1 shards bring their own)."""
    teacher_batch: int = 8
    """Windows per teacher forward."""
    batch_size: int = 4096
    """Activations per SAE step."""
    buffer_tokens: int = 65536
    """Shuffle buffer size (activations); at least 2 x batch_size."""
    normalize: str = "layernorm"
    """Input normalisation: layernorm (OpenAI), sqrt_d, none."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(n_latents / 2^14) (Gao et al. 2024)."""
    warmup_steps: int = 50
    """Linear learning-rate warmup steps."""
    lr_decay_frac: float = 0.2
    """Decay the lr linearly to 0 over this final fraction of max_tokens (0: constant)."""
    auxk_coef: float = 1 / 32
    """AuxK loss coefficient (Gao et al. 2024 §A.2)."""
    k_aux: int | None = None
    """Dead latents used by AuxK; default d_in // 2 (sparsify)."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing; default min(10M, max_tokens // 10)."""
    b_dec_init: str = "geometric_median"
    """b_dec initialisation from the first buffer: geometric_median, mean or zeros."""
    checkpoint_every: int = 200
    """Steps between checkpoints (and one at the end)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    resume: bool = False
    """Continue the run in --out from its checkpoint, also with a larger --max-tokens or another lr
    schedule (a plain rerun of the same command continues on its own)."""
    overwrite: bool = False
    """Replace the sae.train run in --out: removes only the files sae.train wrote there."""
    seed: int = 0
    """Seed of the SAE init and the shuffle buffer."""
    device: str = "cpu"
    """cpu, cuda, cuda:0 ..."""
    teacher_dtype: str = "float32"
    """Teacher weights dtype (activations are cast to fp32 for the SAE)."""
    threads: int | None = None
    """torch CPU threads (default: torch's)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        errors = []
        if not self.teacher:
            errors.append("--teacher is required")
        if self.layer is None:
            errors.append("--layer is required (0-based block index; -1 is the last block)")
        if self.location not in LOCATIONS:
            errors.append(f"--location must be one of {LOCATIONS}")
        if bool(self.corpus) == bool(self.tokens):
            errors.append("give exactly one of --corpus or --tokens")
        if not self.out:
            errors.append("--out is required")
        if self.n_latents < 1:
            errors.append(f"--n-latents={self.n_latents} must be >= 1")
        elif not 1 <= self.k <= self.n_latents:
            errors.append(f"--k={self.k} must be in 1..n_latents={self.n_latents}")
        if self.batch_size < 1:
            errors.append(f"--batch-size={self.batch_size} must be >= 1")
        if self.max_tokens < self.batch_size:
            errors.append(f"--max-tokens={self.max_tokens} is smaller than one batch ({self.batch_size})")
        if self.buffer_tokens < 2 * self.batch_size:
            errors.append(f"--buffer-tokens={self.buffer_tokens} must be at least 2 x batch_size={self.batch_size}")
        if self.normalize not in ("layernorm", "sqrt_d", "none"):
            errors.append("--normalize must be layernorm, sqrt_d or none")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            errors.append("--b-dec-init must be geometric_median, mean or zeros")
        if not 0 <= self.lr_decay_frac < 1:
            errors.append("--lr-decay-frac must be in [0, 1)")
        if self.seq_len < 1 or self.teacher_batch < 1:
            errors.append("--seq-len and --teacher-batch must be >= 1")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            errors.append(f"--lr={self.lr} must be a positive number (or leave it out for the default)")
        if self.warmup_steps < 0:
            errors.append(f"--warmup-steps={self.warmup_steps} must be >= 0")
        if not (math.isfinite(self.auxk_coef) and self.auxk_coef >= 0):
            errors.append(f"--auxk-coef={self.auxk_coef} must be >= 0")
        for name in ("k_aux", "dead_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"--{name.replace('_', '-')}={value} must be >= 1 (or leave it out for the default)")
        if self.checkpoint_every < 1 or self.log_every < 1:
            errors.append("--checkpoint-every and --log-every must be >= 1")
        if self.seed < 0:
            errors.append(f"--seed={self.seed} must be >= 0")
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            errors.append(f"--teacher-dtype={self.teacher_dtype!r} must be float32, bfloat16 or float16")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    def resolved_dead_tokens(self) -> int:
        return (self.dead_tokens if self.dead_tokens is not None
                else max(self.batch_size, min(10_000_000, self.max_tokens // 10)))

"""Configs of the student model and of a training run, and the named presets.

Every field has a docstring under it: :mod:`common.cli` turns them into ``--help``.
Sizes follow docs/method.md section 2.5 (Tack et al., arXiv 2502.08524, Table 7 / Appendix B).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from common.tracking import TRACKING_FIELDS, TrackingOptions

Mode = Literal["ntp", "cocomix", "kd"]
Mix = Literal["interleave", "add", "none"]
Labels = Literal["attribution", "activation"]


def plain_name(name: str) -> bool:
    """A name that may become a directory or a metric key: letters, digits, - and _ (held-out sets, arms)."""
    return bool(name) and name.replace("-", "").replace("_", "").isalnum()


@dataclass
class ConceptConfig:
    """The CoCoMix block inserted before block ``insert_layer`` (docs/method.md section 2.2)."""

    n_concepts: int = 32768
    """C, the concept vocabulary: the SAE's latent count (manifest `sae.n_latents`); paper 32768."""
    insert_layer: int = 3
    """L_ins: the block is applied to the output of the first L_ins blocks (paper: 3 at 69M, 5 above)."""
    topk: int = 32
    """k: the number of largest predicted concept logits kept for the continuous concept (paper 32)."""
    mix: Mix = "interleave"
    """How the continuous concept enters the stream: interleave (2T positions, the paper), add
    (h + c_hat, the paper's ablation) or none (concept prediction only, another ablation)."""
    concept_loss: bool = True
    """Train the predictor with the concept CE; off with mixing on gives the paper's "mix only" ablation."""

    def __post_init__(self) -> None:
        if self.n_concepts < 1:
            raise ValueError(f"concept.n_concepts must be >= 1, got {self.n_concepts}")
        if self.insert_layer < 0:
            raise ValueError(f"concept.insert_layer must be >= 0, got {self.insert_layer}")
        if not 1 <= self.topk <= self.n_concepts:
            raise ValueError(f"concept.topk must be in [1, n_concepts={self.n_concepts}], got {self.topk}")
        if self.mix not in ("interleave", "add", "none"):
            raise ValueError(f"concept.mix must be interleave, add or none, got {self.mix!r}")
        if self.mix == "none" and not self.concept_loss:
            raise ValueError("concept.mix=none with concept_loss off trains nothing of the block: use --mode ntp")


@dataclass
class ModelConfig:
    """A GPT-2-style decoder: learned positions, pre-LN blocks, tied LM head, SDPA attention."""

    vocab_size: int = 50304
    """Embedding rows; at least the tokenizer's vocab (set from the manifest by `trainer.run`)."""
    block_size: int = 1024
    """Maximum tokens per window (learned position table size); paper context 1024."""
    n_layer: int = 8
    """Transformer blocks."""
    n_head: int = 8
    """Attention heads; must divide d_model."""
    d_model: int = 512
    """Residual width d."""
    dropout: float = 0.0
    """Dropout on attention, MLP and embeddings (the reference code inherits 0.1 from GPT-2)."""
    bias: bool = True
    """Biases in linear layers and LayerNorms, as in GPT-2."""
    concept: ConceptConfig | None = None
    """The CoCoMix block; None for the NTP and KD baselines."""
    pause_layer: int | None = None
    """The pause-token baseline (paper Fig. 6f; Goyal et al. 2024): a learned vector interleaved after
    every token before this block, where CoCoMix interleaves its concepts; the LM head reads the pause
    slots. None: no pause tokens. Not combined with a concept block."""

    def __post_init__(self) -> None:
        if isinstance(self.concept, dict):
            self.concept = ConceptConfig(**self.concept)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.concept is not None and self.concept.insert_layer > self.n_layer:
            raise ValueError(
                f"concept.insert_layer={self.concept.insert_layer} exceeds n_layer={self.n_layer}"
            )
        if self.pause_layer is not None:
            if self.concept is not None:
                raise ValueError("pause_layer and a concept block exclude each other (pause tokens replace concepts)")
            if not 0 <= self.pause_layer <= self.n_layer:
                raise ValueError(f"pause_layer={self.pause_layer} must be in [0, n_layer={self.n_layer}]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Presets: plain functions returning a ModelConfig. NTP/KD baselines are widened to match CoCoMix's
# activated parameters (docs/method.md section 2.5: d = 624 / 1072 / 2096 for d = 512 / 1024 / 2048); they
# keep the CoCoMix model's head count (the paper states widths only).


def _paper(n_layer: int, d: int, d_ntp: int, n_head: int, l_ins: int, mode: Mode) -> ModelConfig:
    if mode == "cocomix":
        return ModelConfig(n_layer=n_layer, d_model=d, n_head=n_head, concept=ConceptConfig(insert_layer=l_ins))
    return ModelConfig(n_layer=n_layer, d_model=d_ntp, n_head=n_head)


def preset_69m(mode: Mode) -> ModelConfig:
    return _paper(8, 512, 624, 8, 3, mode)


def preset_386m(mode: Mode) -> ModelConfig:
    return _paper(24, 1024, 1072, 16, 5, mode)


def preset_1_38b(mode: Mode) -> ModelConfig:
    return _paper(24, 2048, 2096, 16, 5, mode)


def preset_tiny(mode: Mode) -> ModelConfig:
    """4 layers, d=64: unit tests and CPU smoke runs (concept block after block 2, k=8)."""
    if mode == "cocomix":
        return ModelConfig(
            vocab_size=512, block_size=128, n_layer=4, d_model=64, n_head=4,
            concept=ConceptConfig(n_concepts=256, insert_layer=2, topk=8),
        )
    return ModelConfig(vocab_size=512, block_size=128, n_layer=4, d_model=80, n_head=4)


def preset_small(mode: Mode) -> ModelConfig:
    """6 layers, d=128: short CPU runs that learn something in minutes."""
    if mode == "cocomix":
        return ModelConfig(
            block_size=512, n_layer=6, d_model=128, n_head=4,
            concept=ConceptConfig(insert_layer=2, topk=32),
        )
    return ModelConfig(block_size=512, n_layer=6, d_model=160, n_head=4)


PRESETS = {
    "tiny": preset_tiny,
    "small": preset_small,
    "69m": preset_69m,
    "386m": preset_386m,
    "1.38b": preset_1_38b,
}


def get_preset(name: str, mode: Mode) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name](mode)


@dataclass
class TrainConfig(TrackingOptions):
    """One training run of the student from a shard manifest (with the tracking flags of
    :class:`common.tracking.TrackingOptions`: --tensorboard, --wandb, ...)."""

    shards: str = ""
    """Path of the manifest JSON written by the extraction pipeline (or stage 1 for ntp)."""
    out_dir: str = "runs/student"
    """Where checkpoints, metrics.jsonl and the resolved config are written. A directory holding
    another run is refused; the same unfinished run continues from its last checkpoint; a finished
    one is reported complete and not touched."""
    preset: str = "tiny"
    """Model size: tiny, small, 69m, 386m, 1.38b (NTP/KD modes get the width-matched baseline)."""
    mode: Mode = "cocomix"
    """Objective: ntp (next token), cocomix (NTP + lambda * concept CE, with mixing), kd (NTP + KL to
    the stored teacher top-k)."""
    labels: Labels = "attribution"
    """Concept labels: attribution (concept_ids, the paper) or activation (top SAE activations from
    mix_ids/mix_vals, the paper's ablation)."""
    mix: Mix | None = None
    """Override the preset's concept mixing: interleave, add or none."""
    concept_loss: bool = True
    """Concept CE on; --no-concept-loss with mixing gives the "mix only" ablation."""
    concept_topk: int | None = None
    """Override the preset's k (concepts kept for mixing)."""
    insert_layer: int | None = None
    """Override the preset's L_ins (with --pause: where the pause tokens go)."""
    pause: bool = False
    """The pause-token baseline (paper Fig. 6f) for --mode ntp or kd: the CoCoMix preset's backbone
    (its width and L_ins) with a learned pause vector interleaved after every token at L_ins instead
    of a concept: CoCoMix's backbone and interleaved positions without its concept predictor and
    compression (so fewer FLOPs than CoCoMix, more than NTP at the same width)."""
    width: int | None = None
    """Override the preset's residual width d (e.g. the NTP baseline matched by active parameters
    instead of FLOPs); must be divisible by the head count."""
    permute_labels: int | None = None
    """Label-signal control for --mode cocomix: train on concept labels permuted across positions with
    this seed (each window takes another window's labels in shuffled position order), so the label
    distribution is the same and its relation to the context is gone. Evaluation uses the real labels."""
    held_out: list[str] | None = None
    """More held-out sets, each NAME=MANIFEST (a tokens manifest suffices; its val split, or its train
    split when it has none): evaluated with the val split at every evaluation, logged as
    held_out/NAME/loss."""
    lambda_concept: float = 0.1
    """Weight of the concept loss (paper 0.1)."""
    lambda_kd: float = 0.1
    """Weight of the KD loss (paper 0.1)."""
    dropout: float = 0.0
    """Dropout probability (the reference code uses 0.1)."""
    micro_batch: int = 8
    """Windows per forward pass per rank."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; global batch = micro_batch * grad_accum * world size."""
    steps: int = 0
    """Optimiser steps; 0 = derive from --max-tokens."""
    max_tokens: int = 0
    """Token budget (predicted tokens); used when --steps is 0. Both 0: one epoch of the train split."""
    lr: float = 6e-4
    """Peak learning rate (paper: 6e-4 at 69M, 3e-4 at 386M, 2e-4 at 1.38B)."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak (paper 10%)."""
    warmup_steps: int = -1
    """Linear warmup steps; -1 = 1/300 of the run (paper), at least 1."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings, not on biases or norms (nanoGPT)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    eval_every: int = 100
    """Evaluate on the val split every this many steps (and at the end); 0 = only at the end."""
    eval_windows: int = 64
    """Validation windows per evaluation (the first ones of the val split)."""
    ckpt_every: int = 0
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    log_every: int = 1
    """Write a metrics line every this many steps."""
    resume: str = ""
    """Checkpoint to resume from (a run's ckpt directory or one of its step-N directories), or 'auto'
    for OUT_DIR/ckpt when it holds one. Only the same run continues (same settings and data)."""
    seed: int = 1337
    """Seed of the model init, the window order and dropout."""
    workers: int = 2
    """Loader worker processes (0 = load in the training process)."""
    verify: Literal["open", "lazy"] = "open"
    """Shard checksums (sha256): every shard the run reads, in parallel, before step 0 (open), or each
    shard before its first read (lazy: starts sooner, may stop mid-run). Never trains on other bytes."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    loss_chunk: int = 128
    """Training positions per chunk of the LM head and its NTP / KD loss (trainer/chunked_ce.py): the
    (batch, T, vocab) logits are never held whole; same values and gradients up to float rounding.
    0 = the plain full-logits head. 128 keeps a chunk's fp32 logits (25 MB at V=49,152) under glibc's
    32 MB mmap threshold, so the allocator reuses them instead of faulting in fresh pages every chunk
    (bench/train.py --head-compare small: 1.18x tokens/s NTP, 1.33x CoCoMix, system time 0.12x / 0.39x
    on 2 CPU cores)."""
    halt_after: int = 0
    """Stop after this many steps of this process without finishing the schedule (tests and preemption
    drills); 0 = off."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("ntp", "cocomix", "kd"):
            raise ValueError(f"--mode must be ntp, cocomix or kd, got {self.mode!r}")
        if self.labels not in ("attribution", "activation"):
            raise ValueError(f"--labels must be attribution or activation, got {self.labels!r}")
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("--micro-batch and --grad-accum must be >= 1")
        if self.steps < 0 or self.max_tokens < 0:
            raise ValueError("--steps and --max-tokens must be >= 0")
        if not 0.0 < self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in (0, 1], got {self.min_lr_ratio}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.pause and self.mode not in ("ntp", "kd"):
            raise ValueError(f"--pause applies to --mode ntp or kd, not {self.mode}")
        if self.mode != "cocomix" and (self.mix is not None or self.concept_topk):
            raise ValueError(f"--mix/--concept-topk only apply to --mode cocomix, not {self.mode}")
        if self.insert_layer is not None and not (self.mode == "cocomix" or self.pause):
            raise ValueError(f"--insert-layer applies to --mode cocomix or --pause, not {self.mode}")
        if self.width is not None and self.width < 1:
            raise ValueError(f"--width must be >= 1, got {self.width}")
        if self.permute_labels is not None and self.mode != "cocomix":
            raise ValueError(f"--permute-labels applies to --mode cocomix, not {self.mode}")
        names = [h.split("=", 1)[0] for h in self.held_out or []]
        for h, name in zip(self.held_out or [], names, strict=True):
            if "=" not in h or not name or not h.split("=", 1)[1]:
                raise ValueError(f"--held-out takes NAME=MANIFEST, got {h!r}")
            if not plain_name(name):
                raise ValueError(f"--held-out name {name!r}: use letters, digits, - and _")
        if len(set(names)) != len(names) or "val" in names:
            raise ValueError(f"--held-out names must be distinct and not 'val', got {names}")
        if self.verify not in ("open", "lazy"):
            raise ValueError(f"--verify must be open or lazy, got {self.verify!r}")
        for name in ("eval_every", "eval_windows", "ckpt_every", "halt_after", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.loss_chunk < 0:
            raise ValueError(f"--loss-chunk must be >= 0 (0 = full logits), got {self.loss_chunk}")
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# How each TrainConfig field relates to the run already in --out-dir (or a --resume checkpoint); the
# one place that decides it (tests/test_trainer_ops.py checks every field is in exactly one group).
# Fields whose change alters the loss curve or the recorded metrics: a resumed run must agree on all.
RESUME_KEYS = (
    "mode", "labels", "lambda_concept", "lambda_kd", "dropout", "lr",
    "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed",
    "eval_windows",  # which val windows val_loss averages over: one curve must use one set
    "permute_labels",
    "held_out",  # the held-out curves must cover the whole run
)
# Checked through what they resolve to: the model config (preset, mix, concept_topk, insert_layer,
# concept_loss, pause, width), the schedule length (steps, max_tokens), the global batch micro_batch x grad_accum x
# ranks (the split between micro_batch and grad_accum may change: it changes float summation order
# only), and the data identity (shards: another path to the same bytes is the same data).
DERIVED_KEYS = ("preset", "mix", "concept_topk", "insert_layer", "concept_loss", "pause", "width", "steps",
                "max_tokens", "micro_batch", "grad_accum", "shards")
# Free to differ when a run continues: how it is run, observed and saved, not what it computes.
# device / compile / loss_chunk change float rounding only (bit-exact resume holds on the same device).
FREE_KEYS = ("out_dir", "resume", "workers", "progress", "log_every", "eval_every", "ckpt_every",
             "halt_after", "verify", "device", "compile", "loss_chunk", *TRACKING_FIELDS)

__all__ = [
    "ConceptConfig", "ModelConfig", "TrainConfig", "plain_name", "PRESETS", "get_preset", "RESUME_KEYS", "DERIVED_KEYS",
    "FREE_KEYS",
]

"""Plain helpers shared by the test modules (fixtures live in tests/conftest.py); test modules import
these, never each other.

Nothing here touches a hub: text is a slice of the OpenWebText sample beside the checkout (synthetic
text where it is absent), teachers and SAEs are randomly initialised.
"""

from __future__ import annotations

from pathlib import Path

OWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "owt-sample"
_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "language model concept sparse teacher student token window residual stream layer attention network training "
    "data text city river government people year new first time world state school music water market"
).split()


# ---------------------------------------------------------------- text
def _synthetic_document(i: int) -> str:
    import random

    rng = random.Random(i)
    lines = []
    for _ in range(rng.randint(20, 60)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        lines.append(" ".join(words).capitalize() + ".")
        if rng.random() < 0.2:
            lines.append("")
    return "\n".join(lines).strip()


def owt_documents(n: int, split: str = "valid") -> list[str]:
    """The first ``n`` documents of the OpenWebText sample (synthetic text where it is absent)."""
    path = OWT / f"owt_{split}.txt"
    if not path.is_file():
        return [_synthetic_document(i) for i in range(n)]
    docs, cur = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.rstrip("\n") == "<|endoftext|>":
                docs.append("".join(cur).rstrip("\n"))
                cur = []
                if len(docs) == n:
                    break
            else:
                cur.append(line)
    return docs


def write_corpus(path: Path, docs: list[str]) -> Path:
    """``docs`` as a text corpus, each followed by a ``<|endoftext|>`` line (docs/data.md)."""
    path.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return path


SAE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Sparse autoencoders find interpretable features in language models. "
    "Concepts are latent directions in the residual stream of a transformer. "
) * 8


def write_word_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Plain-text corpus of words drawn from :data:`SAE_TEXT`, documents separated by <|endoftext|> lines,
    varied enough for a tokenizer (the SAE tests' corpus)."""
    import random

    rng = random.Random(seed)
    words = SAE_TEXT.split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(n_docs)]
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return path


# ---------------------------------------------------------------- models
def tiny_teacher(directory: Path, n_layer: int = 2, n_embd: int = 64, vocab_size: int = 300, seed: int = 0) -> Path:
    """A random GPT-2 (n_layer x n_embd) and a byte-level BPE tokenizer trained on :data:`SAE_TEXT`,
    saved in ``directory`` so ``load_teacher(directory)`` works offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAE_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=len(fast), n_positions=128,
                     bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(cfg).eval().save_pretrained(directory)
    return directory


def random_sae(d: int = 64, c: int = 256, k: int = 8, layer: int = 0, seed: int = 1, normalize: str = "layernorm"):
    """A random TopK SAE (d -> c latents) hooked after block ``layer``; some TopK values clip to 0."""
    import torch

    from sae import HookSpec, SparseAutoencoder

    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, c, activation="topk", k=k, normalize=normalize, hook=HookSpec(layer, "resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(c, d, generator=g) / d**0.5)
        sae.b_enc.copy_(torch.randn(c, generator=g) * 0.3 - 0.2)  # some TopK values clip to 0
        sae.W_dec.copy_(torch.randn(c, d, generator=g) / d**0.5)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


# ---------------------------------------------------------------- stage 2
STAGE2_T = 16
"""Window length of the ``stage2_data`` fixture's token shards (tests/conftest.py)."""


def extract_config(data: Path, teacher, **kw):
    """A stage-2 config over the ``stage2_data`` fixture's token shards and its first SAE."""
    from pipeline.extract import ExtractConfig

    kw = {"tokens": str(data / "tokens"), "teacher": str(teacher), "sae": str(data / "sae_a"),
          "out": str(data / "out"), "k_mix": 4, "k_kd": 2, "batch_size": 3, "ray_address": "local", **kw}
    return ExtractConfig(**kw)


def all_bytes(directory: Path) -> dict[str, bytes]:
    """Every Arrow shard in ``directory``, name -> bytes (byte-identity checks)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.suffix == ".arrow"}

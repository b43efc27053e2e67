"""Shared helpers for the SAE tests (no tests here): a tiny random GPT-2 teacher saved to disk with a
small byte-level BPE tokenizer trained on a slice of text, so `load_teacher(dir)` works offline."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Sparse autoencoders find interpretable features in language models. "
    "Concepts are latent directions in the residual stream of a transformer. "
) * 8


def write_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Plain-text corpus, documents separated by <|endoftext|> lines, varied enough for a tokenizer."""
    import random

    rng = random.Random(seed)
    words = TEXT.split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(n_docs)]
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return path


def tiny_teacher(directory: Path, n_layer: int = 2, n_embd: int = 64, vocab_size: int = 300, seed: int = 0) -> Path:
    """A random GPT-2 (n_layer x n_embd) and a matching tokenizer saved in ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=len(fast), n_positions=128,
                     bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(cfg).eval().save_pretrained(directory)
    return directory

"""Shared fixtures: small real text, a tiny byte-level BPE tokenizer and a tiny random GPT-2 teacher.

Nothing here touches a hub: the tokenizer is trained on the spot from a slice of the OpenWebText
sample (or a built-in paragraph when ../shared is absent), and the teacher is randomly initialised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every Ray a test starts listens on 127.0.0.1 only (Ray otherwise swaps 127.0.0.1 for the machine's
# routable address; NOTES.md). Read when `ray` is first imported, hence here; subprocesses inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

OWT = Path(__file__).resolve().parents[2] / "shared" / "data" / "owt-sample"
_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "language model concept sparse teacher student token window residual stream layer attention network training "
    "data text city river government people year new first time world state school music water market"
).split()


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
    path.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A HF-loadable byte-level BPE tokenizer (vocab 512) directory with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(owt_documents(50), trainer=trainer)
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 (d=64) saved with the tiny tokenizer: a complete local teacher."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_teacher")
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=512, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    for f in os.listdir(tiny_tokenizer_dir):
        shutil.copy(tiny_tokenizer_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One private embedded Ray for the whole test session (starting it costs seconds); "local" starts
    one even when a cluster runs on this machine (pipeline/raylib.py)."""
    from pipeline.raylib import init_ray

    init_ray("local", num_cpus=2)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: extra threads only add contention on a shared machine; restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Shared fixtures: a tiny byte-level BPE tokenizer, a tiny random GPT-2 teacher, embedded Ray, and the
stage-2 test data (token shards, two SAEs, a reference extraction). Plain helpers are in tests/helpers.py.

Nothing here touches a hub: the tokenizer is trained on the spot from a slice of the OpenWebText
sample (or a built-in paragraph when ../shared is absent), and the teacher is randomly initialised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import (
    STAGE2_T,
    all_bytes,
    extract_config,
    owt_documents,
    random_sae,
    write_corpus,
)

# Every Ray a test starts listens on 127.0.0.1 only (Ray otherwise swaps 127.0.0.1 for the machine's
# routable address; docs/operations.md). Read when `ray` is first imported, hence here; subprocesses inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


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


# ---------------------------------------------------------------- stage 2 (test_extract*.py, test_stage2_ops.py)
@pytest.fixture(scope="module")
def stage2_data(tmp_path_factory, tiny_teacher_dir, ray_local) -> Path:
    """Token shards (several, both splits) and two SAEs saved on disk; one copy per test module, so a
    module's tests may write beside it."""
    from pipeline.stage1 import TokenizeConfig
    from pipeline.stage1 import run as tokenize
    from sae import save_sae

    root = tmp_path_factory.mktemp("extract")
    # Seven documents of the OWT sample span >= 4 train shards (the resume test removes shard 3); synthetic
    # text (no sample beside the checkout) tokenises shorter under the tiny tokenizer trained on it, so
    # take documents until it does too.
    for n in range(7, 50, 4):
        corpus = write_corpus(root / "corpus.txt", [d[:900] for d in owt_documents(n)])
        tokens = tokenize(TokenizeConfig(corpus=[str(corpus)], tokenizer=str(tiny_teacher_dir),
                                         out=str(root / "tokens"), seq_len=STAGE2_T, shard_mb=0.0012, val_fraction=0.3,
                                         overwrite=True))
        if len(tokens.splits["train"].shards) >= 4 and tokens.splits["val"].windows > 0:
            break
    assert len(tokens.splits["train"].shards) >= 4 and tokens.splits["val"].windows > 0
    save_sae(random_sae(d=64, c=300, k=8, layer=1, seed=1), root / "sae_a")
    save_sae(random_sae(d=64, c=200, k=6, layer=0, seed=2), root / "sae_b")
    return root


@pytest.fixture(scope="module")
def extraction(stage2_data, tiny_teacher_dir) -> Path:
    """A finished concept extraction (no KD fields) of the tiny teacher + SAE over ``stage2_data``, both
    splits: its manifest (the browser's and the steering evaluation's input)."""
    from pipeline.extract import run

    manifest = stage2_data / "concepts.json"
    run(extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / "ex"), manifest=str(manifest),
                       k_kd=0, batch_size=4))
    return manifest


@pytest.fixture(scope="module")
def stage2_reference(stage2_data, tiny_teacher_dir) -> dict[str, bytes]:
    """The concept shards' bytes of one uninterrupted stage-2 run over ``stage2_data`` (batch size 4)."""
    from pipeline.extract import run

    cfg = extract_config(stage2_data, tiny_teacher_dir, out=str(stage2_data / "ref"), batch_size=4)
    run(cfg)
    return all_bytes(cfg.concept_dir)

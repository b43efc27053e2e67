"""Synthetic concept shards with learnable structure, written through the real ``shards`` writer.

For tests, benchmarks and CPU smoke runs where no extraction has been run. Tokens follow a sparse
Markov chain (each token has 4 successors), so next-token loss can fall well below log V; concept
labels are hashes of the current and next token, so the concept loss can fall too; the "teacher"
top-k for KD is the chain's true successor distribution.

    python -m trainer.synthetic --out /tmp/syn --windows 256 --seq-len 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

N_SUCC = 4  # successors per token in the Markov chain


def make_arrays(
    n: int, seq_len: int, vocab: int, n_concepts: int, k_attr: int = 4, k_mix: int = 8, k_kd: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """All fields of ``n`` windows as numpy arrays with the shard dtypes."""
    rng = np.random.default_rng(seed)
    chain = np.random.default_rng(12345).integers(0, vocab, size=(vocab, N_SUCC))  # fixed across seeds
    probs = np.array([0.55, 0.25, 0.15, 0.05])
    T = seq_len
    tok = np.empty((n, T + 1), dtype=np.int64)
    tok[:, 0] = rng.integers(0, vocab, size=n)
    choice = rng.choice(N_SUCC, size=(n, T), p=probs)
    for t in range(T):
        tok[:, t + 1] = chain[tok[:, t], choice[:, t]]
    cur, nxt = tok[:, :-1], tok[:, 1:]  # (n, T)
    mult = np.array([1, 3, 5, 7])[:k_attr] if k_attr <= 4 else np.arange(1, 2 * k_attr, 2)
    src = np.stack([cur if i % 2 == 0 else nxt for i in range(k_attr)], -1)  # (n, T, K)
    cids = (src * mult + np.arange(k_attr) * 17) % n_concepts
    scores = np.sort(rng.uniform(0.1, 1.0, size=(n, T, k_attr)), -1)[..., ::-1].astype(np.float32)
    short = rng.random((n, T)) < 0.1  # some positions have fewer usable labels
    scores[short, -1] = -np.inf
    scores[:, -1, :] = -np.inf  # the window's last position carries no label (docs/method.md 1.4)
    cids = np.where(np.isfinite(scores), cids, 0)
    mix_src = np.stack([cur if i % 2 == 0 else nxt for i in range(k_mix)], -1)
    mix_ids = (mix_src * (np.arange(k_mix) * 2 + 1) + 11) % n_concepts
    mix_vals = np.sort(rng.uniform(0.0, 2.0, size=(n, T, k_mix)), -1)[..., ::-1]
    kd_ids = chain[cur][..., :k_kd]  # (n, T, k_kd): the chain's successors, best first
    kd_lp = np.broadcast_to(np.log(probs[:k_kd] * 0.98), kd_ids.shape)  # 2% mass outside the chain
    nll = -np.log(probs[choice])
    cid_dt = "uint16" if n_concepts <= 65535 else "int32"
    return {
        "tokens": tok.astype(np.uint16 if vocab <= 65535 else np.uint32),
        "concept_ids": cids.astype(cid_dt),
        "concept_scores": scores.astype(np.float16),
        "mix_ids": mix_ids.astype(cid_dt),
        "mix_vals": mix_vals.astype(np.float16),
        "kd_ids": kd_ids.astype(np.int32),
        "kd_logprobs": kd_lp.astype(np.float16),
        "teacher_nll": nll.astype(np.float16),
    }


def write_manifest(
    out: str | Path,
    windows: int = 64,
    val_windows: int = 16,
    seq_len: int = 32,
    vocab: int = 256,
    n_concepts: int = 128,
    k_attr: int = 4,
    k_mix: int = 8,
    k_kd: int = 4,
    shards_per_split: int = 2,
    format: str = "arrow",
    seed: int = 0,
    tokenizer: dict[str, Any] | None = None,
    fields: list[str] | None = None,
) -> Path:
    """Write train/val shards and ``out/manifest.json``; return the manifest path.

    ``fields`` restricts what is stored (e.g. ``["tokens"]`` for a stage-1-only manifest)."""
    from shards import FieldSpec, Manifest, write_shard

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    T = seq_len
    cid = "uint16" if n_concepts <= 65535 else "int32"
    specs = {
        "tokens": FieldSpec("uint16" if vocab <= 65535 else "uint32", (T + 1,)),
        "concept_ids": FieldSpec(cid, (T, k_attr)),
        "concept_scores": FieldSpec("float16", (T, k_attr)),
        "mix_ids": FieldSpec(cid, (T, k_mix)),
        "mix_vals": FieldSpec("float16", (T, k_mix)),
        "kd_ids": FieldSpec("int32", (T, k_kd)),
        "kd_logprobs": FieldSpec("float16", (T, k_kd)),
        "teacher_nll": FieldSpec("float16", (T,)),
    }
    keep = fields or list(specs)
    specs = {k: v for k, v in specs.items() if k in keep}
    parts = {k: ("tokens" if k == "tokens" else "concepts") for k in specs}
    concepts = any(p == "concepts" for p in parts.values())
    m = Manifest(
        kind="concepts" if concepts else "tokens",
        seq_len=T,
        tokenizer=tokenizer or {"name": "synthetic", "fingerprint": "synthetic:0", "vocab_size": vocab, "eos_id": 0},
        fields=specs,
        field_parts=parts,
        corpus={"sources": ["synthetic markov chain"], "seed": seed},
        teacher={"name": "synthetic-chain", "fingerprint": "synthetic", "n_layer": 0, "width": 0} if concepts else None,
        hook={"layer": 0, "location": "synthetic"} if concepts else None,
        sae=(
            {"source": "synthetic", "fingerprint": "synthetic", "d_in": 0, "n_latents": n_concepts, "k": k_mix}
            if concepts
            else None
        ),
        attribution={"variant": "synthetic", "k_attr": k_attr, "last_position": "score -inf"} if concepts else None,
    )
    for split, n, s0 in (("train", windows, seed), ("val", val_windows, seed + 10_000)):
        bounds = np.linspace(0, n, shards_per_split + 1).astype(int)
        arrays = make_arrays(n, T, vocab, n_concepts, k_attr, k_mix, k_kd, seed=s0)
        for i in range(shards_per_split):
            a, b = bounds[i], bounds[i + 1]
            if b <= a:
                continue
            written = {}
            for pname in dict.fromkeys(parts.values()):
                pf = {k: v for k, v in specs.items() if parts[k] == pname}
                ext = ".arrow" if format == "arrow" else ".zarr"
                written[pname] = write_shard(
                    out / f"{split}-{i:05d}.{pname}{ext}",
                    pf,
                    {k: arrays[k][a:b] for k in pf},
                    format=format,
                    zarr_chunk_windows=4,
                )
            m.add_shard(split, int(b - a), written)
    return m.save(out / "manifest.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--windows", type=int, default=512, help="train windows")
    p.add_argument("--val-windows", type=int, default=64, help="val windows")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per window (T)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    p.add_argument("--n-concepts", type=int, default=256, help="C, the concept count")
    p.add_argument("--shards", type=int, default=2, help="shards per split")
    p.add_argument("--format", choices=["arrow", "zarr"], default="arrow")
    a = p.parse_args(argv)
    path = write_manifest(
        a.out, a.windows, a.val_windows, a.seq_len, a.vocab, a.n_concepts, shards_per_split=a.shards, format=a.format
    )
    print(path)


if __name__ == "__main__":
    main()


def write_word_tokenizer(out: str | Path, vocab: int) -> dict[str, Any]:
    """A word-level tokenizer over the words ``w0 .. w{vocab-1}`` saved as a HF tokenizer directory,
    so synthetic runs can be decoded offline. Returns the manifest's ``tokenizer`` dict for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from common.teacher import tokenizer_fingerprint

    words = {f"w{i}": i for i in range(vocab)}
    words["w0"] = 0  # also the unknown word and EOS
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token="w0")
    out = Path(out)
    fast.save_pretrained(str(out))
    return {"name": str(out), "fingerprint": tokenizer_fingerprint(fast), "vocab_size": vocab, "eos_id": 0}

"""SAE benchmark: sparse top-k encode + decode vs the dense path, and SAE training tokens/s.

    python bench/sae_speed.py                      # CPU, both shapes of the issue
    python bench/sae_speed.py --device cuda        # on a GPU
    python bench/sae_speed.py --teacher smollm2-135m --layer 9   # also: teacher activations to the hook
    python bench/sae_speed.py --smoke [--teacher DIR --layer 1]   # one tiny shape: checks the script runs

Paths compared (same SAE, same inputs, outputs checked equal before timing):
- dense:  c = encode(x) (N, C) dense code, then x_hat = decode(c) = c @ W_dec (N, C) x (C, D)
- sparse: ids, vals = encode_topk(x) (N, k), then decode_sparse = embedding_bag over k rows
Both pay the (N, D) x (D, C) encoder matmul; the sparse path skips the scatter into (N, C) and the
(N, C) x (C, D) decoder matmul. Training: one step of sae.train (forward, AuxK, backward, decoder
projection, Adam, renorm) on random activations; the teacher is not part of it (see --teacher).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.model import SparseAutoencoder  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_sae(d: int, n: int, k: int, device: str) -> SparseAutoencoder:
    gen = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(d, n, "topk", k, normalize="layernorm")
    with torch.no_grad():
        W = torch.randn(n, d, generator=gen)
        sae.W_dec.copy_(W / W.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec)
        sae.b_enc.normal_(0, 0.1, generator=gen)
    return sae.to(device)


def bench_codec(d: int, n: int, k: int, tokens: int, device: str, repeats: int) -> dict:
    sae = make_sae(d, n, k, device)
    x = torch.randn(tokens, d, device=device) * 2 + 0.5

    @torch.no_grad()
    def dense():
        _, stats = sae.normalize_input(x)
        return sae.decode(sae.encode(x), stats)

    @torch.no_grad()
    def sparse():
        _, stats = sae.normalize_input(x)
        ids, vals = sae.encode_topk(x)
        return sae.decode_sparse(ids, vals, stats)

    torch.testing.assert_close(sparse(), dense(), atol=1e-4, rtol=1e-4)

    @torch.no_grad()
    def encode_dense():
        return sae.encode(x)

    @torch.no_grad()
    def encode_sparse():
        return sae.encode_topk(x)

    t_dense, t_sparse = timeit(dense, device, repeats), timeit(sparse, device, repeats)
    t_enc_dense, t_enc_sparse = timeit(encode_dense, device, repeats), timeit(encode_sparse, device, repeats)
    return {
        "shape": f"d={d} n={n} k={k}",
        "dense_tok_s": tokens / t_dense,
        "sparse_tok_s": tokens / t_sparse,
        "speedup": t_dense / t_sparse,
        "enc_dense_tok_s": tokens / t_enc_dense,
        "enc_sparse_tok_s": tokens / t_enc_sparse,
    }


def bench_train(d: int, n: int, k: int, batch: int, device: str, repeats: int) -> dict:
    from sae.objective import auxk_loss, remove_parallel_grad
    from sae.train_config import TrainConfig

    cfg = TrainConfig(teacher="bench", layer=0, corpus=["-"], out="-", n_latents=n, k=k, batch_size=batch,
                      buffer_tokens=2 * batch, max_tokens=10 * batch)
    sae = make_sae(d, n, k, device)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.resolved_lr(), eps=6.25e-10)
    x = torch.randn(batch, d, device=device)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[: n // 4] = True  # exercise the AuxK path as a run with dead latents would

    def step():
        out = sae(x)
        aux = auxk_loss(sae, out.pre_acts, (out.x_n - out.x_hat_n).detach(), dead, d // 2)
        loss = out.fvu + cfg.auxk_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        remove_parallel_grad(sae.W_dec)
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)

    t = timeit(step, device, repeats, warmup=1)
    return {"shape": f"d={d} n={n} k={k}", "batch": batch, "train_tok_s": batch / t}


def bench_teacher(teacher: str, layer: int, device: str, repeats: int, seq_len: int = 512, batch: int = 4) -> dict:
    import numpy as np

    from common.teacher import load_teacher
    from sae.data import teacher_activations
    from sae.hooks import HookSpec, capture_residual

    model = load_teacher(teacher, device)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq_len))
    hook = HookSpec(layer)

    @torch.inference_mode()
    def full():
        with capture_residual(model, hook):
            model(torch.from_numpy(ids).to(device), use_cache=False)

    t_full = timeit(full, device, repeats, warmup=1)
    t_stop = timeit(lambda: teacher_activations(model, hook, ids, device), device, repeats, warmup=1)
    n = batch * seq_len
    return {"teacher": teacher, "layer": layer, "full_forward_tok_s": n / t_full, "stop_at_hook_tok_s": n / t_stop,
            "speedup": t_full / t_stop}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per encode/decode call")
    p.add_argument("--batch", type=int, default=1024, help="tokens per training step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--teacher", default=None, help="also time teacher activations to the hook (e.g. smollm2-135m)")
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--smoke", action="store_true",
                   help="one tiny shape, 2 repeats, 32-token teacher windows: checks the script runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(576, 4608, 32), (768, 32768, 32)]
    seq_len = 512
    if args.smoke:
        shapes, seq_len = [(64, 256, 8)], 32
        args.tokens, args.batch, args.repeats = 128, 64, 2
    print(f"device={args.device} threads={torch.get_num_threads()} tokens/call={args.tokens} batch={args.batch}")
    print("\nencode + decode (tokens/s, median of repeats)")
    print(f"{'shape':<24}{'dense':>12}{'sparse':>12}{'ratio':>8}   {'enc dense':>12}{'enc topk':>12}")
    for d, n, k in shapes:
        r = bench_codec(d, n, k, args.tokens, args.device, args.repeats)
        print(f"{r['shape']:<24}{r['dense_tok_s']:>12.0f}{r['sparse_tok_s']:>12.0f}{r['speedup']:>7.2f}x"
              f"   {r['enc_dense_tok_s']:>12.0f}{r['enc_sparse_tok_s']:>12.0f}")
    print("\nSAE training step (tokens/s; random activations, AuxK on 1/4 dead latents)")
    for d, n, k in shapes:
        r = bench_train(d, n, k, args.batch, args.device, max(2, args.repeats // 2))
        print(f"{r['shape']:<24}{r['train_tok_s']:>12.0f}")
    if args.teacher:
        r = bench_teacher(args.teacher, args.layer, args.device, max(2, args.repeats // 2), seq_len=seq_len)
        print(f"\nteacher {r['teacher']} activations at layer {r['layer']} (tokens/s)")
        print(f"{'full forward':<24}{r['full_forward_tok_s']:>12.0f}")
        print(f"{'stop after hook block':<24}{r['stop_at_hook_tok_s']:>12.0f}{r['speedup']:>7.2f}x")


if __name__ == "__main__":
    main()

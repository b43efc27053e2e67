"""Benchmark stage 2: our extraction vs the reference method and vs a forward pass, and 1 vs 2 actors.

    python bench/extract.py --teacher smollm2-135m --sae /tmp/sae-smollm2-l9 --windows 4 --seq-len 512
    python bench/extract.py --smoke --teacher DIR --layer 1   # 2 windows of 16 tokens: checks the script runs

Measured in one run, on the same teacher, SAE and windows (real text when --corpus exists):
(a) ours (TeacherRunner.run: forward, activation-only backward from the head to the hook, sparse
    attribution, labels, records) vs the reference method (CoCoMix's training-time extraction: a
    forward and a full backward computing parameter gradients, then the dense (tokens, D) x (D, C)
    attribution product and a top-k over all C latents), in tokens/s; target >= 3x;
(b) ours vs a teacher forward pass alone (with logits) under no_grad, as a time ratio; target <= 2.2x;
(c) the full Ray pipeline with 1 vs 2 actors (tokens/s once the actors are loaded);
(d) sha256 GB/s on one core: the cost of stage 2's start-up check of every token shard.
Methods are interleaved and repeated; medians are reported, so load from other processes affects
them alike. With --check-bf16 (GPU): agreement of bf16-autocast labels with fp32 labels.
``--json PATH`` writes every figure with the machine, the date and the command; bench/scale_model.py
reads it for stage 2's rows of the scaling model (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/extract.py` puts bench/ first on sys.path, not the checkout
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "owt-sample" / "owt_valid.txt"


def real_windows(teacher: str, corpus: Path, n: int, T: int, vocab: int) -> np.ndarray:
    """n windows of T+1 tokens of real text (random tokens when the corpus is absent)."""
    if corpus.is_file():
        from common.teacher import load_tokenizer

        tok = load_tokenizer(teacher)
        text = corpus.read_text(encoding="utf-8")[: 8 * n * (T + 1)]
        ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n * T + 1:
            idx = np.arange(n)[:, None] * T + np.arange(T + 1)
            return ids[idx].astype(np.int64)
    return np.random.default_rng(0).integers(0, vocab, size=(n, T + 1))


def random_sae(d: int, c: int, k: int, layer: int):
    from sae import HookSpec, SparseAutoencoder

    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(d, c, activation="topk", k=k, normalize="layernorm", hook=HookSpec(layer, "resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(c, d, generator=g) / d**0.5)
        sae.W_dec.copy_(sae.W_enc)
    return sae


def reference_step(model, sae, tokens: torch.Tensor, layer: int, k_attr: int) -> torch.Tensor:
    """The reference code's extraction: parameter gradients included, dense attribution over all C."""
    model.requires_grad_(True)
    out = model(tokens[:, :-1], output_hidden_states=True, use_cache=False)
    x = out.hidden_states[layer + 1]  # output of block `layer` (not the last block: no final norm)
    x.retain_grad()
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())  # batch mean
    loss.backward()
    D = x.shape[-1]
    with torch.no_grad():
        c = sae.encode(x.detach().reshape(-1, D).float())  # (N, C) dense code
        a = (x.grad.reshape(-1, D).float() @ sae.W_dec.T) * c  # (N, C) dense attribution
        ids = a.topk(k_attr, dim=1).indices
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_methods(runner, windows: np.ndarray, batch: int, reps: int, k_attr: int) -> dict[str, float]:
    """Median seconds over ``reps`` interleaved repetitions of each method over all windows."""
    model, dev = runner.model, runner.device
    tok = torch.from_numpy(windows).to(dev)
    amp = runner._amp

    def forward():
        with torch.no_grad(), amp():
            for s in range(0, len(tok), batch):
                _ = model(tok[s : s + batch, :-1], use_cache=False).logits

    def ours():
        for s in range(0, len(windows), batch):
            runner.run(windows[s : s + batch])

    def reference():
        with amp():
            for s in range(0, len(tok), batch):
                reference_step(model, runner.sae, tok[s : s + batch], runner.layer, k_attr)

    methods = {"forward": forward, "ours": ours, "reference": reference}
    for f in methods.values():  # warm-up (allocator, kernels, caches)
        f()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(reps):
        for name, f in methods.items():
            sync(dev)
            t = time.perf_counter()
            f()
            sync(dev)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def check_bf16(runner, windows: np.ndarray, batch: int) -> dict[str, dict[str, float]]:
    """How often each bf16 precision's labels equal the fp32 ones (same teacher, SAE and windows)."""
    recs = {}
    saved = runner.precision
    for mode in ("float32", "bfloat16", "bf16-above-hook"):
        runner.precision = mode
        parts = [runner.run(windows[s : s + batch])[0] for s in range(0, len(windows), batch)]
        recs[mode] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    runner.precision = saved
    out = {}
    a, m = recs["float32"]["concept_ids"], recs["float32"]["mix_ids"]
    for mode in ("bfloat16", "bf16-above-hook"):
        b, n = recs[mode]["concept_ids"], recs[mode]["mix_ids"]
        out[mode] = {
            "top1_agree": round(float((a[..., 0] == b[..., 0]).mean()), 4),
            "label_set_agree": round(float((np.sort(a, -1) == np.sort(b, -1)).all(-1).mean()), 4),
            "slot_agree": round(float((a == b).mean()), 4),
            "mix_set_agree": round(float((np.sort(m, -1) == np.sort(n, -1)).all(-1).mean()), 4),
        }
    return out


def actors_throughput(teacher: str, sae_dir: str, corpus: Path, windows: int, T: int, batch: int,
                      device: str) -> dict[int, float]:
    """tokens/s of the whole Ray pipeline with 1 and 2 actors on the same token shards."""
    from pipeline.extract import ExtractConfig, run
    from pipeline.stage1 import TokenizeConfig
    from pipeline.stage1 import run as tokenize
    from shards.runlog import read_runs

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    text = corpus.read_text(encoding="utf-8")[: 8 * windows * (T + 1)] if corpus.is_file() else None
    if text is None:
        raise ValueError(f"--actors needs a real corpus; {corpus} does not exist")
    (tmp / "c.txt").write_text(text)
    tm = tokenize(TokenizeConfig(corpus=[str(tmp / "c.txt")], tokenizer=teacher, out=str(tmp / "tokens"),
                                 seq_len=T, val_fraction=0.0, shard_mb=(T + 1) * 2 * max(1, windows // 4) / 1e6))
    out = {}
    for n in (1, 2):
        cfg = ExtractConfig(tokens=str(tmp / "tokens"), teacher=teacher, sae=sae_dir, out=str(tmp / f"w{n}"),
                            batch_size=batch, num_workers=n, device=device, ray_address="local")
        run(cfg)
        thr = read_runs(cfg.concept_dir)[-1]["throughput"]  # timings live in the run log
        out[n] = thr["tokens_per_s"]
        out.setdefault("threads_per_actor", {})[n] = thr["threads_per_worker"]
    out["shards"] = len(tm.splits["train"].shards)
    return out


def checksum_speed(mb: int) -> float:
    """GB/s of shards.checksum (sha256 of a file, one core) over a fresh file of ``mb`` MB."""
    from shards import checksum

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "blob"
        f.write_bytes(np.random.default_rng(0).integers(0, 256, mb << 20, dtype=np.uint8).tobytes())
        checksum(f)  # warm the page cache: the start-up check reads shards stage 1 just wrote
        t = time.perf_counter()
        checksum(f)
        return (mb << 20) / 1e9 / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--sae", default=None, help="SAE directory (default: a random 4608-latent TopK SAE, k=32)")
    p.add_argument("--layer", type=int, default=9, help="hook layer for the random SAE")
    p.add_argument("--latents", type=int, default=4608, help="latents of the random SAE")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--k-attr", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "bf16-above-hook"])
    p.add_argument("--check-bf16", action="store_true", help="label agreement of bf16 autocast vs fp32")
    p.add_argument("--actors", action="store_true", help="also time the Ray pipeline with 1 vs 2 actors")
    p.add_argument("--actor-windows", type=int, default=16)
    p.add_argument("--json", type=Path, default=None,
                   help="also write the results here (bench/scale_model.py reads them)")
    p.add_argument("--smoke", action="store_true",
                   help="a 128-latent random SAE, 2 windows of 16 tokens, 1 repeat: checks the script runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.latents, a.windows, a.seq_len, a.batch_size, a.reps, a.actor_windows = 128, 2, 16, 2, 1, 4

    from common.teacher import load_teacher
    from pipeline.extract_runner import RunnerConfig, TeacherRunner
    from sae import hidden_size, load_sae, save_sae

    model = load_teacher(a.teacher, device=a.device if a.device != "auto" else "cpu")
    sae = load_sae(a.sae) if a.sae else random_sae(hidden_size(model), a.latents, 32, a.layer)
    sae_dir = a.sae
    if sae_dir is None and a.actors:
        sae_dir = str(save_sae(sae, tempfile.mkdtemp(prefix="bench-sae-")))
    cfg = RunnerConfig(teacher=a.teacher, sae=sae_dir or "random", device=a.device, dtype=a.dtype, k_attr=a.k_attr)
    runner = TeacherRunner(cfg, model=model, sae=sae)
    windows = real_windows(a.teacher, a.corpus, a.windows, a.seq_len, model.config.vocab_size)
    n_tok = windows.shape[0] * (windows.shape[1] - 1)
    dev = runner.device
    print(f"teacher {a.teacher} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), SAE "
          f"{sae.n_latents} latents k={sae.k} at layer {runner.layer}, {a.windows} windows x {a.seq_len} tokens, "
          f"batch {a.batch_size}, device {dev}{' ' + torch.cuda.get_device_name() if dev.type == 'cuda' else ''}, "
          f"precision {runner.precision}, torch threads {torch.get_num_threads()}")
    t = time_methods(runner, windows, a.batch_size, a.reps, a.k_attr)
    res: dict = {"setup": {
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join(["python", "bench/extract.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": str(dev), "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
        "teacher": a.teacher, "teacher_params": sum(p.numel() for p in model.parameters()),
        "sae_latents": sae.n_latents, "sae_k": sae.k, "layer": runner.layer, "precision": runner.precision,
        "windows": a.windows, "seq_len": a.seq_len, "batch_size": a.batch_size, "k_attr": a.k_attr}}
    res.update({k: {"seconds": round(v, 3), "tokens_per_s": round(n_tok / v, 1)} for k, v in t.items()})
    res["a_ours_vs_reference_speedup"] = round(t["reference"] / t["ours"], 2)
    res["b_ours_over_forward_time"] = round(t["ours"] / t["forward"], 2)
    for k in ("forward", "ours", "reference"):
        print(f"  {k:10s} {t[k]:8.2f} s   {n_tok / t[k]:10,.0f} tokens/s")
    print(f"(a) ours vs reference: {res['a_ours_vs_reference_speedup']:.2f}x tokens/s (target >= 3x)")
    print(f"(b) ours / forward alone: {res['b_ours_over_forward_time']:.2f}x time (target <= 2.2x)")
    if a.check_bf16:
        res["bf16_agreement"] = check_bf16(runner, windows, a.batch_size)
        print(f"bf16 autocast vs fp32 labels: {json.dumps(res['bf16_agreement'])}")
    if a.actors:
        thr = actors_throughput(a.teacher, sae_dir, a.corpus, a.actor_windows, a.seq_len, a.batch_size, a.device)
        res["c_actors"] = thr
        print(f"(c) Ray pipeline: 1 actor {thr[1]:,.0f} tok/s, 2 actors {thr[2]:,.0f} tok/s "
              f"-> {thr[2] / thr[1]:.2f}x ({thr['shards']} shards)")
    res["d_checksum_gb_per_s"] = round(checksum_speed(4 if a.smoke else 256), 3)
    print(f"(d) sha256 of a shard file: {res['d_checksum_gb_per_s']:.2f} GB/s on one core")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

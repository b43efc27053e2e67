"""Training-side benchmarks, side by side in one run on one machine (ratios are what to read):

(a) CoCoMix step time vs NTP step time at the paper's 69M shapes (8 layers, d=512, L_ins=3, C=32768,
    k=32, T=1024), scaled down by --scale on CPU: both at equal width and against the width-matched
    NTP baseline (d=624), with the analytic FLOP ratio.
(b) CoCoMix training from shards (labels read from an Arrow shard through the trainer's loader)
    vs the reference design that runs, inside every step, a GPT-2 teacher forward + backward with
    parameter gradients (12 layers, width 1.5x the student's, as GPT-2 124M vs the 69M student), the
    SAE encode and the dense (B*T, D) x (D, C) attribution. Target: >= 3x faster.
(c) Loader windows/s (the trainer's StepBatches over the Arrow shard, in-process and with workers)
    vs the windows/s the CoCoMix step consumes. Target: >= 50x.
(d) With --presets: tokens/s of one training step (CoCoMix and its width-matched NTP baseline) and
    peak memory for each named trainer preset (trainer/config.py) at --batch windows of its context,
    on random tokens and labels. bench/scale_model.py reads these (through --json) for the trainer's
    row of the scaling model (docs/scaling.md).
(e) With --head-compare PRESET: the chunked LM head + loss (--loss-chunk, trainer/chunked_ce.py) vs the
    full (B, T, V) logits at V=49,152, NTP and CoCoMix, each variant in a fresh process: tokens/s, peak
    RSS and system (kernel) time per step, as ratios to the first of --head-chunks (0 = full logits).

    python bench/train.py                         # CPU, shapes / 4, a few minutes
    python bench/train.py --scale 1 --device cuda --batch 8   # the paper's shapes on a GPU
    python bench/train.py --smoke                 # shapes / 16, one timed step: checks the script runs
    python bench/train.py --device cuda --batch 8 --presets 69m 386m 1.38b --json bench/results/train-gpu.json
    python bench/train.py --head-only --head-compare small --batch 8   # (e) only, ~3 min on 2 cores

Only this bench imports transformers (for the reference teacher); the trainer never does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shards import load_manifest, open_split  # noqa: E402
from trainer.config import PRESETS, ConceptConfig, ModelConfig, TrainConfig, get_preset  # noqa: E402
from trainer.data import StepBatches, StepSampler, step_loader  # noqa: E402
from trainer.model import GPT  # noqa: E402
from trainer.objectives import compute_losses  # noqa: E402
from trainer.synthetic import write_manifest  # noqa: E402

LOSS_CHUNK: int = TrainConfig.__dataclass_fields__["loss_chunk"].default  # the trainer's default

# The paper's 69M CoCoMix and its teacher (docs/method.md sections 1 and 2.5).
PAPER = dict(n_layer=8, d=512, d_ntp=624, n_head=8, l_ins=3, C=32768, k=32, T=1024, V=50304,
             teacher_layers=12, D=768, teacher_heads=12, sae_layer=6, k_sae=32, k_attr=4)


def shapes(scale: int) -> dict:
    s = dict(PAPER)
    for key in ("d", "d_ntp", "C", "T", "D"):
        s[key] = PAPER[key] // scale
    s["V"] = -(-PAPER["V"] // scale // 64) * 64
    s["n_head"] = max(2, PAPER["n_head"] // scale)
    s["teacher_heads"] = max(3, PAPER["teacher_heads"] // scale)
    s["d_ntp"] = -(-s["d_ntp"] // s["n_head"]) * s["n_head"]
    return s


def student(s: dict, kind: str, device) -> GPT:
    """kind: cocomix, ntp (equal width) or ntp-wide (the width-matched baseline)."""
    concept = ConceptConfig(n_concepts=s["C"], insert_layer=s["l_ins"], topk=s["k"]) if kind == "cocomix" else None
    d = s["d_ntp"] if kind == "ntp-wide" else s["d"]
    cfg = ModelConfig(vocab_size=s["V"], block_size=s["T"], n_layer=s["n_layer"], d_model=d, n_head=s["n_head"],
                      concept=concept)
    return GPT(cfg).to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StudentStep:
    """The trainer's step: forward, losses, backward, clip, AdamW (loop.py's body)."""

    def __init__(self, model: GPT, device, compile_: bool = False, chunk: int | None = None):
        self.model, self.device = model, device
        self.chunk = LOSS_CHUNK if chunk is None else chunk  # LM-head positions per chunk, 0 = full logits
        self.fwd = torch.compile(model) if compile_ else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=device.type == "cuda")
        self.mode = "cocomix" if model.concept is not None else "ntp"
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        with self.amp:
            out = self.fwd(batch["tokens"][:, :-1], head=self.chunk == 0)
            loss = compute_losses(out, batch, self.mode, head_weight=self.model.lm_head.weight, chunk=self.chunk).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class ReferenceLabels:
    """Teacher forward + backward (parameter gradients included), SAE encode, dense attribution,
    top-K_attr labels: what the reference code runs inside every training step."""

    def __init__(self, s: dict, device):
        from transformers import GPT2Config, GPT2LMHeadModel  # bench only

        cfg = GPT2Config(n_layer=s["teacher_layers"], n_embd=s["D"], n_head=s["teacher_heads"], vocab_size=s["V"],
                         n_positions=s["T"], attn_implementation="sdpa")
        self.teacher = GPT2LMHeadModel(cfg).to(device)  # random weights: cost, not quality, is measured
        self.teacher.train()  # the reference keeps parameters trainable and computes their gradients
        g = torch.Generator().manual_seed(0)
        D, C = s["D"], s["C"]
        self.W_enc = (torch.randn(C, D, generator=g) / D**0.5).to(device)
        self.b_pre = torch.zeros(D, device=device)
        self.b_lat = torch.zeros(C, device=device)
        self.W_dec = (torch.randn(D, C, generator=g) / C**0.5).to(device)
        self.s = s
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def flops_per_token(self) -> float:
        """Teacher forward + backward (3x forward, matmuls, attention at average context T/2), SAE
        encode and decode, dense attribution: 2 FLOPs per multiply-add."""
        s = self.s
        D, T, C, V = s["D"], s["T"], s["C"], s["V"]
        teacher = s["teacher_layers"] * (2 * 12 * D * D + 2 * 2 * D * T / 2) + 2 * D * V
        return 3 * teacher + 3 * 2 * D * C

    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        x_in, y = tokens[:, :-1], tokens[:, 1:]
        with self.amp:
            out = self.teacher(x_in, output_hidden_states=True)
            h = out.hidden_states[s["sae_layer"]]
            h.retain_grad()
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        g = h.grad.float()  # (B, T, D)
        self.teacher.zero_grad(set_to_none=True)
        h = h.detach().float()
        mu = h.mean(-1, keepdim=True)
        std = (h - mu).std(-1, keepdim=True)
        xn = (h - mu) / (std + 1e-5)
        c_pre = (xn - self.b_pre) @ self.W_enc.T + self.b_lat  # (B, T, C)
        v, i = torch.topk(c_pre, s["k_sae"], -1)
        c = torch.zeros_like(c_pre).scatter_(-1, i, F.relu(v))  # dense code, as the reference
        x_hat = (c @ self.W_dec.T + self.b_pre) * std + mu  # the SAE forward also decodes  # noqa: F841
        a = (g @ self.W_dec) * c  # dense (B*T, D) x (D, C) attribution
        scores, ids = torch.topk(a, s["k_attr"], -1)
        return ids, scores


def peak_memory_mb(device) -> float:
    """Peak memory so far: CUDA allocations on a GPU (reset per measurement), else this process's
    peak RSS (monotone over the run: a later preset's figure includes the earlier ones)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def preset_steps(names: list[str], batch: int, warmup: int, iters: int, device, compile_: bool) -> dict:
    """(d) tokens/s of one training step per preset and mode (CoCoMix, width-matched NTP), on random
    tokens and K_attr=4 labels: the step's cost, not the loader's ((c) covers that)."""
    out: dict = {}
    for name in names:
        out[name] = {}
        for mode in ("cocomix", "ntp"):
            cfg = get_preset(name, mode)
            T = cfg.block_size
            b = random_batch(cfg, batch, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(0)
            model = GPT(cfg).to(device)
            step = StudentStep(model, device, compile_)
            t = timeit({mode: lambda step=step, b=b: step(b)}, warmup, iters, device)[mode]
            out[name][mode] = {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "seq_len": T, "batch": batch,
                               "params": model.num_params(), "flops_per_token": model.flops_per_token(T),
                               "step_s": t, "tokens_per_s": batch * T / t, "peak_memory_mb": peak_memory_mb(device)}
            r = out[name][mode]
            print(f"(d) preset {name:6s} {mode:8s} d={cfg.d_model:5d} params {r['params'] / 1e6:8.2f}M  "
                  f"step {t * 1e3:9.1f} ms  {r['tokens_per_s']:10,.0f} tok/s  "
                  f"{r['flops_per_token'] * r['tokens_per_s'] / 1e12:6.2f} TFLOP/s  "
                  f"peak {r['peak_memory_mb']:,.0f} MB", flush=True)
            del model, step, b
    return out


def random_batch(cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A seeded batch of random tokens and K_attr=4 concept labels for ``cfg``'s shapes (the step's
    cost does not depend on the values)."""
    T, V = cfg.block_size, cfg.vocab_size
    C = cfg.concept.n_concepts if cfg.concept else 2
    g = torch.Generator().manual_seed(0)
    b = {"tokens": torch.randint(0, V, (batch, T + 1), generator=g),
         "concept_ids": torch.randint(0, C, (batch, T, 4), generator=g),
         "concept_scores": torch.rand(batch, T, 4, generator=g) + 0.1}
    return {k: v.to(device) for k, v in b.items()}


def _head_child(preset: str, mode: str, chunk: int, batch: int, warmup: int, iters: int, device: str,
                threads: int, q) -> None:
    """(e) one variant in a fresh process (peak RSS is per process): median step time, peak RSS and the
    system (kernel) CPU time per step."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = get_preset(preset, mode)
    cfg.vocab_size = HEAD_VOCAB
    T = cfg.block_size
    b = random_batch(cfg, batch, dev)
    torch.manual_seed(0)
    step = StudentStep(GPT(cfg).to(dev), dev, chunk=chunk)
    for _ in range(warmup):
        step(b)
    times, sys_s = [], []
    for _ in range(iters):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        step(b)
        sync(dev)
        times.append(time.perf_counter() - t0)
        sys_s.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime)
    q.put({"step_s": sorted(times)[len(times) // 2], "sys_s_per_step": sum(sys_s) / len(sys_s),
           "tokens_per_s": batch * T / sorted(times)[len(times) // 2], "peak_memory_mb": peak_memory_mb(dev)})


HEAD_VOCAB = 49152  # SmolLM2's tokenizer, the students' vocabulary in the demo and recipes


def head_compare(preset: str, chunks: list[int], batch: int, warmup: int, iters: int, device, threads: int,
                 rounds: int = 2) -> dict:
    """(e) the chunked LM head + loss (trainer/chunked_ce.py) vs the full (B, T, V) logits, per mode, each
    variant in its own process, alternated over ``rounds`` (the better round of each is kept)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out: dict = {}
    for mode in ("ntp", "cocomix"):
        best: dict[int, dict] = {}
        for _ in range(rounds):
            for c in chunks:
                q = ctx.Queue()
                args = (preset, mode, c, batch, warmup, iters, str(device), threads, q)
                p = ctx.Process(target=_head_child, args=args)
                p.start()
                r = q.get()
                p.join()
                if c not in best or r["step_s"] < best[c]["step_s"]:
                    best[c] = r
        out[mode] = {str(c): r for c, r in best.items()}
        base = best[chunks[0]]
        for c in chunks:
            r = best[c]
            print(f"(e) {preset} {mode:8s} V={HEAD_VOCAB} batch {batch}: loss chunk {c or 'full':>5}  "
                  f"{r['tokens_per_s']:8,.0f} tok/s ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)  "
                  f"peak RSS {r['peak_memory_mb']:7,.0f} MB ({r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x)  "
                  f"system {r['sys_s_per_step'] * 1e3:6.0f} ms/step "
                  f"({r['sys_s_per_step'] / max(base['sys_s_per_step'], 1e-9):.2f}x)", flush=True)
    return out


def timeit(fns: dict, warmup: int, iters: int, device) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (one call of each per round) so
    that load from other processes spreads evenly over the contenders."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=4, help="divide widths, C, T and V by this (1 = paper shapes)")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the students")
    p.add_argument("--presets", nargs="*", default=[], choices=sorted(PRESETS), metavar="PRESET",
                   help=f"(d) also time a training step of these trainer presets ({', '.join(PRESETS)})")
    p.add_argument("--head-compare", default="", choices=["", *sorted(PRESETS)], metavar="PRESET",
                   help="(e) the chunked LM head and loss vs full logits on this preset (V=49152), each in a "
                   "fresh process: tokens/s, peak RSS, system time, as ratios to the first of --head-chunks")
    p.add_argument("--head-chunks", type=int, nargs="+", default=[0, LOSS_CHUNK],
                   help=f"(e) loss chunks to compare, 0 = full logits (default 0 {LOSS_CHUNK})")
    p.add_argument("--head-only", action="store_true", help="run only (e)")
    p.add_argument("--json", default="", help="also write the results here (bench/scale_model.py reads them)")
    p.add_argument("--smoke", action="store_true", help="shapes / 16, batch 2, one timed step, short loader runs, "
                   "(d) on the tiny preset: checks the script runs")
    a = p.parse_args(argv)
    loader_s, loader_steps = 2.0, 400
    if a.smoke:
        a.scale, a.batch, a.iters, a.warmup = 16, 2, 1, 1
        loader_s, loader_steps = 0.2, 20
        a.presets = ["tiny"]
        a.head_compare = a.head_compare or "tiny"
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    s = shapes(a.scale)
    B, T = a.batch, s["T"]
    res: dict = {"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
                 "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                 "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                 "command": " ".join(["python", "bench/train.py", *(argv if argv is not None else sys.argv[1:])]),
                 "scale": a.scale, "shapes": s, "batch": B}
    if a.head_only:
        if not a.head_compare:
            p.error("--head-only needs --head-compare PRESET")
        res["e_head"] = head_compare(a.head_compare, a.head_chunks, B, a.warmup, a.iters, dev, a.threads)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        return res
    print(f"shapes (paper / {a.scale}): {json.dumps(s)}; batch {B} x T {T}; device {res['device']}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        n_windows = max(64, 4 * B)
        man = write_manifest(Path(tmp) / "d", windows=n_windows, val_windows=4, seq_len=T, vocab=s["V"],
                             n_concepts=s["C"], k_attr=s["k_attr"], k_mix=8, k_kd=4, shards_per_split=2)
        m = load_manifest(man)
        fields = ["tokens", "concept_ids", "concept_scores"]
        dtypes = {k: m.fields[k].dtype for k in fields}
        ds = open_split(m, "train", fields=fields)
        src = StepBatches(ds, StepSampler(len(ds), B, seed=0), fields, dtypes, vocab_size=s["V"], n_concepts=s["C"])
        it = iter(range(10**9))

        def next_batch() -> dict[str, torch.Tensor]:
            return {k: v.to(dev, non_blocking=True) for k, v in src[next(it)].items()}

        fixed = next_batch()

        # (a) CoCoMix vs NTP -------------------------------------------------------------------
        models, fns = {}, {}
        for kind in ("cocomix", "ntp", "ntp-wide"):
            torch.manual_seed(0)
            models[kind] = student(s, kind, dev)
            fns[kind] = (lambda st: (lambda: st(fixed)))(StudentStep(models[kind], dev, a.compile))
        steps = timeit(fns, a.warmup, a.iters, dev)
        for kind, model in models.items():
            flops = model.flops_per_token(T) * B * T
            res[f"a_{kind}_step_s"] = steps[kind]
            res[f"a_{kind}_flops_per_step"] = flops
            res[f"a_{kind}_params"] = model.num_params()
            res[f"a_{kind}_tokens_per_s"] = B * T / steps[kind]
            print(f"(a) {kind:9s} d={model.cfg.d_model:5d} params {model.num_params() / 1e6:7.2f}M  "
                  f"step {steps[kind] * 1e3:8.1f} ms  "
                  f"{B * T / steps[kind]:9.0f} tok/s  {flops / steps[kind] / 1e12:6.2f} TFLOP/s", flush=True)
        del models, fns
        res["a_time_ratio_cocomix_vs_ntp_equal_width"] = steps["cocomix"] / steps["ntp"]
        res["a_flop_ratio_cocomix_vs_ntp_equal_width"] = res["a_cocomix_flops_per_step"] / res["a_ntp_flops_per_step"]
        res["a_time_ratio_cocomix_vs_ntp_wide"] = steps["cocomix"] / steps["ntp-wide"]
        res["a_flop_ratio_cocomix_vs_ntp_wide"] = res["a_cocomix_flops_per_step"] / res["a_ntp-wide_flops_per_step"]
        print(f"(a) CoCoMix / NTP equal width: time {res['a_time_ratio_cocomix_vs_ntp_equal_width']:.2f}x, "
              f"FLOPs {res['a_flop_ratio_cocomix_vs_ntp_equal_width']:.2f}x;  vs width-matched NTP (d={s['d_ntp']}): "
              f"time {res['a_time_ratio_cocomix_vs_ntp_wide']:.2f}x, "
              f"FLOPs {res['a_flop_ratio_cocomix_vs_ntp_wide']:.2f}x", flush=True)

        # (b) from shards vs the reference design -----------------------------------------------
        torch.manual_seed(0)
        co = StudentStep(student(s, "cocomix", dev), dev, a.compile)
        ref_labels = ReferenceLabels(s, dev)

        def ref_step() -> None:
            batch = next_batch()
            ids, scores = ref_labels(batch["tokens"])
            co({"tokens": batch["tokens"], "concept_ids": ids, "concept_scores": scores.float()})

        tb = timeit({"ours": lambda: co(next_batch()), "ref": ref_step}, a.warmup, a.iters, dev)
        ours, ref = tb["ours"], tb["ref"]
        f_ours = co.model.flops_per_token(T)
        f_ref = f_ours + ref_labels.flops_per_token()
        res["b_shards_step_s"], res["b_reference_step_s"], res["b_speedup"] = ours, ref, ref / ours
        res["b_flop_ratio"] = f_ref / f_ours
        print(f"(b) from shards {ours * 1e3:.1f} ms/step vs reference (teacher fwd+bwd, SAE, dense attribution) "
              f"{ref * 1e3:.1f} ms/step: {ref / ours:.2f}x faster (target >= 3x); "
              f"FLOP ratio {f_ref / f_ours:.2f}x", flush=True)

        # (c) loader vs consumption -------------------------------------------------------------
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < loader_s:
            src[n]
            n += 1
        inproc = n * B / (time.perf_counter() - t0)
        big = StepBatches(ds, StepSampler(len(ds), 32, seed=0), fields, dtypes, vocab_size=s["V"], n_concepts=s["C"])
        loader = step_loader(big, 0, loader_steps, workers=2)
        t0 = time.perf_counter()
        k = 0
        for _ in loader:
            k += 1
        workers = k * 32 / (time.perf_counter() - t0)
        consume = B / ours
        res.update(c_loader_windows_per_s_inprocess=inproc, c_loader_windows_per_s_2workers=workers,
                   c_trainer_windows_per_s=consume, c_ratio_inprocess=inproc / consume,
                   c_ratio_2workers=workers / consume)
        print(f"(c) loader {inproc:,.0f} windows/s in-process, "
              f"{workers:,.0f} windows/s with 2 workers (incl. start-up); "
              f"trainer consumes {consume:,.1f} windows/s: {inproc / consume:,.0f}x / {workers / consume:,.0f}x "
              "(target >= 50x)", flush=True)
        ds.close()
    if a.presets:  # (d)
        res["d_presets"] = preset_steps(a.presets, B, a.warmup, a.iters, dev, a.compile)
    res["peak_memory_mb"] = peak_memory_mb(dev)
    if a.head_compare:  # (e), after peak_memory_mb: its variants run in their own processes
        res["e_head"] = head_compare(a.head_compare, a.head_chunks, B, a.warmup, a.iters, dev, a.threads)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()

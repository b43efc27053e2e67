"""The scaling model: the wall time, bottleneck, storage and GPU-hours of stage 1, stage 2 and training
for OpenWebText (9B tokens) and a 1T-token corpus on clusters of K nodes, computed from benchmark
outputs (each bench's --json) and the committed GPU figures; docs/scaling.md presents it.

    make bench                                    # writes bench/results/{stage1,manifest,extract,train}.json
    python bench/scale_model.py                   # the tables, plain text
    python bench/scale_model.py --markdown        # the tables of docs/scaling.md
    python bench/scale_model.py --json bench/results/scale.json
    python bench/scale_model.py --smoke           # built-in fixture inputs: checks the script runs

A stage runs at the smallest of its limits (tokens/s), each from one measured figure (docs/scaling.md):
  stage 1, K CPU nodes of N cores: workers (K*N - 1 tasks, one core each: the driver keeps one) x one
    worker's tokens/s, at most one task per input partition; the driver (tokens per shard / its CPU
    seconds per shard); storage (corpus bytes read + token bytes written).
  stage 2, K GPUs: K x one GPU's tokens/s; the driver's manifest bookkeeping per shard (at 10k shards);
    storage (token bytes read + concept bytes written); plus the start-up sha256 of every token shard
    (8 threads on the driver).
  training, K GPUs, data parallel: K x one GPU's tokens/s for the preset; the loader; storage (the
    fields CoCoMix reads); plus --verify open (sha256 of every part, 8 threads per rank).
What no bench measures is a flag printed with the table (storage bandwidth, cores per node), and a
missing input is named with the command that writes it, never replaced by a made-up figure.

One file, longer than most: bench/ holds one script per benchmark (tests/test_bench.py runs every
bench/*.py in its --smoke mode), so the input readers, the model and the tables stay together here.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/scale_model.py` puts bench/ first on sys.path, not the checkout
from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli  # noqa: E402

CORPORA = {"OpenWebText (9B tokens)": 9e9, "1T tokens": 1e12}
PRESETS = ("69m", "386m", "1.38b")  # the paper's sizes (trainer/config.py)
VERIFY_THREADS = 8  # shards verify_parts and checksums: min(8, CPUs) threads per rank / stage-2 driver
# Fields each consumer reads (trainer/validate.py for CoCoMix); stage 2's defaults (pipeline/extract_runner.py
# RunnerConfig: k_attr 4, k_mix 32, no KD) decide what it writes.
COCOMIX_READS = ("tokens", "concept_ids", "concept_scores")
STAGE2_WRITES = ("concept_ids", "concept_scores", "mix_ids", "mix_vals", "teacher_nll")
# input -> (file under --results, the command that writes it, whether the model can go without it)
INPUTS = {
    "stage1": ("stage1.json", "python bench/stage1.py --json bench/results/stage1.json", False),
    "manifest": ("manifest.json", "python bench/manifest.py --json bench/results/manifest.json", False),
    "extract": ("extract.json", "python bench/extract.py --json bench/results/extract.json", False),
    "extract_gpu": ("extract-gpu.json", "python bench/extract.py --device cuda --sae SAE_DIR --windows 64 "
                    "--batch-size 16 --dtype bfloat16 --json bench/results/extract-gpu.json  (on a GPU)", True),
    "train_gpu": ("train-gpu.json", "python bench/train.py --device cuda --batch 8 --presets 69m 386m 1.38b "
                  "--json bench/results/train-gpu.json  (on a GPU)", True),
}


@dataclass
class ScaleConfig:
    """Where the measurements are and what the model assumes where nothing was measured."""

    results: str = "bench/results"
    """Folder holding each bench's --json output (stage1.json, manifest.json, extract.json, and from a GPU
    extract-gpu.json, train-gpu.json)."""
    gpu_figures: str = "bench/results/h200-2026.json"
    """Committed GPU figures (machine and date inside), used where no GPU run of the bench is in --results."""
    manifests: list[str] = field(default_factory=lambda: ["manifests/owt.json", "manifests/demo.json"])
    """Concept manifests whose field table gives the bytes per token (the first naming a field wins)."""
    nodes: list[int] = field(default_factory=lambda: [1, 8, 64])
    """Cluster sizes K: CPU nodes for stage 1, GPUs for stage 2 and training."""
    cores_per_node: int = 32
    """CPU cores per stage-1 node (an assumption: no bench measures a cluster)."""
    task_mb: float | None = None
    """Stage 1's --task-mb to model (default: stage 1's own default): input bytes per task."""
    shard_mb: float | None = None
    """Stage 1's --shard-mb to model (default: stage 1's own default). Each task writes at least one shard,
    so the shard count is at least the task count and at least the token bytes / --shard-mb."""
    storage_gbps: float = 2.0
    """Aggregate bandwidth of the shared file system in GB/s, reads and writes together (an assumption,
    not measured: EFS / NFS give roughly 0.5-3, Lustre / FSx 10 and more)."""

    def __post_init__(self) -> None:
        if not self.nodes or min(self.nodes) < 1:
            raise ValueError(f"--nodes must be positive cluster sizes, got {self.nodes}")
        if self.cores_per_node < 2:
            raise ValueError(f"--cores-per-node must be >= 2 (the driver keeps one), got {self.cores_per_node}")
        for k in ("task_mb", "shard_mb"):
            if getattr(self, k) is not None and getattr(self, k) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(self, k)}")
        if self.storage_gbps <= 0:
            raise ValueError(f"--storage-gbps must be > 0, got {self.storage_gbps}")


@dataclass
class Fig:
    """One measured figure and where it comes from (file, machine, date)."""

    value: float
    source: str


class Inputs:
    """Every figure the model uses, read from the bench outputs; what is missing, with the command."""

    def __init__(self, cfg: ScaleConfig):
        self.cfg, self.figs, self.missing = cfg, {}, []
        self.results = Path(cfg.results)
        raw = {k: self._load(k) for k in INPUTS}
        self.gpu = self._gpu_file()
        self._stage1(raw["stage1"])
        self._manifest(raw["manifest"])
        self._extract(raw["extract"], raw["extract_gpu"])
        self._trainer(raw["train_gpu"])
        self._storage()

    def _load(self, key: str) -> dict | None:
        name, cmd, optional = INPUTS[key]
        path = self.results / name
        if not path.is_file():
            if not optional:
                self.missing.append(f"{path} is missing: run `{cmd}`")
            return None
        try:
            d = json.loads(path.read_text())
            if isinstance(d, dict) and "measured" not in d and "measured" not in d.get("setup", {}):
                d["measured"] = "file of " + datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
            return d
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e}): rerun `{cmd}`") from None

    def _put(self, key: str, d: dict | None, path: tuple, source: str, input_key: str) -> None:
        """figs[key] = d[path...], or a line in ``missing`` naming the key and the command."""
        if d is None:
            return
        v = d
        for p in path:
            if not isinstance(v, dict) or p not in v:
                name, cmd, _ = INPUTS[input_key]
                self.missing.append(f"{self.results / name} has no {'.'.join(map(str, path))}: rerun `{cmd}`")
                return
            v = v[p]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            name, cmd, _ = INPUTS[input_key]
            self.missing.append(f"{self.results / name}: {'.'.join(map(str, path))} is {v!r}, not a number: "
                                f"rerun `{cmd}`")
            return
        self.figs[key] = Fig(float(v), source)

    @staticmethod
    def _src(name: str, d: dict, machine: str | None = None) -> str:
        when = d.get("measured") or d.get("setup", {}).get("measured") or "undated"
        mach = d.get("machine") or machine or d.get("setup", {}).get("device_name") or d.get("device") or "this machine"
        return f"{name} ({mach}, {when})"

    def _stage1(self, d: dict | None) -> None:
        if d is None:
            return
        s = self._src("stage1.json", d, "this CPU")
        tps = d.get("tokens_per_s", {})
        if "1" not in tps and "in_process" in tps:  # a run without Ray (--smoke): the tasks in the driver
            self._put("s1_worker_tps", d, ("tokens_per_s", "in_process"), s + ", tasks in the driver", "stage1")
        else:
            self._put("s1_worker_tps", d, ("tokens_per_s", "1"), s + ", 1 Ray worker", "stage1")
        self._put("s1_driver_s_per_shard", d, ("driver_cpu_s_per_shard",), s, "stage1")
        self._put("s1_tail_per_partition", d, ("tail_tokens_per_partition",), s, "stage1")
        if "2" in d.get("tokens_per_s", {}):
            self._put("s1_two_worker_tps", d, ("tokens_per_s", "2"), s, "stage1")

    def _manifest(self, d: dict | None) -> None:
        if d is None:
            return
        s = self._src("manifest.json", d, "this CPU")
        self._put("m_shards", d, ("shards",), s, "manifest")  # the large synthetic manifest's size
        for k in ("load_s", "open_split_s", "open_split_mb"):
            self._put(f"m_{k}", d, (k,), s, "manifest")
        self._put("m_bookkeeping_s_per_shard", d, ("bookkeeping_s_per_shard", str(d.get("shards"))), s, "manifest")

    def _extract(self, cpu: dict | None, gpu: dict | None) -> None:
        if cpu is not None and cpu.get("setup", {}).get("device", "cpu") != "cpu":
            name, cmd, _ = INPUTS["extract"]
            self.missing.append(f"{self.results / name} was measured on {cpu['setup']['device']}, not a CPU: "
                                f"rerun `{cmd}` (a GPU run goes to {INPUTS['extract_gpu'][0]})")
        elif cpu is not None:
            s = self._src("extract.json", cpu)
            actors = cpu.get("c_actors")
            if actors:  # the whole Ray pipeline, one actor with threads_per_actor threads
                self._put("s2_cpu_actor_tps", cpu, ("c_actors", "1"), s + ", Ray, 1 actor", "extract")
                self._put("s2_cpu_actor_threads", cpu, ("c_actors", "threads_per_actor", "1"), s, "extract")
            else:  # the runner in one process with torch_threads threads
                self._put("s2_cpu_actor_tps", cpu, ("ours", "tokens_per_s"), s + ", runner only", "extract")
                self._put("s2_cpu_actor_threads", cpu, ("setup", "torch_threads"), s, "extract")
            self._put("checksum_gbps", cpu, ("d_checksum_gb_per_s",), s, "extract")
        h200 = self.gpu
        if h200 is not None:
            s = f"{Path(self.cfg.gpu_figures).name} ({h200['machine']}, {h200['measured']}), runner only"
            for prec in ("float32", "bfloat16"):
                self._put(f"s2_gpu_tps_{prec}", h200, ("stage2", "tokens_per_s", prec, "ours"), s, "extract_gpu")
        if gpu is not None and gpu.get("setup", {}).get("device", "cpu") != "cpu":  # a fresher GPU run wins
            prec = gpu["setup"].get("precision", "float32")
            if prec in ("float32", "bfloat16"):
                self._put(f"s2_gpu_tps_{prec}", gpu, ("ours", "tokens_per_s"), self._src("extract-gpu.json", gpu),
                          "extract_gpu")

    def _gpu_file(self) -> dict | None:
        path = Path(self.cfg.gpu_figures)
        if not path.is_file():
            self.missing.append(f"{path} is missing: it is committed in the repository (git checkout it)")
            return None
        return json.loads(path.read_text())

    def _trainer(self, gpu: dict | None) -> None:
        h200 = self.gpu
        if h200 is not None:
            t = h200["trainer"]
            s = f"{Path(self.cfg.gpu_figures).name} ({h200['machine']}, {h200['measured']}), {t['precision']}"
            self.figs["tr_tps_69m"] = Fig(t["batch"] * t["seq_len"] / t["shards_step_s"], s)
            self.figs["tr_loader_tps"] = Fig(t["loader_windows_per_s"] * t["seq_len"], s)
        if gpu is not None and gpu.get("device", "cpu") != "cpu":
            s = self._src("train-gpu.json", gpu)
            for p, r in gpu.get("d_presets", {}).items():
                self.figs[f"tr_tps_{p}"] = Fig(r["cocomix"]["tokens_per_s"], s)
            if "c_loader_windows_per_s_2workers" in gpu:
                self.figs["tr_loader_tps"] = Fig(gpu["c_loader_windows_per_s_2workers"] * gpu["shapes"]["T"], s)
        for p in PRESETS:  # a preset without a GPU figure: the 69m figure at equal FLOP/s, marked as estimated
            if f"tr_tps_{p}" not in self.figs and "tr_tps_69m" in self.figs:
                ratio = flops_per_token("69m") / flops_per_token(p)
                self.figs[f"tr_tps_{p}"] = Fig(self.figs["tr_tps_69m"].value * ratio,
                                               f"ESTIMATE: the 69m figure x its FLOPs/token ratio ({ratio:.3f}), "
                                               "no GPU run of bench/train.py --presets")

    def _storage(self) -> None:
        """Bytes per token of every field (dtype x shape / seq_len), the corpus's bytes per token, and the
        on-disk size of each part over its fields' bytes (the container's overhead), from real manifests."""
        self.fields: dict[str, dict] = {}
        self.overhead: dict[str, float] = {}
        for name in self.cfg.manifests:
            m = json.loads(Path(name).read_text())
            T = m["seq_len"]
            for f, spec in m["fields"].items():
                b = math.prod(spec["shape"]) * _itemsize(spec["dtype"]) / T
                self.fields.setdefault(f, {"dtype": spec["dtype"], "shape": spec["shape"], "part": spec["part"],
                                           "bytes_per_token": b, "manifest": name})
            for part in {s["part"] for s in m["fields"].values()}:
                per_window = sum(math.prod(s["shape"]) * _itemsize(s["dtype"]) for s in m["fields"].values()
                                 if s["part"] == part)
                wins = sum(sh["windows"] for sp in m["splits"].values() for sh in sp["shards"])
                disk = sum(sh["parts"][part]["bytes"] for sp in m["splits"].values() for sh in sp["shards"])
                self.overhead.setdefault(part, disk / (per_window * wins) - 1)
            c = m.get("corpus", {})
            stream = sum(sp.get("stream_tokens", 0) for sp in m["splits"].values())
            if c.get("bytes") and stream and "corpus_bytes_per_token" not in self.figs:
                self.figs["corpus_bytes_per_token"] = Fig(c["bytes"] / stream, name)
        for f in sorted(set(STAGE2_WRITES + COCOMIX_READS) - set(self.fields)):
            raise ValueError(f"no manifest in --manifests has the field {f}: add one that does")
        if "corpus_bytes_per_token" not in self.figs:
            raise ValueError("no manifest in --manifests records its corpus's bytes (corpus.bytes): add one that does")

    def bytes_per_token(self, names: tuple[str, ...]) -> float:
        return sum(self.fields[f]["bytes_per_token"] * (1 + self.overhead[self.fields[f]["part"]]) for f in names)


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def flops_per_token(preset: str) -> float:
    """Training FLOPs per token of the preset's CoCoMix model (trainer/model.py), built on the meta device."""
    import torch

    from trainer.config import get_preset
    from trainer.model import GPT

    cfg = get_preset(preset, "cocomix")
    with torch.device("meta"):
        return GPT(cfg).flops_per_token(cfg.block_size)


@dataclass
class Layout:
    """How stage 1's defaults cut a corpus: tasks (input partitions) and shards."""

    tasks: int
    shards: int
    tokens_per_task: float
    tokens_per_shard: float
    text: str


def layout(inp: Inputs, tokens: float) -> Layout:
    """Stage 1's defaults (pipeline/stage1_config.py): --shard-mb of windows of seq_len + 1 uint16 tokens;
    --task-mb of input per task (common/partition.py), each task packing and writing its own shards, so a
    task smaller than a shard writes one smaller shard. Input bytes per token from a real manifest."""
    from dataclasses import fields

    from pipeline.stage1_config import TokenizeConfig

    d = {f.name: f.default for f in fields(TokenizeConfig)}
    for k in ("task_mb", "shard_mb"):  # the model's flags, when given, stand for stage 1's
        if getattr(inp.cfg, k) is not None:
            d[k] = getattr(inp.cfg, k)
    shard = int(d["shard_mb"] * 1e6) // ((d["seq_len"] + 1) * 2) * d["seq_len"]
    if "task_mb" not in d:  # one driver packs the whole stream
        n = math.ceil(tokens / shard)
        return Layout(1, n, tokens, tokens / n, f"{n:,} shards of {shard / 1e6:.1f}M tokens (--shard-mb "
                      f"{d['shard_mb']:g})")
    per_task = d["task_mb"] * 1e6 / inp.figs["corpus_bytes_per_token"].value
    tasks = math.ceil(tokens / per_task)
    shards = tasks * math.ceil(per_task / shard)
    return Layout(tasks, shards, per_task, tokens / shards,
                  f"{tasks:,} stage-1 tasks of {per_task / 1e6:.1f}M tokens (--task-mb {d['task_mb']:g} at "
                  f"{inp.figs['corpus_bytes_per_token'].value:.2f} corpus bytes per token), {shards:,} shards of "
                  f"{tokens / shards / 1e6:.1f}M tokens (--shard-mb {d['shard_mb']:g}: at most {shard / 1e6:.1f}M)")


# ---------------------------------------------------------------------------------------------------
# The model: a stage's limits (tokens/s) on K units, its start-up cost, its wall time.


@dataclass
class Limit:
    name: str
    tokens_per_s: float
    why: str


@dataclass
class Cell:
    """One stage on one cluster size for one corpus."""

    wall_s: float | None = None
    bottleneck: str | None = None
    lower_bound: bool = False  # a limit's figure is missing (``needs``): the stage takes at least wall_s
    startup_s: float = 0.0
    unit_hours: float | None = None  # GPU-hours (stage 2, training) or core-hours (stage 1)
    limits: list[Limit] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)  # figures missing for this cell
    notes: list[str] = field(default_factory=list)


def _finish(cell: Cell, tokens: float, units: int) -> Cell:
    """The wall time at the smallest limit; with a limit's figure missing (``needs``), a lower bound."""
    if not cell.limits:
        return cell
    low = min(cell.limits, key=lambda lim: lim.tokens_per_s)
    cell.bottleneck = low.name
    cell.wall_s = cell.startup_s + tokens / low.tokens_per_s
    cell.unit_hours = cell.wall_s * units / 3600
    cell.lower_bound = bool(cell.needs)
    return cell


# Which input file writes each figure (by the figure's prefix), for a cell that lacks it.
PRODUCER = {"s1_": "stage1.json", "m_": "manifest.json", "s2_cpu": "extract.json", "checksum": "extract.json",
            "s2_gpu": "the GPU figures", "tr_": "the GPU figures"}


def _need(inp: Inputs, cell: Cell, *keys: str) -> bool:
    """True when every figure is there; else the missing ones go to ``cell.needs``."""
    by: dict[str, list[str]] = {}
    for k in keys:
        if k not in inp.figs:
            by.setdefault(next(v for p, v in PRODUCER.items() if k.startswith(p)), []).append(k)
    cell.needs += [f"{src} ({', '.join(ks)})" for src, ks in by.items()]
    return not by


def stage1(inp: Inputs, tokens: float, k: int) -> Cell:
    cfg, f, c = inp.cfg, inp.figs, Cell()
    if not _need(inp, c, "s1_worker_tps"):
        return c
    workers, lay = k * cfg.cores_per_node - 1, layout(inp, tokens)
    if lay.tasks < workers:
        c.notes.append(f"{lay.tasks:,} tasks < {workers:,} workers: the extra workers idle")
        workers = lay.tasks
    if "s1_tail_per_partition" in f:  # each task's last partial window is dropped
        c.notes.append(f"tail tokens dropped: {lay.tasks * f['s1_tail_per_partition'].value / tokens:.4%}")
    per = f["s1_worker_tps"].value
    c.limits.append(Limit("workers", workers * per, f"{workers:,} x {per:,.0f} tokens/s per worker"))
    tps = lay.tokens_per_shard
    if _need(inp, c, "s1_driver_s_per_shard"):
        drv = f["s1_driver_s_per_shard"].value
        c.limits.append(Limit("driver", tps / drv if drv > 0 else math.inf,
                              f"{tps:,.0f} tokens per shard / {drv:.4f} driver CPU s per shard"))
    io = f["corpus_bytes_per_token"].value + inp.bytes_per_token(("tokens",))
    c.limits.append(Limit("storage", cfg.storage_gbps * 1e9 / io,
                          f"{cfg.storage_gbps:g} GB/s / {io:.2f} B per token (corpus read + tokens written)"))
    return _finish(c, tokens, k * cfg.cores_per_node)


def _stage2_common(inp: Inputs, c: Cell, tokens: float) -> None:
    """The driver's bookkeeping, storage and the start-up check: the same on GPUs and CPUs."""
    f, tps = inp.figs, layout(inp, tokens).tokens_per_shard
    if _need(inp, c, "m_bookkeeping_s_per_shard"):
        b = f["m_bookkeeping_s_per_shard"].value
        c.limits.append(Limit("driver", tps / b if b > 0 else math.inf,
                              f"{tps:,.0f} tokens per shard / {b:.4f} s manifest bookkeeping per shard"))
    io = inp.bytes_per_token(("tokens",) + STAGE2_WRITES)
    c.limits.append(Limit("storage", inp.cfg.storage_gbps * 1e9 / io,
                          f"{inp.cfg.storage_gbps:g} GB/s / {io:.1f} B per token (tokens read + concepts written)"))
    if _need(inp, c, "checksum_gbps"):  # pipeline/extract_plan.py verify_token_shards: the driver, 8 threads
        gb = tokens * inp.bytes_per_token(("tokens",)) / 1e9
        c.startup_s = gb / min(VERIFY_THREADS * f["checksum_gbps"].value, inp.cfg.storage_gbps)
        c.notes.append(f"start-up sha256 of {gb:,.0f} GB of token shards: {fmt_time(c.startup_s)}")


def stage2_gpu(precision: str):
    def build(inp: Inputs, tokens: float, k: int) -> Cell:
        c = Cell()
        if not _need(inp, c, f"s2_gpu_tps_{precision}"):
            return c
        per = inp.figs[f"s2_gpu_tps_{precision}"].value
        c.limits.append(Limit("GPUs", k * per, f"{k} x {per:,.0f} tokens/s per GPU ({precision})"))
        _stage2_common(inp, c, tokens)
        return _finish(c, tokens, k)
    return build


def stage2_cpu(inp: Inputs, tokens: float, k: int) -> Cell:
    """One actor per node using all its cores; tokens/s assumed linear in threads (an optimistic bound)."""
    c = Cell()
    if not _need(inp, c, "s2_cpu_actor_tps", "s2_cpu_actor_threads"):
        return c
    f, n = inp.figs, inp.cfg.cores_per_node
    per = f["s2_cpu_actor_tps"].value * n / f["s2_cpu_actor_threads"].value
    c.limits.append(Limit("CPUs", k * per, f"{k} nodes x {per:,.0f} tokens/s per {n}-core node "
                          f"({f['s2_cpu_actor_tps'].value:,.0f} on {f['s2_cpu_actor_threads'].value:g} threads)"))
    _stage2_common(inp, c, tokens)
    return _finish(c, tokens, k * n)


def trainer(preset: str):
    def build(inp: Inputs, tokens: float, k: int) -> Cell:
        c = Cell()
        key = f"tr_tps_{preset}"
        if not _need(inp, c, key):
            return c
        f = inp.figs
        per = f[key].value
        c.limits.append(Limit("GPUs", k * per, f"{k} x {per:,.0f} tokens/s per GPU"
                              + (" (estimated)" if f[key].source.startswith("ESTIMATE") else "")))
        if _need(inp, c, "tr_loader_tps"):
            c.limits.append(Limit("loader", k * f["tr_loader_tps"].value,
                                  f"{k} x {f['tr_loader_tps'].value:,.0f} tokens/s of loader per rank"))
        io = inp.bytes_per_token(COCOMIX_READS)
        c.limits.append(Limit("storage", inp.cfg.storage_gbps * 1e9 / io,
                              f"{inp.cfg.storage_gbps:g} GB/s / {io:.1f} B per token (fields CoCoMix reads)"))
        if _need(inp, c, "checksum_gbps"):  # --verify open reads every byte of every part (shards/dataset.py)
            gb = tokens * inp.bytes_per_token(("tokens",) + STAGE2_WRITES) / 1e9
            c.startup_s = gb / min(k * VERIFY_THREADS * f["checksum_gbps"].value, inp.cfg.storage_gbps)
            c.notes.append(f"--verify open over {gb:,.0f} GB: {fmt_time(c.startup_s)} (--verify lazy spreads it)")
        return _finish(c, tokens, k)
    return build


# (row label, unit of the hours column, builder)
ROWS = [
    ("stage 1, K CPU nodes", "core-h", stage1),
    ("stage 2, K GPUs, fp32", "GPU-h", stage2_gpu("float32")),
    ("stage 2, K GPUs, bf16", "GPU-h", stage2_gpu("bfloat16")),
    ("stage 2, K CPU nodes", "core-h", stage2_cpu),
    *[(f"train {p} CoCoMix, K GPUs", "GPU-h", trainer(p)) for p in PRESETS],
]


def fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def fmt_bytes(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b:,.0f} B"


def fmt_rate(r: float) -> str:
    if math.isinf(r):
        return "unbounded"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= scale:
            return f"{r / scale:.3g}{unit}"
    return f"{r:.3g}"


def compute(inp: Inputs) -> dict:
    """Every cell of every table, the storage per field and the figures used, as one JSON-able dict."""
    out: dict = {"config": asdict(inp.cfg), "missing": inp.missing,
                 "figures": {k: asdict(v) for k, v in sorted(inp.figs.items())}, "corpora": {}}
    for name, tokens in CORPORA.items():
        lay = layout(inp, tokens)
        shards = lay.shards
        notes = [lay.text]
        f = inp.figs
        if all(f"m_{k}" in f for k in ("shards", "load_s", "open_split_s", "open_split_mb")):
            n = f["m_shards"].value
            x = shards / n  # bench/manifest.py's figures at n shards, taken as linear in the shard count
            notes.append(f"manifest load {f['m_load_s'].value * x:.2f} s, open_split "
                         f"{f['m_open_split_s'].value * x:.2f} s and {f['m_open_split_mb'].value * x:,.1f} MB at "
                         f"{shards:,} shards (measured at {n:,.0f} shards, taken as linear in shards)")
        rows = {label: {str(k): asdict(build(inp, tokens, k)) for k in inp.cfg.nodes} for label, _, build in ROWS}
        out["corpora"][name] = {"tokens": tokens, "layout": asdict(lay), "notes": notes, "rows": rows}
    fields = {}
    for f, spec in inp.fields.items():
        b = spec["bytes_per_token"]
        fields[f] = {**spec, "bytes": {n: b * t for n, t in CORPORA.items()}}
    totals = {
        "stage 1 output (tokens)": ("tokens",),
        "stage 2 labels only (--k-mix 0)": ("concept_ids", "concept_scores", "teacher_nll"),
        "stage 2 defaults (--k-mix 32)": STAGE2_WRITES,
        "stage 2 defaults + KD (--k-kd 32)": STAGE2_WRITES + ("kd_ids", "kd_logprobs"),
    }
    out["storage"] = {"fields": fields, "part_overhead": inp.overhead,
                      "totals": {k: {"bytes_per_token": inp.bytes_per_token(v),
                                     "bytes": {n: inp.bytes_per_token(v) * t for n, t in CORPORA.items()}}
                                 for k, v in totals.items()}}
    return out


def table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    w = [max(len(x) for x in col) for col in zip(headers, *rows, strict=True)]
    fmt = lambda r: "  ".join(x.ljust(n) for x, n in zip(r, w, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * n for n in w])] + [fmt(r) for r in rows])


def cell_notes(rows: dict, ks: list[str]) -> list[str]:
    """Each row's notes once: without K when every cluster size has it, else per K."""
    out = []
    for label, cells in rows.items():
        seen = []
        for k in ks:
            seen += [n for n in cells[k]["notes"] if n not in seen]
        for n in seen:
            where = [k for k in ks if n in cells[k]["notes"]]
            out.append(f"{label}: {n}" if where == ks else f"{label}, K = {', '.join(where)}: {n}")
    return out


def render(res: dict, markdown: bool) -> str:
    cfg = res["config"]
    ks = [str(k) for k in cfg["nodes"]]
    units = {label: unit for label, unit, _ in ROWS}
    h = "### " if markdown else ""
    out = [f"Generated {datetime.date.today().isoformat()} by `python bench/scale_model.py` from the inputs listed "
           "under 'Figures used'.", "",
           f"Assumed (not measured): stage 1 on K CPU nodes of {cfg['cores_per_node']} cores; stage 2 and "
           "training on K GPUs of the machine named under 'Figures used' (one actor or rank each); shared "
           f"storage {cfg['storage_gbps']:g} GB/s; linear scaling across nodes (no multi-node Ray or DDP "
           "overhead); training makes one pass over the corpus."]
    for name, c in res["corpora"].items():
        out += ["", f"{h}{name}", ""] + [f"- {n}" for n in c["notes"]] + [""]
        rows = []
        for label, cells in c["rows"].items():
            r = [label]
            for k in ks:
                x = cells[k]
                needs = ", ".join(dict.fromkeys(n.split(" (")[0] for n in x["needs"]))  # the files, once
                if x["wall_s"] is None:
                    r.append(f"needs {needs}")
                    continue
                r.append(("≥ " if x["lower_bound"] else "")
                         + f"{fmt_time(x['wall_s'])}, {x['unit_hours']:,.0f} {units[label]} ({x['bottleneck']}"
                         + (f"; {fmt_time(x['startup_s'])} start-up" if x["startup_s"] > 0.1 * x["wall_s"] else "")
                         + (f"; needs {needs})" if needs else ")"))
            rows.append(r)
        out.append(table(["stage", *[f"K = {k}" for k in ks]], rows, markdown))
        out += [""] + [f"- {n}" for n in cell_notes(c["rows"], ks)]
    first = next(iter(res["corpora"].values()))
    out += ["", f"{h}Limits of each stage, {next(iter(res['corpora']))} (tokens/s; the smallest is the bottleneck)",
            ""]
    rows = []
    for label, cells in first["rows"].items():
        for i, lim in enumerate(cells[ks[0]]["limits"]):
            rows.append([label, lim["name"], *[fmt_rate(cells[k]["limits"][i]["tokens_per_s"]) for k in ks],
                         lim["why"]])
    out.append(table(["stage", "limit", *[f"K = {k}" for k in ks], f"from (K = {ks[0]})"], rows, markdown))
    st = res["storage"]
    out += ["", f"{h}Storage", ""]
    rows = [[f, f"{s['dtype']} {tuple(s['shape'])}", f"{s['bytes_per_token']:.2f}",
             *[fmt_bytes(b) for b in s["bytes"].values()], s["manifest"]] for f, s in st["fields"].items()]
    rows += [[k, "", f"{t['bytes_per_token']:.2f}", *[fmt_bytes(b) for b in t["bytes"].values()], "with overhead"]
             for k, t in st["totals"].items()]
    out.append(table(["field", "dtype (shape per window)", "B/token", *res["corpora"], "from"], rows, markdown))
    out += ["", "Container overhead (bytes on disk / the fields' bytes - 1): "
            + ", ".join(f"{p} part {v:+.2%}" for p, v in sorted(st["part_overhead"].items()))]
    out += ["", f"{h}Figures used", ""]
    rows = [[k, f"{v['value']:,.4g}", v["source"]] for k, v in res["figures"].items()]
    out.append(table(["figure", "value", "source"], rows, markdown))
    if res["missing"] and markdown:  # file names only: docs name no file that does not exist (test_architecture)
        names = ", ".join(Path(m.split(" ")[0]).name for m in res["missing"])
        out += ["", f"Missing inputs: {names}; `python bench/scale_model.py` prints the command for each."]
    elif res["missing"]:
        out += ["", f"{h}Missing inputs (their rows say 'needs ...')", ""] + [f"- {m}" for m in res["missing"]]
    return "\n".join(out)


# Fixture inputs for --smoke, with the field names each bench's --json writes.
SMOKE = {
    "stage1.json": {"measured": "smoke", "tokens_per_s": {"1": 300000.0, "2": 560000.0},
                    "driver_cpu_s_per_shard": 0.05, "tail_tokens_per_partition": 256.0},
    "manifest.json": {"measured": "smoke", "shards": 10000, "load_s": 0.5, "open_split_s": 0.8,
                      "open_split_mb": 60.0, "bookkeeping_s_per_shard": {"100": 0.0019, "10000": 0.002}},
    "extract.json": {"setup": {"measured": "smoke", "device": "cpu", "device_name": "cpu", "torch_threads": 2},
                     "ours": {"tokens_per_s": 250.0}, "d_checksum_gb_per_s": 1.4},
}


BEGIN, END = "<!-- scale_model: begin -->", "<!-- scale_model: end -->"


def update_doc(doc: Path, text: str) -> None:
    """Replace what lies between the two markers of ``doc`` (docs/scaling.md) by ``text``; nothing else."""
    old = doc.read_text(encoding="utf-8")
    if old.count(BEGIN) != 1 or old.count(END) != 1 or old.index(BEGIN) > old.index(END):
        raise ValueError(f"{doc} has no single '{BEGIN}' ... '{END}' region to replace: add the two lines "
                         "where the tables go")
    head, rest = old.split(BEGIN)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")


def _path(p: str) -> str:
    """A relative path as given when it exists from here, else from the checkout (the documented cwd)."""
    return p if Path(p).is_absolute() or Path(p).exists() else str(REPO / p)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python bench/scale_model.py", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, ScaleConfig)
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown (docs/scaling.md)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure and cell here")
    p.add_argument("--strict", action="store_true", help="exit 2 when an input is missing (after printing)")
    p.add_argument("--update", type=Path, default=None, metavar="DOC",
                   help=f"also put the Markdown tables between the '{BEGIN}' and '{END}' lines of DOC "
                   "(docs/scaling.md)")
    p.add_argument("--smoke", action="store_true", help="built-in fixture inputs: checks the script runs")
    a = p.parse_args(argv)
    cfg = dataclass_from_args(ScaleConfig, a)
    cfg.gpu_figures, cfg.manifests = _path(cfg.gpu_figures), [_path(m) for m in cfg.manifests]
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            for name, d in SMOKE.items():
                (Path(tmp) / name).write_text(json.dumps(d))
            cfg.results = tmp
        cfg.results = _path(cfg.results)
        res = compute(Inputs(cfg))
    print(render(res, a.markdown))
    if a.update:
        update_doc(a.update, render(res, markdown=True))
        print(f"updated the tables in {a.update.resolve()}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    if a.strict and res["missing"]:
        raise ValueError(f"{len(res['missing'])} input(s) missing (listed above): run the commands named there")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

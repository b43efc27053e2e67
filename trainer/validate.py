"""Checks run before the first step: the manifest against the mode, the model against the data,
a resume checkpoint against the run. Each collects every problem and raises one ValueError."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from trainer.config import RESUME_KEYS, ModelConfig, TrainConfig, get_preset


def needed_fields(cfg: TrainConfig) -> list[str]:
    """Fields the mode reads (docs/data.md, the trainer contract: CoCoMix needs concept_ids, KD kd_*)."""
    f = ["tokens"]
    if cfg.mode == "cocomix":
        f += ["concept_ids", "concept_scores"] if cfg.labels == "attribution" else ["mix_ids", "mix_vals"]
    elif cfg.mode == "kd":
        f += ["kd_ids", "kd_logprobs"]
    return f


def _pad(v: int, multiple: int = 64) -> int:
    # nanoGPT pads GPT-2's 50257 to 50304: matmuls with a multiple of 64 run faster on GPUs.
    return -(-v // multiple) * multiple


def k_attr(manifest) -> int | None:
    """K_attr, the labels per position: a concept manifest's ``attribution.k_attr`` (stage 2 and
    trainer.synthetic always write it); None for a token manifest, whose modes (ntp) need none."""
    return int(manifest.attribution["k_attr"]) if manifest.attribution else None


def build_model_config(cfg: TrainConfig, manifest) -> ModelConfig:
    """The preset, sized to the data: vocab from the tokenizer (padded to 64), C from the SAE,
    positions from seq_len, and the CLI's concept overrides."""
    # The pause baseline runs on CoCoMix's backbone: same width and L_ins, a pause vector instead of a concept.
    m = get_preset(cfg.preset, "cocomix" if cfg.pause else cfg.mode)
    if cfg.pause:
        m.pause_layer = cfg.insert_layer if cfg.insert_layer is not None else m.concept.insert_layer
        m.concept = None
    if cfg.width is not None:
        m.d_model = cfg.width
    m.vocab_size = _pad(int(manifest.tokenizer["vocab_size"]))
    m.block_size = max(m.block_size, manifest.seq_len)
    m.dropout = cfg.dropout
    if m.concept is not None:
        c = m.concept
        if manifest.sae and "n_latents" in manifest.sae:
            c.n_concepts = int(manifest.sae["n_latents"])
        if cfg.mix is not None:
            c.mix = cfg.mix
        if cfg.concept_topk:
            c.topk = cfg.concept_topk
        if cfg.insert_layer is not None:
            c.insert_layer = cfg.insert_layer
        c.concept_loss = cfg.concept_loss
        m.concept = dataclasses.replace(c)  # re-runs __post_init__ checks on the overrides
    return ModelConfig(**{**dataclasses.asdict(m), "concept": m.concept})


def check_manifest(cfg: TrainConfig, manifest, model: ModelConfig) -> None:
    """Everything about the manifest that can stop this run. The model's vocab_size, block_size and
    n_concepts are not re-checked: build_model_config sets them from this manifest."""
    e: list[str] = []
    where = f"manifest {manifest.path}"
    missing = [f for f in needed_fields(cfg) if f not in manifest.fields]
    if missing:
        hint = {
            "cocomix": "run the concept extraction (stage 2) or use --mode ntp",
            "kd": "extract with teacher top-k logits (k_kd > 0) or use another mode",
        }.get(cfg.mode, "")
        what = f"--mode {cfg.mode}" + (f" --labels {cfg.labels}" if cfg.mode == "cocomix" else "")
        e.append(f"{what} needs field(s) {missing}, the manifest has {sorted(manifest.fields)}: {hint}")
    if manifest.kind == "concepts" and manifest.stats.get("complete") is False:
        e.append("the extraction that wrote this manifest has not finished (stats.complete is false): "
                 "rerun the same extraction command, which resumes where it stopped")
    if "train" not in manifest.splits or manifest.splits["train"].windows == 0:
        e.append("the manifest has no train windows")
    if cfg.eval_windows > 0 and ("val" not in manifest.splits or manifest.splits["val"].windows == 0):
        e.append("the manifest has no val windows: tokenize with a larger --val-fraction or pass --eval-windows 0")
    if model.concept is not None and cfg.mode == "cocomix":
        if "n_latents" not in (manifest.sae or {}):
            e.append("manifest sae.n_latents is missing: cannot size the concept predictor")
        if model.concept.topk > model.concept.n_concepts:
            e.append(f"concept topk {model.concept.topk} > n_concepts {model.concept.n_concepts}")
        if cfg.labels == "attribution" and "concept_ids" in manifest.fields:
            K = manifest.fields["concept_ids"].shape[-1]
            if manifest.attribution and int(manifest.attribution["k_attr"]) != K:
                e.append(f"attribution.k_attr {manifest.attribution['k_attr']} != concept_ids width {K}")
            if manifest.fields["concept_ids"].shape[0] != manifest.seq_len:
                e.append(
                    f"concept_ids has {manifest.fields['concept_ids'].shape[0]} positions, "
                    f"seq_len is {manifest.seq_len}"
                )
    if cfg.mode == "kd" and "kd_ids" in manifest.fields and "kd_logprobs" in manifest.fields:
        if manifest.fields["kd_ids"].shape != manifest.fields["kd_logprobs"].shape:
            e.append("kd_ids and kd_logprobs have different shapes")
    if e:
        raise ValueError(f"{where} cannot be used for this run:\n  - " + "\n  - ".join(e))


_CONCEPT_FIELDS = ("concept_ids", "concept_scores", "mix_ids", "mix_vals")
_TEACHER_FIELDS = (*_CONCEPT_FIELDS, "kd_ids", "kd_logprobs")


def _read_shards(manifest, eval_windows: int) -> dict[str, list]:
    """Per split, the shards a run reads: every train shard, and the val shards holding the first
    ``eval_windows`` windows (the only ones evaluated: :func:`trainer.data.eval_batches`)."""
    read = {"train": list(manifest.splits["train"].shards) if "train" in manifest.splits else []}
    if eval_windows > 0 and "val" in manifest.splits:
        val, n = [], 0
        for sh in manifest.splits["val"].shards:
            if n >= eval_windows:
                break
            val.append(sh)
            n += sh.windows
        read["val"] = val
    return read


def _short(checksum: str) -> str:
    return str(checksum).split(":", 1)[-1][:12]


def shard_name(manifest, split: str, i: int, part: str) -> str:
    """``train-00003`` for the i-th shard of a split (its file name without extensions)."""
    try:
        return Path(manifest.splits[split].shards[i].parts[part].path).name.split(".")[0]
    except (KeyError, IndexError):
        return f"{split} shard {i}"


def data_identity(manifest, fields: list[str], eval_windows: int) -> dict[str, Any]:
    """Everything that decides the bytes a run reads, compactly: the tokenizer, seq_len and window
    counts; for concept / KD fields the teacher, SAE, attribution variant, hook layer and k's; and per
    shard part read (``tokens``, ``concepts``) one digest of its shards' checksums (train, then the
    evaluated val shards) plus 12 hex digits per shard, which name a differing shard on resume."""
    read = _read_shards(manifest, eval_windows)
    parts = [p for p in manifest.parts if any(manifest.field_parts.get(f) == p for f in fields)]
    checksums: dict[str, str] = {}
    shards: dict[str, dict[str, list[str]]] = {}
    for part in parts:
        h = hashlib.sha256()
        shards[part] = {}
        for split, shs in read.items():
            shards[part][split] = []
            for sh in shs:
                c = sh.parts[part].checksum
                h.update(f"{split}\0{sh.windows}\0{c}\0".encode())
                shards[part][split].append(_short(c))
        checksums[part] = "sha256:" + h.hexdigest()[:32]
    att = manifest.attribution or {}
    teacher_fields = any(f in _TEACHER_FIELDS for f in fields)
    concept_fields = any(f in _CONCEPT_FIELDS for f in fields)
    val = manifest.splits.get("val")
    return {
        "tokenizer_fingerprint": manifest.tokenizer.get("fingerprint"),
        "seq_len": manifest.seq_len,
        "train_windows": manifest.splits["train"].windows if "train" in manifest.splits else 0,
        "val_windows": min(eval_windows, val.windows) if (val is not None and eval_windows > 0) else 0,
        "teacher_fingerprint": (manifest.teacher or {}).get("fingerprint") if teacher_fields else None,
        "sae_fingerprint": (manifest.sae or {}).get("fingerprint") if concept_fields else None,
        "attribution": att.get("variant") if concept_fields else None,
        "hook_layer": (manifest.hook or {}).get("layer") if concept_fields else None,
        "k_attr": k_attr(manifest) if "concept_ids" in fields else None,
        "k_mix": manifest.fields["mix_ids"].shape[-1] if "mix_ids" in fields else None,
        "k_kd": manifest.fields["kd_ids"].shape[-1] if "kd_ids" in fields else None,
        "checksums": checksums,
        "shards": shards,
    }


def run_record(
    model: ModelConfig, cfg: TrainConfig, world: int, total_steps: int, identity: dict[str, Any]
) -> dict[str, Any]:
    """What identifies a run: written to OUT/config.json and every checkpoint's config.json."""
    return {"model": model.to_dict(), "train": cfg.to_dict(), "world_size": world, "total_steps": total_steps,
            "data": identity}


def _data_differences(saved: dict[str, Any], now: dict[str, Any], manifest, what: str) -> list[str]:
    e: list[str] = []
    for k, v in now.items():
        if k == "shards":
            continue
        if k == "checksums":
            old = saved.get("checksums")
            if not isinstance(old, dict):
                e.append(
                    f"data.checksums: the {what} records none (written by an older version), this manifest {sorted(v)}"
                )
                continue
            for part in sorted(set(old) | set(v)):
                if old.get(part) != v.get(part):
                    e.append(f"data.{part}_checksums: {_name_shard_difference(saved, now, part, manifest, what)}")
            continue
        if saved.get(k) != v:
            e.append(f"data.{k}: {what} {saved.get(k)!r}, this manifest {v!r}")
    return e


def _name_shard_difference(saved: dict[str, Any], now: dict[str, Any], part: str, manifest, what: str) -> str:
    a_all, b_all = (saved.get("shards") or {}).get(part), (now.get("shards") or {}).get(part)
    if a_all is None:
        return (
            f"the {what} does not read part {part!r}" if b_all is not None else f"this run does not read part {part!r}"
        )
    if b_all is None:
        return f"this run does not read part {part!r}, the {what} does"
    for split in ("train", "val"):
        a, b = a_all.get(split, []), b_all.get(split, [])
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return f"shard {shard_name(manifest, split, i, part)} differs ({what} {x}..., this manifest {y}...)"
        if len(a) != len(b):
            return f"{split} has {len(b)} shard(s) in this manifest, {len(a)} in the {what}"
    return "the shard checksums differ"


def differences(saved: dict[str, Any], now: dict[str, Any], manifest, what: str = "checkpoint") -> list[str]:
    """Every difference between a recorded run (a checkpoint's or OUT/config.json) and this one that
    changes the loss curve or the data (RESUME_KEYS, the model, global batch, schedule, data
    identity), as ``"key: <what> A, this run B"``; empty when this run may continue it."""
    e: list[str] = []
    sm, nm = saved.get("model") or {}, now["model"]
    for k, v in nm.items():
        if sm.get(k) != v:
            e.append(f"model.{k}: {what} {sm.get(k)!r}, this run {v!r}")
    st, nt = saved.get("train") or {}, now["train"]
    for k in RESUME_KEYS:
        if st.get(k) != nt[k]:
            e.append(f"{k}: {what} {st.get(k)!r}, this run {nt[k]!r}")
    sw, nw = saved.get("world_size", 1), now["world_size"]
    if sw * (st.get("micro_batch") or 0) * (st.get("grad_accum") or 0) != nw * nt["micro_batch"] * nt["grad_accum"]:
        e.append(
            f"global batch: {what} {sw} ranks x {st.get('micro_batch')} x {st.get('grad_accum')}, "
            f"this run {nw} x {nt['micro_batch']} x {nt['grad_accum']}"
        )
    if saved.get("total_steps") != now["total_steps"]:
        e.append(
            f"schedule length: {what} {saved.get('total_steps')} steps, this run {now['total_steps']} "
            "(--steps / --max-tokens)"
        )
    e += _data_differences(saved.get("data") or {}, now["data"], manifest, what)
    return e

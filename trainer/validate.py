"""Checks run before the first step: the manifest against the mode, the model against the data,
a resume checkpoint against the run. Each collects every problem and raises one ValueError."""

from __future__ import annotations

import dataclasses
from typing import Any

from trainer.config import RESUME_KEYS, ModelConfig, TrainConfig, get_preset


def needed_fields(cfg: TrainConfig) -> list[str]:
    """Fields the mode reads (DESIGN.md "Trainer contract": CoCoMix needs concept_ids, KD kd_*)."""
    f = ["tokens"]
    if cfg.mode == "cocomix":
        f += ["concept_ids", "concept_scores"] if cfg.labels == "attribution" else ["mix_ids", "mix_vals"]
    elif cfg.mode == "kd":
        f += ["kd_ids", "kd_logprobs"]
    return f


def _pad(v: int, multiple: int = 64) -> int:
    # nanoGPT pads GPT-2's 50257 to 50304: matmuls with a multiple of 64 run faster on GPUs.
    return -(-v // multiple) * multiple


def k_attr(manifest) -> int:
    """K_attr: labels per position (the manifest's attribution.k_attr, else the field's width)."""
    att = manifest.attribution or {}
    if "k_attr" in att:
        return int(att["k_attr"])
    if "concept_ids" in manifest.fields:
        return manifest.fields["concept_ids"].shape[-1]
    return 4  # paper (COCOMIX.md section 1.4)


def build_model_config(cfg: TrainConfig, manifest) -> ModelConfig:
    """The preset, sized to the data: vocab from the tokenizer (padded to 64), C from the SAE,
    positions from seq_len, and the CLI's concept overrides."""
    m = get_preset(cfg.preset, cfg.mode)
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
    vocab = int(manifest.tokenizer["vocab_size"])
    if model.vocab_size < vocab:
        e.append(f"model vocab_size {model.vocab_size} < tokenizer vocab_size {vocab} of the manifest")
    if manifest.seq_len > model.block_size:
        e.append(f"manifest seq_len {manifest.seq_len} exceeds the model's block_size {model.block_size}")
    if model.concept is not None and cfg.mode == "cocomix":
        n_lat = (manifest.sae or {}).get("n_latents")
        if n_lat is None:
            e.append("manifest sae.n_latents is missing: cannot size the concept predictor")
        elif int(n_lat) != model.concept.n_concepts:
            e.append(f"model n_concepts {model.concept.n_concepts} != manifest sae.n_latents {n_lat}")
        if model.concept.topk > model.concept.n_concepts:
            e.append(f"concept topk {model.concept.topk} > n_concepts {model.concept.n_concepts}")
        if cfg.labels == "attribution" and "concept_ids" in manifest.fields:
            K = manifest.fields["concept_ids"].shape[-1]
            if manifest.attribution and int(manifest.attribution.get("k_attr", K)) != K:
                e.append(f"attribution.k_attr {manifest.attribution['k_attr']} != concept_ids width {K}")
            if manifest.fields["concept_ids"].shape[0] != manifest.seq_len:
                e.append(f"concept_ids has {manifest.fields['concept_ids'].shape[0]} positions, seq_len is {manifest.seq_len}")
    if cfg.mode == "kd" and "kd_ids" in manifest.fields and "kd_logprobs" in manifest.fields:
        if manifest.fields["kd_ids"].shape != manifest.fields["kd_logprobs"].shape:
            e.append("kd_ids and kd_logprobs have different shapes")
    if e:
        raise ValueError(f"{where} cannot be used for this run:\n  - " + "\n  - ".join(e))


def data_identity(manifest) -> dict[str, Any]:
    """What a resumed run must read the same of: tokenizer, concepts, window layout."""
    return {
        "tokenizer_fingerprint": manifest.tokenizer.get("fingerprint"),
        "sae_fingerprint": (manifest.sae or {}).get("fingerprint"),
        "seq_len": manifest.seq_len,
        "train_windows": manifest.splits["train"].windows if "train" in manifest.splits else 0,
    }


def check_resume(saved: dict[str, Any], model: ModelConfig, cfg: TrainConfig, manifest, world: int, total_steps: int) -> None:
    """``saved``: the checkpoint's config.json. Every difference that would change the loss curve
    is an error (RESUME_KEYS), listed together."""
    e: list[str] = []
    sm = saved.get("model", {})
    for k, v in model.to_dict().items():
        if sm.get(k) != v:
            e.append(f"model.{k}: checkpoint {sm.get(k)!r}, this run {v!r}")
    st = saved.get("train", {})
    for k in RESUME_KEYS:
        if st.get(k) != getattr(cfg, k):
            e.append(f"{k}: checkpoint {st.get(k)!r}, this run {getattr(cfg, k)!r}")
    if saved.get("world_size", 1) * st.get("micro_batch", 0) * st.get("grad_accum", 0) != world * cfg.micro_batch * cfg.grad_accum:
        e.append(
            f"global batch: checkpoint {saved.get('world_size', 1)} ranks x {st.get('micro_batch')} x {st.get('grad_accum')}, "
            f"this run {world} x {cfg.micro_batch} x {cfg.grad_accum}"
        )
    if saved.get("total_steps") != total_steps:
        e.append(f"schedule length: checkpoint {saved.get('total_steps')} steps, this run {total_steps} (--steps / --max-tokens)")
    ident = data_identity(manifest)
    for k, v in ident.items():
        if saved.get("data", {}).get(k) != v:
            e.append(f"data.{k}: checkpoint {saved.get('data', {}).get(k)!r}, this manifest {v!r}")
    if e:
        raise ValueError("the resume checkpoint does not match this run:\n  - " + "\n  - ".join(e))

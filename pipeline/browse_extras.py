"""The concept browser's optional sections (docs/browse.md): the logit lens through the teacher and
the student's view of each concept. Both check that the model they load is the one the manifest's
concepts were made with, before any heavy work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import Manifest, open_split


def find_sae(m: Manifest, sae: str | None) -> str:
    """The SAE to load: ``--sae`` when given, else the manifest's ``sae.source`` as recorded (relative
    to the current directory, as stage 2 saw it), else relative to the manifest's folder."""
    if sae:
        return sae
    src = str((m.sae or {}).get("source") or "")
    for cand in (Path(src), (m.path.parent / src) if m.path else None):
        if src and cand is not None and cand.exists():
            return str(cand)
    raise ValueError(f"the manifest's SAE {src!r} is not found (from here or beside the manifest): pass --sae PATH")


def load_checked_sae(m: Manifest, sae: str | None):
    from sae import load_sae

    path = find_sae(m, sae)
    loaded = load_sae(path, format=(m.sae or {}).get("format") if not sae else None)
    want = (m.sae or {}).get("fingerprint")
    if loaded.fingerprint() != want:
        raise ValueError(f"--sae {path}: fingerprint {loaded.fingerprint()}, the manifest's concepts were made with "
                         f"{want}: pass the SAE of this extraction")
    return loaded


def check_teacher(m: Manifest, teacher: str) -> None:
    """The teacher must be the manifest's (same weight-file fingerprint)."""
    from pipeline.extract_plan import teacher_identity

    got, want = teacher_identity(teacher)["fingerprint"], (m.teacher or {}).get("fingerprint")
    if got != want:
        raise ValueError(f"--teacher {teacher}: fingerprint {got}, the manifest's concepts were made with {want} "
                         f"({(m.teacher or {}).get('name')})")


def final_norm(model):
    """The teacher's final norm module (Llama ``norm``, GPT-2 ``ln_f``, others ``final_layernorm``)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layernorm", "final_norm"):
        mod = getattr(base, name, None)
        if mod is not None and hasattr(mod, "weight"):
            return mod
    return None


def lens_directions(W_dec, norm):
    """Decoder rows mapped through the linear part of the final norm.

    A norm divides by the input's own scale, which does not change which tokens a direction promotes,
    and its bias adds the same logits for every concept; what differs between concepts is the
    per-channel gain (and, for LayerNorm, the centring). So a direction d goes to gamma * (d - mean d)
    for LayerNorm and gamma * d for RMSNorm, and the lens is W_U @ that (docs/browse.md)."""
    import torch

    d = W_dec.float()
    if norm is None:
        return d
    if isinstance(norm, torch.nn.LayerNorm):
        d = d - d.mean(-1, keepdim=True)
    return d * norm.weight.float()


@dataclass
class Lens:
    promoted: dict[int, list[tuple[int, float]]]
    """Per concept, the tokens whose logits its decoder direction raises most, (token, logit)."""
    suppressed: dict[int, list[tuple[int, float]]]


def logit_lens(m: Manifest, teacher: str, sae: str | None, top: int = 10, concepts: list[int] | None = None) -> Lens:
    """The logit lens of every concept's decoder direction (in chunks of 256 concepts)."""
    import torch

    from common.teacher import load_teacher

    check_teacher(m, teacher)
    s = load_checked_sae(m, sae)
    model = load_teacher(teacher)
    W_U = model.get_output_embeddings().weight.float()  # (V, D)
    ids = list(range(s.n_latents)) if concepts is None else concepts
    promoted: dict[int, list[tuple[int, float]]] = {}
    suppressed: dict[int, list[tuple[int, float]]] = {}
    with torch.no_grad():
        dirs = lens_directions(s.W_dec.detach(), final_norm(model))
        for i in range(0, len(ids), 256):
            chunk = ids[i : i + 256]
            logits = dirs[chunk] @ W_U.T  # (n, V)
            hi, lo = logits.topk(top, -1), logits.topk(top, -1, largest=False)
            for j, cid in enumerate(chunk):
                promoted[cid] = list(zip(hi.indices[j].tolist(), hi.values[j].tolist(), strict=True))
                suppressed[cid] = list(zip(lo.indices[j].tolist(), lo.values[j].tolist(), strict=True))
    return Lens(promoted, suppressed)


@dataclass
class StudentView:
    ckpt: str
    comp_norm: np.ndarray | None
    """(C,) L2 norm of each concept's compression-weight column (None when the student does not mix)."""
    predicted: np.ndarray
    """(C,) fraction of positions where the concept is among the student's top-k predicted concepts."""
    positions: int
    split: str
    topk: int


def load_student(ckpt: str, m: Manifest):
    """The CoCoMix student of ``ckpt``, checked against the manifest (its concepts are this SAE's)."""
    from trainer.checkpoint import load_model_from

    try:
        model, cfg = load_model_from(ckpt, "cpu")
    except ValueError as e:
        raise ValueError(f"--ckpt {ckpt}: {e}") from e
    if model.concept is None:
        raise ValueError(f"--ckpt {ckpt}: a {cfg.get('train', {}).get('mode', '?')} student without a concept block; "
                         "pass a CoCoMix checkpoint")
    C = int((m.sae or {}).get("n_latents", -1))
    if model.cfg.concept.n_concepts != C:
        raise ValueError(f"--ckpt {ckpt}: the student predicts {model.cfg.concept.n_concepts} concepts, the manifest's "
                         f"SAE has {C}")
    got, want = (cfg.get("data") or {}).get("sae_fingerprint"), (m.sae or {}).get("fingerprint")
    if got is not None and got != want:
        raise ValueError(f"--ckpt {ckpt}: trained on concepts of SAE {got}, the manifest's are {want}")
    return model, cfg


def student_view(ckpt: str, m: Manifest, windows: int = 64, batch: int = 8) -> StudentView:
    """Compression-weight norms (paper Fig. 6c) and how often the student predicts each concept in its
    top-k, on the first ``windows`` windows of the val split (train when there is none)."""
    import torch

    model, _ = load_student(ckpt, m)
    model.eval()
    w = model.concept.comp_weight
    comp = None if w is None else w.detach().float().norm(dim=1).numpy()
    split = "val" if "val" in m.splits and m.splits["val"].windows else "train"
    ds = open_split(m, split, verify="lazy", fields=["tokens"], limit=windows)
    counts = np.zeros(model.cfg.concept.n_concepts, np.int64)
    positions = 0
    T = min(m.seq_len, model.cfg.block_size)
    try:
        with torch.no_grad():
            for s in range(0, len(ds), batch):
                x = torch.from_numpy(ds.get_batch(range(s, min(len(ds), s + batch)))["tokens"][:, :T].astype(np.int64))
                top = model(x).concept_ids  # (B, T, k)
                counts += np.bincount(top.reshape(-1).numpy(), minlength=counts.size)
                positions += x.numel()
    finally:
        ds.close()
    return StudentView(ckpt, comp, counts / max(1, positions), positions, split, model.cfg.concept.topk)

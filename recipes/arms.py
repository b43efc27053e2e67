"""The arms of the efficiency experiment (recipes/efficiency.py): what an arm may set, the trainer
config of one of its students, and its row of the report.

An arm is a named student recipe on the shared extraction: a trainer mode plus the switches that make
the paper's ablations (arXiv 2502.08524, Fig. 6; docs/method.md): ``mix`` none (prediction only) or
add, ``concept_loss`` off (mixing only), ``labels`` activation, ``pause`` (the pause-token baseline),
``width`` (another width-matching rule) and ``permute_labels`` (the label-signal control). Every arm
trains on the same windows with the same schedule and evaluation, so rows differ only by the arm.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from recipes.compare import compare

if TYPE_CHECKING:
    from trainer.config import TrainConfig

# Trainer settings an arm may set; the rest (data, schedule, batch, evaluation) belong to the
# experiment, so that every arm is compared at the same budget on the same windows.
ARM_KEYS = ("mode", "labels", "mix", "concept_loss", "concept_topk", "insert_layer", "pause", "width",
            "permute_labels", "lambda_concept", "lambda_kd", "seeds")


def _trainer_settings(arm: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arm.items() if k != "seeds"}


def check_arms(arms: dict[str, dict], baseline: str) -> None:
    """Every arm is a valid trainer setting (checked by TrainConfig itself) and the baseline is one."""
    from trainer.config import TrainConfig, plain_name

    if not arms:
        raise ValueError("arms must name at least one student")
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not one of the arms {sorted(arms)}")
    for name, arm in arms.items():
        if not plain_name(name):
            raise ValueError(f"arm name {name!r}: use letters, digits, - and _ (it names a run directory)")
        if not isinstance(arm, dict) or "mode" not in arm:
            raise ValueError(f"arm {name!r} must be an object with a mode, e.g. {{\"mode\": \"ntp\"}}")
        if bad := set(arm) - set(ARM_KEYS):
            raise ValueError(f"arm {name!r}: unknown keys {sorted(bad)}; an arm may set {sorted(ARM_KEYS)}")
        seeds = arm.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"arm {name!r}: seeds must be a non-empty list of integers, got {seeds!r}")
        try:
            TrainConfig(**_trainer_settings(arm))
        except (TypeError, ValueError) as e:
            raise ValueError(f"arm {name!r}: {e}") from e


def student_config(arm: dict[str, Any], **experiment: Any) -> TrainConfig:
    """The TrainConfig of one student: the arm's settings over the experiment's (which name data,
    schedule, seed, evaluation and run directory)."""
    from trainer.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    assert set(experiment) <= known, sorted(set(experiment) - known)
    return TrainConfig(**(experiment | _trainer_settings(arm)))


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def arm_report(arm: dict[str, Any], summaries: dict[int, dict], curves: dict[int, list[dict]],
               mean: list[dict], base_mean: list[dict] | None, held_out: list[str]) -> dict[str, Any]:
    """One arm's row: size, cost, final losses (val and each held-out set), concept recall against its
    prior, and the comparison with the baseline (None for the baseline itself)."""
    first = summaries[min(summaries)]
    finals = {s: c[-1] for s, c in curves.items()}
    val_mean, val_std = _mean_std([p["val_loss"] for p in finals.values()])
    row: dict[str, Any] = {
        "settings": _trainer_settings(arm),
        "seeds": sorted(curves),
        "params": first.get("params"),
        "flops_per_token": mean[-1]["flops"] / mean[-1]["tokens"],
        "final_val_loss": {str(s): p["val_loss"] for s, p in finals.items()},
        "final_val_loss_mean": val_mean,
        "final_val_loss_std": val_std,
        "final_held_out_loss": {name: _mean_std([p[f"held_out/{name}/loss"] for p in finals.values()])[0]
                                for name in held_out},
        "wall_s_mean": _mean_std([s["wall_s"] for s in summaries.values()])[0] if all(
            "wall_s" in s for s in summaries.values()) else None,
        "curve": mean,
    }
    for key in ("val_concept_recall", "val_concept_recall_prior"):
        vals = [p[key] for p in finals.values() if p.get(key) is not None]
        row[key] = _mean_std(vals)[0] if len(vals) == len(finals) else None
    if base_mean is not None:
        row["vs_baseline"] = compare(base_mean, mean)
        row["vs_baseline"]["held_out_delta"] = {
            name: mean[-1][f"held_out/{name}/loss"] - base_mean[-1][f"held_out/{name}/loss"] for name in held_out}
    return row

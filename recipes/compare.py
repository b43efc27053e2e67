"""The efficiency experiment's comparisons: pure functions of (tokens, flops, val_loss) curves, the
plot and the printed report (``recipes/efficiency.py`` runs the experiment; README, "The efficiency
experiment", shows the committed results)."""

from __future__ import annotations

import math
from pathlib import Path

from recipes.steps import pyplot


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Pointwise mean over seeds (same schedule, so the same evaluation tokens); the shortest wins."""
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        pts = [c[i] for c in curves]
        losses = [p["val_loss"] for p in pts]
        mean = sum(losses) / len(losses)
        std = math.sqrt(sum((v - mean) ** 2 for v in losses) / (len(losses) - 1)) if len(losses) > 1 else 0.0
        point = {"tokens": pts[0]["tokens"], "flops": pts[0]["flops"], "val_loss": mean, "val_loss_std": std}
        # Other metrics (held-out losses, concept recall): the mean where every seed logged them.
        for k in sorted(set(pts[0]) - {"tokens", "flops", "val_loss"}):
            if all(p.get(k) is not None for p in pts):
                point[k] = sum(p[k] for p in pts) / len(pts)
        out.append(point)
    return out


def x_to_reach(curve: list[dict], target: float, x: str) -> float | None:
    """The first ``x`` (tokens or flops) at which the curve's loss is <= target, linearly
    interpolated between evaluations; None when the curve never gets there."""
    prev = None
    for p in curve:
        if p["val_loss"] <= target:
            if prev is None:
                return float(p[x])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev[x] + frac * (p[x] - prev[x])
        prev = p
    return None


def loss_at(curve: list[dict], x_value: float, x: str) -> float | None:
    """The curve's loss at ``x_value`` (linear interpolation); None outside the evaluated range."""
    for a, b in zip(curve, curve[1:], strict=False):
        if a[x] <= x_value <= b[x]:
            frac = 0.0 if b[x] == a[x] else (x_value - a[x]) / (b[x] - a[x])
            return a["val_loss"] + frac * (b["val_loss"] - a["val_loss"])
    if curve and curve[-1][x] == x_value:
        return curve[-1]["val_loss"]
    return None


def equivalent_tokens(base: list[dict], other: list[dict]) -> list[dict]:
    """At each evaluation of ``other``: the tokens ``base`` needed to reach the same loss, and their
    ratio to ``other``'s tokens (the base-equivalent data multiplier, > 1 when ``other`` learns more per
    token; "effective data" in Hernandez et al. 2021, arXiv 2102.01293). None where ``base`` never got
    that low, or where the point is worse than base's first evaluation (base got there earlier, by an
    unknown count of tokens)."""
    out = []
    for p in other:
        t = x_to_reach(base, p["val_loss"], "tokens")
        known = t is not None and p["val_loss"] <= base[0]["val_loss"]
        out.append({"tokens": p["tokens"], "base_tokens": t if known else None,
                    "ratio": t / p["tokens"] if known else None})
    return out


def extrapolate_ratio(points: list[dict], tail: float = 0.5) -> dict:
    """A power law ratio ~ tokens^slope fitted by least squares in log-log space to the last ``tail``
    fraction of the equivalent-token points; where the slope carries the ratio to 1 (parity), the
    projected tokens. A straight-line extrapolation of a short, cosine-decayed run: an indication of
    direction, not a forecast (README, "Why CoCoMix trails NTP")."""
    pts = [p for p in points if p["ratio"]]
    pts = pts[int(len(pts) * (1 - tail)):]
    if len(pts) < 3:
        return {"points": len(pts), "slope": None, "parity_tokens": None}
    xs, ys = [math.log(p["tokens"]) for p in pts], [math.log(p["ratio"]) for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    last = pts[-1]
    parity = None
    if last["ratio"] < 1 and slope > 0:
        parity = last["tokens"] * (1 / last["ratio"]) ** (1 / slope)
    elif last["ratio"] >= 1:
        parity = last["tokens"]
    return {"points": len(pts), "from_tokens": pts[0]["tokens"], "slope": slope, "last_ratio": last["ratio"],
            "parity_tokens": parity}


def compare(base: list[dict], other: list[dict]) -> dict:
    """``other`` against ``base`` (NTP): at equal tokens, and at equal training FLOPs."""
    target = base[-1]["val_loss"]
    out: dict = {"base_final_val_loss": target, "final_val_loss": other[-1]["val_loss"]}
    for x in ("tokens", "flops"):
        reach = x_to_reach(other, target, x)
        out[f"{x}_to_reach_base_final"] = reach
        out[f"{x}_saved_fraction"] = None if reach is None else 1.0 - reach / base[-1][x]
        # The mirror question, which still has an answer when `other` is the slower one.
        out[f"base_{x}_to_reach_final"] = x_to_reach(base, other[-1]["val_loss"], x)
    out["equivalent_tokens"] = eq = equivalent_tokens(base, other)
    out["equivalent_tokens_trend"] = extrapolate_ratio(eq)
    # Equal FLOPs: both losses where the cheaper run's budget ends (the paper reports tokens only).
    f_eq = min(base[-1]["flops"], other[-1]["flops"])
    out["equal_flops"] = {"flops": f_eq, "base_val_loss": loss_at(base, f_eq, "flops"),
                          "val_loss": loss_at(other, f_eq, "flops")}
    return out


def plot(curves: dict[str, dict], path: Path, title: str) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in ((axes[0], "tokens", "training tokens"), (axes[1], "flops", "training FLOPs (student only)")):
        for i, (mode, c) in enumerate(curves.items()):
            color = f"C{i}"
            for seed_curve in c["seeds"].values():
                ax.plot([p[x] for p in seed_curve], [p["val_loss"] for p in seed_curve], color=color, alpha=0.25,
                        lw=0.8)
            m = c["mean"]
            ax.plot([p[x] for p in m], [p["val_loss"] for p in m], color=color, marker="o", ms=3,
                    label=f"{mode} (mean of {len(c['seeds'])} seed(s))")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_arms(rows: dict[str, dict], baseline: str, held_out: list[str], path: Path, title: str) -> Path | None:
    """Many arms: validation loss against tokens (mean over seeds), and each arm's final loss minus the
    baseline's on every evaluated set (val and each held-out set; below zero is better)."""
    if (plt := pyplot()) is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0]
    colors = plt.get_cmap("tab20").colors if len(rows) > 10 else [f"C{i}" for i in range(10)]
    for i, (name, r) in enumerate(rows.items()):
        c = r["curve"]
        ax.plot([p["tokens"] for p in c], [p["val_loss"] for p in c], color=colors[i % len(colors)], marker="o",
                ms=2.5, lw=2.2 if name == baseline else 1.2, ls="-" if r["settings"].get("mode") != "kd" else "--",
                label=f"{name} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    sets = ["val", *held_out]
    others = [n for n in rows if n != baseline]
    width = 0.8 / len(sets)
    base = rows[baseline]
    for j, name in enumerate(sets):
        b = base["final_val_loss_mean"] if name == "val" else base["final_held_out_loss"][name]
        deltas = [(rows[n]["final_val_loss_mean"] if name == "val" else rows[n]["final_held_out_loss"][name]) - b
                  for n in others]
        ax.barh([i + j * width for i in range(len(others))], deltas, height=width, label=name, color=f"C{j}")
    ax.set_yticks([i + width * (len(sets) - 1) / 2 for i in range(len(others))], others, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"final loss minus {baseline}'s (nats/token; < 0 is better)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, title="evaluated on")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def arms_table(r: dict) -> str:
    """The report's students as one Markdown table (README, "Why CoCoMix trails NTP"): size, cost, final
    loss on every evaluated set, tokens to reach the baseline's final loss (or the baseline tokens that
    reach this arm's final: the data multiplier), and concept recall against the label-frequency prior."""
    rows = r["students"]
    held = list(r.get("held_out", {}))
    base = r.get("baseline", "ntp")
    head = ["arm", "settings", "params", "FLOPs/token", "val loss (mean ± sd, seeds)", *[f"{h} loss" for h in held],
            f"tokens to reach {base}'s final", f"{base} tokens for this final (multiplier)", "concept recall (prior)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        settings = ", ".join(f"{k}={v}" for k, v in row.get("settings", {}).items() if k != "mode")
        mode = row.get("settings", {}).get("mode", name)
        vs = row.get("vs_baseline") or {}
        reach = vs.get("tokens_to_reach_base_final")
        eq = (vs.get("equivalent_tokens") or [{}])[-1]
        cells = [
            f"**{name}**" if name == base else name,
            mode + (f" ({settings})" if settings else ""),
            f"{row['params'] / 1e6:.2f}M",
            f"{row['flops_per_token']:.3g}",
            f"{row['final_val_loss_mean']:.3f} ± {row['final_val_loss_std']:.3f} ({len(row['seeds'])})",
            *[f"{row['final_held_out_loss'][h]:.3f}" for h in held],
            "" if name == base else ("never" if reach is None else f"{reach:,.0f}"),
            "" if name == base else ("beyond its run" if eq.get("base_tokens") is None
                                     else f"{eq['base_tokens']:,.0f} ({eq['ratio']:.2f}x)"),
            "" if row.get("val_concept_recall") is None
            else f"{row['val_concept_recall']:.3f} ({row['val_concept_recall_prior']:.3f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_report(r: dict) -> None:
    print(f"\nrun directory: {r['run_dir']}   report: {r['run_dir']}/report.json   plot: {r['plot']}")
    if r["config"].get("arms"):
        print(arms_table(r))
    print(f"data: {r['data']}   SAE: {r['sae']}")
    for mode, s in r["students"].items():
        held = "".join(f"  {n} {v:.4f}" for n, v in s.get("final_held_out_loss", {}).items())
        recall = (f"  concept recall {s['val_concept_recall']:.3f} (prior {s['val_concept_recall_prior']:.3f})"
                  if s.get("val_concept_recall") is not None else "")
        print(f"  {mode:8s} params {s['params']:,}  flops/token {s['flops_per_token']:.3g}  "
              f"final val loss {s['final_val_loss_mean']:.4f}  per seed {s['final_val_loss']}{held}{recall}")
    for mode, c in r["vs_ntp"].items():
        tok, fl = c["tokens_to_reach_base_final"], c["flops_to_reach_base_final"]
        eq = c["equal_flops"]
        print(f"  {mode} vs NTP: reaches NTP's final loss {c['base_final_val_loss']:.4f} "
              + (f"after {tok:,.0f} tokens ({c['tokens_saved_fraction']:+.1%} saved) and {fl:.3g} FLOPs "
                 f"({c['flops_saved_fraction']:+.1%} saved)" if tok is not None else "never within the budget")
              + f"; at equal FLOPs {eq['flops']:.3g}: {mode} {_f(eq['val_loss'])} vs NTP {_f(eq['base_val_loss'])}")
        if tok is None and (back := c.get("base_tokens_to_reach_final")) is not None:
            print(f"    NTP reaches {mode}'s final loss {c['final_val_loss']:.4f} after {back:,.0f} tokens")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"

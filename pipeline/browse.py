"""The concept browser: a static HTML site that shows what each concept of an extraction means.

    python -m pipeline.browse --manifest M.json --out SITE [--teacher T] [--ckpt STUDENT_CKPT]
                              [--steering REPORT.json ...]

One streaming pass over the concept shards (pipeline/browse_stats.py: bounded memory, numpy per
chunk) gives every concept's label counts per rank, score histogram, most labelled tokens and top-N
contexts; the optional teacher adds the logit lens, the optional CoCoMix checkpoint the student's
compression-weight norm and prediction rate, the optional steering reports (pipeline/steering.py) a
table per steered concept. Open SITE/index.html in a browser: no server, no network (docs/browse.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import Parser, add_dataclass_args, dataclass_from_args, run_cli
from pipeline import browse_html as H
from pipeline import browse_out
from pipeline.outputs import command_line
from shards import Manifest, load_manifest


@dataclass
class BrowseConfig:
    """The concept browser's settings (``python -m pipeline.browse --help``)."""

    manifest: str
    """Concept manifest (stage 2's --manifest)."""
    out: str
    """Site directory to write (a new or empty one, or a site browse wrote, with --overwrite)."""
    teacher: str | None = None
    """Teacher for the logit lens (the manifest's teacher: alias, directory, .gguf or hub id); off unless given."""
    sae: str | None = None
    """SAE for the logit lens (default: the manifest's sae.source); checked against the manifest's fingerprint."""
    ckpt: str | None = None
    """CoCoMix student checkpoint: its compression-weight norms and how often it predicts each concept."""
    steering: list[str] | None = None
    """Steering reports (python -m pipeline.steering --out REPORT.json) shown on the steered concepts' pages."""
    splits: list[str] | None = None
    """Splits to read (default: all)."""
    top_n: int = 20
    """Contexts per concept (the best attribution scores)."""
    context: int = 20
    """Tokens shown on each side of the labelled one."""
    top_tokens: int = 12
    """Most labelled tokens listed per concept."""
    lens_tokens: int = 10
    """Tokens listed each way by the logit lens."""
    student_windows: int = 64
    """Windows the student runs on to count its predicted concepts (bounded work)."""
    max_pairs: int = 20_000_000
    """Distinct (concept, token) pairs counted exactly before each concept keeps only its 64 most frequent
    tokens (memory: 16 bytes per pair)."""
    overwrite: bool = False
    """Replace a site browse wrote earlier at --out (never anything else)."""
    progress: bool = True
    """Progress bar on stderr."""

    def __post_init__(self) -> None:
        for name, low in (("top_n", 1), ("context", 0), ("top_tokens", 1), ("lens_tokens", 1),
                          ("student_windows", 1), ("max_pairs", 1000)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")


def load_concepts(path: str) -> Manifest:
    if not Path(path).is_file():
        raise ValueError(f"--manifest {path!r} does not exist")
    m = load_manifest(path)
    if m.kind != "concepts" or "concept_ids" not in m.fields:
        raise ValueError(f"--manifest {path!r} is a {m.kind} manifest: pass a concept manifest (stage 2's --manifest)")
    if not m.stats.get("complete", False):
        raise ValueError(f"--manifest {path!r}: the extraction is not finished; rerun stage 2's command first")
    return m


def load_steering(paths: list[str], m: Manifest) -> dict[int, list[dict]]:
    """Steering reports by concept; a report made with another SAE than the manifest's is refused."""
    from pipeline.steering import SCHEMA

    out: dict[int, list[dict]] = {}
    for p in paths:
        try:
            rep = json.loads(Path(p).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ValueError(f"--steering {p!r} does not exist") from e
        except (OSError, ValueError) as e:
            raise ValueError(f"--steering {p!r} is not a readable JSON report: {e}") from e
        if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
            raise ValueError(f"--steering {p!r} is not a steering report (schema {SCHEMA})")
        if rep.get("sae_fingerprint") != (m.sae or {}).get("fingerprint"):
            raise ValueError(f"--steering {p!r} labels with SAE {rep.get('sae_fingerprint')}, the manifest's concepts "
                             f"are {(m.sae or {}).get('fingerprint')}")
        by: dict[int, list[dict]] = {}
        for r in rep["results"]:
            by.setdefault(int(r["concept"]), []).append(r)
        what = (f"{Path(p).name}: student {rep['ckpt']}, {rep['prompts']['n']} prompts, "
                f"{rep['generation']['new_tokens']} new tokens each; 95% intervals: {rep['intervals']}")
        for cid, rows in by.items():
            out.setdefault(cid, []).append({"what": what, "rows": rows})
    return out


def visible(text: str) -> str:
    """A token for the index's one-line summary: leading/trailing spaces as ␣, newlines as ↵."""
    s = text.replace("\n", "↵").replace("\t", "→")
    core = s.strip(" ")
    lead, trail = len(s) - len(s.lstrip(" ")), len(s) - len(s.rstrip(" "))
    return "␣" * lead + core + "␣" * trail if core else "␣" * len(s)


def build(cfg: BrowseConfig) -> dict:
    """Build the site; returns a summary (counts and the pass's timing)."""
    from pipeline.browse_extras import check_teacher, load_checked_sae, load_student, logit_lens, student_view
    from pipeline.browse_stats import aggregate, contexts, split_order
    from trainer.generate import load_tokenizer

    m = load_concepts(cfg.manifest)
    splits = split_order(m, cfg.splits)
    out = Path(cfg.out)
    browse_out.check_out(out, cfg.overwrite, command_line(["python", "-m", "pipeline.browse"], cfg, overwrite=True))
    # Every optional input is checked before the pass (cheap mistakes first).
    if cfg.ckpt:
        load_student(cfg.ckpt, m)
    if cfg.teacher:
        check_teacher(m, cfg.teacher)
        load_checked_sae(m, cfg.sae)
    steering = load_steering(cfg.steering or [], m)
    tok = load_tokenizer(m.tokenizer)

    t0 = time.perf_counter()
    agg, offsets = aggregate(m, splits, cfg.top_n, cfg.max_pairs, progress=cfg.progress)
    t_pass = time.perf_counter() - t0
    ctx = contexts(m, offsets, agg, cfg.context)
    t_ctx = time.perf_counter() - t0 - t_pass
    used = [int(c) for c in np.nonzero(agg.label_counts)[0]]
    top_tok = agg.top_tokens(cfg.top_tokens)
    lens = logit_lens(m, cfg.teacher, cfg.sae, cfg.lens_tokens, used) if cfg.teacher else None
    student = student_view(cfg.ckpt, m, cfg.student_windows) if cfg.ckpt else None

    cache: dict[int, str] = {}

    def decode(t: int) -> str:
        if t not in cache:
            cache[t] = tok.decode([t])
        return cache[t]

    K = agg.k_attr
    mean, labels = agg.mean_score(), agg.label_counts
    cols = [("id", "concept", "int", "SAE latent id"),
            ("labels", "labels", "int", "times it is one of a token's labels"),
            ("frac", "% tokens", "pct", "labels / labelled positions")]
    cols += [(f"r{i + 1}", f"rank {i + 1}", "int", f"labels at rank {i + 1}") for i in range(K)]
    cols += [("mean", "mean score", "num", "mean attribution score"), ("max", "max score", "num", "largest score")]
    if student is not None:
        if student.comp_norm is not None:
            cols.append(("comp", "comp. norm", "num", "student's compression-weight norm (paper Fig. 6c)"))
        cols.append(("pred", "student top-k", "pct", f"positions where the student predicts it (top-{student.topk})"))
    cols.append(("tokens", "tokens it labels most", "text", "most often labelled tokens"))
    rows = []
    for c in range(agg.n_concepts):
        n = int(labels[c])
        row: list = [c, n, n / max(1, agg.tokens), *agg.rank_counts[c].tolist(), float(mean[c]),
                     float(agg.score_max[c]) if n else None]
        if student is not None:
            if student.comp_norm is not None:
                row.append(round(float(student.comp_norm[c]), 6))
            row.append(float(student.predicted[c]))
        row.append("  ".join(visible(decode(t)) for t, _ in top_tok.get(c, [])[:5]))
        rows.append(row)

    title = f"{Path(cfg.manifest).stem}: {m.sae['n_latents']:,} concepts"
    teacher = m.teacher or {}
    subtitle = H.esc(f"teacher {teacher.get('name')} · layer {(m.hook or {}).get('layer')} · SAE "
                     f"{m.sae['n_latents']:,} latents (TopK {m.sae.get('k')}) · {m.attribution['variant']}, "
                     f"{K} labels per token · {agg.tokens:,} labelled tokens ({', '.join(splits)})")
    items = [(H.fmt_int(len(used)), "concepts that are labels", "concepts with at least one label"),
             (H.fmt_int(agg.tokens), "labelled tokens", "positions read"),
             (H.fmt_int(agg.windows), "windows", f"of {m.seq_len} tokens")]
    if student is not None and student.comp_norm is not None:
        items.append((H.fmt_pct(float((student.comp_norm < 1e-2).mean())), "comp. norm < 1e-2",
                      "fraction of concepts whose compression weight the student left near zero (paper Fig. 6c: 5.8%)"))
    if student is not None:
        items.append((H.fmt_int(student.positions), "student positions",
                      f"{student.split} positions the student ran on"))
    summary = H.cards(items) + ('<p class="note">Click a column to sort; click a concept to see its contexts. '
                                "Token text: ␣ is a space, ↵ a newline.</p>")

    tmp = browse_out.start(out)
    try:
        (tmp / "site.css").write_text(H.CSS, encoding="utf-8")
        (tmp / "index.js").write_text(H.INDEX_JS, encoding="utf-8")
        (tmp / "data.js").write_text(H.index_data(cols, rows), encoding="utf-8")
        (tmp / "index.html").write_text(H.index_page(title, subtitle, summary), encoding="utf-8")
        (tmp / "c").mkdir()
        hist = agg.hist
        for i, c in enumerate(used):
            info = {"rank_counts": agg.rank_counts[c].tolist(), "labels": int(labels[c]),
                    "label_frac": labels[c] / max(1, agg.tokens), "mean_score": float(mean[c]),
                    "max_score": float(agg.score_max[c]), "hist": hist[c], "top_tokens": top_tok.get(c, []),
                    "pruned": agg.pruned, "contexts": ctx.get(c, []), "steering": steering.get(c)}
            if lens is not None:
                info["lens"] = (lens.promoted[c], lens.suppressed[c])
            if student is not None:
                info["comp_norm"] = None if student.comp_norm is None else float(student.comp_norm[c])
                info["predicted"] = float(student.predicted[c])
            nav = (used[i - 1] if i else None, used[i + 1] if i + 1 < len(used) else None)
            (tmp / "c" / f"{c}.html").write_text(H.concept_page(c, info, decode, nav, title), encoding="utf-8")
        browse_out.finish(tmp, out, str(Path(cfg.manifest)))
    except BaseException:
        from pipeline.outputs import remove_entry

        remove_entry(tmp)
        raise
    return {"site": str(out.absolute() / "index.html"), "concepts": len(used), "tokens": agg.tokens,
            "pass_s": round(t_pass, 3), "contexts_s": round(t_ctx, 3), "pruned": agg.pruned,
            "steered_concepts": sorted(steering)}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m pipeline.browse", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, BrowseConfig)
    return p


def _main(argv: list[str] | None) -> int:
    cfg = dataclass_from_args(BrowseConfig, build_parser().parse_args(argv))
    s = build(cfg)
    per_tok = s["pass_s"] / max(1, s["tokens"]) * 1e6
    print(f"{s['concepts']:,} concepts from {s['tokens']:,} labelled tokens; pass {s['pass_s']:.2f} s "
          f"({per_tok:.2f} us/token), contexts {s['contexts_s']:.2f} s")
    print(f"open: file://{s['site']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, interrupted="interrupted: nothing replaced; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())

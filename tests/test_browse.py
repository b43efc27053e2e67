"""The concept browser (pipeline/browse*.py): the streaming aggregation against a brute-force pass, the
site's HTML (well-formed, self-contained, deterministic), its output contract, and the site as
headless Chromium renders it (skipped where Debian's ``chromium`` is absent)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline import browse_stats
from pipeline.browse import main as browse_main
from pipeline.browse_stats import Aggregate, aggregate, contexts, split_order
from shards import load_manifest, open_split
from shards.fields import as_float32

pytestmark = pytest.mark.usefixtures("ray_local", "one_thread")


@pytest.fixture(scope="module")
def student(extraction, tmp_path_factory) -> Path:
    """A tiny CoCoMix student trained a few steps on the extraction."""
    from trainer.config import TrainConfig
    from trainer.loop import train

    out = tmp_path_factory.mktemp("student") / "run"
    train(TrainConfig(shards=str(extraction), out_dir=str(out), mode="cocomix", preset="tiny", steps=4, micro_batch=4,
                      eval_every=4, eval_windows=4, workers=0, progress=False))
    return out / "ckpt"


# ---------------------------------------------------------------------------------- brute force
def brute(entries, C: int, K: int, V: int, N: int):
    """The reference: ``entries`` is every label slot as (concept, score, key, token), in key order."""
    rank = np.zeros((C, K), np.int64)
    ssum = np.zeros(C)
    smax = np.full(C, -np.inf)
    hist = np.zeros((C, browse_stats.N_BINS), np.int64)
    per: dict[int, list] = {}
    pairs: Counter = Counter()
    for c, s, key, tok in entries:
        if not math.isfinite(s):
            continue
        rank[c, key % K] += 1
        ssum[c] += s
        smax[c] = max(smax[c], s)
        b = 0 if s <= 0 else 1 + min(browse_stats.N_BINS - 2, max(0, math.floor((math.log10(s) + 4) * 8)))
        hist[c, b] += 1
        per.setdefault(c, []).append((-s, key))
        pairs[(c, tok)] += 1
    top = {c: [(-ns, k) for ns, k in sorted(v)[:N]] for c, v in per.items()}
    return rank, ssum, smax, hist, top, pairs


def check_against(agg: Aggregate, entries, V: int) -> None:
    C, K, N = agg.n_concepts, agg.k_attr, agg.top_n
    rank, ssum, smax, hist, top, pairs = brute(entries, C, K, V, N)
    np.testing.assert_array_equal(agg.rank_counts, rank)
    np.testing.assert_allclose(agg.score_sum, ssum, rtol=1e-6)
    np.testing.assert_array_equal(agg.score_max[rank.sum(1) > 0], smax[rank.sum(1) > 0].astype(np.float32))
    np.testing.assert_array_equal(agg.hist, hist)
    for c in range(C):
        got = [(s, k) for s, k in zip(agg.top_score[c].tolist(), agg.top_key[c].tolist(), strict=True) if k >= 0]
        assert got == [(np.float32(s).item(), k) for s, k in top.get(c, [])], c
    want = {}
    for (c, t), n in pairs.items():
        want.setdefault(c, []).append((t, n))
    tops = agg.top_tokens(3)
    for c, v in want.items():
        assert tops[c] == sorted(v, key=lambda x: (-x[1], x[0]))[:3]
    assert set(tops) == set(want)


def test_aggregate_equals_brute_force_on_random_chunks():
    """Many ties (scores from a few values), missing slots, several chunks and pair merges."""
    rng = np.random.default_rng(0)
    C, K, T, V, N = 13, 3, 7, 11, 4
    agg = Aggregate(n_concepts=C, k_attr=K, seq_len=T, vocab_size=V, top_n=N, pair_buffer=5)
    entries = []
    first = 0
    for n in (5, 1, 9, 4):
        ids = rng.integers(0, C, size=(n, T, K))
        scores = rng.choice([0.0005, 0.02, 0.5, 3.0, 7e4, -1.0], size=(n, T, K)).astype(np.float32)
        scores[rng.random((n, T, K)) < 0.2] = -np.inf
        tokens = rng.integers(0, V, size=(n, T + 1))
        agg.add(ids, scores, tokens, first)
        for w in range(n):
            for t in range(T):
                for r in range(K):
                    entries.append((int(ids[w, t, r]), float(scores[w, t, r]), ((first + w) * T + t) * K + r,
                                    int(tokens[w, t])))
        first += n
    agg.finish()
    assert agg.tokens == first * T and agg.windows == first
    check_against(agg, entries, V)


def test_aggregate_equals_brute_force_on_an_extraction(extraction, monkeypatch):
    m = load_manifest(extraction)
    monkeypatch.setattr(browse_stats, "CHUNK_ENTRIES", 3 * m.seq_len * 4)  # three windows per chunk
    splits = split_order(m, None)
    assert splits == ["train", "val"]
    agg, offsets = aggregate(m, splits, top_n=5)
    entries, windows = [], {}
    base = 0
    K = m.fields["concept_ids"].shape[-1]
    for split in splits:
        ds = open_split(m, split, fields=["tokens", "concept_ids", "concept_scores"])
        for i in range(len(ds)):
            w = ds[i]
            windows[(split, i)] = w["tokens"]
            sc = as_float32(w["concept_scores"], m.fields["concept_scores"].dtype)
            for t in range(m.seq_len):
                for r in range(K):
                    entries.append((int(w["concept_ids"][t, r]), float(sc[t, r]), ((base + i) * m.seq_len + t) * K + r,
                                    int(w["tokens"][t])))
        base += len(ds)
        ds.close()
    assert offsets == {"train": 0, "val": m.splits["train"].windows}
    assert agg.tokens == sum(s.tokens for s in m.splits.values())
    check_against(agg, entries, int(m.tokenizer["vocab_size"]))
    assert agg.label_counts.sum() == sum(1 for e in entries if math.isfinite(e[1]))
    # Contexts: the window's tokens around the labelled position, with the labelled token at ``at``.
    ctx = contexts(m, offsets, agg, radius=3)
    for c, items in ctx.items():
        assert len(items) == len(agg.top_entries(c))
        for x, (s, g, pos, r) in zip(items, agg.top_entries(c), strict=True):
            row = windows[(x.split, x.window)]
            assert (offsets[x.split] + x.window, x.position, x.rank, x.score) == (g, pos, r, s)
            assert x.tokens == row[max(0, pos - 3) : pos + 4].tolist() and x.tokens[x.at] == row[pos]


def test_pair_counts_are_pruned_to_bounded_lower_bounds():
    rng = np.random.default_rng(1)
    C, K, T, V = 4, 2, 50, 40
    agg = Aggregate(n_concepts=C, k_attr=K, seq_len=T, vocab_size=V, max_pairs=20, keep_tokens=3, pair_buffer=1)
    exact = Aggregate(n_concepts=C, k_attr=K, seq_len=T, vocab_size=V)
    for i in range(6):
        ids = rng.integers(0, C, size=(3, T, K))
        scores = rng.random((3, T, K)).astype(np.float32)
        tokens = np.minimum(rng.geometric(0.15, size=(3, T + 1)), V - 1)  # a few frequent tokens
        for a in (agg, exact):
            a.add(ids, scores, tokens, 3 * i)
    agg.finish()
    exact.finish()
    assert agg.pruned and not exact.pruned and agg.pair_keys.size <= 20 + C * V
    true = dict(zip(exact.pair_keys.tolist(), exact.pair_counts.tolist(), strict=True))
    assert all(n <= true[k] for k, n in zip(agg.pair_keys.tolist(), agg.pair_counts.tolist(), strict=True))


# ---------------------------------------------------------------------------------- the site
VOID = {"meta", "link", "br", "hr", "img", "input", "line", "rect", "path", "circle", "source", "col", "wbr"}


class Checker(HTMLParser):
    """Balanced tags (void elements aside) and every src / href / url(...) local."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.links: list[str] = []
        self.errors: list[str] = []
        self.classes: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.links.append(v)
            if k == "class" and v:
                self.classes.update(v.split())
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def check_page(path: Path) -> Checker:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    c = Checker()
    c.feed(text)
    c.close()
    assert not c.errors and not c.stack, (path, c.errors, c.stack)
    for link in c.links:
        assert not link.startswith(("http:", "https:", "//", "data:", "file:")), (path, link)
        target = (path.parent / link.split("#")[0]).resolve()
        assert target.is_file(), (path, link)  # every local link resolves
    return c


def build(extraction, out, *extra) -> int:
    return browse_main(["--manifest", str(extraction), "--out", str(out), "--no-progress", "--top-n", "6", *extra])


def test_site_is_well_formed_self_contained_and_deterministic(extraction, student, tiny_teacher_dir, tmp_path,
                                                                capsys):
    out = tmp_path / "site"
    report = tmp_path / "steer.json"
    m = load_manifest(extraction)
    report.write_text(json.dumps({
        "schema": "cocomix.steering/1", "ckpt": "x", "sae_fingerprint": m.sae["fingerprint"],
        "prompts": {"n": 3}, "generation": {"new_tokens": 5}, "intervals": "Wilson; bootstrap",
        "results": [{"concept": 7, "scale": 5.0, "steered": {"samples": 3, "tokens": 12, "token_rate": 0.25,
                     "token_rate_ci": [0.1, 0.4], "sample_rate": 2 / 3, "sample_rate_ci": [0.2, 0.94],
                     "mean_act": 0.5, "mean_act_ci": [0.2, 0.8]},
                     "unsteered": {"samples": 3, "tokens": 12, "token_rate": 0.0, "token_rate_ci": [0, 0],
                                   "sample_rate": 0.0, "sample_rate_ci": [0, 0.56], "mean_act": 0.0,
                                   "mean_act_ci": [0, 0]}}]}))
    assert build(extraction, out, "--ckpt", str(student), "--teacher", str(tiny_teacher_dir),
                 "--steering", str(report)) == 0
    assert "open: file://" in capsys.readouterr().out
    pages = sorted(out.rglob("*.html"))
    agg, _ = aggregate(m, ["train", "val"])
    used = np.nonzero(agg.label_counts)[0].tolist()
    assert [p.stem for p in pages if p.parent.name == "c"] == sorted(map(str, used), key=str)
    for p in pages:
        check_page(p)
    for p in out.rglob("*"):
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            assert "http://" not in text and "https://" not in text, p  # nothing reaches a network
    data = json.loads((out / "data.js").read_text().split("=", 1)[1].rstrip(";\n"))
    assert [r[0] for r in data["rows"]] == list(range(m.sae["n_latents"]))
    assert {"comp", "pred", "tokens"} <= set(data["columns"])
    page = (out / "c" / f"{used[0]}.html").read_text()
    c = check_page(out / "c" / f"{used[0]}.html")
    assert c.classes["hit"] >= 2 and "Logit lens" in page and "compression-weight norm" in page and "<svg" in page
    if 7 in used:
        assert "Steering" in (out / "c" / "7.html").read_text()
    # The same command again (with --overwrite) writes the same bytes: no timestamps in the site.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert build(extraction, out, "--ckpt", str(student), "--teacher", str(tiny_teacher_dir),
                 "--steering", str(report), "--overwrite") == 0
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_output_contract(extraction, tmp_path, capsys):
    out = tmp_path / "site"
    assert build(extraction, out) == 0
    capsys.readouterr()
    # A site is not replaced without --overwrite; the refusal quotes the command that does.
    assert build(extraction, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    # A user's file inside the site: refused with or without --overwrite, and kept.
    (out / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        assert build(extraction, out, *extra) == 2
        assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    # A directory of the user's: refused.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.html").write_text("x")
    assert build(extraction, mine, "--overwrite") == 2
    assert "did not write" in capsys.readouterr().err and (mine / "a.html").read_text() == "x"
    # A killed build's temporary directory is removed by the next run; an empty --out is used.
    (out / "notes.txt").unlink()
    tmp = out.parent / f".{out.name}.browse-tmp"
    tmp.mkdir()
    (tmp / ".cocomix-browse-building").write_text("")
    assert build(extraction, out, "--overwrite") == 0 and not tmp.exists()
    # Killed between the two renames of a replacement: the old site aside, the new one not yet in place.
    old = out.parent / f".{out.name}.browse-old"
    shutil.copytree(out, tmp)
    out.rename(old)
    assert build(extraction, out, "--overwrite") == 0 and not tmp.exists() and not old.exists()
    assert (out / "index.html").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build(extraction, empty) == 0 and (empty / "index.html").is_file()
    capsys.readouterr()
    # Mistakes: one line, exit 2.
    tokens_manifest = Path(load_manifest(extraction).splits["train"].shards[0].parts["tokens"].path).parent
    for args, words in (
        (["--manifest", str(tokens_manifest / "manifest.json"), "--out", str(tmp_path / "x")], "tokens manifest"),
        (["--manifest", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")], "does not exist"),
        (["--manifest", str(extraction), "--out", str(tmp_path / "x"), "--top-n", "0"], "--top-n"),
        (["--manifest", str(extraction), "--out", str(tmp_path / "x"), "--splits", "test"], "--splits test"),
        (["--manifest", str(extraction), "--out", str(tmp_path / "x"), "--steering", str(tmp_path / "no.json")],
         "--steering"),
        (["--manifest", str(extraction), "--out", str(tmp_path / "x"), "--ckpt", str(tmp_path)], "ckpt"),
    ):
        assert browse_main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (args, err)
        assert not (tmp_path / "x").exists()


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_site_in_headless_chromium(extraction, tmp_path):
    """What a person sees: the index lists the concepts once its script has run; a concept page shows
    highlighted contexts. Screenshots are left in the test's tmp directory."""
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the site is checked without it above")
    out = tmp_path / "site"
    assert build(extraction, out) == 0
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--user-data-dir=" + str(tmp_path / "profile"), "--virtual-time-budget=3000"]
    env = {**os.environ, "HOME": str(tmp_path)}

    def dom(page: Path) -> str:
        r = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    index = dom(out / "index.html")
    m = load_manifest(extraction)
    agg, _ = aggregate(m, ["train", "val"])
    best = int(agg.label_counts.argmax())
    assert f'href="c/{best}.html"' in index  # rendered by index.js from data.js: rows exist only after it ran
    assert f"of {m.sae['n_latents']:,} concepts" in index
    assert index.count("<tr>") >= int((agg.label_counts > 0).sum())
    page = dom(out / "c" / f"{best}.html")
    assert page.count('class="hit"') >= 3 and "Top 6 contexts" in page
    for name, target in (("index", out / "index.html"), ("concept", out / "c" / f"{best}.html")):
        shot = tmp_path / f"{name}.png"
        r = subprocess.run([*flags, "--window-size=1200,900", f"--screenshot={shot}", target.as_uri()],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0 and shot.stat().st_size > 5000, r.stderr[-2000:]

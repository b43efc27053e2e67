"""The concept browser's one streaming pass over a concept dataset (docs/browse.md).

Per concept it keeps, in arrays whose size depends on the number of concepts C only:
- how often it is a label at each rank (C, K_attr), the sum and maximum of its scores;
- a histogram of its scores on fixed log-spaced bins (so no second pass is needed for the range);
- its top-N labels by score (a "heap" kept as a (C, N) table, updated per chunk of windows with one
  sort of the candidates that beat the current N-th best, so the per-token work is numpy, not Python);
- (concept, token) label counts, merged in sorted numpy arrays every ``pair_buffer`` pairs; beyond
  ``max_pairs`` distinct pairs each concept keeps only its ``keep_tokens`` most frequent tokens and the
  counts become lower bounds (``pruned``), so memory stays bounded on any corpus.

Ties are broken by position: of two labels with the same score the earlier one (split order, window,
position, rank) wins, the order tests/test_browse.py's brute-force reference uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shards import Manifest, open_split
from shards.fields import as_float32

HIST_LO, HIST_HI, HIST_PER_DECADE = -4, 4, 8
"""Score histogram: bins of 1/8 decade from 1e-4 to 1e4 (values outside land in the end bins), plus
bin 0 for scores <= 0 (the signed ``preact_x_grad`` variant; docs/method.md)."""
N_BINS = (HIST_HI - HIST_LO) * HIST_PER_DECADE + 1
CHUNK_ENTRIES = 1 << 22
"""Label slots handled per numpy step (~4M: a few hundred MB of temporaries at most)."""


def hist_bin(s: np.ndarray) -> np.ndarray:
    """The histogram bin of each score (see HIST_*)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.floor((np.log10(np.maximum(s, 1e-30)) - HIST_LO) * HIST_PER_DECADE).astype(np.int64)
    return np.where(s > 0, np.clip(b, 0, N_BINS - 2) + 1, 0)


def hist_edges() -> np.ndarray:
    """Lower edges of bins 1..N_BINS-1 (bin 0 is "<= 0")."""
    return 10.0 ** (HIST_LO + np.arange(N_BINS - 1) / HIST_PER_DECADE)


@dataclass
class Aggregate:
    """Everything the site shows that comes from the shards; see the module docstring."""

    n_concepts: int
    k_attr: int
    seq_len: int
    vocab_size: int
    top_n: int = 20
    max_pairs: int = 20_000_000
    keep_tokens: int = 64
    pair_buffer: int = 4_000_000
    tokens: int = 0
    """Labelled positions seen."""
    windows: int = 0
    rank_counts: np.ndarray = field(init=False)
    score_sum: np.ndarray = field(init=False)
    score_max: np.ndarray = field(init=False)
    hist: np.ndarray = field(init=False)
    top_score: np.ndarray = field(init=False)
    """(C, N) best scores, descending; -inf where a concept has fewer than N labels."""
    top_key: np.ndarray = field(init=False)
    """(C, N) ((window * T) + position) * K + rank of each top label (global window over the splits); -1 empty."""
    pair_keys: np.ndarray = field(init=False)
    """Sorted concept * V + token keys of (concept, labelled token) pairs."""
    pair_counts: np.ndarray = field(init=False)
    pruned: bool = False
    _pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, init=False)
    _pending_n: int = 0

    def __post_init__(self) -> None:
        C, K, N = self.n_concepts, self.k_attr, self.top_n
        self.rank_counts = np.zeros((C, K), np.int64)
        self.score_sum = np.zeros(C, np.float64)
        self.score_max = np.full(C, -np.inf, np.float32)
        self.hist = np.zeros((C, N_BINS), np.int64)
        self.top_score = np.full((C, N), -np.inf, np.float32)
        self.top_key = np.full((C, N), -1, np.int64)
        self.pair_keys = np.zeros(0, np.int64)
        self.pair_counts = np.zeros(0, np.int64)

    # -------------------------------------------------------------------------------- the pass
    def add(self, ids: np.ndarray, scores: np.ndarray, tokens: np.ndarray, first_window: int) -> None:
        """One chunk: ids / scores (n, T, K) (scores as float32), tokens (n, T+1); ``first_window`` is
        the global index of its first window."""
        n, T, K = ids.shape
        C = self.n_concepts
        self.tokens += n * T
        self.windows += n
        valid = np.isfinite(scores)  # a missing slot holds -inf (docs/data.md)
        w, t, r = np.nonzero(valid)
        c = ids[w, t, r].astype(np.int64)
        s = scores[w, t, r]
        if c.size and (c.min() < 0 or c.max() >= C):
            raise ValueError(f"concept id {int(c.max())} outside [0, {C}): the shards do not match the manifest")
        self.rank_counts += np.bincount(c * K + r, minlength=C * K).reshape(C, K)
        self.score_sum += np.bincount(c, weights=s, minlength=C)
        np.maximum.at(self.score_max, c, s)
        self.hist += np.bincount(c * N_BINS + hist_bin(s), minlength=C * N_BINS).reshape(C, N_BINS)
        tok = tokens[w, t].astype(np.int64)
        keys, counts = np.unique(c * self.vocab_size + tok, return_counts=True)
        self._pending.append((keys, counts))
        self._pending_n += keys.size
        if self._pending_n >= self.pair_buffer:
            self._merge_pairs()
        key = ((first_window + w.astype(np.int64)) * T + t) * K + r
        self._update_top(c, s, key)

    def _update_top(self, c: np.ndarray, s: np.ndarray, key: np.ndarray) -> None:
        # Chunks arrive in key order, so a candidate equal to the N-th best loses the tie: strict '>'.
        beat = s > self.top_score[c, -1]
        c, s, key = c[beat], s[beat], key[beat]
        if not c.size:
            return
        touched = np.unique(c)
        old_s, old_k = self.top_score[touched], self.top_key[touched]  # (m, N)
        keep = old_k >= 0
        cc = np.concatenate([np.repeat(touched, self.top_n)[keep.ravel()], c])
        ss = np.concatenate([old_s[keep], s])
        kk = np.concatenate([old_k[keep], key])
        order = np.lexsort((kk, -ss.astype(np.float64), cc))  # by concept, score descending, key
        cc, ss, kk = cc[order], ss[order], kk[order]
        start = np.searchsorted(cc, cc, side="left")
        rank = np.arange(cc.size) - start
        sel = rank < self.top_n
        self.top_score[touched] = -np.inf
        self.top_key[touched] = -1
        self.top_score[cc[sel], rank[sel]] = ss[sel]
        self.top_key[cc[sel], rank[sel]] = kk[sel]

    def _merge_pairs(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.pair_keys, *(k for k, _ in self._pending)])
        counts = np.concatenate([self.pair_counts, *(c for _, c in self._pending)])
        self._pending, self._pending_n = [], 0
        self.pair_keys, inv = np.unique(keys, return_inverse=True)
        self.pair_counts = np.bincount(inv, weights=counts, minlength=self.pair_keys.size).astype(np.int64)
        if self.pair_keys.size > self.max_pairs:
            self._prune_pairs()

    def _prune_pairs(self) -> None:
        """Keep each concept's ``keep_tokens`` most frequent tokens: bounded memory, counts become lower
        bounds for the tokens that stay (said on the site)."""
        c = self.pair_keys // self.vocab_size
        order = np.lexsort((self.pair_keys, -self.pair_counts, c))
        c_sorted = c[order]
        rank = np.arange(order.size) - np.searchsorted(c_sorted, c_sorted, side="left")
        keep = np.sort(order[rank < self.keep_tokens])
        self.pair_keys, self.pair_counts = self.pair_keys[keep], self.pair_counts[keep]
        self.pruned = True

    def finish(self) -> None:
        self._merge_pairs()

    # -------------------------------------------------------------------------------- results
    @property
    def label_counts(self) -> np.ndarray:
        return self.rank_counts.sum(1)

    def mean_score(self) -> np.ndarray:
        n = self.label_counts
        return np.where(n > 0, self.score_sum / np.maximum(n, 1), np.nan)

    def top_tokens(self, m: int) -> dict[int, list[tuple[int, int]]]:
        """Per concept with labels, its ``m`` most often labelled tokens as (token, count), most first
        (ties: lower token id first)."""
        V = self.vocab_size
        c, tok = self.pair_keys // V, self.pair_keys % V
        order = np.lexsort((tok, -self.pair_counts, c))
        c, tok, cnt = c[order], tok[order], self.pair_counts[order]
        rank = np.arange(c.size) - np.searchsorted(c, c, side="left")
        sel = rank < m
        out: dict[int, list[tuple[int, int]]] = {}
        for ci, ti, ni in zip(c[sel].tolist(), tok[sel].tolist(), cnt[sel].tolist(), strict=True):
            out.setdefault(ci, []).append((ti, ni))
        return out

    def top_entries(self, cid: int) -> list[tuple[float, int, int, int]]:
        """Concept ``cid``'s top labels as (score, global window, position, rank), best first."""
        T, K = self.seq_len, self.k_attr
        out = []
        for s, k in zip(self.top_score[cid].tolist(), self.top_key[cid].tolist(), strict=True):
            if k < 0:
                break
            out.append((s, k // (T * K), (k // K) % T, k % K))
        return out


def split_order(m: Manifest, splits: list[str] | None) -> list[str]:
    """The splits to read, in a fixed order (train first); an unknown one is refused."""
    names = sorted(m.splits, key=lambda s: (s != "train", s))
    if splits is None:
        return names
    if bad := [s for s in splits if s not in m.splits]:
        raise ValueError(f"--splits {','.join(bad)}: the manifest has {', '.join(names)}")
    return [s for s in names if s in splits]


def aggregate(m: Manifest, splits: list[str], top_n: int = 20, max_pairs: int = 20_000_000,
              progress: bool = False) -> tuple[Aggregate, dict[str, int]]:
    """The streaming pass over ``splits`` of the concept manifest ``m`` (shards verified before use).
    Returns the aggregate and each split's first global window index."""
    from tqdm import tqdm

    spec = m.fields["concept_scores"]
    agg = Aggregate(n_concepts=int(m.sae["n_latents"]), k_attr=int(m.fields["concept_ids"].shape[-1]),
                    seq_len=m.seq_len, vocab_size=int(m.tokenizer["vocab_size"]), top_n=top_n, max_pairs=max_pairs)
    offsets: dict[str, int] = {}
    base = 0
    total = sum(m.splits[s].windows for s in splits) * m.seq_len
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="browse: reading shards", disable=not progress)
    step = max(1, CHUNK_ENTRIES // (m.seq_len * agg.k_attr))
    for split in splits:
        offsets[split] = base
        ds = open_split(m, split, verify="lazy", fields=["tokens", "concept_ids", "concept_scores"])
        try:
            for k in range(len(ds.shards)):
                a = ds.shard_arrays(k)
                n = a["tokens"].shape[0]
                for s in range(0, n, step):
                    e = min(n, s + step)
                    scores = as_float32(np.asarray(a["concept_scores"][s:e]), spec.dtype)
                    agg.add(np.asarray(a["concept_ids"][s:e]), scores, np.asarray(a["tokens"][s:e]), base + s)
                    bar.update((e - s) * m.seq_len)
                base += n
        finally:
            ds.close()
    bar.close()
    agg.finish()
    return agg, offsets


@dataclass
class Context:
    """One top label of a concept, with the tokens around it."""

    score: float
    rank: int
    split: str
    window: int
    """Window index within its split."""
    position: int
    tokens: list[int]
    """Token ids of the context (at most ``radius`` on each side, within the window)."""
    at: int
    """Index of the labelled token in ``tokens``."""


def contexts(m: Manifest, offsets: dict[str, int], agg: Aggregate, radius: int = 20) -> dict[int, list[Context]]:
    """Every concept's top labels with their contexts: one read of each window they fall in (after the
    pass, C x N windows at most; each shard's tokens are gathered with one fancy index)."""
    names = sorted(offsets, key=offsets.__getitem__)
    starts = np.array([offsets[s] for s in names], dtype=np.int64)
    wanted: dict[tuple[str, int], list[tuple[int, int, float, int, int]]] = {}  # (split, local window) -> entries
    for cid in np.nonzero(agg.top_key[:, 0] >= 0)[0].tolist():
        for i, (s, g, pos, r) in enumerate(agg.top_entries(cid)):
            split = names[int(np.searchsorted(starts, g, side="right")) - 1]
            wanted.setdefault((split, g - offsets[split]), []).append((cid, i, s, pos, r))
    out: dict[int, list[Context | None]] = {}
    for split in names:
        locals_ = sorted(w for sp, w in wanted if sp == split)
        if not locals_:
            continue
        ds = open_split(m, split, verify="lazy", fields=["tokens"])
        try:
            by_shard: dict[int, list[tuple[int, int]]] = {}
            for w in locals_:
                k, j = ds.locate(w)
                by_shard.setdefault(k, []).append((w, j))
            for k, items in by_shard.items():
                rows = np.asarray(ds.shard_arrays(k)["tokens"])[[j for _, j in items]]  # (n, T+1)
                for (w, _), row in zip(items, rows, strict=True):
                    for cid, i, s, pos, r in wanted[(split, w)]:
                        lo, hi = max(0, pos - radius), min(row.size, pos + radius + 1)
                        ctx = Context(float(s), r, split, w, pos, row[lo:hi].tolist(), pos - lo)
                        out.setdefault(cid, [None] * int((agg.top_key[cid] >= 0).sum()))[i] = ctx
        finally:
            ds.close()
    return {c: [x for x in v if x is not None] for c, v in out.items()}

"""The concept browser's pages: plain HTML written from Python, one stylesheet and one script, all by
relative paths, so the site opens from disk (file://) with no server and no network (docs/browse.md).

    SITE/index.html        every concept: a table rendered by index.js from data.js (sortable, searchable)
    SITE/c/<id>.html       one page per concept that is ever a label (static HTML, no script needed)
    SITE/site.css, SITE/index.js, SITE/data.js
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable

import numpy as np

from pipeline.browse_stats import N_BINS, Context, hist_edges

CSS = """
:root { --fg:#1d2330; --muted:#5c6577; --line:#e3e6ec; --bg:#fafbfc; --card:#fff; --accent:#2456c9;
        --hit:#ffd34d; --hitline:#c98a00; --bar:#5b8def; --neg:#d9534f; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); line-height:1.45;
       font:15px/1.45 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:#1d2330; color:#fff; padding:14px 28px; }
header a { color:#cfe0ff; text-decoration:none; }
header h1 { margin:0; font-size:20px; font-weight:600; }
header .sub { color:#aab4c8; font-size:13px; margin-top:2px; }
main { max-width:1180px; margin:0 auto; padding:18px 28px 48px; }
h2 { font-size:16px; margin:26px 0 8px; font-weight:600; }
a { color:var(--accent); }
.cards { display:flex; flex-wrap:wrap; gap:10px; margin:6px 0 4px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px 14px; min-width:120px; }
.card .v { font-size:19px; font-weight:600; font-variant-numeric: tabular-nums; }
.card .k { font-size:12px; color:var(--muted); }
.note { color:var(--muted); font-size:13px; }
table { border-collapse:collapse; background:var(--card); border:1px solid var(--line); }
th, td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; background:#f3f5f8; white-space:nowrap; }
td.n, th.n { text-align:right; font-variant-numeric: tabular-nums; white-space:nowrap; }
#concepts th { cursor:pointer; user-select:none; }
#concepts th.sorted::after { content:" \\25BE"; } #concepts th.sorted.asc::after { content:" \\25B4"; }
#concepts tbody tr:hover { background:#f0f5ff; }
.search { margin:10px 0; display:flex; gap:12px; align-items:center; }
.search input { font-size:15px; padding:6px 10px; width:320px; border:1px solid #c9ceda; border-radius:6px; }
.tok { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size:13px; white-space:pre; }
.chip { display:inline-block; margin:2px 4px 2px 0; padding:1px 7px; border:1px solid var(--line);
        border-radius:10px; background:#f5f7fb; }
.chip .c { color:var(--muted); font-size:11px; margin-left:5px; font-family:inherit; }
.ctx { list-style:none; padding:0; margin:0; background:var(--card); border:1px solid var(--line); border-radius:8px; }
.ctx li { display:flex; gap:12px; padding:6px 12px; border-bottom:1px solid var(--line); align-items:baseline; }
.ctx li:last-child { border-bottom:none; }
.ctx .s { flex:0 0 92px; text-align:right; color:var(--muted); font-size:12px; font-variant-numeric:tabular-nums; }
.ctx .t { font-family: "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size:13.5px;
          white-space:pre-wrap; word-break:break-word; }
.hit { background:var(--hit); border-bottom:2px solid var(--hitline); font-weight:700; border-radius:2px;
       padding:0 1px; }
.next { text-decoration: underline dotted var(--hitline); text-underline-offset:3px; }
.ws { color:#9aa3b5; }
.cols { display:flex; flex-wrap:wrap; gap:28px; }
.cols > div { flex:1 1 320px; }
nav.pn { display:flex; justify-content:space-between; margin-top:4px; font-size:14px; }
svg text { font-size:11px; fill:#5c6577; }
.ci { color:var(--muted); font-size:12px; }
table.steer td { font-size:14px; } th.g { text-align:center; border-left:1px solid var(--line); }
details { margin:8px 0; } summary { cursor:pointer; color:var(--accent); font-size:14px; }
.ex li { margin:6px 0; font-size:14px; } .ex .t { font-family: Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size:13px; white-space:pre-wrap; background:#f3f5f8; padding:0 3px; }
"""

INDEX_JS = """
(function () {
  var D = window.COCOMIX_CONCEPTS, cols = D.columns, rows = D.rows, LIMIT = 5000;
  var table = document.getElementById('concepts'), body = table.querySelector('tbody');
  var q = document.getElementById('q'), shown = document.getElementById('shown');
  var sortCol = cols.indexOf('labels'), asc = false;
  function fmt(v, kind) {
    if (v === null || v === undefined || (typeof v === 'number' && isNaN(v))) return '\\u2013';
    if (kind === 'int') return v.toLocaleString('en-US');
    if (kind === 'pct') return (100 * v).toPrecision(3) + '%';
    if (kind === 'num')
      return Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 0.001) ? v.toExponential(2) : v.toPrecision(3);
    return String(v);
  }
  var head = table.querySelector('thead tr');
  cols.forEach(function (c, i) {
    var th = document.createElement('th');
    th.textContent = D.titles[i]; th.title = D.help[i] || '';
    if (D.kinds[i] !== 'text') th.className = 'n';
    th.onclick = function () { asc = sortCol === i ? !asc : D.kinds[i] === 'text'; sortCol = i; render(); };
    head.appendChild(th);
  });
  function render() {
    var needle = q.value.trim().toLowerCase();
    var list = rows.filter(function (r) {
      return !needle || String(r[0]) === needle || String(r[cols.indexOf('tokens')]).toLowerCase().indexOf(needle) >= 0;
    });
    list.sort(function (a, b) {
      var x = a[sortCol], y = b[sortCol];
      if (x === null || (typeof x === 'number' && isNaN(x))) return 1;
      if (y === null || (typeof y === 'number' && isNaN(y))) return -1;
      var c = x < y ? -1 : x > y ? 1 : a[0] - b[0];
      return asc ? c : -c;
    });
    head.querySelectorAll('th').forEach(function (th, i) {
      th.classList.toggle('sorted', i === sortCol); th.classList.toggle('asc', i === sortCol && asc);
    });
    var html = [];
    list.slice(0, LIMIT).forEach(function (r) {
      var cells = r.map(function (v, i) {
        var kind = D.kinds[i], text = fmt(v, kind).replace(/&/g, '&amp;').replace(/</g, '&lt;');
        if (i === 0 && r[cols.indexOf('labels')] > 0) text = '<a href="c/' + r[0] + '.html">' + text + '</a>';
        var cls = kind === 'text' ? (i === cols.indexOf('tokens') ? 'tok' : '') : 'n';
        return '<td class="' + cls + '">' + text + '</td>';
      });
      html.push('<tr>' + cells.join('') + '</tr>');
    });
    body.innerHTML = html.join('');
    shown.textContent = list.length.toLocaleString('en-US') + ' of ' + rows.length.toLocaleString('en-US') +
      ' concepts' + (list.length > LIMIT ? ' (first ' + LIMIT + ' shown; search to narrow)' : '');
  }
  q.addEventListener('input', render);
  render();
})();
"""


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def fmt_num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.2e}"
    return f"{x:.3g}"


def fmt_pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{100 * x:.3g}%"


def token_html(text: str) -> str:
    """A decoded token with its whitespace made visible (newline, tab) and everything else escaped."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append('<span class="ws">↵</span>')
        elif ch == "\t":
            out.append('<span class="ws">→</span>')
        elif ch == "\r":
            out.append('<span class="ws">␍</span>')
        else:
            out.append(esc(ch))
    return "".join(out)


def page(title: str, header: str, body: str, root: str, scripts: tuple[str, ...] = ()) -> str:
    tags = "".join(f'<script src="{root}{s}"></script>' for s in scripts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f'<link rel="stylesheet" href="{root}site.css">\n</head>\n<body>\n<header>{header}</header>\n'
            f'<main>\n{body}\n</main>\n{tags}\n</body>\n</html>\n')


def cards(items: list[tuple[str, str, str]]) -> str:
    """(value, key, tooltip) cards."""
    return '<div class="cards">' + "".join(
        f'<div class="card" title="{esc(t)}"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>'
        for v, k, t in items) + "</div>"


def histogram_svg(counts: np.ndarray, width: int = 560, height: int = 150) -> str:
    """Inline SVG of one concept's score histogram (bins: pipeline/browse_stats.py)."""
    nz = np.nonzero(counts)[0]
    if not nz.size:
        return '<p class="note">no labels</p>'
    lo, hi = int(nz[0]), int(nz[-1])
    lo = max(1, lo) if lo > 0 else 0
    bins = list(range(lo, hi + 1))
    edges = hist_edges()
    top = int(counts[bins].max())
    pad_l, pad_b, pad_t = 46, 22, 8
    bw = (width - pad_l - 6) / max(1, len(bins))
    ph = height - pad_b - pad_t
    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'aria-label="score histogram">',
             f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{width - 4}" y2="{pad_t + ph}" stroke="#c9ceda"/>',
             f'<text x="{pad_l - 6}" y="{pad_t + 9}" text-anchor="end">{top:,}</text>',
             f'<text x="{pad_l - 6}" y="{pad_t + ph}" text-anchor="end">0</text>']
    for i, b in enumerate(bins):
        h = ph * counts[b] / top
        x = pad_l + i * bw
        lab = "≤ 0" if b == 0 else f"[{fmt_num(edges[b - 1])}, {fmt_num(edges[b] if b < N_BINS - 1 else math.inf)})"
        color = "var(--neg)" if b == 0 else "var(--bar)"
        parts.append(f'<rect x="{x + 0.5:.1f}" y="{pad_t + ph - h:.1f}" width="{max(1.0, bw - 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{esc(lab)}: {int(counts[b]):,}</title></rect>')
        if b > 0 and (b - 1) % 8 == 0:  # a decade edge: label it
            parts.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{fmt_num(edges[b - 1])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def chips(items: list[tuple[int, float | int]], decode: Callable[[int], str], value: Callable[[float], str]) -> str:
    return "".join(f'<span class="chip"><span class="tok">{token_html(decode(t))}</span>'
                   f'<span class="c">{value(v)}</span></span>' for t, v in items) or '<span class="note">none</span>'


def context_html(ctx: Context, decode: Callable[[int], str]) -> str:
    spans = []
    for i, t in enumerate(ctx.tokens):
        cls = "hit" if i == ctx.at else "next" if i == ctx.at + 1 else ""
        text = token_html(decode(t))
        spans.append(f'<span class="{cls}">{text}</span>' if cls else text)
    where = f"{ctx.split} window {ctx.window:,}, position {ctx.position}, label rank {ctx.rank + 1}"
    return (f'<li><span class="s" title="{esc(where)}">{fmt_num(ctx.score)}</span>'
            f'<span class="t">{"".join(spans)}</span></li>')


def steering_html(rows: list[dict]) -> str:
    """The steering report's rows for one concept (pipeline/steering.py's format)."""
    def cell(arm: dict, key: str, pct: bool) -> str:
        f = fmt_pct if pct else fmt_num
        lo, hi = arm.get(f"{key}_ci", [None, None])
        return f'{f(arm.get(key))}<br><span class="ci">[{f(lo)}, {f(hi)}]</span>'

    def delta(r: dict, key: str, pct: bool) -> str:
        d = (r.get("difference") or {}).get(key)
        if not d:
            return "–"
        f = fmt_pct if pct else fmt_num
        sign = "+" if d["value"] > 0 else ""
        return f'{sign}{f(d["value"])}<br><span class="ci">[{f(d["ci"][0])}, {f(d["ci"][1])}]</span>'

    head = ("<tr><th></th><th class=g colspan=3>tokens labelled with it</th><th class=g colspan=2>samples with it</th>"
            "<th class=g colspan=3>its mean SAE activation</th><th></th></tr>"
            "<tr><th class=n>scale</th><th class=n>steered</th><th class=n>unsteered</th><th class=n>difference</th>"
            "<th class=n>steered</th><th class=n>unsteered</th><th class=n>steered</th><th class=n>unsteered</th>"
            "<th class=n>difference</th><th class=n>samples</th></tr>")
    body = []
    for r in rows:
        s, u = r["steered"], r["unsteered"]
        body.append(f'<tr><td class=n>{fmt_num(r["scale"])}</td><td class=n>{cell(s, "token_rate", True)}</td>'
                    f'<td class=n>{cell(u, "token_rate", True)}</td><td class=n>{delta(r, "token_rate", True)}</td>'
                    f'<td class=n>{cell(s, "sample_rate", True)}</td><td class=n>{cell(u, "sample_rate", True)}</td>'
                    f'<td class=n>{cell(s, "mean_act", False)}</td><td class=n>{cell(u, "mean_act", False)}</td>'
                    f'<td class=n>{delta(r, "mean_act", False)}</td><td class=n>{fmt_int(s["samples"])}</td></tr>')
    ex = []
    for r in rows:
        for e in r.get("examples", [])[:2]:
            ex.append(f'<li><b>scale {fmt_num(r["scale"])}</b> · prompt '
                      f'<span class="t">{token_html(e["prompt"])}</span>'
                      f'<br>unsteered: <span class="t">{token_html(e["unsteered"])}</span>'
                      f'<br>steered: <span class="t">{token_html(e["steered"])}</span></li>')
    more = f'<details><summary>example continuations</summary><ul class="ex">{"".join(ex)}</ul></details>' if ex else ""
    return f"<table class=steer>{head}{''.join(body)}</table>{more}"


def index_data(columns: list[tuple[str, str, str, str]], rows: list[list]) -> str:
    """data.js: the index table as a script (a .js file, not fetched JSON: file:// pages may not fetch)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    data = {"columns": [c[0] for c in columns], "titles": [c[1] for c in columns], "kinds": [c[2] for c in columns],
            "help": [c[3] for c in columns], "rows": [[clean(v) for v in r] for r in rows]}
    return "window.COCOMIX_CONCEPTS = " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + ";\n"


def index_page(title: str, subtitle: str, summary: str) -> str:
    body = (f"{summary}\n<div class=\"search\"><input id=\"q\" type=\"search\" "
            f"placeholder=\"search: a concept id or token text\" aria-label=\"search\"><span id=\"shown\" "
            f"class=\"note\"></span></div>\n<noscript><p>The table needs JavaScript (it runs from the file, no "
            f"network).</p></noscript>\n<table id=\"concepts\"><thead><tr></tr></thead><tbody></tbody></table>")
    header = f"<h1>{esc(title)}</h1><div class=\"sub\">{subtitle}</div>"
    return page(title, header, body, "", ("data.js", "index.js"))


def concept_page(cid: int, info: dict, decode: Callable[[int], str], nav: tuple[int | None, int | None],
                 title: str) -> str:
    """One concept's page. ``info`` holds what the aggregate, the lens, the student and the steering
    report say about it (pipeline/browse.py builds it)."""
    K = len(info["rank_counts"])
    rank_txt = " / ".join(fmt_int(n) for n in info["rank_counts"])
    items = [
        (fmt_int(info["labels"]), "labels", "how often it is one of a token's K_attr labels"),
        (fmt_pct(info["label_frac"]), "of labelled tokens", "labels / labelled positions"),
        (rank_txt, f"at rank 1{'/…/' + str(K) if K > 1 else ''}", "labels at each rank (1 = the best score)"),
        (fmt_num(info["mean_score"]), "mean score", "mean attribution score of its labels"),
        (fmt_num(info["max_score"]), "max score", "largest attribution score"),
    ]
    if info.get("comp_norm") is not None:
        items.append((fmt_num(info["comp_norm"]), "compression-weight norm",
                      "L2 norm of the student's compression-weight column (paper Fig. 6c)"))
    if info.get("predicted") is not None:
        items.append((fmt_pct(info["predicted"]), "student predicts it",
                      "fraction of positions where it is in the student's top-k concepts"))
    prev, nxt = nav
    navl = f'<a href="{prev}.html">← concept {prev}</a>' if prev is not None else "<span></span>"
    navr = f'<a href="{nxt}.html">concept {nxt} →</a>' if nxt is not None else "<span></span>"
    parts = [cards(items), f'<nav class="pn">{navl}{navr}</nav>']
    ctxs = info["contexts"]
    parts.append(f"<h2>Top {len(ctxs)} contexts by attribution score</h2>"
                 '<p class="note">The labelled token is <span class="hit">highlighted</span>; the token it predicts '
                 'is <span class="next">underlined</span>. ↵ is a newline. Hover a score for where it is.</p>')
    parts.append('<ul class="ctx">' + "".join(context_html(c, decode) for c in ctxs) + "</ul>")
    side = [f"<div><h2>Score distribution</h2>{histogram_svg(info['hist'])}"
            '<p class="note">Log-spaced bins (8 per decade); hover a bar for its range and count.</p></div>']
    approx = " (lower bounds: the token table was pruned)" if info.get("pruned") else ""
    side.append(f"<div><h2>Tokens it labels most often</h2>{chips(info['top_tokens'], decode, fmt_int)}"
                f'<p class="note">count of labels on each token{approx}</p></div>')
    parts.append('<div class="cols">' + "".join(side) + "</div>")
    if info.get("lens"):
        up, down = info["lens"]
        parts.append('<div class="cols"><div><h2>Logit lens: tokens its direction promotes</h2>'
                     f"{chips(up, decode, fmt_num)}</div><div><h2>… and suppresses</h2>{chips(down, decode, fmt_num)}"
                     '</div></div><p class="note">The SAE decoder row through the gain of the teacher\'s final norm '
                     "and its unembedding (docs/browse.md).</p>")
    if info.get("steering"):
        parts.append("<h2>Steering</h2>" + "".join(
            f'<p class="note">{esc(rep["what"])}</p>{steering_html(rep["rows"])}' for rep in info["steering"]))
    header = (f'<div class="sub"><a href="../index.html">← all concepts</a> · {esc(title)}</div>'
              f"<h1>Concept {cid}</h1>")
    return page(f"Concept {cid} · {title}", header, "\n".join(parts), "../")

"""The static HTML feature browser that `actserve features` writes; it opens from the file system
with no server and no network (no CDN: styles and scripts are inline, data files sit beside).

    OUT/index.html                 the SAEs, linking to each SAE's index
    OUT/SAE/index.html             its features: sortable by density and max activation, searchable
                                   by id, dead and dense features marked; data in index-data.js
    OUT/SAE/feature.html#ID        one page for every feature: it loads data/chunk-NNNN.js (the
                                   CHUNK features around ID) with a <script> element, which works
                                   from file:// where fetch() of a local file does not
    OUT/SAE/data/chunk-NNNN.js     window.featureChunk({id: feature, ...}) for CHUNK features

Each page sets data-ok="1" on <html> once it has rendered, and data-error on a script error.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

CHUNK = 128  # features per data file of the feature page


def js_value(value) -> str:
    """JSON for embedding in a script: `</` escaped so no string can close the <script> element."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def rounded(x: float) -> float:
    return float(f"{x:.4g}")


def feature_data(feature: dict, examples: list[dict]) -> dict:
    """The JSON one feature's page renders."""
    return {
        "id": feature["feature"], "density": feature["density"], "count": feature["fire_count"],
        "max": rounded(feature["max_activation"]), "mean": rounded(feature["mean_activation"]),
        "dead": feature["dead"], "dense": feature["dense"],
        "hist": [[rounded(lo), None if hi == float("inf") else rounded(hi), c] for lo, hi, c in feature["histogram_bins"]],
        "promoted": None if feature["promoted"] is None else [[t, rounded(v)] for t, v in feature["promoted"]],
        "suppressed": None if feature["suppressed"] is None else [[t, rounded(v)] for t, v in feature["suppressed"]],
        "examples": [{"a": rounded(e["activation"]), "s": e["sequence"], "p": e["position"],
                      "c": e["position"] - e["context_start"], "t": e["context_token_texts"],
                      "v": [rounded(v) for v in e["context_activations"]]} for e in examples],
    }


def write_browser(directory: Path, meta: dict, features: list[dict], examples: list[dict]) -> None:
    by_feature: dict[int, list[dict]] = {}
    for e in examples:
        by_feature.setdefault(e["feature"], []).append(e)
    data = directory / "data"
    data.mkdir()
    for start in range(0, len(features), CHUNK):
        chunk = {f["feature"]: feature_data(f, by_feature.get(f["feature"], [])) for f in features[start:start + CHUNK]}
        (data / f"chunk-{start // CHUNK:04d}.js").write_text(f"window.featureChunk({js_value(chunk)});\n")
    rows = [[f["feature"], f["density"], rounded(f["max_activation"]), f["fire_count"], int(f["dead"]) + 2 * int(f["dense"])]
            for f in features]
    page_meta = {k: meta[k] for k in ("sae", "hook", "architecture", "d_sae", "tokens", "top", "dense_threshold", "logit_lens")}
    (directory / "index-data.js").write_text(f"window.featureIndex({js_value({'meta': page_meta, 'rows': rows})});\n")
    (directory / "index.html").write_text(INDEX_HTML.replace("$TITLE", html.escape(f"{meta['sae']}: features")))
    (directory / "feature.html").write_text(
        FEATURE_HTML.replace("$TITLE", html.escape(f"{meta['sae']}: feature")).replace("$META", js_value(page_meta))
        .replace("$CHUNK", str(CHUNK)))


def write_sae_index(root: Path, entries: list[dict]) -> None:
    rows = "\n".join(
        f"<tr><td><a href=\"{html.escape(e['sae'])}/index.html\">{html.escape(e['sae'])}</a></td>"
        f"<td>{html.escape(e['hook'])}</td><td>{html.escape(e['architecture'])}</td><td>{e['d_sae']}</td>"
        f"<td>{e['dead']}</td><td>{e['dense']}</td><td>{e['tokens']}</td></tr>" for e in entries)
    (root / "index.html").write_text(ROOT_HTML.replace("$ROWS", rows))


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 2px 10px; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
th.sort { cursor: pointer; text-decoration: underline dotted; }
tr.dead td { color: #999; }
.tag { font-size: 11px; padding: 0 4px; border-radius: 3px; margin-left: 4px; }
.tag.dead { background: #ddd; } .tag.dense { background: #fcc; }
.ctx { font-family: ui-monospace, monospace; white-space: pre; margin: 2px 0; }
.tok { border-radius: 2px; }
.tok.hit { outline: 1px solid #c40; }
.muted { color: #777; }
ul.logits { display: inline-block; vertical-align: top; margin-right: 3em; font-family: ui-monospace, monospace; }
"""

ROOT_HTML = """<!doctype html>
<html data-ok="1"><head><meta charset="utf-8"><title>actserve features</title><style>""" + STYLE + """</style></head>
<body><h1>Feature browser</h1>
<table><thead><tr><th>SAE</th><th>hook</th><th>architecture</th><th>features</th><th>dead</th><th>dense</th><th>tokens</th></tr></thead>
<tbody>
$ROWS
</tbody></table></body></html>
"""

# Shared by both pages: report script errors on <html> so a headless browser's DOM shows them.
ERROR_HOOK = """window.addEventListener('error', e => { document.documentElement.dataset.error = String(e.message); });"""

INDEX_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>$TITLE</title><style>""" + STYLE + """</style>
<script>""" + ERROR_HOOK + """
let DATA = null;
window.featureIndex = d => { DATA = d; };
</script>
<script src="index-data.js"></script></head>
<body><p><a href="../index.html">all SAEs</a></p>
<h1 id="title"></h1><p id="about" class="muted"></p>
<p><label>feature id <input id="search" size="8" placeholder="e.g. 12"></label>
<label><input type="checkbox" id="hidedead"> hide dead</label> <span id="shown" class="muted"></span></p>
<table><thead><tr><th class="sort" data-key="0">feature</th><th class="sort" data-key="1">density</th>
<th class="sort" data-key="2">max activation</th><th class="sort" data-key="3">firing tokens</th><th>flags</th></tr></thead>
<tbody id="rows"></tbody></table>
<p><button id="more" hidden>show more</button></p>
<script>
const LIMIT = 1000;
let sortKey = 1, descending = true, limit = LIMIT;
const m = DATA.meta;
document.getElementById('title').textContent = m.sae + ': ' + m.d_sae + ' features of ' + m.hook;
const dead = DATA.rows.filter(r => r[4] & 1).length, dense = DATA.rows.filter(r => r[4] & 2).length;
document.getElementById('about').textContent = m.architecture + ' SAE; ' + m.tokens + ' eval tokens; '
  + dead + ' dead (never fired), ' + dense + ' dense (density > ' + m.dense_threshold + ')';
function fmt(x) { return x === 0 ? '0' : x.toPrecision(3); }
function render() {
  const q = document.getElementById('search').value.trim(), hide = document.getElementById('hidedead').checked;
  let rows = DATA.rows.filter(r => (!q || String(r[0]).startsWith(q)) && !(hide && (r[4] & 1)));
  rows.sort((a, b) => (descending ? b[sortKey] - a[sortKey] : a[sortKey] - b[sortKey]) || a[0] - b[0]);
  const parts = [];
  for (const r of rows.slice(0, limit)) {
    const tags = (r[4] & 1 ? '<span class="tag dead">dead</span>' : '') + (r[4] & 2 ? '<span class="tag dense">dense</span>' : '');
    parts.push('<tr class="' + (r[4] & 1 ? 'dead' : '') + '"><td><a href="feature.html#' + r[0] + '">' + r[0] + '</a></td><td>'
      + fmt(r[1]) + '</td><td>' + fmt(r[2]) + '</td><td>' + r[3] + '</td><td>' + tags + '</td></tr>');
  }
  document.getElementById('rows').innerHTML = parts.join('');
  document.getElementById('shown').textContent = 'showing ' + Math.min(limit, rows.length) + ' of ' + rows.length;
  document.getElementById('more').hidden = rows.length <= limit;
}
for (const th of document.querySelectorAll('th.sort')) {
  th.addEventListener('click', () => {
    const key = Number(th.dataset.key);
    descending = key === sortKey ? !descending : key !== 0;
    sortKey = key; render();
  });
}
document.getElementById('search').addEventListener('input', () => { limit = LIMIT; render(); });
document.getElementById('hidedead').addEventListener('change', render);
document.getElementById('more').addEventListener('click', () => { limit += LIMIT; render(); });
render();
document.documentElement.dataset.renderMs = performance.now().toFixed(1);
document.documentElement.dataset.ok = '1';
</script></body></html>
"""

FEATURE_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>$TITLE</title><style>""" + STYLE + """</style>
<script>""" + ERROR_HOOK + """</script></head>
<body><p><a href="index.html">all features</a> <span id="nav"></span></p>
<h1 id="title">feature</h1><p id="stats"></p>
<h2>Top activations</h2>
<p class="muted">Each token is shaded by this feature's activation on it (hover for the value); the outlined token
is the example. Activations on the BOS position are not counted.</p>
<div id="examples"></div>
<h2>Activation histogram</h2><p class="muted">non-zero activations, log-spaced bins</p><div id="hist"></div>
<h2>Logit lens</h2><p class="muted" id="lenshow"></p><div id="logits"></div>
<script>
const META = $META, CHUNK = $CHUNK;
const loaded = {};
window.featureChunk = chunk => { Object.assign(loaded, chunk); };
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function shown(t) { return t.replace(/\\n/g, '\\u21b5').replace(/\\t/g, '\\u2192'); }
function fmt(x) { return x === 0 ? '0' : x.toPrecision(3); }
function histogram(bins) {
  const NS = 'http://www.w3.org/2000/svg', W = 600, H = 160, pad = 30;
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('width', W); svg.setAttribute('height', H + pad); svg.setAttribute('id', 'histogram');
  const top = Math.max(1, ...bins.map(b => b[2])), w = (W - 2 * pad) / Math.max(bins.length, 1);
  bins.forEach((b, i) => {
    const r = document.createElementNS(NS, 'rect'), h = H * b[2] / top;
    r.setAttribute('x', pad + i * w); r.setAttribute('y', H - h); r.setAttribute('width', Math.max(w - 1, 1));
    r.setAttribute('height', h); r.setAttribute('fill', '#e67e22');
    const t = document.createElementNS(NS, 'title');
    t.textContent = fmt(b[0]) + ' to ' + (b[1] === null ? 'inf' : fmt(b[1])) + ': ' + b[2];
    r.appendChild(t); svg.appendChild(r);
  });
  const label = (x, anchor, text) => {
    const t = document.createElementNS(NS, 'text');
    t.setAttribute('x', x); t.setAttribute('y', H + 18); t.setAttribute('text-anchor', anchor);
    t.setAttribute('font-size', '12'); t.textContent = text; svg.appendChild(t);
  };
  if (bins.length) {
    label(pad, 'start', fmt(bins[0][0]));
    const last = bins[bins.length - 1][1];
    label(W - pad, 'end', last === null ? 'inf' : fmt(last));
    label(W / 2, 'middle', 'activation (max bar: ' + top + ' tokens)');
  }
  return svg;
}
function render(id) {
  const f = loaded[id];
  document.title = META.sae + ': feature ' + id;
  const nav = document.getElementById('nav');
  nav.replaceChildren();
  if (id > 0) nav.appendChild(el('a', {href: '#' + (id - 1)}, '\\u2190 ' + (id - 1)));
  nav.appendChild(document.createTextNode(' '));
  if (id + 1 < META.d_sae) nav.appendChild(el('a', {href: '#' + (id + 1)}, (id + 1) + ' \\u2192'));
  if (f === undefined) {
    document.getElementById('title').textContent = 'no feature ' + id + ' (the SAE has ' + META.d_sae + ')';
    document.documentElement.dataset.ok = '1';
    return;
  }
  const title = document.getElementById('title');
  title.textContent = META.sae + ' feature ' + id + ' ';
  if (f.dead) title.appendChild(el('span', {class: 'tag dead'}, 'dead'));
  if (f.dense) title.appendChild(el('span', {class: 'tag dense'}, 'dense'));
  document.getElementById('stats').textContent = META.hook + ': density ' + fmt(f.density) + ' (' + f.count + ' of '
    + META.tokens + ' tokens), max activation ' + fmt(f.max) + ', mean when firing ' + fmt(f.mean);
  const box = document.getElementById('examples');
  box.replaceChildren();
  if (!f.examples.length) box.appendChild(el('p', {class: 'muted'}, 'never fired on the eval tokens'));
  for (const x of f.examples) {
    const line = el('div', {class: 'ctx'});
    line.appendChild(el('span', {class: 'muted'}, fmt(x.a).padStart(7) + '  seq ' + x.s + ' pos ' + x.p + '  '));
    x.t.forEach((t, i) => {
      const a = Math.max(0, Math.min(1, x.v[i] / (f.max || 1)));
      const span = el('span', {class: 'tok' + (i === x.c ? ' hit' : ''), title: JSON.stringify(t) + ' ' + fmt(x.v[i]),
                               style: 'background-color: rgba(230, 126, 34, ' + a.toFixed(3) + ')'}, shown(t));
      line.appendChild(span);
    });
    box.appendChild(line);
  }
  document.getElementById('hist').replaceChildren(histogram(f.hist));
  const logits = document.getElementById('logits');
  logits.replaceChildren();
  if (f.promoted === null) {
    document.getElementById('lenshow').textContent = 'not computed: ' + META.hook + ' is not a residual-stream hook';
  } else {
    document.getElementById('lenshow').textContent = 'Tokens whose logits this feature raises and lowers most: ' + META.logit_lens + '.';
    for (const [name, list] of [['promoted', f.promoted], ['suppressed', f.suppressed]]) {
      const ul = el('ul', {class: 'logits', id: name});
      ul.appendChild(el('b', {}, name));
      for (const [t, v] of list) ul.appendChild(el('li', {}, JSON.stringify(t) + ' ' + fmt(v)));
      logits.appendChild(ul);
    }
  }
  document.documentElement.dataset.ok = '1';
}
function show() {
  const id = parseInt(location.hash.slice(1) || '0', 10);
  delete document.documentElement.dataset.ok;
  if (!(id >= 0)) { document.getElementById('title').textContent = 'not a feature id: ' + location.hash; return; }
  if (id in loaded || id >= META.d_sae) { render(id); return; }
  const chunk = Math.floor(id / CHUNK);
  const s = el('script', {src: 'data/chunk-' + String(chunk).padStart(4, '0') + '.js'});
  s.onload = () => render(id);
  s.onerror = () => { document.documentElement.dataset.error = 'cannot load ' + s.src; };
  document.head.appendChild(s);
}
window.addEventListener('hashchange', show);
show();
</script></body></html>
"""

"""The report's interactive part: a learnability map and its curves, drawn in the browser by plotly.js.

Everything the page draws is computed here, on the host, from the final tables (``page_data``):
per grid point (``summary_by_setting``'s case and grid axes) the median over seeds of each metric
at each checkpoint (from ``metrics``) and of each steps-to-threshold summary. The page embeds that
data and plotly.js itself (nothing is fetched), and a small script of ours draws

- the map: the chosen metric per grid point over two chosen grid axes (a heatmap; a line over one
  axis where the sweep has one), the other axes held at chosen values, values on hover;
- the curves: the metric against training step for the map's row (clicked, or chosen), one line
  per value of the map's x axis; for a steps-to metric, the metric it times with its threshold.

Selectors: metric, threshold (steps-to metrics), checkpoint (per-checkpoint metrics), the map's
axes and the values of the others. The page marks ``<body data-interactive="N">`` after its N-th
draw (what the browser test waits for).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from calibjax.analysis import summaries
from calibjax.storage import reader

# Per-checkpoint metrics offered (those the sweep measured: a column of NaN is left out).
METRICS = (
    "kl",
    "kl_rel",
    "tv",
    "max_err",
    "err_dense",
    "err_sparse",
    "true_ece",
    "ece",
    "cal_term",
    "grouping_term",
    "kl_cal",
    "kl_group",
    "kl_to_optimum",
    "brier",
    "accuracy",
)
TIMING = re.compile(r"^(steps_to|sustained)_(kl_rel|kl)_([0-9.eE+-]+)$")  # (not the quartiles: _q25, _q75)
MAX_VALUES = 4_000_000  # medians embedded at most (grid points x checkpoints x metrics): about 30 MB of text


def page_data(out: str | Path) -> dict | None:
    """What the interactive part draws, from a results directory's final tables; None where there is
    nothing to draw (no summary_by_setting, or no checkpoint)."""
    out = Path(out)
    try:
        agg = reader.read_table(out, "summary_by_setting")
    except FileNotFoundError:
        return None
    axes_cols = summaries.setting_columns(agg)
    runs = reader.read_table(out, "runs", columns=["run_id", *axes_cols])
    keys = reader.read_table(out, "metrics", columns=["run_id", "step"])
    if keys.empty:
        return None
    # each run's grid point: its row of summary_by_setting (the same grouping: aggregate's, dropna=False)
    point = runs.merge(agg[axes_cols].reset_index(), on=axes_cols, how="left")["index"].to_numpy()
    setting = np.full(int(runs["run_id"].max()) + 1, -1, np.int64)
    setting[runs["run_id"].to_numpy()] = np.where(np.isnan(point), -1, point).astype(np.int64)
    steps = np.unique(keys["step"].to_numpy())
    key = setting[keys["run_id"].to_numpy()] * len(steps) + np.searchsorted(steps, keys["step"].to_numpy())
    rows, key = np.flatnonzero(key >= 0), key[key >= 0]
    n = len(agg) * len(steps)
    available = set(reader.table_columns(out, "metrics"))
    values = {}
    for m in (m for m in METRICS if m in available):  # one column at a time: a million runs fit
        if values and (len(values) + 1) * n > MAX_VALUES:  # (very large sweeps: the first metrics only)
            break
        column = reader.read_table(out, "metrics", columns=[m])[m].to_numpy(float)[rows]
        (median,) = summaries.group_quantiles(column, key, n, (0.5,))  # (numpy's median, NaN ignored)
        if not np.isnan(median).all():
            values[m] = median
    timing: dict[str, dict[str, np.ndarray]] = {}
    for c in agg.columns:
        if (hit := TIMING.match(c)) and hit.group(2) in values:
            timing.setdefault(f"{hit.group(1)}_{hit.group(2)}", {})[hit.group(3)] = agg[c].to_numpy(float)
    axes = []
    codes = []
    for c in axes_cols:
        labels, code = _axis(agg[c])
        axes.append({"name": c, "values": labels})
        codes.append(code)
    return {
        "axes": axes,
        "settings": np.stack(codes, axis=1).tolist() if codes else [[] for _ in range(len(agg))],
        "runs": agg["n_runs"].astype(int).tolist(),
        "steps": steps.astype(int).tolist(),
        "values": values,
        "timing": timing,
    }


def _axis(column: pd.Series) -> tuple[list[str], list[int]]:
    """An axis's values as labels (ascending where they compare), and each row's index among them."""
    try:
        codes, uniques = pd.factorize(column, sort=True, use_na_sentinel=False)
    except TypeError:  # (values of mixed types: as they come)
        codes, uniques = pd.factorize(column, use_na_sentinel=False)
    labels = ["(none)" if pd.isna(v) else f"{v:g}" if isinstance(v, float) else str(v) for v in uniques]
    return labels, codes.tolist()


def _numbers(values: np.ndarray) -> str:
    """A JavaScript array of numbers, 4 significant digits (Infinity: never reached; NaN: none)."""
    text = np.char.mod("%.4g", np.asarray(values, float))
    return "[" + ",".join(text.tolist()).replace("nan", "NaN").replace("inf", "Infinity") + "]"


def script_data(data: dict) -> str:
    """``page_data`` as a JavaScript expression (JSON with NaN and Infinity, which JSON lacks)."""
    plain = {k: v for k, v in data.items() if k not in ("values", "timing")}
    values = ",".join(f"{json.dumps(k)}:{_numbers(v)}" for k, v in data["values"].items())
    timing = ",".join(
        json.dumps(family) + ":{" + ",".join(f"{json.dumps(eps)}:{_numbers(v)}" for eps, v in by_eps.items()) + "}"
        for family, by_eps in data["timing"].items()
    )
    text = json.dumps(plain)[:-1] + f',"values":{{{values}}},"timing":{{{timing}}}}}'
    return text.replace("</", "<\\/")


def section(out: str | Path) -> str:
    """The interactive part of report.html (empty where there is nothing to draw)."""
    data = page_data(out)
    if data is None or not data["values"]:
        return ""
    from plotly.offline import get_plotlyjs  # (plotly.js as the plotly package ships it)

    return f"""<h2>Explore</h2>
<p>Medians over seeds per grid point, from <code>metrics.parquet</code> (per checkpoint) and
<code>summary_by_setting.parquet</code> (steps to a threshold). Hover for values; click a cell to show its
row's curves. Drawn by plotly.js, embedded in this page.</p>
<div id="cj-controls" class="controls"></div>
<div id="cj-map" class="plot"></div>
<div id="cj-curves" class="plot"></div>
<script>{get_plotlyjs()}</script>
<script>const CALIBJAX_DATA = {script_data(data)};</script>
<script>{APP}</script>"""


STYLE = """.controls{display:flex;flex-wrap:wrap;gap:6px 16px;margin:1em 0;font-size:13px}
.controls label{display:flex;flex-direction:column;color:#555}.plot{width:100%;height:480px}"""

# The page's own script: selectors, the map and the curves (plotly.js's Plotly.react redraws).
APP = r"""
(function () {
  const D = CALIBJAX_DATA, A = D.axes, S = D.steps, N = D.runs.length;
  const index = new Map(D.settings.map((s, i) => [s.join(','), i]));
  const varying = A.map((a, i) => i).filter(i => A[i].values.length > 1);
  const family = m => m.replace(/^(steps_to|sustained)_/, '');
  const metrics = [...Object.keys(D.values), ...Object.keys(D.timing)];
  const st = {metric: metrics[0], eps: null, step: S.length - 1, x: varying[0] ?? -1,
              y: varying[1] ?? -1, at: A.map(() => 0), row: 0};
  const controls = document.getElementById('cj-controls');
  const sel = {};
  function select(id, label, items, value, change) {
    let s = sel[id];
    if (!s) {
      const l = document.createElement('label'); l.textContent = label;
      s = sel[id] = document.createElement('select'); s.id = 'cj-' + id;
      s.addEventListener('change', () => { change(s.value); draw(); });
      l.appendChild(s); controls.appendChild(l);
    }
    s.innerHTML = '';
    for (const [v, text] of items) {
      const o = document.createElement('option'); o.value = v; o.textContent = text; s.appendChild(o);
    }
    s.value = String(value);
    s.parentNode.style.display = items.length > 1 ? '' : 'none';
  }
  const timed = () => st.metric in D.timing;
  function value(i, metric) {
    if (i === undefined) return NaN;
    if (metric in D.timing) return D.timing[metric][st.eps][i];
    return D.values[metric][i * S.length + st.step];
  }
  function point(xi, yi) {
    const at = st.at.slice();
    if (st.x >= 0) at[st.x] = xi;
    if (st.y >= 0) at[st.y] = yi;
    return index.get(at.join(','));
  }
  const fmt = v => Number.isNaN(v) ? 'none' : v === Infinity ? 'never' : (+v.toPrecision(4)).toString();
  const label = () => timed() ? `${st.metric.replace(/_/g, ' ')} ${st.eps}` : `${st.metric} at step ${S[st.step]}`;
  function controlsDraw() {
    select('metric', 'metric', metrics.map(m => [m, m]), st.metric, v => { st.metric = v; st.eps = null; });
    if (timed()) {
      const eps = Object.keys(D.timing[st.metric]);
      if (!eps.includes(st.eps)) st.eps = eps[0];
      select('threshold', 'threshold', eps.map(e => [e, e]), st.eps, v => { st.eps = v; });
    } else select('threshold', 'threshold', [], '', () => {});
    select('checkpoint', 'checkpoint (step)', timed() ? [] : S.map((s, i) => [i, s]), st.step,
           v => { st.step = +v; });
    const ax = varying.map(i => [i, A[i].name]);
    select('x', 'map x axis', ax, st.x, v => {
      st.x = +v; st.row = 0;
      if (st.y === st.x) st.y = varying.find(i => i !== st.x) ?? -1;
    });
    select('y', 'map y axis', [[-1, '(none)'], ...ax.filter(([i]) => i !== st.x)], st.y,
           v => { st.y = +v; st.row = 0; });
    A.forEach((a, i) => {
      const shown = i !== st.x && i !== st.y && a.values.length > 1;
      select('at-' + i, a.name, shown ? a.values.map((v, k) => [k, v]) : [], st.at[i], v => { st.at[i] = +v; });
    });
  }
  function positive(vs) { const f = vs.filter(Number.isFinite); return f.length > 0 && f.every(v => v > 0); }
  function mapDraw() {
    const xs = st.x >= 0 ? A[st.x].values : [''], ys = st.y >= 0 ? A[st.y].values : [''];
    const raw = ys.map((_, yi) => xs.map((_, xi) => value(point(xi, yi), st.metric)));
    const log = positive(raw.flat());
    const text = ys.map((yv, yi) => xs.map((xv, xi) => {
      const i = point(xi, yi);
      const where = [st.x >= 0 ? `${A[st.x].name} = ${xv}` : '', st.y >= 0 ? `${A[st.y].name} = ${yv}` : '']
        .filter(Boolean).join('<br>');
      return `${where}<br>${label()}: ${fmt(value(i, st.metric))}<br>${i === undefined ? 0 : D.runs[i]} runs`;
    }));
    const layout = {margin: {t: 30, l: 120}, title: {text: label() + ' (median over seeds)', font: {size: 14}},
                    xaxis: {title: {text: st.x >= 0 ? A[st.x].name : ''}, type: 'category'}};
    let trace;
    if (st.y >= 0) {
      trace = {type: 'heatmap', x: xs, y: ys, text: text, hoverinfo: 'text', colorscale: 'Viridis',
               z: raw.map(r => r.map(v => Number.isFinite(v) ? (log ? Math.log10(v) : v) : null)),
               colorbar: {title: {text: log ? 'log10' : ''}}};
      layout.yaxis = {title: {text: A[st.y].name}, type: 'category'};
    } else {
      trace = {type: 'scatter', mode: 'lines+markers', x: xs, y: raw[0].map(v => Number.isFinite(v) ? v : null),
               text: text[0], hoverinfo: 'text'};
      layout.yaxis = {type: log ? 'log' : 'linear', title: {text: label()}};
    }
    Plotly.react('cj-map', [trace], layout, {responsive: true, displaylogo: false});
  }
  function curvesDraw() {
    const m = timed() ? family(st.metric) : st.metric;
    const xs = st.x >= 0 ? A[st.x].values : [''];
    const keep = S.map((s, k) => k).filter(k => S[k] > 0);
    const traces = xs.map((xv, xi) => {
      const i = point(xi, st.y >= 0 ? st.row : 0);
      return {type: 'scatter', mode: 'lines+markers', name: st.x >= 0 ? `${A[st.x].name} = ${xv}` : m,
              x: keep.map(k => S[k]),
              y: keep.map(k => { const v = i === undefined ? NaN : D.values[m][i * S.length + k];
                                 return Number.isFinite(v) ? v : null; })};
    });
    const shapes = timed() ? [{type: 'line', xref: 'paper', x0: 0, x1: 1, y0: +st.eps, y1: +st.eps,
                               line: {dash: 'dot', color: '#888'}}] : [];
    const row = st.y >= 0 ? ` at ${A[st.y].name} = ${A[st.y].values[st.row]}` : '';
    Plotly.react('cj-curves', traces, {
      margin: {t: 30}, title: {text: `${m} against step${row} (median over seeds)`, font: {size: 14}},
      xaxis: {type: 'log', title: {text: 'step'}},
      yaxis: {type: positive(traces.flatMap(t => t.y.filter(v => v !== null))) ? 'log' : 'linear', title: {text: m}},
      shapes: shapes}, {responsive: true, displaylogo: false});
  }
  let draws = 0;
  function draw() {
    controlsDraw(); mapDraw(); curvesDraw();
    document.body.dataset.interactive = String(++draws);
  }
  draw();
  document.getElementById('cj-map').on('plotly_click', ev => {
    if (st.y >= 0 && ev.points.length) {
      st.row = A[st.y].values.indexOf(String(ev.points[0].y)); curvesDraw();
      document.body.dataset.interactive = String(++draws);
    }
  });
})();
"""

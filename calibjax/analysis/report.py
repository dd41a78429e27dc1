"""One self-contained HTML page per results directory: ``DIR/report.html``.

The page holds everything needed to read a sweep's results without calibjax: the sweep file, the
manifest's essentials (versions, backend, devices, times, completeness), the interactive maps and
curves (``interactive``: plotly.js and the medians embedded), the per-setting summary table, and
every figure of ``DIR/figures`` embedded as a PNG (data: URI), so the file can be mailed, attached
to a lab notebook or opened offline: nothing is fetched. ``calibjax report DIR`` writes it
(``pipeline.report``: of an unfinished sweep, from ``DIR/partial``, marked partial); ``run`` and
``merge`` write it after the figures. One small script marks, for tests and the curious, whether
every image decoded.
"""

from __future__ import annotations

import base64
import html
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from calibjax.analysis import interactive, summaries
from calibjax.storage import files, owned, reader

MAX_ROWS = 200  # rows of summary_by_setting shown (the parquet file has them all)
SHOWN = [
    "final_kl",
    "final_kl_rel",
    "final_err_dense",
    "final_err_sparse",
    "final_true_ece",
    "steps_to_kl_0.01",
    "steps_to_kl_rel_0.1",
    "kl_auc",
]

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f4f4f4}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}figure{margin:1.5em 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{color:#666}dd{margin:0}
.partial{background:#fff4d6;border:1px solid #e0b44c;padding:.6em 1em}"""

# Sets <body data-images="loaded/total"> once the page has loaded: what the browser test reads.
CHECK = """window.addEventListener('load',function(){var i=[].slice.call(document.images);
document.body.dataset.images=i.filter(function(m){return m.complete&&m.naturalWidth>0}).length+'/'+i.length;});"""


def _facts(manifest: dict, runs: pd.DataFrame | None) -> list[tuple[str, str]]:
    versions = manifest.get("versions") or {}
    status = runs["status"].value_counts().to_dict() if runs is not None and "status" in runs else {}
    layout = manifest.get("layout") or {}
    facts = [
        (
            "sweep",
            f"{manifest.get('sweep_name')} ({manifest.get('sweep_file')}, sha256 "
            f"{str(manifest.get('sweep_sha256'))[:12]})",
        ),
        ("runs", f"{manifest.get('runs')} in the sweep; " + ", ".join(f"{v} {k}" for k, v in sorted(status.items()))),
        ("complete", str(manifest.get("complete"))),
        (
            "calibjax",
            f"{versions.get('calibjax')} (numbers version {manifest.get('numbers_version')}); jax "
            f"{versions.get('jax')}, jaxlib {versions.get('jaxlib')}, python {manifest.get('python')}",
        ),
        (
            "backend",
            f"{manifest.get('backend')}, {len(manifest.get('devices') or [])} device(s), "
            f"{layout.get('inner_batch', manifest.get('vector_width'))} runs vmapped per device",
        ),
        ("platform", str(manifest.get("platform"))),
    ]
    if manifest.get("wall_s") is not None:
        facts.append(
            (
                "last run",
                f"{manifest.get('trained_this_call')} runs trained in {manifest['wall_s']:.1f} s "
                f"({manifest.get('compile_s', 0):.1f} s compiling), "
                f"{manifest.get('model_steps_per_s', 0):,.0f} model-steps/s",
            )
        )
    if manifest.get("shards"):
        facts.append(
            (
                "shards",
                f"{manifest['shards']} (merged: {manifest.get('merged', False)}, missing runs: "
                f"{manifest.get('missing_runs', 0)})",
            )
        )
    return facts


def _summary_table(out: Path) -> str:
    try:
        agg = reader.read_table(out, "summary_by_setting")
    except FileNotFoundError:
        return "<p>No summary_by_setting.parquet (run <code>calibjax summarize</code>).</p>"
    values = [c for c in SHOWN if c in agg.columns]
    shown = agg[[*summaries.setting_columns(agg), "n_runs", *values]].head(MAX_ROWS)
    note = f"<p>First {MAX_ROWS} of {len(agg)} settings.</p>" if len(agg) > MAX_ROWS else ""
    return note + shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="never", border=0)


def _figures(out: Path) -> str:
    """The figures calibjax drew from the current final tables (never a user's own PNG, nor one
    drawn from an earlier write of the tables: those are named, for calibjax plot to redraw)."""
    d = out / "figures"
    parts, current = [], reader.generation(out)
    drawn = owned.recorded_figures(d) if d.is_dir() and not d.is_symlink() else {}
    stale = sorted(n for n, g in drawn.items() if g != current and (d / n).is_file())
    for png in sorted(d / n for n, g in drawn.items() if g == current):
        if not png.is_file():
            continue
        data = base64.b64encode(png.read_bytes()).decode()
        name = html.escape(png.name)
        parts.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'
        )
    if stale:
        parts.append(
            f"<p>Not shown, drawn from an earlier write of the tables: {html.escape(', '.join(stale))} "
            "(<code>calibjax plot DIR</code> draws them again).</p>"
        )
    return "\n".join(parts) or "<p>No figures (run <code>calibjax plot DIR</code>).</p>"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_report(out: str | Path, to: Path | None = None) -> Path:
    """Write ``DIR/report.html`` (atomically) from the directory's manifest, tables and figures.

    Where the tables hold only some of the sweep's runs (a merge with runs missing, or the partial
    view of an unfinished sweep: ``pipeline.report``), the page says so at the top. ``to``: where
    to write it instead (a partial view's page goes to the results directory it views)."""
    out = Path(out)
    manifest = files.read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out}: no manifest.json here; run or merge a sweep first")
    runs = reader.read_table(out, "runs", columns=["status"]) if (out / "runs.parquet").exists() else None
    title = html.escape(f"calibjax: {manifest.get('sweep_name')}")
    try:
        description = tomllib.loads(manifest.get("sweep_text", "")).get("description", "")
    except tomllib.TOMLDecodeError:
        description = ""
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _facts(manifest, runs))
    banner = ""
    if runs is not None and (runs["status"] == "missing").any():
        done, total = int((runs["status"] != "missing").sum()), len(runs)
        banner = (
            f'<p class="partial" id="partial">Partial: {done:,} of {total:,} runs finished '
            f"({100 * done / max(total, 1):.1f} %) when this page was written ({html.escape(_now())}); "
            "tables, figures and maps hold those runs only (<code>calibjax status DIR</code> says what is "
            "left; <code>calibjax run</code> writes this page again as it goes on).</p>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}
{interactive.STYLE}</style></head>
<body><h1>{title}</h1><p class="sub">{html.escape(str(description))}</p>{banner}
<h2>Run</h2><dl>{facts}</dl>
{interactive.section(out)}
<h2>Summary by setting</h2>
<p>Medians over seeds (<code>summary_by_setting.parquet</code>; quartiles are in the file). kl in nats against
the exact posterior; steps_to_*: first checkpoint at which it held ("never": not within training).</p>
{_summary_table(out)}
<h2>Figures</h2>
{_figures(out)}
<h2>Sweep file</h2><pre>{html.escape(manifest.get("sweep_text", ""))}</pre>
<h2>Manifest</h2><pre>{
        html.escape(json.dumps({k: v for k, v in manifest.items() if k != "sweep_text"}, indent=1, default=str))
    }</pre>
<script>{CHECK}</script>
</body></html>
"""
    path = Path(to) if to is not None else out / "report.html"
    files.write_atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path

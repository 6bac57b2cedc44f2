"""What a scoring run tells people: `summary.json` for machines and `report.html` for the department.

The report is one self-contained HTML file (inline CSS and SVG, no scripts, nothing fetched), so it can
be mailed or opened on a machine without internet.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import __version__
from pipeline import schema as s
from pipeline.bundle import ModelBundle

TOP_REASONS = 10


def build_summary(
    bundle: ModelBundle,
    *,
    flags: pd.DataFrame,
    rows: int,
    input_path: Path,
    input_digest: str,
    reference_rows: int,
    seconds: float,
) -> dict[str, Any]:
    """Counts per kind and field, the model used, the input's size and digest, time and minutes saved.

    Minutes saved are estimated from the held-out precision of each kind: an expected true flag saves
    `minutes_per_correction` (searching for the error and the right value), an expected false alarm costs
    `minutes_per_false_alarm` (reading and dismissing it).
    """
    config = bundle.config
    kinds = {kind: int((flags[s.FLAG_KIND] == kind).sum()) if len(flags) else 0 for kind in s.KINDS}
    error_flags = flags[flags[s.FLAG_KIND] == s.KIND_ERROR] if len(flags) else flags
    per_field = error_flags[s.FLAG_FIELD].value_counts().sort_index().to_dict() if len(error_flags) else {}
    with_suggestion = int((error_flags[s.FLAG_SUGGESTION] != s.MISSING).sum()) if len(error_flags) else 0

    expected_true = 0.0
    expected_false = 0.0
    precision_used: dict[str, float] = {}
    for kind, count in kinds.items():
        precision = float(
            bundle.metrics.get(f"test_{kind}_precision", 0.5 if kind == s.KIND_ANOMALY else 1.0)
        )
        precision_used[kind] = round(precision, 4)
        expected_true += count * precision
        expected_false += count * (1 - precision)
    saved = expected_true * config.minutes_per_correction - expected_false * config.minutes_per_false_alarm
    reviewed = int(flags[s.FLAG_RECORD_ID].nunique()) if len(flags) else 0
    return {
        "model": {
            "name": bundle.source.get("name", config.name),
            "version": bundle.source.get("version", ""),
            "run_id": bundle.source.get("run_id", ""),
            "uri": bundle.source.get("uri", ""),
        },
        "input": {"path": str(input_path), "rows": rows, "sha256": input_digest},
        "reference_rows": reference_rows,
        "flags": {"total": int(len(flags)), **kinds},
        "error_flags_per_field": {str(k): int(v) for k, v in per_field.items()},
        "error_flags_with_suggestion": with_suggestion,
        "records_needing_review": reviewed,
        "minutes_saved_estimate": round(saved, 1),
        "minutes_saved_basis": {
            "minutes_per_correction": config.minutes_per_correction,
            "minutes_per_false_alarm": config.minutes_per_false_alarm,
            "held_out_precision_per_kind": precision_used,
        },
        "seconds": round(seconds, 3),
        "pipeline_version": __version__,
        "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_report(
    summary: dict[str, Any], flags: pd.DataFrame, histograms: dict[str, np.ndarray], folder: Path
) -> None:
    """Writes `summary.json` and `report.html` into `folder`."""
    top = (
        flags.groupby([s.FLAG_KIND, s.FLAG_FIELD])
        .size()
        .sort_values(ascending=False)
        .head(TOP_REASONS)
        .reset_index(name="count")
        if len(flags)
        else pd.DataFrame(columns=[s.FLAG_KIND, s.FLAG_FIELD, "count"])
    )
    summary = {**summary, "top_flag_groups": top.to_dict(orient="records")}
    (folder / s.SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    (folder / s.REPORT_FILE).write_text(_html(summary, flags, histograms), encoding="utf-8")


def _histogram_svg(counts: np.ndarray, title: str) -> str:
    width, height, pad = 320, 120, 20
    peak = max(int(counts.max()) if len(counts) else 0, 1)
    bar = (width - 2 * pad) / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{pad + i * bar:.1f}" y="{height - pad - (c / peak) * (height - 2 * pad):.1f}" '
        f'width="{bar - 1:.1f}" height="{(c / peak) * (height - 2 * pad):.1f}" fill="#4a7ab5"/>'
        for i, c in enumerate(counts)
    )
    return (
        f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'{bars}<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>'
        f'<text x="{pad}" y="{height - 4}" font-size="10">0</text>'
        f'<text x="{width - pad - 6}" y="{height - 4}" font-size="10">1</text></svg>'
        f"<figcaption>{html.escape(title)} (records per 0.05 band)</figcaption></figure>"
    )


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False, name=None)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(summary: dict[str, Any], flags: pd.DataFrame, histograms: dict[str, np.ndarray]) -> str:
    model = summary["model"]
    counts = pd.DataFrame([{"kind": k, "flags": v} for k, v in summary["flags"].items()])
    fields = pd.DataFrame(
        [{"field": k, "error flags": v} for k, v in summary["error_flags_per_field"].items()],
        columns=["field", "error flags"],
    )
    top = (
        flags.head(20)[[s.FLAG_RECORD_ID, s.FLAG_KIND, s.FLAG_FIELD, s.FLAG_SCORE, s.FLAG_REASON]]
        if len(flags)
        else pd.DataFrame(columns=[s.FLAG_RECORD_ID, s.FLAG_KIND, s.FLAG_FIELD, s.FLAG_SCORE, s.FLAG_REASON])
    )
    if len(top):
        top = top.assign(**{s.FLAG_SCORE: top[s.FLAG_SCORE].map(lambda v: f"{float(v):.3f}")})
    figures = "".join(_histogram_svg(histograms[name], name) for name in histograms)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review queue report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}figure{{display:inline-block;margin:.5em}}
.big{{font-size:1.6em;font-weight:bold}}</style></head><body>
<h1>Review queue</h1>
<p>{summary["input"]["rows"]} rows scored from <code>{html.escape(summary["input"]["path"])}</code> in
{summary["seconds"]} s with model <b>{html.escape(str(model["name"]))}</b> version
{html.escape(str(model["version"]) or "-")} (run {html.escape(str(model["run_id"]) or "-")}).</p>
<p class="big">{summary["flags"]["total"]} flags on {summary["records_needing_review"]} records;
estimated {summary["minutes_saved_estimate"]} minutes of correction work saved.</p>
<h2>Flags per kind</h2>{_table(counts)}
<h2>Error flags per field</h2>{_table(fields)}
<h2>Highest-scoring flags</h2>{_table(top)}
<h2>Score distributions</h2>{figures}
<p><small>Minutes saved: {html.escape(json.dumps(summary["minutes_saved_basis"]))}</small></p>
</body></html>
"""

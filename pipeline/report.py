"""What a scoring run tells people: `summary.json` for machines and `report.html` for the department.

The report is one self-contained HTML file (inline CSS and SVG, no scripts, nothing fetched), so it can
be mailed or opened on a machine without internet.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import __version__
from pipeline import schema as s
from pipeline.bundle import ModelBundle

TOP_REASONS = 10
TOP_FLAGS = 15


class FlagTally:
    """What the summary and the report count of a batch's flags, taken one flag at a time in the queue's
    order as `flags.csv` is written: flags per kind and per kind and field, error flags with a suggestion,
    the input rows flagged (their ids are unique: the records to review) and the queue's first
    `TOP_FLAGS`. So no frame of every flag is held after the batch (2,000,000 rows: ~300,000 flags, read
    back as a frame they and the summary's counting took ~200 MB). The rows flagged are a bitmap, a bit per
    input row up to the last one flagged: flags come in the queue's order, not the rows', and a row's
    several flags count once (an 8-byte row number per flag was ~2 MB at 2,000,000 rows).

    >>> tally = FlagTally()
    >>> tally.add(["R1", "error", "city", "Utrecth", "Utrecht", "", "0.9100", "typo", "false"], row=0)
    >>> tally.kinds["error"], tally.records()
    (1, 1)
    """

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.groups: Counter[tuple[str, str]] = Counter()  # (kind, field): flags
        self.with_suggestion = 0
        self.flags = 0
        self.flagged = bytearray()  # bit `row % 8` of byte `row // 8`: input row `row` has a flag
        self.top: list[list[str]] = []

    def __len__(self) -> int:
        return self.flags

    def add(self, flag: Sequence[str], row: int) -> None:
        """Counts one flag (its `FLAG_COLUMNS` cells as written) of input row `row`."""
        kind, field = flag[_KIND_AT], flag[_FIELD_AT]
        self.kinds[kind] += 1
        self.groups[kind, field] += 1
        if kind == s.KIND_ERROR and flag[_SUGGESTION_AT] != s.MISSING:
            self.with_suggestion += 1
        self.flags += 1
        byte = row >> 3
        if byte >= len(self.flagged):  # twice the room at least: appending stays linear
            self.flagged.extend(bytes(max(byte + 1, 2 * len(self.flagged)) - len(self.flagged)))
        self.flagged[byte] |= 1 << (row & 7)
        if len(self.top) < TOP_FLAGS:
            self.top.append(list(flag))

    def records(self) -> int:
        """Distinct records flagged."""
        return int.from_bytes(self.flagged, "little").bit_count()

    def per_field(self) -> dict[str, int]:
        """Error flags per field, by field name."""
        return {field: n for (kind, field), n in sorted(self.groups.items()) if kind == s.KIND_ERROR}

    def top_groups(self) -> list[dict[str, Any]]:
        """The `TOP_REASONS` (kind, field) groups with most flags, most first (ties as pandas orders a
        sorted group count)."""
        if not self.groups:
            return []
        keys = sorted(self.groups)
        counts = pd.Series(
            [self.groups[key] for key in keys],
            index=pd.MultiIndex.from_tuples(keys, names=[s.FLAG_KIND, s.FLAG_FIELD]),
            dtype=np.int64,
        )
        top = counts.sort_values(ascending=False).head(TOP_REASONS).reset_index(name="count")
        return top.to_dict(orient="records")

    def top_flags(self) -> pd.DataFrame:
        """The queue's first `TOP_FLAGS` flags (text cells, as in flags.csv)."""
        return pd.DataFrame(self.top, columns=list(s.FLAG_COLUMNS), dtype=object)


_KIND_AT, _FIELD_AT, _SUGGESTION_AT = (
    s.FLAG_COLUMNS.index(name) for name in (s.FLAG_KIND, s.FLAG_FIELD, s.FLAG_SUGGESTION)
)


def build_summary(
    bundle: ModelBundle,
    *,
    flags: FlagTally,
    rows: int,
    input_path: Path,
    input_digest: str,
    reference_rows: int,
    seconds: float,
    reference_path: Path | None = None,
) -> dict[str, Any]:
    """Counts per kind and field, the model used, the input's size and digest, time and minutes saved.

    Minutes saved are estimated from the held-out precision of each kind: an expected true flag saves
    `minutes_per_correction` (searching for the error and the right value), an expected false alarm costs
    `minutes_per_false_alarm` (reading and dismissing it). With `cost_per_hour` in the config, time saved is
    also given in euros. The review page reads `id_column`, `reference_path` and the basis from here.
    """
    config = bundle.config
    kinds = {kind: flags.kinds[kind] for kind in s.KINDS}
    per_field = flags.per_field()
    with_suggestion = flags.with_suggestion

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
    reviewed = flags.records()
    realised = {k: v for k, v in bundle.metrics.items() if k.startswith("realised_")}
    euros = (
        {"euros_saved_estimate": round(saved / 60 * config.cost_per_hour, 2)}
        if config.cost_per_hour is not None
        else {}
    )
    return {
        "model": {
            "name": bundle.source.get("name", config.name),
            "version": bundle.source.get("version", ""),
            "run_id": bundle.source.get("run_id", ""),
            "uri": bundle.source.get("uri", ""),
        },
        "input": {"path": str(input_path), "rows": rows, "sha256": input_digest},
        "id_column": config.id_column,
        "time_column": config.time_column,
        "reference_path": str(reference_path) if reference_path is not None else None,
        "reference_rows": reference_rows,
        "flags": {"total": int(len(flags)), **kinds},
        "error_flags_per_field": {str(k): int(v) for k, v in per_field.items()},
        "error_flags_with_suggestion": with_suggestion,
        "records_needing_review": reviewed,
        "minutes_saved_estimate": round(saved, 1),
        **euros,
        "minutes_saved_basis": {
            "minutes_per_correction": config.minutes_per_correction,
            "minutes_per_false_alarm": config.minutes_per_false_alarm,
            "cost_per_hour": config.cost_per_hour,
            "held_out_precision_per_kind": precision_used,
        },
        # What reviews delivered, as measured from the log this model version was trained on (if any).
        "realised_by_review": realised,
        "seconds": round(seconds, 3),
        "pipeline_version": __version__,
        "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_report(
    summary: dict[str, Any], flags: FlagTally, histograms: dict[str, np.ndarray], folder: Path
) -> None:
    """Writes `summary.json` and `report.html` into `folder`."""
    summary = {**summary, "top_flag_groups": flags.top_groups()}
    (folder / s.SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    (folder / s.REPORT_FILE).write_text(_html(summary, flags, histograms), encoding="utf-8")


# ------------------------------------------------------------------------------------------ report.html

CHART_COLOURS = {s.KIND_DUPLICATE: "#6741d9", s.KIND_ERROR: "#e8590c", s.KIND_ANOMALY: "#0b7285"}


def _axis_ticks(peak: float) -> list[float]:
    """Three or so round ticks from 0 to at least `peak`."""
    if peak <= 0:
        return [0.0, 1.0]
    step = 10 ** np.floor(np.log10(peak))
    for factor in (1, 2, 5, 10):
        if peak / (step * factor) <= 4:
            step *= factor
            break
    return [float(step * i) for i in range(int(np.ceil(peak / step)) + 1)]


def _bar_chart(
    labels: list[str],
    values: list[float],
    *,
    title: str,
    x_title: str,
    y_title: str,
    colours: list[str] | None = None,
    value_format: str = "{:.0f}",
    width: int = 420,
    height: int = 220,
) -> str:
    """A titled vertical bar chart with both axes, as inline SVG."""
    left, right, top, bottom = 52, 12, 30, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    ticks = _axis_ticks(max(values, default=0.0))
    peak = ticks[-1]
    slot = plot_w / max(len(values), 1)
    parts = [
        f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-weight="bold">'
        f"{html.escape(title)}</text>"
    ]
    for tick in ticks:
        y = top + plot_h - tick / peak * plot_h
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e5e8ec"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{value_format.format(tick)}</text>"
        )
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        bar_h = value / peak * plot_h
        x = left + i * slot + slot * 0.15
        colour = (colours or [])[i] if colours else "#2f6db5"
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{slot * 0.7:.1f}" height="{bar_h:.1f}" '
            f'fill="{colour}"><title>{html.escape(label)}: {value_format.format(value)}</title></rect>'
            f'<text x="{x + slot * 0.35:.1f}" y="{top + plot_h - bar_h - 3:.1f}" text-anchor="middle" '
            f'font-size="10">{value_format.format(value)}</text>'
            f'<text x="{x + slot * 0.35:.1f}" y="{top + plot_h + 14}" text-anchor="middle" '
            f'font-size="{10 if len(labels) > 6 else 11}">{html.escape(label[:14])}</text>'
        )
    parts.append(
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>'
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>'
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle" font-size="12">'
        f"{html.escape(x_title)}</text>"
        f'<text transform="translate(14 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle" '
        f'font-size="12">{html.escape(y_title)}</text>'
    )
    return (
        f'<figure><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}" font-family="sans-serif">{"".join(parts)}</svg></figure>'
    )


def _histogram_chart(counts: np.ndarray, name: str) -> str:
    bins = len(counts)
    labels = [f"{i / bins:.2f}" if i % 4 == 0 else "" for i in range(bins)]
    return _bar_chart(
        labels,
        [float(c) for c in counts],
        title=f"{name.replace('_', ' ')}: records per score band",
        x_title="score (0 = fine, 1 = surely wrong)",
        y_title="records",
        width=360,
    )


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False, name=None)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _money(minutes: float, cost_per_hour: float | None) -> str:
    text = f"{minutes:,.0f} minutes ({minutes / 60:,.1f} hours)"
    if cost_per_hour is not None:
        text += f", € {minutes / 60 * cost_per_hour:,.0f}"
    return text


def _top_flags(flags: FlagTally) -> pd.DataFrame:
    columns = ["record", "kind", "field", "as entered", "suggestion / match", "score", "why"]
    if not len(flags):
        return pd.DataFrame(columns=columns)
    top = flags.top_flags()
    proposal = top[s.FLAG_SUGGESTION].where(top[s.FLAG_KIND] != s.KIND_DUPLICATE, "= " + top[s.FLAG_MATCH_ID])
    return pd.DataFrame(
        {
            "record": top[s.FLAG_RECORD_ID],
            "kind": top[s.FLAG_KIND],
            "field": top[s.FLAG_FIELD],
            "as entered": top[s.FLAG_VALUE],
            "suggestion / match": proposal,
            "score": top[s.FLAG_SCORE].map(lambda v: f"{float(v):.2f}"),
            "why": top[s.FLAG_REASON],
        },
        columns=columns,
    )


def _realised_section(realised: dict[str, float], cost_per_hour: float | None) -> str:
    if not realised:
        return (
            "<h2>Realised by review</h2><p class=muted>No review decisions in the log this model was trained "
            "on yet: run <code>python -m pipeline review DIR</code>, then <code>feedback</code> and "
            "<code>train</code>.</p>"
        )
    kinds = [k for k in s.KINDS if f"realised_accept_share_{k}" in realised]
    chart = _bar_chart(
        kinds,
        [100 * realised[f"realised_accept_share_{k}"] for k in kinds],
        title="Reviewed flags the clerks accepted",
        x_title="kind of flag",
        y_title="% accepted",
        colours=[CHART_COLOURS[k] for k in kinds],
    )
    saved = realised.get("realised_minutes_saved", 0.0)
    return (
        "<h2>Realised by review (measured from the decisions in the log this version learned from)</h2>"
        f"<p class=big>{realised.get('realised_flags_reviewed', 0):.0f} flags reviewed, "
        f"{realised.get('realised_flags_accepted', 0):.0f} accepted; "
        f"{realised.get('realised_minutes_reviewing', 0):.0f} minutes spent reviewing; "
        f"saved {_money(saved, cost_per_hour)}.</p>{chart}"
    )


def _html(summary: dict[str, Any], flags: FlagTally, histograms: dict[str, np.ndarray]) -> str:
    model = summary["model"]
    basis = summary["minutes_saved_basis"]
    cost = basis.get("cost_per_hour")
    kinds = list(s.KINDS)
    kind_chart = _bar_chart(
        kinds,
        [float(summary["flags"][k]) for k in kinds],
        title="Flags per kind",
        x_title="kind of flag",
        y_title="flags",
        colours=[CHART_COLOURS[k] for k in kinds],
    )
    per_field = summary["error_flags_per_field"]
    field_chart = _bar_chart(
        list(per_field),
        [float(v) for v in per_field.values()],
        title="Error flags per field",
        x_title="field",
        y_title="error flags",
        width=max(420, 46 * len(per_field) + 70),
    )
    histogram_charts = "".join(_histogram_chart(histograms[name], name) for name in histograms)
    precision = basis.get("held_out_precision_per_kind", {})
    basis_text = (
        f"each right flag saves {basis['minutes_per_correction']:g} minutes of searching and correcting, "
        f"each false alarm costs {basis['minutes_per_false_alarm']:g}; expected right flags from the model's "
        "held-out precision ("
        + ", ".join(f"{k} {v:.0%}" for k, v in precision.items())
        + ")"
        + (f"; staff time at € {cost:g} per hour" if cost is not None else "; set cost_per_hour for euros")
    )
    rows = summary["input"]["rows"]
    version = html.escape(str(model["version"]) or "-")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Data quality report: {rows} rows</title>
<style>body{{font-family:sans-serif;margin:1.5em 2em;max-width:72em;color:#1d2733}}
table{{border-collapse:collapse;margin:.5em 0;font-size:.92em}}
td,th{{border:1px solid #d8dee6;padding:.25em .5em;text-align:left;vertical-align:top}}
th{{background:#f3f5f8}}figure{{display:inline-block;margin:.3em .6em .3em 0}}
.big{{font-size:1.35em}}.muted{{color:#6b7785}}h2{{margin:1.1em 0 .3em;font-size:1.15em}}
.kpis{{display:flex;gap:1em;flex-wrap:wrap}}
.kpi{{border:1px solid #d8dee6;border-radius:6px;padding:.6em 1em}}
.kpi b{{display:block;font-size:1.6em}}</style></head><body>
<h1>Data quality: {rows} new rows checked</h1>
<p class=muted>{html.escape(summary["input"]["path"])} · model <b>{html.escape(str(model["name"]))}</b>
version {version} · scored {html.escape(summary["scored_at"])} in {summary["seconds"]} s</p>
<div class=kpis>
<div class=kpi><b>{summary["flags"]["total"]}</b>flags to review</div>
<div class=kpi><b>{summary["records_needing_review"]}</b>records concerned</div>
<div class=kpi><b>{summary["error_flags_with_suggestion"]}</b>corrections proposed</div>
<div class=kpi><b>{_money(summary["minutes_saved_estimate"], cost)}</b>estimated staff time saved</div>
</div>
<h2>What was found</h2>{kind_chart}{field_chart}
<h2>Top {TOP_FLAGS} flags, with the proposed correction</h2>{_table(_top_flags(flags))}
<p class=muted>The whole queue is in flags.csv; work through it with
<code>python -m pipeline review {html.escape("DIR")}</code>.</p>
{_realised_section(summary.get("realised_by_review", {}), cost)}
<h2>How sure the model is</h2>{histogram_charts}
<p class=muted><small>Time saved: {html.escape(basis_text)}.</small></p>
</body></html>
"""

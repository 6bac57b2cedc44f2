"""The output contract, checked: does a `score` output folder keep `docs/CONTRACT.md` section 3?

`check_output` is this repository's own statement of what `score` must write, so its tests and a
scheduled job can check a result without anything outside the repository. It holds at least the rules of
the shared `check-output` tool, plus what this product promises beyond them (the column order, the
summary's row count and digest, flags that agree with `records.csv`). The input is read with
`pipeline.ingest`, so a `;`-separated, Windows-1252 or `.xlsx` batch is checked as it was scored; the
outputs are read as what the contract says they are: UTF-8, comma-separated.

>>> check_output("out/today", "exports/orders.csv")  # doctest: +SKIP
[]
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from pipeline import schema as s
from pipeline.ingest import DETECT, ReadOptions, file_digest, read_table

MAX_VIOLATIONS = 40
SCORE_COLUMNS = (s.DUPLICATE_SCORE, s.ERROR_SCORE, s.ANOMALY_SCORE)
NEEDS_REVIEW_VALUES = ("true", "false")


def check_output(
    folder: str | Path,
    input_path: str | Path,
    id_column: str = s.LOG_RECORD_ID,
    *,
    options: ReadOptions = DETECT,
) -> list[str]:
    """The ways the `score` output in `folder` breaks the contract for the batch `input_path`; empty
    when it keeps it. At most `MAX_VIOLATIONS` are listed, each a line naming the file and row.

    Raises `InputFileError` when the input itself cannot be read (that is the caller's fault, not the
    output's).
    """
    folder = Path(folder)
    missing = [
        name for name in (s.RECORDS_FILE, s.FLAGS_FILE, s.SUMMARY_FILE) if not (folder / name).is_file()
    ]
    if missing:
        return [f"{folder}: missing {name}" for name in missing]
    batch = read_table(input_path, options=options)
    bad: list[str] = []
    records, record_header = _read_output(folder / s.RECORDS_FILE, bad)
    flags, flag_header = _read_output(folder / s.FLAGS_FILE, bad)
    if bad:
        return bad
    if id_column not in batch.columns:
        return [f"{input_path}: has no id column {id_column!r} (pass --id-column)"]
    bad += _check_records(batch, records, record_header, id_column)
    bad += _check_flags(batch, records, flags, flag_header, id_column)
    bad += _check_summary(folder / s.SUMMARY_FILE, len(batch), Path(input_path))
    return bad[:MAX_VIOLATIONS]


def _read_output(path: Path, bad: list[str]) -> tuple[list[dict[str, str]], list[str]]:
    """An output CSV as rows of text; the contract fixes UTF-8 and commas, so nothing is detected."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            lines = [row for row in csv.reader(fh, strict=True) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        bad.append(f"{path.name}: not a UTF-8, comma-separated CSV ({exc.__class__.__name__}: {exc})")
        return [], []
    header, rows = (lines[0], lines[1:]) if lines else ([], [])
    ragged = next((i for i, row in enumerate(rows, start=1) if len(row) != len(header)), None)
    if ragged is not None:
        bad.append(f"{path.name} row {ragged}: {len(rows[ragged - 1])} cells, the header has {len(header)}")
    return [dict(zip(header, row, strict=False)) for row in rows], header


def _check_records(batch: Any, records: list[dict[str, str]], header: list[str], id_column: str) -> list[str]:
    bad: list[str] = []
    expected = [*batch.columns, *s.RECORD_COLUMNS]
    if header != expected:
        lacking = [name for name in expected if name not in header]
        if lacking:
            bad.append(f"records.csv lacks columns {lacking}")
        else:
            bad.append(
                f"records.csv: columns are {header}, want the input's columns then {list(s.RECORD_COLUMNS)}"
            )
    if len(records) != len(batch):
        bad.append(f"records.csv has {len(records)} rows, the input has {len(batch)}: every row exactly once")
    ids = [row.get(id_column) for row in records]
    if ids != batch[id_column].tolist():
        at = next((i for i, (a, b) in enumerate(zip(ids, batch[id_column], strict=False)) if a != b), None)
        where = f" (first difference at row {at + 1})" if at is not None else ""
        bad.append(f"records.csv: ids are not exactly the input's ids in input order{where}")
    else:
        for number, (given, written) in enumerate(
            zip(batch.itertuples(index=False), records, strict=True), 1
        ):
            changed = [
                name for name, value in zip(batch.columns, given, strict=True) if written.get(name) != value
            ]
            if changed:
                bad.append(f"records.csv row {number}: input value changed in {changed[:3]}")
                break
    if any(name not in header for name in s.RECORD_COLUMNS):
        return bad
    for number, row in enumerate(records, 1):
        for column in SCORE_COLUMNS:
            if row[column] != "" and not _unit(row[column]):
                bad.append(f"records.csv row {number}: {column}={row[column]!r} is not in 0..1")
        if row[s.NEEDS_REVIEW] not in NEEDS_REVIEW_VALUES:
            bad.append(f"records.csv row {number}: needs_review={row[s.NEEDS_REVIEW]!r}, want true/false")
        if row[s.DUPLICATE_OF] and row[s.DUPLICATE_OF] == row[id_column]:
            bad.append(f"records.csv row {number}: duplicate_of is the record itself")
        if len(bad) > MAX_VIOLATIONS:
            break
    return bad


def _check_flags(
    batch: Any, records: list[dict[str, str]], flags: list[dict[str, str]], header: list[str], id_column: str
) -> list[str]:
    bad: list[str] = []
    if header != list(s.FLAG_COLUMNS):
        lacking = [name for name in s.FLAG_COLUMNS if name not in header]
        if lacking:
            return [f"flags.csv lacks columns {lacking}"]
        bad.append(f"flags.csv: columns are {header}, want {list(s.FLAG_COLUMNS)}")
    rows_by_id = {row[id_column]: row for row in batch.to_dict("records")}
    flagged: dict[str, set[str]] = {}
    error_fields: dict[str, set[str]] = {}
    last = math.inf
    for number, flag in enumerate(flags, 1):
        where = f"flags.csv row {number}"
        record_id, kind = flag[s.FLAG_RECORD_ID], flag[s.FLAG_KIND]
        record = rows_by_id.get(record_id)
        if record is None:
            bad.append(f"{where}: record_id {record_id!r} is not in the input")
        if kind not in s.KINDS:
            bad.append(f"{where}: kind {kind!r}, want one of {', '.join(s.KINDS)}")
        if not _unit(flag[s.FLAG_SCORE]):
            bad.append(f"{where}: score {flag[s.FLAG_SCORE]!r} is not in 0..1")
        elif float(flag[s.FLAG_SCORE]) > last + 1e-12:
            bad.append(f"{where}: not sorted by score, highest first")
        else:
            last = float(flag[s.FLAG_SCORE])
        if kind == s.KIND_ERROR:
            if not flag[s.FLAG_FIELD]:
                bad.append(f"{where}: an error flag without a field")
            elif record is not None and flag[s.FLAG_VALUE] != record.get(flag[s.FLAG_FIELD]):
                bad.append(f"{where}: value {flag[s.FLAG_VALUE]!r} is not the input's {flag[s.FLAG_FIELD]!r}")
            error_fields.setdefault(record_id, set()).add(flag[s.FLAG_FIELD])
        if kind == s.KIND_DUPLICATE:
            if not flag[s.FLAG_MATCH_ID]:
                bad.append(f"{where}: a duplicate flag without match_id")
            elif flag[s.FLAG_MATCH_ID] == record_id:
                bad.append(f"{where}: a record flagged as a duplicate of itself")
        if not flag[s.FLAG_REASON].strip():
            bad.append(f"{where}: empty reason")
        flagged.setdefault(record_id, set()).add(kind)
        if len(bad) > MAX_VIOLATIONS:
            return bad
    if s.NEEDS_REVIEW in (records[0] if records else {}):
        for number, row in enumerate(records, 1):
            record_id = row.get(id_column)
            if (row[s.NEEDS_REVIEW] == "true") != (record_id in flagged):
                bad.append(
                    f"records.csv row {number}: needs_review of {record_id!r} disagrees with flags.csv"
                )
                break
            fields = set(filter(None, row.get(s.ERROR_FIELDS, "").split(s.ERROR_FIELD_SEPARATOR)))
            if fields != error_fields.get(record_id, set()):
                bad.append(f"records.csv row {number}: error_fields of {record_id!r} disagree with flags.csv")
                break
    return bad


def _check_summary(path: Path, rows: int, input_path: Path) -> list[str]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"summary.json is not JSON: {exc}"]
    facts = summary.get("input") if isinstance(summary, dict) else None
    if not isinstance(facts, dict):
        return ["summary.json: no `input` with the input's row count and digest"]
    bad = []
    if facts.get("rows") != rows:
        bad.append(f"summary.json: input rows {facts.get('rows')!r}, the input has {rows}")
    if facts.get("sha256") != file_digest(input_path):
        bad.append("summary.json: input sha256 is not the digest of the input file's bytes")
    return bad


def _unit(value: str) -> bool:
    try:
        return 0.0 <= float(value) <= 1.0
    except ValueError:
        return False

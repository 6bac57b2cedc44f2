"""From review decisions to the corrections log, and what the review realised.

`feedback` turns the decisions of a score folder (`decisions.csv`, contract section 4) into rows of the
department's corrections log, in the log's own format, so the next training run learns from them:

| decision | log row |
| --- | --- |
| error flag accepted / edited | `edit`: old_value = flagged value, new_value = suggestion / typed value |
| duplicate flag accepted | `merge`: record_id merged into match_id |
| error flag rejected | `confirm` with `field`, and the value found right in old_value and new_value |
| duplicate flag rejected | `confirm` with the matched record in `merged_into`: a known non-duplicate pair |
| anomaly flag rejected | `confirm` with no field: the record was reviewed and found right |
| anomaly flag accepted | no row: no field is known; the clerk corrects the record where it is kept |

Every row carries two added columns, `source` = `review` and `seconds` (time the clerk spent), so the
realised value of the review can be measured from the log (`realised_value`). Appending is idempotent (a
row already in the log is not added again, and a log with nothing to add is not touched) and atomic (a
temporary file beside the log, then `os.replace`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from pipeline import schema as s
from pipeline.config import DEFAULT_MINUTES_PER_CORRECTION, Config
from pipeline.corrections import review_rows
from pipeline.decisions import decision_problem, flag_key, latest, load_flags, read_csv_text
from pipeline.exceptions import BadInputError, CorrectionsLogError, InputFileError

logger = logging.getLogger(__name__)

DELIMITERS = (",", ";", "\t", "|")
REVIEW_COLUMNS = (s.LOG_SOURCE, s.LOG_SECONDS)
PARQUET_SUFFIXES = (".parquet", ".pq")


class DecisionError(BadInputError):
    """A decision that cannot be turned into a log row: bad value, or a flag not in the score folder."""


@dataclass
class FeedbackResult:
    """What `feedback` did: counts only."""

    decisions: int  # flags decided (the last decision per flag)
    appended: int  # log rows added now
    already_logged: int  # rows that were in the log already (an earlier run)
    anomalies_accepted: int  # accepted anomaly flags: no log row
    realised: dict[str, float] = field(default_factory=dict)


def feedback(
    decisions_path: Path,
    log_path: Path,
    *,
    folder: Path | None = None,
    minutes_per_correction: float | None = None,
    cost_per_hour: float | None = None,
) -> FeedbackResult:
    """Appends the decisions in `decisions_path` to the corrections log `log_path`.

    `folder` is the score output folder the decisions were made on (default: the decisions file's folder);
    its `flags.csv` is what every decision is checked against. Raises `DecisionError` naming the row for
    an unknown decision value, record or flag. Minutes and cost default to the folder's summary.json.
    """
    decisions_path, log_path = Path(decisions_path), Path(log_path)
    folder = Path(folder) if folder is not None else decisions_path.parent
    flags = load_flags(folder)
    basis = _summary_basis(folder)
    minutes = minutes_per_correction if minutes_per_correction is not None else basis.get("minutes")
    cost = cost_per_hour if cost_per_hour is not None else basis.get("cost")
    decisions = read_csv_text(decisions_path)
    _check_decisions(decisions, flags, source=decisions_path)
    chosen = latest(decisions)
    rows = [row for row in (_log_row(r) for r in chosen.to_dict(orient="records")) if row is not None]
    anomalies_accepted = int(
        ((chosen[s.FLAG_KIND] == s.KIND_ANOMALY) & (chosen[s.DECISION] != s.DECISION_REJECT)).sum()
    )
    log = _LogFile.read(log_path)
    appended, already = log.append(rows)
    realised = realised_value(log.frame(), minutes_per_correction=minutes, cost_per_hour=cost)
    logger.info(
        "feedback: %d decisions, %d log rows added, %d already logged", len(chosen), appended, already
    )
    return FeedbackResult(
        decisions=len(chosen),
        appended=appended,
        already_logged=already,
        anomalies_accepted=anomalies_accepted,
        realised=realised,
    )


# ------------------------------------------------------------------------------------------ realised value


def realised_value(
    log: pd.DataFrame,
    config: Config | None = None,
    *,
    minutes_per_correction: float | None = None,
    cost_per_hour: float | None = None,
) -> dict[str, float]:
    """What the review delivered, measured from the log's review rows (`source` = `review`).

    `realised_flags_reviewed`, `realised_flags_accepted`, `realised_accept_share_<kind>` and
    `realised_accept_share_error_<field>`, `realised_minutes_reviewing` (the clerks' `seconds`),
    `realised_minutes_saved` (accepted flags x minutes_per_correction - minutes reviewing) and, with an
    hourly cost, `realised_euros_saved` and `realised_euros_reviewing`. Empty when no row came from a review.

    >>> log = pd.DataFrame({"record_id": ["1", "2"], "action": ["edit", "confirm"], "field": ["a", "a"],
    ...     "merged_into": ["", ""], "source": ["review", "review"], "seconds": ["60", "60"]})
    >>> realised_value(log, minutes_per_correction=4)["realised_minutes_saved"]
    2.0
    """
    if config is not None:
        minutes_per_correction = config.minutes_per_correction
        cost_per_hour = config.cost_per_hour
    if minutes_per_correction is None:
        minutes_per_correction = DEFAULT_MINUTES_PER_CORRECTION
    rows = review_rows(log)
    if not len(rows):
        return {}
    for name in (s.LOG_FIELD, s.LOG_MERGED_INTO):
        if name not in rows.columns:
            rows = rows.assign(**{name: s.MISSING})
    action = rows[s.LOG_ACTION].astype(str).str.strip().str.lower()
    accepted = action.isin((s.ACTION_EDIT, s.ACTION_MERGE))
    kind = pd.Series(s.KIND_ANOMALY, index=rows.index)
    kind[(action == s.ACTION_MERGE) | (rows[s.LOG_MERGED_INTO] != s.MISSING)] = s.KIND_DUPLICATE
    kind[(action == s.ACTION_EDIT) | ((action == s.ACTION_CONFIRM) & (rows[s.LOG_FIELD] != s.MISSING))] = (
        s.KIND_ERROR
    )
    minutes_reviewing = float(rows[s.LOG_SECONDS].sum()) / 60
    saved = int(accepted.sum()) * minutes_per_correction - minutes_reviewing
    figures: dict[str, float] = {
        "realised_flags_reviewed": float(len(rows)),
        "realised_flags_accepted": float(accepted.sum()),
        "realised_minutes_reviewing": round(minutes_reviewing, 2),
        "realised_minutes_saved": round(saved, 2),
    }
    for name in s.KINDS:
        of_kind = kind == name
        if of_kind.any():
            figures[f"realised_accept_share_{name}"] = round(float(accepted[of_kind].mean()), 4)
    errors = kind == s.KIND_ERROR
    for name, share in accepted[errors].groupby(rows.loc[errors, s.LOG_FIELD]).mean().sort_index().items():
        figures[f"realised_accept_share_error_{name}"] = round(float(share), 4)
    if cost_per_hour is not None:
        figures["realised_euros_saved"] = round(saved / 60 * cost_per_hour, 2)
        figures["realised_euros_reviewing"] = round(minutes_reviewing / 60 * cost_per_hour, 2)
    return figures


# ------------------------------------------------------------------------------------------ decisions


def _check_decisions(decisions: pd.DataFrame, flags: pd.DataFrame, *, source: Path) -> None:
    """Refuses the first bad row, naming it (1-based data row, as in every other message)."""
    for name in (s.FLAG_RECORD_ID, s.FLAG_KIND, s.DECISION):
        if name not in decisions.columns:
            raise InputFileError(f"{source}: missing column {name!r} (see contract section 4)")
    for name in s.DECISION_COLUMNS:
        if name not in decisions.columns:
            decisions[name] = s.MISSING
    known = {flag_key(row): row for row in flags.to_dict(orient="records")}
    known_records = set(flags[s.FLAG_RECORD_ID])
    for number, row in enumerate(decisions.to_dict(orient="records"), start=1):
        where = f"{source}: row {number}"
        if row[s.DECISION] not in s.DECISIONS:
            raise DecisionError(
                f"{where}: decision {row[s.DECISION]!r} is not one of {', '.join(s.DECISIONS)}"
            )
        if row[s.FLAG_KIND] not in s.KINDS:
            raise DecisionError(f"{where}: kind {row[s.FLAG_KIND]!r} is not one of {', '.join(s.KINDS)}")
        if row[s.FLAG_RECORD_ID] not in known_records:
            raise DecisionError(f"{where}: record {row[s.FLAG_RECORD_ID]!r} has no flag in {s.FLAGS_FILE}")
        flag = known.get(flag_key(row))
        if flag is None:
            raise DecisionError(
                f"{where}: no such flag in {s.FLAGS_FILE} ({row[s.FLAG_KIND]} flag of record "
                f"{row[s.FLAG_RECORD_ID]!r}{_where_flag(row)})"
            )
        problem = decision_problem(row, flag)
        if problem:
            raise DecisionError(f"{where}: {problem}")
        if row[s.DECISION_DECIDED_AT] and pd.isna(
            pd.to_datetime(row[s.DECISION_DECIDED_AT], errors="coerce", format="ISO8601")
        ):
            raise DecisionError(f"{where}: decided_at {row[s.DECISION_DECIDED_AT]!r} is not ISO 8601")


def _where_flag(row: dict[str, str]) -> str:
    if row[s.FLAG_FIELD]:
        return f", field {row[s.FLAG_FIELD]!r}"
    if row[s.FLAG_MATCH_ID]:
        return f", match {row[s.FLAG_MATCH_ID]!r}"
    return ""


def _log_row(row: dict[str, str]) -> dict[str, str] | None:
    """The log row for one decision (see the module docstring), or None for an accepted anomaly."""
    kind, decision = row[s.FLAG_KIND], row[s.DECISION]
    out = dict.fromkeys(s.LOG_COLUMNS, s.MISSING)
    out[s.LOG_RECORD_ID] = row[s.FLAG_RECORD_ID]
    out[s.LOG_CORRECTED_AT] = row[s.DECISION_DECIDED_AT]
    out[s.LOG_SOURCE] = s.SOURCE_REVIEW
    out[s.LOG_SECONDS] = row[s.DECISION_SECONDS]
    if decision == s.DECISION_REJECT:
        out[s.LOG_ACTION] = s.ACTION_CONFIRM
        if kind == s.KIND_ERROR:
            out[s.LOG_FIELD] = row[s.FLAG_FIELD]
            out[s.LOG_OLD_VALUE] = out[s.LOG_NEW_VALUE] = row[s.FLAG_VALUE]
        elif kind == s.KIND_DUPLICATE:
            out[s.LOG_MERGED_INTO] = row[s.FLAG_MATCH_ID]
        return out
    if kind == s.KIND_ERROR:
        out[s.LOG_ACTION] = s.ACTION_EDIT
        out[s.LOG_FIELD] = row[s.FLAG_FIELD]
        out[s.LOG_OLD_VALUE] = row[s.FLAG_VALUE]
        out[s.LOG_NEW_VALUE] = (
            row[s.DECISION_NEW_VALUE] if decision == s.DECISION_EDIT else row[s.FLAG_SUGGESTION]
        )
        return out
    if kind == s.KIND_DUPLICATE:
        out[s.LOG_ACTION] = s.ACTION_MERGE
        out[s.LOG_MERGED_INTO] = row[s.FLAG_MATCH_ID]
        return out
    return None


def _summary_basis(folder: Path) -> dict[str, float]:
    """minutes_per_correction and cost_per_hour as the score run recorded them in summary.json."""
    try:
        summary = json.loads((folder / s.SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    basis = summary.get("minutes_saved_basis", {})
    out = {}
    if isinstance(basis.get("minutes_per_correction"), int | float):
        out["minutes"] = float(basis["minutes_per_correction"])
    if isinstance(basis.get("cost_per_hour"), int | float):
        out["cost"] = float(basis["cost_per_hour"])
    return out


# ------------------------------------------------------------------------------------------ the log file


class _LogFile:
    """A corrections log kept in its own format: CSV (its delimiter, encoding, BOM and line ends) or
    Parquet. Rows are appended; existing bytes are kept as they are unless the review columns have to be
    added to the header."""

    def __init__(
        self, path: Path, header: list[str], rows: list[list[str]], *, text: str | None = None, **dialect: str
    ) -> None:
        self.path = path
        self.header = header
        self.rows = rows
        self.text = text  # the CSV's decoded text, None for Parquet
        self.dialect = dialect

    @classmethod
    def read(cls, path: Path) -> _LogFile:
        if not path.exists():
            raise InputFileError(f"{path}: corrections log not found")
        if path.suffix.lower() in PARQUET_SUFFIXES:
            frame = pd.read_parquet(path)
            frame = frame.astype(object).where(frame.notna(), s.MISSING).astype(str)
            log = cls(path, list(frame.columns), frame.values.tolist())
        elif path.suffix.lower() in (".xlsx", ".xls"):
            raise InputFileError(f"{path}: feedback writes corrections logs in CSV or Parquet; convert it")
        else:
            log = cls._read_csv(path)
        for name in s.LOG_REQUIRED_COLUMNS:
            if name not in log.header:
                raise CorrectionsLogError(f"{path}: missing column {name!r} (required in a corrections log)")
        return log

    @classmethod
    def _read_csv(cls, path: Path) -> _LogFile:
        raw = path.read_bytes()
        if not raw:
            raise InputFileError(f"{path}: file is empty (expected at least a header row)")
        bom = raw.startswith(b"\xef\xbb\xbf")
        try:
            text, encoding = raw.decode("utf-8-sig"), "utf-8"
        except UnicodeDecodeError:
            try:
                text, encoding = raw.decode("cp1252"), "cp1252"
            except UnicodeDecodeError:
                raise InputFileError(f"{path}: neither UTF-8 nor Windows-1252 text") from None
        first_line = text.split("\n", 1)[0]
        line_end = "\r\n" if first_line.endswith("\r") else "\n"
        delimiter = _delimiter(first_line.rstrip("\r"))
        try:
            parsed = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
        except csv.Error as exc:
            raise InputFileError(f"{path}: malformed CSV ({exc})") from None
        header, body = parsed[0], [row for row in parsed[1:] if row]
        return cls(
            path,
            header,
            body,
            text=text,
            encoding=encoding,
            bom="1" if bom else "",
            line_end=line_end,
            delimiter=delimiter,
        )

    def frame(self) -> pd.DataFrame:
        width = len(self.header)
        rows = [(row + [s.MISSING] * width)[:width] for row in self.rows]
        return pd.DataFrame(rows, columns=self.header, dtype=object)

    def append(self, new_rows: list[dict[str, str]]) -> tuple[int, int]:
        """Adds the rows not already in the log; returns (added, already there)."""
        header = self.header + [name for name in REVIEW_COLUMNS if name not in self.header]
        grown = [(row + [s.MISSING] * len(header))[: len(header)] for row in self.rows]
        seen = {tuple(row) for row in grown}
        fresh: list[list[str]] = []
        for row in new_rows:
            values = [row.get(name, s.MISSING) for name in header]
            if tuple(values) not in seen:
                seen.add(tuple(values))
                fresh.append(values)
        if fresh:
            if self.text is not None and header == self.header:
                self._append_csv(fresh)
            else:
                self._rewrite(header, grown + fresh)
            self.header, self.rows = header, grown + fresh
        return len(fresh), len(new_rows) - len(fresh)

    def _append_csv(self, rows: list[list[str]]) -> None:
        """Keeps the file's bytes and adds the rows after them, in its dialect."""
        assert self.text is not None
        text = (
            self.text if not self.text or self.text.endswith("\n") else self.text + self.dialect["line_end"]
        )
        self._write_text(text + self._csv(rows))

    def _rewrite(self, header: list[str], rows: list[list[str]]) -> None:
        if self.text is None:
            frame = pd.DataFrame(rows, columns=header, dtype=object)
            _replace(self.path, lambda fh: frame.to_parquet(fh, index=False))
        else:
            self._write_text(self._csv([header, *rows]))

    def _csv(self, rows: list[list[str]]) -> str:
        out = io.StringIO(newline="")
        writer = csv.writer(out, delimiter=self.dialect["delimiter"], lineterminator=self.dialect["line_end"])
        writer.writerows(rows)
        return out.getvalue()

    def _write_text(self, text: str) -> None:
        encoding = self.dialect["encoding"]
        try:
            payload = (("\ufeff" if self.dialect["bom"] else "") + text).encode(encoding)
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start : exc.end]
            raise DecisionError(
                f"{self.path}: the log is {encoding} and cannot hold {bad!r} from a decision; "
                "save the log as UTF-8"
            ) from None
        _replace(self.path, lambda fh: fh.write(payload))


def _delimiter(header_line: str) -> str:
    """The separator that splits the header into the log's columns."""
    for delimiter in DELIMITERS:
        names = next(csv.reader([header_line], delimiter=delimiter), [])
        if s.LOG_RECORD_ID in names and s.LOG_ACTION in names:
            return delimiter
    return ","


def _replace(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes to a temporary file beside `path`, fsyncs it and moves it over `path` in one step."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

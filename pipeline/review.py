"""The review page: a clerk works through a score folder's flags in the browser, and every decision is
saved at once to the folder's `decisions.csv` (contract sections 2 and 4).

A small FastAPI app (the web stack MLflow already brings) served by uvicorn on 127.0.0.1, with static
HTML, CSS and JavaScript from `review_static/` (no build step, nothing fetched from the internet):

- `GET /api/queue`: the flags in `flags.csv` order, each with its record, the matched record for a
  duplicate (from `records.csv`, else from the reference file), and its latest decision.
- `GET /api/decisions`: the latest decision per flag, so a second tab sees the first one's work.
- `POST /api/decisions`: one decision; refused with 404 for a flag that is not in the folder and with 422
  for a decision that cannot stand (see `decisions.decision_problem`).

The server holds no state beyond what is on disk: a restarted server, a reload or a second tab all read
the same append-only file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import schema as s
from pipeline.decisions import (
    append_decision,
    decision_problem,
    flag_key,
    latest,
    load_flags,
    read_csv_text,
    read_decisions,
)
from pipeline.exceptions import InputFileError
from pipeline.ingest import iter_table

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("review_static")
DEFAULT_PORT = 8765
# A clerk who leaves a flag open over lunch has not spent an hour on it.
MAX_SECONDS_PER_FLAG = 600


@dataclass
class ReviewFolder:
    """A score output folder loaded for review: its flags, the records they are about, and the figures
    the page shows money with."""

    folder: Path
    flags: pd.DataFrame
    records: dict[str, dict[str, str]]
    columns: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    reference: Path | None = None

    @property
    def decisions_path(self) -> Path:
        return self.folder / s.DECISIONS_FILE

    @classmethod
    def load(cls, folder: Path, *, reference: Path | None = None) -> ReviewFolder:
        """Reads the folder; the matched records of duplicates come from `records.csv` or, when they are
        not in the batch, from `reference` (default: the reference named in summary.json, if readable)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputFileError(f"{folder}: not a folder (expected a score output folder)")
        flags = load_flags(folder)
        summary = _read_summary(folder)
        batch = read_csv_text(folder / s.RECORDS_FILE)
        id_column = _id_column(batch, flags, summary)
        columns = [name for name in batch.columns if name not in s.RECORD_COLUMNS]
        records = {
            row[id_column]: row for row in batch[columns].to_dict(orient="records")
        }  # input columns only
        wanted = set(flags.loc[flags[s.FLAG_MATCH_ID] != s.MISSING, s.FLAG_MATCH_ID]) - set(records)
        reference = reference or _summary_reference(folder, summary)
        if wanted and reference is not None:
            records.update(_reference_records(reference, id_column, wanted, columns))
        return cls(folder, flags, records, columns, summary, reference)

    def queue(self) -> dict[str, Any]:
        """Everything the page needs: the flags with their records and decisions, and the money basis."""
        decided = self.latest_decisions()
        items = []
        for position, flag in enumerate(self.flags.to_dict(orient="records")):
            key = flag_key(flag)
            match_id = flag[s.FLAG_MATCH_ID]
            items.append(
                {
                    "position": position,
                    "key": list(key),
                    **flag,
                    "record": self.records.get(flag[s.FLAG_RECORD_ID]),
                    "match": self.records.get(match_id) if match_id else None,
                    "decision": decided.get(key),
                }
            )
        basis = self.summary.get("minutes_saved_basis", {})
        return {
            "folder": str(self.folder),
            "model": self.summary.get("model", {}),
            "columns": self.columns,
            # Always different between two registrations, so never marked as a difference.
            "unmarked": [self.summary.get("id_column"), self.summary.get("time_column")],
            "reference": str(self.reference) if self.reference else None,
            "minutes_per_correction": basis.get("minutes_per_correction", 4.0),
            "cost_per_hour": basis.get("cost_per_hour"),
            "flags": items,
        }

    def latest_decisions(self) -> dict[tuple[str, ...], dict[str, str]]:
        rows = latest(read_decisions(self.decisions_path))
        return {flag_key(row): row for row in rows.to_dict(orient="records")}

    def decide(self, payload: dict[str, Any]) -> dict[str, str]:
        """Checks one decision against the folder's flags and appends it; returns the row written.

        Raises `LookupError` for a flag not in the folder and `ValueError` for a decision that cannot stand.
        """
        key = flag_key({name: str(payload.get(name) or s.MISSING) for name in s.FLAG_KEY})
        matches = [flag for flag in self.flags.to_dict(orient="records") if flag_key(flag) == key]
        if not matches:
            raise LookupError(
                f"no such flag in {self.folder / s.FLAGS_FILE}: {key[1]} flag of record {key[0]!r}"
            )
        flag = matches[0]
        seconds = payload.get(s.DECISION_SECONDS)
        row = {
            **{name: flag[name] for name in s.FLAG_COLUMNS if name in s.DECISION_COLUMNS},
            s.DECISION: str(payload.get(s.DECISION) or s.MISSING),
            s.DECISION_NEW_VALUE: str(payload.get(s.DECISION_NEW_VALUE) or s.MISSING),
            s.DECISION_DECIDED_AT: datetime.now(UTC).isoformat(timespec="seconds"),
            s.DECISION_SECONDS: _seconds(seconds),
        }
        if row[s.DECISION] != s.DECISION_EDIT:
            row[s.DECISION_NEW_VALUE] = s.MISSING
        problem = decision_problem(row, flag)
        if problem:
            raise ValueError(problem)
        append_decision(self.decisions_path, row)
        logger.info("decision %s on a %s flag", row[s.DECISION], key[1])
        return row


def create_app(review: ReviewFolder) -> Any:
    """The FastAPI app over one loaded folder."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="Review", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/queue")
    def queue() -> JSONResponse:
        return JSONResponse(review.queue(), headers={"Cache-Control": "no-store"})

    @app.get("/api/decisions")
    def decisions() -> JSONResponse:
        rows = [{"key": list(key), **row} for key, row in review.latest_decisions().items()]
        return JSONResponse({"decisions": rows}, headers={"Cache-Control": "no-store"})

    # A plain (sync) handler: FastAPI runs it in a worker thread, and the file lock serializes writers.
    @app.post("/api/decisions")
    def decide(payload: dict[str, Any]) -> dict[str, Any]:
        try:
            row = review.decide(payload)
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return {"key": list(flag_key(row)), **row}

    return app


def serve(
    folder: Path,
    *,
    port: int = DEFAULT_PORT,
    reference: Path | None = None,
    host: str = "127.0.0.1",
    ready: Any = None,
) -> None:
    """Loads the folder and serves the review page until interrupted."""
    import uvicorn

    review = ReviewFolder.load(folder, reference=reference)
    config = uvicorn.Config(create_app(review), host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if ready is not None:
        ready(review, f"http://{host}:{port}/")
    server.run()


# ------------------------------------------------------------------------------------------ helpers


def _read_summary(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / s.SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s: no readable %s; money figures and reference unknown", folder, s.SUMMARY_FILE)
        return {}


def _id_column(batch: pd.DataFrame, flags: pd.DataFrame, summary: dict[str, Any]) -> str:
    """The id column: the one summary.json names, else the first column holding every flagged record."""
    named = summary.get("id_column")
    if named in batch.columns:
        return named
    flagged = set(flags[s.FLAG_RECORD_ID])
    for name in batch.columns:
        if flagged <= set(batch[name]) and batch[name].is_unique:
            return name
    raise InputFileError(f"{s.RECORDS_FILE}: no column holds the ids of the flagged records")


def _summary_reference(folder: Path, summary: dict[str, Any]) -> Path | None:
    """The reference file summary.json names, as given, or relative to the folder's parent."""
    named = summary.get("reference_path")
    if not named:
        return None
    for candidate in (Path(named), folder.parent / named):
        if candidate.is_file():
            return candidate
    logger.warning("reference %s named in %s is not found; matched records are shown by id", named, folder)
    return None


def _reference_records(
    path: Path, id_column: str, wanted: set[str], columns: list[str]
) -> dict[str, dict[str, str]]:
    """The reference records with these ids, read in chunks (a history may be large)."""
    found: dict[str, dict[str, str]] = {}
    for chunk in iter_table(path):
        if id_column not in chunk.columns:
            raise InputFileError(f"{path}: missing the id column {id_column!r}")
        hits = chunk[chunk[id_column].isin(wanted)]
        for row in hits.to_dict(orient="records"):
            found[row[id_column]] = {name: row.get(name, s.MISSING) for name in columns}
    return found


def _seconds(value: Any) -> str:
    """Seconds as the page measured them, capped, with one decimal; empty when not given."""
    if value in (None, ""):
        return s.MISSING
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return str(value)  # refused by decision_problem, naming the value
    return f"{min(max(seconds, 0.0), MAX_SECONDS_PER_FLAG):.1f}"

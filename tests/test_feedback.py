"""feedback: decisions into the corrections log, idempotently and atomically; decisions.csv under
concurrent writers; the review rows as known negatives and as realised value."""

from __future__ import annotations

import csv
import json
import multiprocessing
import threading
from pathlib import Path

import pandas as pd
import pytest

from pipeline import schema as s
from pipeline.cli import main
from pipeline.config import Config
from pipeline.corrections import confirmed_cells, rejected_pairs, validate_log
from pipeline.decisions import append_decision, latest, read_decisions
from pipeline.feedback import realised_value

# The contract's flag columns (flags.csv may carry more, e.g. suggest_empty; a folder without them is read).
CONTRACT_FLAG_COLUMNS = ("record_id", "kind", "field", "value", "suggestion", "match_id", "score", "reason")

FLAGS = [
    # record_id, kind, field, value, suggestion, match_id, score, reason
    ("B1", "error", "city", "Amstredam", "Amsterdam", "", "0.9500", "city is misspelled"),
    ("B2", "duplicate", "", "", "", "H7", "0.9000", "same customer and amount as H7"),
    ("B3", "error", "postcode", "1234 ZZ", "", "", "0.8000", "postcode does not match the city"),
    ("B4", "anomaly", "", "", "", "", "0.7000", "unusual record"),
    ("B5", "error", "city", "Utrecht", "Zeist", "", "0.6000", "city does not match the postcode"),
    ("B6", "duplicate", "", "", "", "B2", "0.5500", "same name as B2"),
    ("B7", "anomaly", "", "", "", "", "0.5000", "unusual record"),
]
LOG_HEADER = list(s.LOG_COLUMNS)
LOG_ROWS = [["H1", "edit", "city", "Utrect", "Utrecht", "", "2024-01-02T10:00:00"]]


def decision(flag: tuple[str, ...], verdict: str, new_value: str = "", seconds: str = "30") -> dict[str, str]:
    row = dict(zip(CONTRACT_FLAG_COLUMNS, flag, strict=True))
    return {
        **{k: row[k] for k in s.DECISION_COLUMNS if k in row},
        s.DECISION: verdict,
        s.DECISION_NEW_VALUE: new_value,
        s.DECISION_DECIDED_AT: "2024-07-10T09:00:00+00:00",
        s.DECISION_SECONDS: seconds,
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A score output folder with a literal queue, and the clerk's decisions on it."""
    out = tmp_path / "out"
    out.mkdir()
    with open(out / s.FLAGS_FILE, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(CONTRACT_FLAG_COLUMNS)
        writer.writerows(FLAGS)
    (out / s.SUMMARY_FILE).write_text(
        json.dumps({"minutes_saved_basis": {"minutes_per_correction": 4.0, "cost_per_hour": 45.0}}),
        encoding="utf-8",
    )
    for row in (
        decision(FLAGS[0], "reject"),  # changed below: the later row wins
        decision(FLAGS[1], "accept"),
        decision(FLAGS[2], "edit", "1234 AB", seconds="90"),
        decision(FLAGS[3], "accept"),
        decision(FLAGS[4], "reject"),
        decision(FLAGS[5], "reject"),
        decision(FLAGS[6], "reject"),
        decision(FLAGS[0], "accept", seconds="15"),
    ):
        append_decision(out / s.DECISIONS_FILE, row)
    return out


def write_log(path: Path, *, delimiter: str = ",", encoding: str = "utf-8", line_end: str = "\n") -> Path:
    with open(path, "w", encoding=encoding, newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter, lineterminator=line_end)
        writer.writerow(LOG_HEADER)
        writer.writerows(LOG_ROWS)
    return path


def run_feedback(folder: Path, log: Path, *extra: str) -> int:
    return main(
        ["feedback", "--decisions", str(folder / s.DECISIONS_FILE), "--corrections", str(log), *extra]
    )


def read_log(path: Path, **kwargs: str) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)


def test_decisions_become_log_rows_in_the_contracts_mapping(folder: Path, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv")
    assert run_feedback(folder, log) == 0
    frame = read_log(log)
    assert list(frame.columns) == [*LOG_HEADER, s.LOG_SOURCE, s.LOG_SECONDS]
    assert frame.iloc[0].tolist() == [*LOG_ROWS[0], "", ""]  # the existing row is kept as it was
    added = frame.iloc[1:][[s.LOG_RECORD_ID, s.LOG_ACTION, s.LOG_FIELD, s.LOG_OLD_VALUE, s.LOG_NEW_VALUE]]
    assert added.values.tolist() == [
        ["B2", "merge", "", "", ""],
        ["B3", "edit", "postcode", "1234 ZZ", "1234 AB"],  # edited: the typed value
        ["B5", "confirm", "city", "Utrecht", "Utrecht"],  # rejected error: the value found right
        ["B6", "confirm", "", "", ""],  # rejected duplicate
        ["B7", "confirm", "", "", ""],  # rejected anomaly; the accepted anomaly B4 adds no row
        ["B1", "edit", "city", "Amstredam", "Amsterdam"],  # accepted: the suggestion; the later row won
    ]
    assert frame[s.LOG_MERGED_INTO].iloc[1:].tolist() == ["H7", "", "", "B2", "", ""]
    assert set(frame[s.LOG_SOURCE].iloc[1:]) == {"review"}
    assert frame[s.LOG_SECONDS].iloc[1:].tolist() == ["30", "90", "30", "30", "30", "15"]
    assert set(frame[s.LOG_CORRECTED_AT].iloc[1:]) == {"2024-07-10T09:00:00+00:00"}
    validate_log(frame)  # the log reader accepts it


@pytest.mark.parametrize(
    ("delimiter", "encoding", "line_end"),
    [(",", "utf-8", "\n"), (";", "cp1252", "\r\n"), ("\t", "utf-8", "\r\n")],
)
def test_twice_is_byte_identical_and_the_logs_format_is_kept(
    folder: Path, tmp_path: Path, delimiter: str, encoding: str, line_end: str
) -> None:
    log = write_log(tmp_path / "log.csv", delimiter=delimiter, encoding=encoding, line_end=line_end)
    assert run_feedback(folder, log) == 0
    once = log.read_bytes()
    assert run_feedback(folder, log) == 0
    assert log.read_bytes() == once
    text = once.decode(encoding)
    assert text.count(line_end) == 8 and (line_end == "\r\n" or "\r" not in text)
    assert text.splitlines()[0] == delimiter.join([*LOG_HEADER, "source", "seconds"])
    # A third run after one more decision appends just that row, keeping every earlier byte.
    append_decision(folder / s.DECISIONS_FILE, decision(FLAGS[3], "reject", seconds="5"))
    assert run_feedback(folder, log) == 0
    assert log.read_bytes().startswith(once)
    assert log.read_bytes()[len(once) :].decode(encoding).startswith(f"B4{delimiter}confirm")


def test_parquet_log_twice_is_byte_identical(folder: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    pd.DataFrame(LOG_ROWS, columns=LOG_HEADER).to_parquet(log, index=False)
    assert run_feedback(folder, log) == 0
    once = log.read_bytes()
    assert run_feedback(folder, log) == 0
    assert log.read_bytes() == once
    assert pd.read_parquet(log)[s.LOG_ACTION].tolist() == ["edit", "merge", "edit", *["confirm"] * 3, "edit"]


def test_a_bad_decision_value_is_refused_naming_the_row(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write_log(tmp_path / "log.csv")
    before = log.read_bytes()
    append_decision(folder / s.DECISIONS_FILE, decision(FLAGS[4], "maybe"))
    assert run_feedback(folder, log) == 2
    err = capsys.readouterr().err
    assert "decisions.csv: row 9: decision 'maybe' is not one of accept, edit, reject" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert log.read_bytes() == before  # nothing written


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"record_id": "X9", "kind": "error", "field": "city"},
            "row 9: record 'X9' has no flag in flags.csv",
        ),
        (
            {"record_id": "B1", "kind": "error", "field": "postcode"},
            "row 9: no such flag in flags.csv (error flag of record 'B1', field 'postcode')",
        ),
        (
            {"record_id": "B2", "kind": "duplicate", "field": "", "match_id": "H8"},
            "row 9: no such flag in flags.csv (duplicate flag of record 'B2', match 'H8')",
        ),
        (
            {"record_id": "B1", "kind": "error", "field": "city", "value": "Rome"},
            "row 9: value 'Rome' differs",
        ),
    ],
)
def test_unknown_record_or_flag_is_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], row: dict[str, str], message: str
) -> None:
    log = write_log(tmp_path / "log.csv")
    append_decision(folder / s.DECISIONS_FILE, {**decision(FLAGS[0], "accept"), "value": "Amstredam", **row})
    assert run_feedback(folder, log) == 2
    assert message in capsys.readouterr().err


def test_edit_of_a_duplicate_and_an_unchanged_edit_are_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write_log(tmp_path / "log.csv")
    append_decision(folder / s.DECISIONS_FILE, decision(FLAGS[4], "edit", "Utrecht"))
    assert run_feedback(folder, log) == 2
    assert "row 9: the typed value equals the flagged value" in capsys.readouterr().err


def test_decisions_need_their_score_folder(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "elsewhere.csv"
    moved.write_bytes((folder / s.DECISIONS_FILE).read_bytes())
    log = write_log(tmp_path / "log.csv")
    assert main(["feedback", "--decisions", str(moved), "--corrections", str(log)]) == 2
    assert "not a score output folder" in capsys.readouterr().err
    args = ["feedback", "--decisions", str(moved), "--corrections", str(log), "--output", str(folder)]
    assert main(args) == 0


def _writer(path: str, prefix: str, n: int) -> None:
    for i in range(n):
        append_decision(Path(path), decision((f"{prefix}{i}", "anomaly", "", "", "", "", "1", "r"), "reject"))


def test_two_concurrent_writers_keep_both_decisions(tmp_path: Path) -> None:
    path = tmp_path / s.DECISIONS_FILE
    # Two processes (two servers on one folder) and two threads (two tabs on one server), at once.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), p, 150)) for p in ("P", "Q")]
    threads = [threading.Thread(target=_writer, args=(str(path), t, 150)) for t in ("T", "U")]
    for worker in (*procs, *threads):
        worker.start()
    for worker in (*procs, *threads):
        worker.join()
    assert all(p.exitcode == 0 for p in procs)
    rows = read_decisions(path)
    assert len(rows) == 600 and len(latest(rows)) == 600
    assert list(rows.columns) == list(s.DECISION_COLUMNS)  # one header, no torn rows
    assert path.read_text(encoding="utf-8").count("record_id") == 1


def test_review_rows_are_known_negatives_and_extra_columns_are_kept() -> None:
    log = validate_log(
        pd.DataFrame(
            [
                ["A", "confirm", "city", "Zeist", "Zeist", "", "2024-01-01", "review", "10"],
                ["B", "confirm", "city", "Ede", "Ede", "", "2024-01-01", "review", "10"],
                ["B", "edit", "city", "Ede", "Epe", "", "2024-02-01", "", ""],  # corrected after all
                ["C", "confirm", "", "", "", "D", "2024-01-01", "review", "20"],
                ["E", "confirm", "", "", "", "F", "2024-01-01", "review", "20"],
                ["E", "merge", "", "", "", "F", "2024-03-01", "", ""],  # merged after all
                ["G", "merge", "", "", "", "H", "2024-01-01", "review", "20"],
                ["I", "edit", "postcode", "1", "2", "", "2024-01-01", "review", "60"],
                ["J", "confirm", "", "", "", "", "2024-01-01", "review", "20"],  # anomaly rejected
            ],
            columns=[*s.LOG_COLUMNS, s.LOG_SOURCE, s.LOG_SECONDS],
            dtype=object,
        )
    )
    assert list(log.columns[-2:]) == [s.LOG_SOURCE, s.LOG_SECONDS]
    assert confirmed_cells(log).values.tolist() == [["A", "city", "Zeist"]]
    assert rejected_pairs(log) == {frozenset(("C", "D"))}
    config = Config.model_validate(
        {
            "name": "t",
            "fields": {"city": {"type": "category"}},
            "minutes_per_correction": 4,
            "cost_per_hour": 45,
        }
    )
    figures = realised_value(log, config)
    assert figures["realised_flags_reviewed"] == 7
    assert figures["realised_flags_accepted"] == 2
    assert figures["realised_accept_share_duplicate"] == pytest.approx(1 / 3, abs=1e-4)
    assert figures["realised_accept_share_error"] == pytest.approx(1 / 3, abs=1e-4)
    assert figures["realised_accept_share_error_city"] == 0.0
    assert figures["realised_accept_share_error_postcode"] == 1.0
    assert figures["realised_accept_share_anomaly"] == 0.0
    minutes = 160 / 60
    assert figures["realised_minutes_reviewing"] == round(minutes, 2)
    assert figures["realised_minutes_saved"] == round(2 * 4 - minutes, 2)
    assert figures["realised_euros_saved"] == round((2 * 4 - minutes) / 60 * 45, 2)
    assert realised_value(log.drop(columns=[s.LOG_SOURCE])) == {}


def test_accepting_an_error_flag_without_a_suggestion_is_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write_log(tmp_path / "log.csv")
    append_decision(folder / s.DECISIONS_FILE, decision(FLAGS[2], "accept"))
    assert run_feedback(folder, log) == 2
    assert "row 9: the flag has no suggestion to accept" in capsys.readouterr().err

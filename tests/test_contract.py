"""The repository's own output check: a kept contract passes, and each way of breaking it is reported.

The output here is written by hand, small enough to read; tests/test_formats.py runs the same check on
real `score` outputs (CSV, `;`/Windows-1252 and `.xlsx` inputs).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline import schema as s
from pipeline.cli import main
from pipeline.contract import check_output
from pipeline.exceptions import InputFileError
from pipeline.ingest import file_digest

BATCH = [
    {"record_id": "007", "name": "Jansen", "amount": "1.234,50"},
    {"record_id": "008", "name": "Jansn", "amount": "NA"},
    {"record_id": "009", "name": "Pietersen", "amount": "12"},
]
EXTRA = [
    # duplicate_of, duplicate_score, cluster_id, error_fields, error_score, anomaly_score, needs_review
    ["", "0.0100", "007", "", "0.0200", "0.1000", "false"],
    ["007", "0.9700", "007", "name", "0.8800", "0.2000", "true"],
    ["", "0.0000", "009", "", "0.0100", "0.0500", "false"],
]
FLAGS = [
    ["008", "duplicate", "", "", "", "007", "0.9700", "same name, amount and customer as 007", "false"],
    [
        "008",
        "error",
        "name",
        "Jansn",
        "Jansen",
        "",
        "0.8800",
        "name is a misspelling of a known name",
        "false",
    ],
]


def write_csv(path: Path, header: list[str], rows: list[list[str]], **kwargs) -> Path:
    with open(path, "w", newline="", encoding=kwargs.pop("encoding", "utf-8")) as fh:
        writer = csv.writer(fh, lineterminator="\r\n", **kwargs)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_output(
    tmp_path: Path,
    *,
    batch: list[dict[str, str]] = BATCH,
    records: list[list[str]] | None = None,
    record_header: list[str] | None = None,
    flags: list[list[str]] = FLAGS,
    summary: dict | None = None,
) -> tuple[Path, Path]:
    """A batch file and a `score` output folder for it that keeps the contract, unless told otherwise."""
    input_path = write_csv(tmp_path / "batch.csv", list(batch[0]), [list(row.values()) for row in batch])
    folder = tmp_path / "out"
    folder.mkdir()
    if records is None:
        records = [[*row.values(), *extra] for row, extra in zip(batch, EXTRA, strict=True)]
    write_csv(folder / s.RECORDS_FILE, record_header or [*batch[0], *s.RECORD_COLUMNS], records)
    write_csv(folder / s.FLAGS_FILE, list(s.FLAG_COLUMNS), flags)
    summary = summary or {"input": {"rows": len(batch), "sha256": file_digest(input_path)}}
    (folder / s.SUMMARY_FILE).write_text(json.dumps(summary), encoding="utf-8")
    return folder, input_path


def test_an_output_that_keeps_the_contract_passes(tmp_path):
    folder, input_path = make_output(tmp_path)
    assert check_output(folder, input_path) == []


def good_records() -> list[list[str]]:
    return [[*row.values(), *extra] for row, extra in zip(BATCH, EXTRA, strict=True)]


def broken(column: str, row: int, value: str) -> list[list[str]]:
    records = good_records()
    records[row][[*BATCH[0], *s.RECORD_COLUMNS].index(column)] = value
    return records


@pytest.mark.parametrize(
    ("change", "violation"),
    [
        (
            {
                "records": [r[:-1] for r in good_records()],
                "record_header": [*BATCH[0], *s.RECORD_COLUMNS[:-1]],
            },
            "records.csv lacks columns ['needs_review']",
        ),
        ({"records": good_records()[:2]}, "records.csv has 2 rows, the input has 3: every row exactly once"),
        (
            {"records": [good_records()[i] for i in (0, 2, 1)]},
            "records.csv: ids are not exactly the input's ids in input order (first difference at row 2)",
        ),
        (
            {"records": broken("anomaly_score", 2, "1.5")},
            "records.csv row 3: anomaly_score='1.5' is not in 0..1",
        ),
        ({"records": broken("amount", 1, "NaN")}, "records.csv row 2: input value changed in ['amount']"),
        (
            {"records": broken("needs_review", 0, "yes")},
            "records.csv row 1: needs_review='yes', want true/false",
        ),
        (
            {"records": broken("needs_review", 2, "true")},
            "records.csv row 3: needs_review of '009' disagrees with flags.csv",
        ),
        ({"flags": [FLAGS[1], FLAGS[0]]}, "flags.csv row 2: not sorted by score, highest first"),
        ({"flags": [[*FLAGS[0][:6], "-0.1", *FLAGS[0][7:]]]}, "flags.csv row 1: score '-0.1' is not in 0..1"),
        ({"flags": [FLAGS[0], [*FLAGS[1][:3], "Jansen", *FLAGS[1][4:]]]}, "is not the input's 'name'"),
        ({"flags": [FLAGS[0], [*FLAGS[1][:7], " ", "false"]]}, "flags.csv row 2: empty reason"),
        (
            {"flags": [["010", *FLAGS[0][1:]], FLAGS[1]]},
            "flags.csv row 1: record_id '010' is not in the input",
        ),
        ({"flags": [FLAGS[0]]}, "records.csv row 2: error_fields of '008' disagree with flags.csv"),
        ({"summary": {"input": {"rows": 4, "sha256": ""}}}, "summary.json: input rows 4, the input has 3"),
    ],
)
def test_each_broken_output_is_reported(tmp_path, change, violation):
    folder, input_path = make_output(tmp_path, **change)
    violations = check_output(folder, input_path)
    assert any(violation in line for line in violations), violations


def test_missing_files_are_reported_and_an_unreadable_input_is_an_input_error(tmp_path):
    folder, input_path = make_output(tmp_path)
    (folder / s.FLAGS_FILE).unlink()
    assert check_output(folder, input_path) == [f"{folder}: missing flags.csv"]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(InputFileError, match="absent.csv: file not found"):
        check_output(make_output(other)[0], tmp_path / "absent.csv")


def test_a_semicolon_windows_1252_input_is_checked_as_it_was_read(tmp_path):
    batch = [{**row, "name": row["name"] + " é€"} for row in BATCH]
    flags = [FLAGS[0], [*FLAGS[1][:3], "Jansn é€", *FLAGS[1][4:]]]
    folder, utf8_input = make_output(tmp_path, batch=batch, flags=flags)
    assert check_output(folder, utf8_input) == []
    rows = [list(row.values()) for row in batch]
    exported = write_csv(tmp_path / "export.csv", list(batch[0]), rows, delimiter=";", encoding="cp1252")
    # Every value matches; only the digest tells the two files apart.
    assert check_output(folder, exported) == [
        "summary.json: input sha256 is not the digest of the input file's bytes"
    ]


def test_the_cli_prints_ok_or_each_violation(tmp_path, capsys):
    folder, input_path = make_output(tmp_path)
    assert main(["check-output", str(folder), str(input_path)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    write_csv(folder / s.FLAGS_FILE, list(s.FLAG_COLUMNS), [FLAGS[1], FLAGS[0]])
    assert main(["check-output", str(folder), str(input_path)]) == 1
    assert "flags.csv row 2: not sorted by score, highest first" in capsys.readouterr().out
    assert main(["check-output", str(folder), str(input_path), "--delimiter", ":"]) == 2
    assert "delimiter ':' is not one of" in capsys.readouterr().err

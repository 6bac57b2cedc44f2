"""Files as departments export them, end to end: a model trained on a `;`-separated Windows-1252 export
scores the same batch as UTF-8 CSV, as `;`/Windows-1252 and as `.xlsx` into identical outputs, and each
output keeps the contract by the repository's own check."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import pytest

from pipeline import schema as s
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.contract import check_output
from pipeline.train import load_history

FORMATS = ("utf8", "semicolon-cp1252", "xlsx")
# The demo has a few Turkish letters Windows-1252 cannot hold; every copy gets the same stand-in.
NOT_IN_CP1252 = {"ı": "i", "Ş": "S", "ş": "s", "ğ": "g", "İ": "I"}


def cp1252_safe(text: str) -> str:
    return "".join(ch if _encodable(ch) else NOT_IN_CP1252.get(ch, "?") for ch in text)


def _encodable(ch: str) -> bool:
    try:
        ch.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


def write_copy(rows: list[list[str]], path: Path, fmt: str) -> Path:
    """The rows as that kind of export: UTF-8 CSV, `;`-separated Windows-1252 CSV, or text cells in .xlsx."""
    if fmt == "xlsx":
        from openpyxl import Workbook

        book = Workbook(write_only=True)
        sheet = book.create_sheet("Export")
        for row in rows:
            sheet.append(row)
        path = path.with_suffix(".xlsx")
        book.save(path)
        return path
    delimiter, encoding = (",", "utf-8") if fmt == "utf8" else (";", "cp1252")
    text = io.StringIO(newline="")
    csv.writer(text, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    path.write_bytes(text.getvalue().encode(encoding))
    return path


@pytest.fixture(scope="module")
def exports(demo, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The demo's history, log, batch and batch ground truth in each format."""
    root = tmp_path_factory.mktemp("exports")
    sources = {"records": demo.records, "corrections": demo.corrections, "batch": demo.batch}
    copies: dict[str, dict[str, Path]] = {}
    for fmt in FORMATS:
        folder = root / fmt
        folder.mkdir()
        copies[fmt] = {}
        for name, source in sources.items():
            rows = list(csv.reader(io.StringIO(cp1252_safe(source.read_text("utf-8")), newline="")))
            copies[fmt][name] = write_copy(rows, folder / f"{name}.csv", fmt)
    return copies


@pytest.fixture(scope="module")
def trained(demo, exports, tmp_path_factory) -> str:
    """Trains once, on the `;`-separated Windows-1252 history and log; returns the tracking URI."""
    store = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    export = exports["semicolon-cp1252"]
    argv = ["train", "--config", str(demo.config), "--records", str(export["records"])]
    argv += ["--corrections", str(export["corrections"]), "--tracking-uri", uri, "--quiet"]
    assert run(argv) == 0
    return uri


def run(argv: list[str]) -> int:
    old = sys.stdout
    sys.stdout = io.StringIO()
    try:
        return main(argv)
    finally:
        sys.stdout = old


@pytest.fixture(scope="module")
def scored(exports, trained, tmp_path_factory) -> dict[str, Path]:
    """Each format's batch scored against the history in the same format."""
    root = tmp_path_factory.mktemp("scored")
    outputs = {}
    for fmt in FORMATS:
        outputs[fmt] = root / fmt
        argv = ["score", "--model", "models:/orders@champion", "--input", str(exports[fmt]["batch"])]
        argv += ["--reference", str(exports[fmt]["records"]), "--output", str(outputs[fmt])]
        assert run([*argv, "--tracking-uri", trained, "--quiet"]) == 0, fmt
    return outputs


def test_every_export_reads_as_the_same_history(demo, exports):
    config = load_config(demo.config)
    frames = {
        fmt: load_history(config, paths["records"], paths["corrections"]) for fmt, paths in exports.items()
    }
    records, log = frames["utf8"]
    assert len(records) > 1000 and records["record_id"].iloc[0] == "R0000001"
    assert any("é" in value for value in records["customer_name"])
    for fmt in FORMATS[1:]:
        assert frames[fmt][0].equals(records), fmt
        assert frames[fmt][1].equals(log), fmt


def test_the_three_exports_of_a_batch_score_identically(scored):
    reference = {name: (scored["utf8"] / name).read_bytes() for name in (s.RECORDS_FILE, s.FLAGS_FILE)}
    assert reference[s.FLAGS_FILE].count(b"\n") > 10, "the demo batch has flags to compare"
    for fmt in FORMATS[1:]:
        assert (scored[fmt] / s.FLAGS_FILE).read_bytes() == reference[s.FLAGS_FILE], fmt
        assert (scored[fmt] / s.RECORDS_FILE).read_bytes() == reference[s.RECORDS_FILE], fmt


def test_each_output_keeps_the_contract_by_our_own_check(exports, scored):
    for fmt in FORMATS:
        assert check_output(scored[fmt], exports[fmt]["batch"]) == [], fmt
    # And a row dropped from a real output is caught.
    records = (scored["xlsx"] / s.RECORDS_FILE).read_bytes().split(b"\r\n")
    broken = scored["xlsx"].parent / "broken"
    broken.mkdir()
    for name in (s.FLAGS_FILE, s.SUMMARY_FILE):
        (broken / name).write_bytes((scored["xlsx"] / name).read_bytes())
    (broken / s.RECORDS_FILE).write_bytes(b"\r\n".join(records[:5] + records[6:]))
    rows = len(records) - 2  # a header and the empty piece after the last line end
    violations = check_output(broken, exports["xlsx"]["batch"])
    assert f"records.csv has {rows - 1} rows, the input has {rows}: every row exactly once" in violations

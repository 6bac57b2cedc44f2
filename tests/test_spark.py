"""`score --engine spark`: a real local Spark session gives the same outputs as the in-process batch job."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import schema as s
from pipeline.bundle import ModelBundle
from pipeline.cli import main
from pipeline.exceptions import InputFileError, SchemaError
from pipeline.score import run_batch

# Small chunks, so Spark cuts the batch into several chunks scored in parallel; the in-process job takes it
# in one piece, and each Spark chunk has to start from the running numbers the chunks before it left.
CHUNK_ROWS = 128


@pytest.fixture(scope="module")
def spark():
    """One local Spark session for the module; `score_spark` reuses the active session."""
    java_home = os.environ.get("JAVA_HOME")
    has_java = bool(java_home and Path(java_home, "bin", "java").exists()) or shutil.which("java") is not None
    assert has_java, "Spark needs a Java runtime (17+): install openjdk-17-jre-headless or set JAVA_HOME"
    from pipeline.spark import _session

    session, _ = _session("local[2]", {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4"})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def bundle(demo, tmp_path_factory) -> ModelBundle:
    """A model trained on the demo data, saved and loaded back as `score` would load it."""
    from pipeline.config import load_config
    from pipeline.train import train

    result = train(load_config(demo.config), demo.records, demo.corrections)
    return ModelBundle.load(result.bundle.save(tmp_path_factory.mktemp("model") / "bundle"))


def test_spark_writes_what_the_in_process_job_writes(spark, demo, bundle, tmp_path):
    from pipeline.spark import score_spark

    local = run_batch(bundle, demo.batch, tmp_path / "local", reference_path=demo.records)
    distributed = score_spark(
        bundle,
        demo.batch,
        tmp_path / "spark",
        reference_path=demo.records,
        chunk_rows=CHUNK_ROWS,
        output_format="parquet",
    )

    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "spark" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert distributed["flags"] == local["flags"]
    assert distributed["flags"][s.KIND_DUPLICATE] > 0 and distributed["flags"][s.KIND_ERROR] > 0
    assert distributed["input"] == local["input"]
    assert distributed["reference_rows"] == local["reference_rows"] == 1500
    assert distributed["reference_path"] == local["reference_path"] == str(demo.records)
    assert distributed["engine"]["name"] == "spark"
    summary = json.loads((tmp_path / "spark" / s.SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["flags"] == local["flags"]
    assert (tmp_path / "spark" / s.REPORT_FILE).stat().st_size > 1000
    import pandas as pd

    records = pd.read_parquet(tmp_path / "spark" / "records.parquet")
    assert len(records) == 300 and records[s.DUPLICATE_OF].ne("").sum() == local["flags"][s.KIND_DUPLICATE]
    assert len(pd.read_parquet(tmp_path / "spark" / "flags.parquet")) == local["flags"]["total"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_awkward_values_come_back_exactly_from_csv_and_parquet(spark, demo, bundle, tmp_path):
    import pandas as pd

    from pipeline.spark import score_spark

    with open(demo.batch, newline="", encoding="utf-8") as fh:
        header, first = list(csv.reader(fh))[:2]
    awkward = ["NA", "null", "None", "nan", "007", "1e5", "1,50", ' "quoted" ', "line\nbreak", "a\r\nb"]
    awkward += ["Ærø 北京 🙂", "  ", "-0", ""]
    rows = []
    for i, value in enumerate(awkward):
        row = dict(zip(header, first, strict=True))
        row.update({"record_id": f"X{i:03d}", "notes": value, "extra_column": value})
        row["customer_name"] = value if i % 2 else row["customer_name"]
        rows.append(row)
    batch = tmp_path / "awkward.csv"
    with open(batch, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*header, "extra_column"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    crlf = tmp_path / "awkward_crlf.csv"
    with open(crlf, "w", newline="", encoding="utf-8") as fh:  # as Excel and the csv module write them
        writer = csv.DictWriter(fh, fieldnames=[*header, "extra_column"], lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    parquet = tmp_path / "awkward.parquet"
    pd.DataFrame(rows, dtype=object).to_parquet(parquet, index=False)

    for source in (batch, parquet, crlf):
        run_batch(bundle, source, tmp_path / f"local-{source.name}")
        score_spark(bundle, source, tmp_path / f"spark-{source.name}")
        for name in (s.RECORDS_FILE, s.FLAGS_FILE):
            expected = (tmp_path / f"local-{source.name}" / name).read_bytes()
            if source == crlf:
                # The one known difference: Spark's CSV parser turns a CR LF inside a quoted cell of a
                # CR LF file into LF (a lone LF in a cell, and any line break in an LF file, stay as is).
                expected = expected.replace(b"a\r\nb", b"a\nb").replace(rb"a\r\nb", rb"a\nb")  # value, repr
            assert (tmp_path / f"spark-{source.name}" / name).read_bytes() == expected, (source.name, name)
    with open(tmp_path / "spark-awkward.csv" / s.RECORDS_FILE, newline="", encoding="utf-8") as fh:
        back = list(csv.DictReader(fh))
    assert [{k: r[k] for k in rows[0]} for r in back] == rows


def test_header_only_batch_is_a_normal_day(spark, demo, bundle, tmp_path):
    from pipeline.spark import score_spark

    batch = tmp_path / "empty.csv"
    batch.write_text(demo.batch.read_text(encoding="utf-8").splitlines(keepends=True)[0], encoding="utf-8")
    summary = score_spark(bundle, batch, tmp_path / "out")

    assert summary["input"]["rows"] == 0 and summary["flags"]["total"] == 0
    header = batch.read_text(encoding="utf-8").rstrip("\n")
    records = (tmp_path / "out" / s.RECORDS_FILE).read_text(encoding="utf-8")
    assert records == header + "," + ",".join(s.RECORD_COLUMNS) + "\n"
    assert (tmp_path / "out" / s.FLAGS_FILE).read_text(encoding="utf-8") == ",".join(s.FLAG_COLUMNS) + "\n"


def test_bad_input_is_refused_with_the_in_process_message(spark, demo, bundle, tmp_path):
    from pipeline.spark import score_spark

    lines = demo.batch.read_text(encoding="utf-8").splitlines(keepends=True)
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("".join([*lines[:6], lines[3]]), encoding="utf-8")
    with pytest.raises(SchemaError) as expected:
        run_batch(bundle, repeated, tmp_path / "local")
    with pytest.raises(SchemaError) as raised:
        score_spark(bundle, repeated, tmp_path / "out")
    assert str(raised.value) == str(expected.value)
    assert "row 6" in str(raised.value) and "appears more than once" in str(raised.value)

    short = tmp_path / "short.csv"
    short.write_text("".join([*lines[:4], "R9,only,three\n", *lines[4:6]]), encoding="utf-8")
    with pytest.raises(InputFileError, match=r"short\.csv: row 4 has 3 cells, the header has \d+$"):
        score_spark(bundle, short, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_id_faults_across_chunks_and_the_reference_are_reported_as_run_batch_reports_them(
    spark, demo, bundle, tmp_path
):
    """Ids are checked chunk by chunk: in the first chunk with a fault, an empty id before an id seen in an
    earlier chunk, even when the empty one comes later in that chunk; an id of the reference is repeated."""
    from pipeline.spark import score_spark

    with open(demo.batch, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    with open(demo.records, newline="", encoding="utf-8") as fh:
        known = next(csv.DictReader(fh))["record_id"]
    id_at = header.index("record_id")
    rows = [list(row) for row in rows[:300]]
    rows[140][id_at] = rows[10][id_at]  # chunk 1 repeats an id of chunk 0
    rows[250][id_at] = ""  # and has an empty id later
    both = tmp_path / "both.csv"
    with open(both, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *rows])
    rows[250][id_at] = "FRESH-1"
    rows[140][id_at] = known
    clash = tmp_path / "clash.csv"
    with open(clash, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *rows])

    for batch, expected in ((both, "row 251: empty 'record_id'"), (clash, f"row 141: record_id {known!r}")):
        with pytest.raises(SchemaError) as local:
            run_batch(bundle, batch, tmp_path / "local", reference_path=demo.records, chunk_rows=CHUNK_ROWS)
        with pytest.raises(SchemaError) as raised:
            score_spark(bundle, batch, tmp_path / "out", reference_path=demo.records, chunk_rows=CHUNK_ROWS)
        assert str(raised.value) == str(local.value)
        assert expected in str(raised.value)
        assert not (tmp_path / "out").exists()


def test_cli_engine_spark_exits_2_on_bad_input(spark, demo, bundle, tmp_path, capsys):
    model = tmp_path / "model"
    ModelBundle.save(bundle, model)
    header = demo.batch.read_text(encoding="utf-8").splitlines()[0]
    batch = tmp_path / "no_id.csv"
    batch.write_text(header.replace("record_id", "ident") + "\n", encoding="utf-8")
    code = main(
        [
            "score",
            "--model",
            str(model),
            "--input",
            str(batch),
            "--output",
            str(tmp_path / "o"),
            "--engine",
            "spark",
        ]
    )
    assert code == 2
    assert "missing column 'record_id'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_each_spark_chunk_starts_from_the_running_numbers_run_batch_carries(spark, demo, bundle):
    """The state before each chunk, entry days included (a later chunk's horizon reads them), is the one
    the in-process job builds chunk by chunk."""
    from pipeline.ingest import ReadOptions, iter_table
    from pipeline.spark import _linked_chunks, _read

    options = ReadOptions.from_config(bundle.config)
    batch = _read(spark, demo.batch, [], options)
    states = {k: linked.numbers for k, linked in enumerate(_linked_chunks(bundle, batch, None, CHUNK_ROWS))}
    assert bundle.errors.running_numbers().names, "the demo model checks running numbers"
    state = bundle.errors.running_numbers()
    chunks = list(iter_table(demo.batch, chunk_rows=CHUNK_ROWS, options=options))
    assert sorted(states) == list(range(len(chunks)))
    for k, chunk in enumerate(chunks):
        assert json.dumps(states[k], sort_keys=True) == json.dumps(state.to_dict(), sort_keys=True), k
        state = state.then(bundle.errors.running_numbers(chunk))


def test_links_across_chunk_borders_and_chains_match_the_in_process_job(spark, demo, bundle, tmp_path):
    """A record copied twice into later chunks of the batch: the copies link across chunk borders and join
    the original's cluster (the second copy through the first), the same bytes as the in-process job's."""
    from pipeline.spark import score_spark

    with open(demo.batch, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    id_at = header.index("record_id")
    first, second = list(rows[5]), list(rows[5])
    first[id_at], second[id_at] = "COPY-1", "COPY-2"
    rows = [*rows[:130], first, *rows[130:260], second, *rows[260:]]
    batch = tmp_path / "copies.csv"
    with open(batch, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *rows])

    run_batch(bundle, batch, tmp_path / "local", reference_path=demo.records, chunk_rows=CHUNK_ROWS)
    score_spark(bundle, batch, tmp_path / "spark", reference_path=demo.records, chunk_rows=CHUNK_ROWS)

    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "spark" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    with open(tmp_path / "spark" / s.RECORDS_FILE, newline="", encoding="utf-8") as fh:
        out = {r["record_id"]: r for r in csv.DictReader(fh)}
    original = out[rows[5][id_at]]
    assert out["COPY-1"][s.DUPLICATE_OF] != "" and out["COPY-2"][s.DUPLICATE_OF] != ""
    assert out["COPY-1"][s.CLUSTER_ID] == out["COPY-2"][s.CLUSTER_ID] == original[s.CLUSTER_ID]


def test_rows_duplicating_two_records_score_as_in_process(spark, demo, bundle, re_registrations, tmp_path):
    """Rows that duplicate a reference record and a slipped re-registration of it (their links'
    `reference_duplicate_positions`, whose values the error model takes into account): the same bytes as
    the in-process job's."""
    from pipeline.spark import score_spark

    run_batch(
        bundle, re_registrations, tmp_path / "local", reference_path=demo.records, chunk_rows=CHUNK_ROWS
    )
    score_spark(
        bundle, re_registrations, tmp_path / "spark", reference_path=demo.records, chunk_rows=CHUNK_ROWS
    )
    for name in (s.RECORDS_FILE, s.FLAGS_FILE):
        assert (tmp_path / "spark" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_spark_imports_no_private_name_of_another_module():
    """One matcher, two engines: Spark reaches the other modules through their public API only."""
    import ast

    import pipeline.spark

    tree = ast.parse(Path(pipeline.spark.__file__).read_text(encoding="utf-8"))
    imported = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline")
        for alias in node.names
    ]
    assert ("pipeline.score", "link_chunk") in imported and ("pipeline.score", "assess_chunk") in imported
    assert [name for _, name in imported if name.startswith("_")] == []
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
    ]
    assert private == []

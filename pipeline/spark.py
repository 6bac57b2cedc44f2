"""Scoring on Spark: the same model, the same contract outputs, for batches one machine cannot take.

`score_spark` writes what `pipeline.score.run_batch` writes (records.csv in input order with every input
column unchanged, flags.csv, summary.json, report.html, Parquet copies on request), with the work spread
over a Spark cluster:

* Reading: the batch (and reference) are read by Spark, every cell as text, "" for an empty cell, and
  numbered in file order (`_row`, 0-based data rows) so the output keeps input order and messages can name
  rows. Bad input is refused with the same one-line messages as the in-process path.
* Duplicates: each record's blocking keys (the duplicate model's own `_encode`) are exploded into
  (rule, key) rows, and only keys that occur in the batch are kept, so no executor holds the whole
  reference. Within a (rule, key) block, ordered as the in-process `Matcher` indexes records (the
  reference oldest first, then the batch in input order), a window over the `window` preceding rows gives
  each batch record its block's earlier members; their shared-key weights (1 / block size) are summed in
  rule order, the `top_k` kept, and the pairs scored with the model's comparison features and classifier,
  a bucket of records at a time. The best candidate at or above `threshold_` is the link; its reason is the
  model's reason. Cluster ids are resolved on the driver from the links (a matched record joins its
  match's cluster), as the `Matcher` does. The result is the same as in-process, candidate for candidate.
* Errors and anomalies: row-parallel, `mapInPandas` over contiguous ranges of rows, calling
  `pipeline.score.score_chunk` itself with the duplicate links computed above, so the error model gets the
  matched record's values exactly as in-process, and with the running-number state before each range
  (`ErrorModel.running_numbers`: what each range adds is computed in parallel, then folded in order on the
  driver, a few numbers per prefix and range).
* Writing: executors format their rows as CSV text (the same `csv` writer settings as `run_batch`); the
  driver streams the ranges in order into records.csv and writes flags, summary and report with the
  helpers of `pipeline.score` and `pipeline.report`, in a staging folder that is moved into place at the end.

How the model reaches the executors: the loaded bundle is saved to a temporary folder on the driver and
shipped with `SparkContext.addFile(folder, recursive=True)`; each executor's Python worker loads it once
from `SparkFiles.get(...)` and keeps it for the job. That works on `local[*]` and on a cluster alike; the
executors need the `pipeline` package (and its dependencies) installed in their Python, e.g. the same wheel
in the cluster's image or a virtualenv archive passed with `spark.archives`.

>>> # summary = score_spark(bundle, Path("batch.csv"), Path("out"), reference_path=Path("history.csv"),
>>> #                       master="spark://head:7077")
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import schema as s
from pipeline.bundle import ModelBundle
from pipeline.detectors import RunningNumbers
from pipeline.exceptions import BadInputError, InputFileError, OutputError, SchemaError
from pipeline.ingest import (
    DEFAULT_CHUNK_ROWS,
    FileFormat,
    ReadOptions,
    check_header,
    check_readable,
    detect_format,
    file_digest,
    is_excel,
    is_parquet,
    not_utf8_error,
)
from pipeline.score import (
    CSV_LINE_END,
    HISTOGRAM_BINS,
    SCORE_COLUMNS,
    empty_flags,
    prepare_output,
    publish,
    score_chunk,
    sort_flags,
    write_flags,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

logger = logging.getLogger(__name__)

ROW = "_row"
BAD = "_bad"
MONO = "_mono"
TKEY = "_tkey"
RULE = "_rule"
KEY = "_key"
# Rows per range of the final scoring stage and per group of the pair-scoring stage.
ROWS_PER_PARTITION = 100_000
PAIR_BUCKET_ROWS = 4096
PARTITION_BITS = 33  # monotonically_increasing_id: partition index above bit 33, row within it below
DEFAULT_CONF = {
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}

# Bundles loaded by this Python worker, by shipped folder name: loaded once, reused by later tasks.
_BUNDLES: dict[str, ModelBundle] = {}


@dataclass
class _Table:
    """A file read by Spark: `frame` has `_row` and the columns `c0..cN` (text, "" = missing)."""

    path: str
    frame: DataFrame
    header: list[str]
    rows: int

    def column(self, name: str) -> str:
        return f"c{self.header.index(name)}"


def score_spark(
    bundle: ModelBundle,
    input_path: str | Path,
    output: str | Path,
    *,
    reference_path: str | Path | None = None,
    master: str = "local[*]",
    overwrite: bool = False,
    output_format: str = "csv",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    spark_conf: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Scores a batch file on Spark into `output`, exactly as `run_batch` does. Returns the summary.

    `input_path` and `reference_path` are single CSV or Parquet files, local or on storage every executor
    can read (`hdfs://`, `s3a://`, ...). An active Spark session is reused (`master` and `spark_conf` are
    then ignored); otherwise one is started with `master` and `spark_conf` and stopped at the end.
    Raises `BadInputError` (exit 2) for bad input, as `run_batch` does.
    """
    from pipeline.report import build_summary, write_report

    started = time.perf_counter()
    output = Path(output)
    staging = prepare_output(output, overwrite=overwrite)
    shipped = Path(tempfile.mkdtemp(prefix="pipeline-spark-model-"))
    cached: list[DataFrame] = []
    spark, created = None, False
    try:
        spark, created = _session(master, spark_conf)
        config = bundle.config
        # Checked in run_batch's order, so a run with several faults reports the same one first.
        reference = None
        if reference_path is not None:
            reference = _read(spark, reference_path, cached, ReadOptions.from_config(config))
            _require(reference, config.required_columns(), what="configured")
            _check_ids(reference, config.id_column, chunk_rows=None, reference=None)
            # The error model's lookups also know the reference's records, as in run_batch: refreshed on
            # the driver from the configured columns, then shipped.
            names = [name for name in config.required_columns() if name in reference.header]
            stored = reference.frame.select(*[reference.column(name) for name in names]).toPandas()
            stored.columns = names
            bundle = dataclasses.replace(bundle, errors=bundle.errors.with_reference(stored))
        model = _ship_model(spark, bundle, shipped)
        batch = _read(spark, input_path, cached, ReadOptions.from_config(config))
        _require(batch, [config.id_column, *config.fields], what="configured")
        for name in s.RECORD_COLUMNS:
            if name in batch.header:
                raise OutputError(f"{input_path}: input already has an output column {name!r}")
        _check_ids(batch, config.id_column, chunk_rows=chunk_rows, reference=reference)
        logger.info(
            "spark: read and checked %d batch rows, %d reference rows (%.1f s)",
            batch.rows,
            reference.rows if reference else 0,
            time.perf_counter() - started,
        )

        links = _duplicate_links(spark, bundle, model, batch, reference).persist()
        cached.append(links)
        clusters = _clusters(links)
        logger.info("spark: %d duplicate links (%.1f s)", len(clusters), time.perf_counter() - started)
        numbers = _running_numbers(bundle, batch, chunk_rows)
        result = _score_rows(spark, bundle, model, batch, links, clusters, chunk_rows, numbers).persist()
        cached.append(result)

        parts = result.filter(result.part != "records").select("part", "payload").collect()
        flag_frames = [_flags_from_json(row.payload) for row in parts if row.part == "flags"]
        histograms = {name: np.zeros(HISTOGRAM_BINS, dtype=int) for name in SCORE_COLUMNS}
        for row in parts:
            if row.part == "hist":
                for name, counts in json.loads(row.payload).items():
                    histograms[name] += np.asarray(counts, dtype=int)
        logger.info("spark: scored %d rows (%.1f s)", batch.rows, time.perf_counter() - started)
        records_path = staging / s.RECORDS_FILE
        _write_records(result, records_path, batch.header)
        flags = sort_flags(pd.concat(flag_frames, ignore_index=True)) if flag_frames else empty_flags()
        write_flags(flags, staging, output_format)
        if output_format == "parquet":
            _records_parquet(records_path, staging / "records.parquet")
        summary = build_summary(
            bundle,
            flags=flags,
            rows=batch.rows,
            input_path=input_path,  # type: ignore[arg-type] # a URI stays as given
            input_digest=_digest(input_path),
            reference_rows=reference.rows if reference is not None else 0,
            seconds=time.perf_counter() - started,
        )
        summary["engine"] = {"name": "spark", "master": spark.sparkContext.master}
        write_report(summary, flags, histograms, staging)
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        for frame in cached:
            frame.unpersist()
        if created and spark is not None:
            spark.stop()
        shutil.rmtree(shipped, ignore_errors=True)
    return summary


# ------------------------------------------------------------------------------------- session and model


def _session(master: str, conf: dict[str, str] | None) -> tuple[SparkSession, bool]:
    """The active Spark session, or a new one (and True: the caller stops it)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise BadInputError(f"--engine spark needs PySpark: pip install 'pipeline[spark]' ({exc})") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        logger.info("spark: using the active session (master %s)", active.sparkContext.master)
        return active, False
    java_home = os.environ.get("JAVA_HOME")
    if not (java_home and Path(java_home, "bin", "java").exists()) and shutil.which("java") is None:
        raise BadInputError(
            "--engine spark needs a Java runtime (17 or later): install one (e.g. apt-get install "
            "openjdk-17-jre-headless) or set JAVA_HOME"
        )
    builder = SparkSession.builder.master(master).appName("pipeline score")
    settings = dict(DEFAULT_CONF)
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Local workers must import this package: run them with this interpreter (PySpark reads the
        # variable when the context starts; the `spark.pyspark.python` setting only serves spark-submit).
        os.environ["PYSPARK_PYTHON"] = sys.executable
    cores = _local_cores(master)
    if cores:
        # Spark's 200 shuffle partitions suit a cluster; on one machine a few per core keep tasks busy.
        settings["spark.sql.shuffle.partitions"] = str(4 * cores)
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate(), True
    except Exception as exc:  # noqa: BLE001 - a JVM that does not start is the user's setup to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise BadInputError(f"Spark did not start with master {master!r}: {first}") from None


def _local_cores(master: str) -> int | None:
    """The cores of a `local`, `local[N]` or `local[*]` master; None for a cluster."""
    if master == "local":
        return 1
    if master.startswith("local["):
        inside = master[len("local[") :].split(",")[0].rstrip("]")
        return os.cpu_count() or 1 if inside == "*" else int(inside) if inside.isdigit() else None
    return None


def _ship_model(spark: SparkSession, bundle: ModelBundle, folder: Path) -> str:
    """Saves the bundle (without its held-out data) and ships it to the executors; returns its name."""
    name = f"pipeline-bundle-{uuid.uuid4().hex}"
    dataclasses.replace(bundle, holdout=None).save(folder / name)
    spark.sparkContext.addFile(str(folder / name), recursive=True)
    return name


def _load_bundle(name: str) -> ModelBundle:
    """The shipped bundle, loaded once per Python worker (executor side)."""
    bundle = _BUNDLES.get(name)
    if bundle is None:
        from pyspark import SparkFiles

        _BUNDLES.clear()  # a worker outliving a job keeps only the latest model
        bundle = _BUNDLES[name] = ModelBundle.load(Path(SparkFiles.get(name)))
    return bundle


# ------------------------------------------------------------------------------------------------ reading


def _is_local(path: str | Path) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _local(path: str | Path) -> Path:
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def _digest(path: str | Path) -> str:
    return file_digest(_local(path)) if _is_local(path) else ""


def _read(spark: SparkSession, path: str | Path, cached: list[DataFrame], options: ReadOptions) -> _Table:
    """Reads a CSV or Parquet file as text and numbers its rows in file order (see `_Table`).

    A local CSV's separator and encoding are detected as `pipeline.ingest` does; a remote one is read
    with the config's `delimiter` and `encoding`, or as comma-separated UTF-8.
    """
    from pyspark.sql import functions as F

    if _is_local(path):
        check_readable(_local(path))
        uri = str(_local(path).resolve())
        fmt = detect_format(_local(path), options)
    else:
        uri = str(path)
        kind = "parquet" if is_parquet(Path(str(path))) else "xlsx" if is_excel(Path(str(path))) else "csv"
        fmt = FileFormat(kind, delimiter=options.delimiter or ",", encoding=options.encoding or "utf-8")
    if fmt.kind == "xlsx":
        raise InputFileError(
            f"{path}: the Spark engine reads CSV and Parquet, not .xlsx; save the sheet as CSV or Parquet, "
            "or score it with --engine local"
        )
    try:
        if fmt.kind == "parquet":
            raw, header = _read_parquet(spark, uri, path)
            has_bad = False
        else:
            raw, header = _read_csv(spark, uri, path, fmt)
            has_bad = True
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - Spark reports unreadable files as JVM errors
        raise InputFileError(f"{path}: cannot read ({_first_line(exc)})") from None
    raw = raw.withColumn(MONO, F.monotonically_increasing_id()).persist()
    cached.append(raw)
    columns = [f"c{i}" for i in range(len(header))]
    stats = _partition_stats(raw, columns, has_bad)
    if not stats and has_bad:
        raise InputFileError(f"{path}: file is empty (expected at least a header row)")
    offsets, total = {}, 0
    for partition in sorted(stats):
        offsets[partition] = total
        total += stats[partition]["n"]
    first_data = 1 if has_bad else 0  # a CSV's first row is its header

    def row_of(mono: int) -> int:
        return offsets[mono >> PARTITION_BITS] + (mono & ((1 << PARTITION_BITS) - 1)) - first_data

    if has_bad:
        header = [name or "" for name in stats[min(stats)]["first"]]
        header[0] = header[0].removeprefix("\ufeff")
        check_header(Path(str(path)), header)
        _check_cells(stats, row_of, path, header, fmt.delimiter)
    starts = F.create_map(*[F.lit(value) for item in offsets.items() for value in item])
    offset = F.element_at(starts, F.shiftright(F.col(MONO), PARTITION_BITS)) if offsets else F.lit(0)
    row = (offset + (F.col(MONO).bitwiseAND((1 << PARTITION_BITS) - 1)) - first_data).alias(ROW)
    numbered = raw.select(row, *columns).filter(F.col(ROW) >= 0)
    rows = total - first_data
    partitions = max(spark.sparkContext.defaultParallelism, math.ceil(rows / ROWS_PER_PARTITION), 1)
    frame = numbered.repartition(partitions, ROW).persist()
    cached.append(frame)
    frame.count()
    raw.unpersist()
    return _Table(path=str(path), frame=frame, header=list(header), rows=rows)


def _partition_stats(raw: DataFrame, columns: list[str], has_bad: bool) -> dict[int, dict[str, Any]]:
    """One pass over the file: per partition of the read, its row count, its first row, and the first
    malformed row and first row with undecodable bytes (by `monotonically_increasing_id`)."""
    from pyspark.sql import functions as F

    mono = F.col(MONO)
    aggregates = [F.count("*").alias("n"), F.min_by(F.array(*columns), mono).alias("first")]
    if has_bad:
        bad = F.col(BAD).isNotNull()
        replaced = F.concat_ws("", *columns).contains("\ufffd")  # Spark decodes bad bytes as U+FFFD
        aggregates += [
            F.min(F.when(bad, mono)).alias("bad"),
            F.min_by(F.col(BAD), F.when(bad, mono)).alias("bad_text"),
            F.min(F.when(replaced, mono)).alias("replaced"),
        ]
    grouped = raw.groupBy(F.shiftright(mono, PARTITION_BITS).alias("p")).agg(*aggregates)
    return {row["p"]: row.asDict() for row in grouped.collect()}


def _read_csv(
    spark: SparkSession, uri: str, path: str | Path, fmt: FileFormat
) -> tuple[DataFrame, list[str]]:
    from pyspark.sql.types import StringType, StructField, StructType

    reader = (
        spark.read.option("header", False)
        .option("multiLine", True)
        .option("escape", '"')
        .option("sep", fmt.delimiter)
        .option("encoding", _spark_charset(path, fmt.encoding))
        .option("inferSchema", False)
    )
    width = len(reader.csv(uri).columns)
    schema = StructType(
        [StructField(f"c{i}", StringType()) for i in range(width)] + [StructField(BAD, StringType())]
    )
    frame = (
        reader.schema(schema).option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", BAD).csv(uri)
    )
    from pyspark.sql import functions as F

    # The header row decides the width; an empty cell is "" (Spark reads it as null).
    cells = [F.coalesce(F.col(f"c{i}"), F.lit(s.MISSING)) for i in range(width)]
    if fmt.encoding == "cp1252":
        cells = [F.translate(cell, _LATIN1_C1, _CP1252_C1) for cell in cells]
    cells = [cell.alias(f"c{i}") for i, cell in enumerate(cells)]
    return frame.select(*cells, BAD), [f"c{i}" for i in range(width)]


def _read_parquet(spark: SparkSession, uri: str, path: str | Path) -> tuple[DataFrame, list[str]]:
    from pyspark.sql.types import StringType, StructField, StructType

    frame = spark.read.parquet(uri)
    header = list(frame.columns)
    check_header(Path(str(path)), header)
    columns = [f"c{i}" for i in range(len(header))]
    schema = StructType([StructField(name, StringType()) for name in columns])
    return frame.mapInArrow(_arrow_as_text, schema), header


def _arrow_as_text(batches: Iterator[Any]) -> Iterator[Any]:
    """Every column cast to text with Arrow, null as "" (as `pipeline.ingest` reads Parquet)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for batch in batches:
        columns = []
        for column in batch.columns:
            text = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
            columns.append(pc.fill_null(text, s.MISSING))
        yield pa.RecordBatch.from_arrays(columns, names=[f"c{i}" for i in range(len(columns))])


# Spark 4 decodes CSV in a few charsets only. Windows-1252 is read as ISO-8859-1, which agrees with it on
# every byte but 0x80-0x9F; those are then mapped to Windows-1252's characters (the five bytes it leaves
# undefined never get this far: `detect_format` refuses them).
_SPARK_CHARSETS = {"utf-8": "UTF-8", "utf-16": "UTF-16", "iso8859-1": "ISO-8859-1", "cp1252": "ISO-8859-1"}
_C1_BYTES = bytes(b for b in range(0x80, 0xA0) if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D))
_LATIN1_C1, _CP1252_C1 = _C1_BYTES.decode("latin-1"), _C1_BYTES.decode("cp1252")


def _spark_charset(path: str | Path, encoding: str) -> str:
    """The charset Spark reads a file in that Python reads in `encoding`."""
    charset = _SPARK_CHARSETS.get(encoding)
    if charset is None:
        raise InputFileError(
            f"{path}: the Spark engine reads CSV in UTF-8 or Windows-1252, not {encoding}; save the file as "
            "UTF-8, or score it with --engine local"
        )
    return charset


def _check_cells(
    stats: dict[int, dict[str, Any]], row_of: Any, path: str | Path, header: list[str], delimiter: str = ","
) -> None:
    """The first row with too many or too few cells, or with bytes that are not UTF-8, is an error."""
    bad = min(
        ((row_of(p["bad"]), p["bad_text"]) for p in stats.values() if p["bad"] is not None), default=None
    )
    replaced = min((row_of(p["replaced"]) for p in stats.values() if p["replaced"] is not None), default=None)
    if replaced is not None and (bad is None or replaced < bad[0]) and not _valid_utf8(path):
        if _is_local(path):
            raise not_utf8_error(_local(path))
        raise InputFileError(f"{path}: row {replaced + 1} is not UTF-8 text; save the file as UTF-8")
    if bad is not None:
        cells = len(next(csv.reader(io.StringIO(bad[1]), delimiter=delimiter), []))
        raise InputFileError(f"{path}: row {bad[0] + 1} has {cells} cells, the header has {len(header)}")


def _valid_utf8(path: str | Path) -> bool:
    """Whether a file is UTF-8 (a U+FFFD may be in the text itself); remote files are assumed not."""
    if not _is_local(path):
        return False
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(_local(path), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else exc.__class__.__name__


# --------------------------------------------------------------------------------------------- validation


def _require(table: _Table, columns: list[str], *, what: str) -> None:
    missing = [name for name in columns if name not in table.header]
    if missing:
        raise SchemaError(
            f"{table.path}: missing column {missing[0]!r} ({what}); the file has {table.header[:12]}"
        )


def _check_ids(table: _Table, id_column: str, *, chunk_rows: int | None, reference: _Table | None) -> None:
    """Empty and repeated ids, with `pipeline.ingest.check_unique_ids`' messages and precedence.

    The in-process job checks chunk by chunk (`chunk_rows`; None = the whole file at once): in the first
    chunk with a fault, an empty id first, then an id repeated within the chunk, then one seen before
    (earlier chunks or the reference). The same fault is reported here.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ids = table.frame.select(ROW, F.col(table.column(id_column)).alias("id"))
    chunk = F.floor(F.col(ROW) / chunk_rows) if chunk_rows else F.lit(0)
    ids = ids.withColumn("chunk", chunk)
    by_id = Window.partitionBy("id").orderBy(ROW)
    ids = ids.withColumn("previous", F.lag(ROW).over(by_id)).withColumn(
        "first", F.min(ROW).over(Window.partitionBy("id"))
    )
    previous_chunk = F.floor(F.col("previous") / chunk_rows) if chunk_rows else F.lit(0)
    first_chunk = F.floor(F.col("first") / chunk_rows) if chunk_rows else F.lit(0)
    seen = F.col("first") < F.col(ROW)
    seen = seen & (first_chunk < F.col("chunk"))
    if reference is not None:
        known = reference.frame.select(F.col(reference.column(id_column)).alias("id")).distinct()
        ids = ids.join(known.withColumn("in_reference", F.lit(True)), "id", "left")
        seen = seen | F.col("in_reference").isNotNull()
    fault = (
        F.when(F.col("id") == s.MISSING, 0)
        .when(F.col("previous").isNotNull() & (previous_chunk == F.col("chunk")), 1)
        .when(seen, 2)
    )
    first = ids.withColumn("fault", fault).filter(F.col("fault").isNotNull())
    found = first.orderBy("chunk", "fault", ROW).limit(1).collect()
    if not found:
        return
    row, value = found[0][ROW], found[0]["id"]
    if found[0]["fault"] == 0:
        raise SchemaError(f"{table.path}: row {row + 1}: empty {id_column!r}; every record needs an id")
    raise SchemaError(f"{table.path}: row {row + 1}: {id_column} {value!r} appears more than once")


# ------------------------------------------------------------------------------------------------ duplicates


def _model_columns(bundle: ModelBundle, table: _Table) -> list[str]:
    """The columns the duplicate model reads: the id, all config fields, and the time column if present."""
    config = bundle.config
    names = [config.id_column, *config.fields]
    if config.time_column and config.time_column in table.header:
        names.append(config.time_column)
    return [name for name in names if name in table.header]


def _records(bundle: ModelBundle, table: _Table, prefix: str) -> DataFrame:
    """The model's columns of a table, named `<prefix><real name index>` (see `_frame_of`)."""
    from pyspark.sql import functions as F

    names = _model_columns(bundle, table)
    return table.frame.select(
        F.col(ROW), *[F.col(table.column(name)).alias(f"{prefix}{i}") for i, name in enumerate(names)]
    )


def _frame_of(pdf: pd.DataFrame, prefix: str, names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({name: pdf[f"{prefix}{i}"].to_numpy(dtype=object) for i, name in enumerate(names)})
    return frame.fillna(s.MISSING)


def _duplicate_links(
    spark: SparkSession, bundle: ModelBundle, model: str, batch: _Table, reference: _Table | None
) -> DataFrame:
    """Per batch row with any candidate: its best candidate, score, link flag, reason, matched values."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    duplicates = bundle.duplicates
    window, top_k = int(duplicates.window), int(duplicates.top_k)
    batch_names = _model_columns(bundle, batch)
    keys = _records(bundle, batch, "b").mapInPandas(
        _keys_of(model, "b", batch_names, is_batch=True),
        f"{TKEY} double, {ROW} long, {RULE} int, {KEY} string",
    )
    others = _records(bundle, batch, "o").withColumn("o_batch", F.lit(True))
    if reference is not None:
        reference_names = _model_columns(bundle, reference)
        reference_keys = _records(bundle, reference, "r").mapInPandas(
            _keys_of(model, "r", reference_names, is_batch=False),
            f"{TKEY} double, {ROW} long, {RULE} int, {KEY} string",
        )
        in_batch = keys.select(RULE, KEY).distinct()
        keys = keys.unionByName(reference_keys.join(in_batch, [RULE, KEY], "left_semi"))
        # The reference rows as "other" records, with the batch's column layout ("" where it lacks one).
        layout = [
            F.col(reference.column(name)).alias(f"o{i}")
            if name in reference.header
            else F.lit("").alias(f"o{i}")
            for i, name in enumerate(batch_names)
        ]
        others = others.unionByName(
            reference.frame.select(F.col(ROW), *layout).withColumn("o_batch", F.lit(False))
        )
    # Each block in the Matcher's indexing order: the reference oldest first (unknown time first, then
    # file order), then the batch in input order (its _tkey is +inf).
    block = Window.partitionBy(RULE, KEY).orderBy(TKEY, ROW)
    preceding = F.collect_list(F.struct(TKEY, ROW)).over(block.rowsBetween(-window, -1))
    queries = (
        keys.withColumn("n_before", F.row_number().over(block) - 1)
        .withColumn("preceding", preceding)
        .filter((F.col(TKEY) == float("inf")) & (F.col("n_before") > 0))
        .select(
            F.col(ROW).alias("q_row"),
            RULE,
            (F.lit(1.0) / F.col("n_before")).alias("weight"),
            F.explode("preceding").alias("other"),
        )
    )
    # Summed in rule order, as the Matcher adds them, so ties between candidates break the same way.
    # Partitioned by record once: the sum per candidate and the top_k per record need no further shuffle.
    shared = (
        queries.repartition("q_row")
        .groupBy("q_row", F.col("other." + TKEY).alias("o_tkey"), F.col("other." + ROW).alias("o_row"))
        .agg(
            F.aggregate(
                F.array_sort(F.collect_list(F.struct(RULE, "weight"))),
                F.lit(0.0),
                lambda total, item: total + item["weight"],
            ).alias("shared")
        )
    )
    rank = Window.partitionBy("q_row").orderBy(F.desc("shared"), F.desc("o_tkey"), F.desc("o_row"))
    pairs = shared.withColumn("rank", F.row_number().over(rank)).filter(F.col("rank") <= top_k)
    pairs = pairs.withColumn("o_batch", F.col("o_tkey") == float("inf")).drop("rank", "shared")
    pairs = pairs.join(_records(bundle, batch, "q").withColumnRenamed(ROW, "q_row"), "q_row").join(
        others.withColumnRenamed(ROW, "o_row"), ["o_row", "o_batch"]
    )
    pairs = pairs.join(_density(bundle, model, batch, reference), "q_row", "left")
    fields = list(bundle.config.fields)
    schema = (
        "q_row long, record_id string, candidate_id string, score double, linked boolean, reason string, "
        + ", ".join(f"m{i} string" for i in range(len(fields)))
    )
    bucket = F.floor(F.col("q_row") / PAIR_BUCKET_ROWS)
    return pairs.groupBy(bucket.alias("bucket")).applyInPandas(_best_of(model, batch_names), schema)


def _density(bundle: ModelBundle, model: str, batch: _Table, reference: _Table | None) -> DataFrame:
    """Per batch row, for each match field i: `dn{i}`, how many records indexed up to it (the reference
    oldest first, then the batch in input order; itself included) hold its value, and `dt{i}`, how many
    hold any value: the counts the in-process `Matcher` keeps for its density penalty."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    schema = f"{TKEY} double, {ROW} long, {RULE} int, {KEY} string"
    names = _model_columns(bundle, batch)
    values = _records(bundle, batch, "v").mapInPandas(_values_of(model, "v", names, is_batch=True), schema)
    if reference is not None:
        reference_names = _model_columns(bundle, reference)
        values = values.unionByName(
            _records(bundle, reference, "v").mapInPandas(
                _values_of(model, "v", reference_names, is_batch=False), schema
            )
        )
    counted = (
        values.withColumn("n", F.row_number().over(Window.partitionBy(RULE, KEY).orderBy(TKEY, ROW)))
        .withColumn("t", F.row_number().over(Window.partitionBy(RULE).orderBy(TKEY, ROW)))
        .filter(F.col(TKEY) == float("inf"))
    )
    fields = range(len(bundle.duplicates.plugins_))
    return counted.groupBy(F.col(ROW).alias("q_row")).agg(
        *[F.max(F.when(F.col(RULE) == i, F.col("n"))).alias(f"dn{i}") for i in fields],
        *[F.max(F.when(F.col(RULE) == i, F.col("t"))).alias(f"dt{i}") for i in fields],
    )


def _values_of(model: str, prefix: str, names: list[str], *, is_batch: bool) -> Any:
    """Executor side: each record's match-field values as the matcher counts them, one row per field
    (`_rule` = the field's index), with its order key."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        duplicates = _load_bundle(model).duplicates
        for pdf in batches:
            if not len(pdf):
                continue
            frame = _frame_of(pdf, prefix, names)
            rows = pdf[ROW].to_numpy(dtype=np.int64)
            _, times = duplicates.blocking_keys(frame)
            tkey = np.full(len(rows), np.inf) if is_batch else np.where(np.isnan(times), -np.inf, times)
            for field, values in enumerate(duplicates.match_values(frame).values()):
                values = np.asarray(values, dtype=object)
                present = values != s.MISSING
                if present.any():
                    yield pd.DataFrame(
                        {TKEY: tkey[present], ROW: rows[present], RULE: field, KEY: values[present]}
                    )

    return run


def _keys_of(model: str, prefix: str, names: list[str], *, is_batch: bool) -> Any:
    """Executor side: each record's non-empty blocking keys, one row per rule, with its order key."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        duplicates = _load_bundle(model).duplicates
        for pdf in batches:
            if not len(pdf):
                continue
            keys, times = duplicates.blocking_keys(_frame_of(pdf, prefix, names))
            rows = pdf[ROW].to_numpy(dtype=np.int64)
            tkey = np.full(len(rows), np.inf) if is_batch else np.where(np.isnan(times), -np.inf, times)
            for rule, values in enumerate(keys):
                values = np.asarray(values, dtype=object)
                present = values != s.MISSING
                if present.any():
                    yield pd.DataFrame(
                        {TKEY: tkey[present], ROW: rows[present], RULE: rule, KEY: values[present]}
                    )

    return run


def _best_of(model: str, names: list[str]) -> Any:
    """Executor side: scores a bucket of candidate pairs with the model's features and classifier and keeps
    each record's best (highest score, then most recently indexed), with the model's reason when linked."""

    def run(pdf: pd.DataFrame) -> pd.DataFrame:
        bundle = _load_bundle(model)
        duplicates = bundle.duplicates
        fields = list(bundle.config.fields)
        n = len(pdf)
        width = len(duplicates.plugins_)
        density = tuple(
            pdf[[f"{prefix}{i}" for i in range(width)]].fillna(0).to_numpy(dtype=np.int64)
            for prefix in ("dn", "dt")
        )
        pairs = duplicates.matcher(None).score_pairs(
            _frame_of(pdf, "q", names), _frame_of(pdf, "o", names), density
        )
        scores = pairs.scores
        query = pdf["q_row"].to_numpy(dtype=np.int64)
        tkey = pdf["o_tkey"].to_numpy(dtype=float)
        other = pdf["o_row"].to_numpy(dtype=np.int64)
        order = np.lexsort((-other, -tkey, -scores, query))
        first = np.ones(n, dtype=bool)
        first[1:] = query[order][1:] != query[order][:-1]
        chosen = order[first]
        linked = scores[chosen] >= duplicates.threshold_
        reasons = [pairs.reason(int(i)) if ok else s.MISSING for i, ok in zip(chosen, linked, strict=True)]
        out = {
            "q_row": query[chosen],
            "record_id": [pairs.left_id(int(i)) for i in chosen],
            "candidate_id": [pairs.right_id(int(i)) for i in chosen],
            "score": scores[chosen],
            "linked": linked,
            "reason": reasons,
        }
        for j, name in enumerate(fields):
            values = [pairs.right_value(int(i), name) for i in chosen]
            out[f"m{j}"] = np.where(linked, np.asarray(values, dtype=object), s.MISSING)
        return pd.DataFrame(out)

    return run


def _clusters(links: DataFrame) -> dict[int, str]:
    """Cluster ids of the linked rows, resolved on the driver in input order as the Matcher does: a linked
    record joins its match's cluster (an earlier linked batch record's) or the match's own id. The links
    are few (one per flagged duplicate); unlinked rows are their own cluster."""
    from pyspark.sql import functions as F

    linked = links.filter(F.col("linked")).select("q_row", "record_id", "candidate_id").collect()
    cluster: dict[str, str] = {}
    by_row: dict[int, str] = {}
    for row, record_id, candidate_id in sorted(linked):
        cluster[record_id] = by_row[row] = cluster.get(candidate_id, candidate_id)
    return by_row


# ----------------------------------------------------------------------------------------- scoring rows


class _LinkedMatcher:
    """Stands in for `Matcher` in `score_chunk`: the links and matched values computed by Spark."""

    def __init__(self, links: pd.DataFrame, matched: dict[str, dict[str, str]]) -> None:
        self._links = links
        self._matched = matched

    def match(self, chunk: pd.DataFrame) -> pd.DataFrame:
        return self._links.loc[chunk.index]

    def record(self, record_id: str) -> dict[str, str] | None:
        return self._matched.get(record_id)


def _score_rows(
    spark: SparkSession,
    bundle: ModelBundle,
    model: str,
    batch: _Table,
    links: DataFrame,
    clusters: dict[int, str],
    chunk_rows: int,
    numbers: dict[int, dict],
) -> DataFrame:
    """Row-parallel scoring with `score_chunk`, one `chunk_rows` chunk of input rows at a time, each with
    the running-number state before it (`numbers`, by chunk; `_running_numbers`). One output row per
    piece, in input order: ("records", first row, CSV text), ("flags", first row, JSON), ("hist", first
    row, JSON)."""
    from pyspark.sql import functions as F

    config = bundle.config
    cluster_of = spark.sparkContext.broadcast(clusters)
    numbers_of = spark.sparkContext.broadcast(numbers)
    joined = batch.frame.join(links.withColumnRenamed("q_row", ROW), ROW, "left")
    header = batch.header
    fields = list(config.fields)
    id_position = header.index(config.id_column)

    def run(pdf: pd.DataFrame) -> pd.DataFrame:
        bundle = _load_bundle(model)
        clusters_by_row = cluster_of.value
        pdf = pdf.sort_values(ROW, kind="stable").reset_index(drop=True)
        rows = pdf[ROW].to_numpy(dtype=np.int64)
        chunk = pd.DataFrame(
            {name: pdf[f"c{i}"].to_numpy(dtype=object) for i, name in enumerate(header)},
            index=pd.Index(rows),
        )
        ids = chunk.iloc[:, id_position].to_numpy(dtype=object)
        linked = pdf["linked"].fillna(False).to_numpy(dtype=bool)
        duplicate_of = np.where(linked, pdf["candidate_id"].fillna(s.MISSING).to_numpy(dtype=object), "")
        cluster = np.array(
            [clusters_by_row.get(int(r), i) if ok else i for r, i, ok in zip(rows, ids, linked, strict=True)],
            dtype=object,
        )
        frame = pd.DataFrame(
            {
                s.DUPLICATE_OF: duplicate_of.astype(object),
                s.DUPLICATE_SCORE: pdf["score"].fillna(0.0).to_numpy(dtype=float),
                s.CLUSTER_ID: cluster,
                "reason": pdf["reason"].fillna(s.MISSING).to_numpy(dtype=object),
            },
            index=chunk.index,
        )
        matched = {
            candidate: {name: pdf[f"m{j}"].iloc[k] for j, name in enumerate(fields)}
            for k, candidate in enumerate(duplicate_of)
            if linked[k]
        }
        state = numbers_of.value.get(int(rows[0]) // chunk_rows)
        before = RunningNumbers.from_dict(state) if state is not None else None
        result = score_chunk(chunk, bundle, _LinkedMatcher(frame, matched), before)
        out = pd.concat([chunk, result.columns], axis=1)
        text = io.StringIO()
        csv.writer(text, lineterminator=CSV_LINE_END).writerows(out.itertuples(index=False, name=None))
        histograms = {
            name: np.histogram(
                result.columns[name].to_numpy(dtype=float), bins=HISTOGRAM_BINS, range=(0.0, 1.0)
            )[0].tolist()
            for name in SCORE_COLUMNS
        }
        start = int(rows[0])
        pieces = [("records", start, text.getvalue()), ("hist", start, json.dumps(histograms))]
        if len(result.flags):
            pieces.append(("flags", start, _flags_to_json(result.flags)))
        return pd.DataFrame(pieces, columns=["part", "start", "payload"])

    chunks = joined.groupBy(F.floor(F.col(ROW) / chunk_rows).alias("chunk"))
    return chunks.applyInPandas(run, "part string, start long, payload string").orderBy("start", "part")


def _running_numbers(bundle: ModelBundle, batch: _Table, chunk_rows: int) -> dict[int, dict]:
    """The error model's running-number state before each `chunk_rows` chunk (`RunningNumbers.to_dict`),
    as `run_batch` carries it from chunk to chunk: what each chunk adds, computed in parallel from the
    running-number fields and the entry time alone, folded in chunk order on the driver. Empty when the
    model has none."""
    from pyspark.sql import functions as F

    start = bundle.errors.running_numbers()
    if not start.names:
        return {}
    # The running-number fields and the entry time (the state keeps each number's entry day, which the
    # horizon of a later chunk's expectations reads), as `run_batch` gives them.
    names, time_column = start.names, bundle.config.time_column
    wanted = [*names, *([time_column] if time_column in batch.header else [])]
    columns = {name: batch.column(name) for name in wanted}

    def adds(pdf: pd.DataFrame) -> pd.DataFrame:
        pdf = pdf.sort_values(ROW, kind="stable")
        chunk = pd.DataFrame({name: pdf[column].to_numpy(dtype=object) for name, column in columns.items()})
        # `ErrorModel.running_numbers(chunk)`, without shipping the model to the executors.
        payload = json.dumps(RunningNumbers(names).advance(chunk, time_column).to_dict())
        return pd.DataFrame({"chunk": [int(pdf[ROW].iloc[0]) // chunk_rows], "payload": [payload]})

    frame = batch.frame.select(ROW, *columns.values())
    parts = (
        frame.groupBy(F.floor(F.col(ROW) / chunk_rows).alias("chunk"))
        .applyInPandas(adds, "chunk long, payload string")
        .collect()
    )
    added = {int(row.chunk): RunningNumbers.from_dict(json.loads(row.payload)) for row in parts}
    before, state = {}, start
    for chunk in sorted(added):
        before[chunk] = state.to_dict()
        state = state.then(added[chunk])
    return before


def _flags_to_json(flags: pd.DataFrame) -> str:
    columns = ["_row", *s.FLAG_COLUMNS]
    data = {
        name: [v.item() if isinstance(v, np.generic) else v for v in flags[name].tolist()] for name in columns
    }
    return json.dumps(data)


def _flags_from_json(payload: str) -> pd.DataFrame:
    data = json.loads(payload)
    frame = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in data.items()})
    frame["_row"] = frame["_row"].astype(np.int64)
    frame[s.FLAG_SCORE] = frame[s.FLAG_SCORE].astype(float)
    return frame


# ---------------------------------------------------------------------------------------------- writing


def _write_records(result: DataFrame, path: Path, header: list[str]) -> None:
    """Streams the executors' CSV text into records.csv, range by range in input order."""
    from pyspark.sql import functions as F

    last = -1
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator=CSV_LINE_END).writerow([*header, *s.RECORD_COLUMNS])
        pieces = result.filter(F.col("part") == "records").select("start", "payload")
        for start, text in pieces.toLocalIterator(prefetchPartitions=True):
            if start <= last:
                raise RuntimeError(f"spark: records arrived out of order (row {start} after {last})")
            last = start
            fh.write(text)


def _records_parquet(records_path: Path, target: Path) -> None:
    """records.csv as Parquet (all text), as `run_batch` writes it, streamed in chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for chunk in pd.read_csv(
            records_path, dtype=str, keep_default_na=False, chunksize=DEFAULT_CHUNK_ROWS
        ):
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(target, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()

"""Scoring on Spark: the same model, the same contract outputs, for batches one machine cannot take.

`score_spark` writes what `pipeline.score.run_batch` writes (records.csv in input order with every input
column unchanged, flags.csv, summary.json, report.html, Parquet copies on request), with the work spread
over a Spark cluster:

* Reading: the batch is read by Spark, every cell as text, "" for an empty cell, and numbered in file
  order (`_row`, 0-based data rows) so the output keeps input order and messages can name rows; it is
  cached in the read's partitions (no shuffle). A local reference is read and prepared on the driver by
  `pipeline.reference.prepare_reference`, with its cache, as `run_batch` does (the driver holds the index
  anyway); a remote one is read by Spark and collected. Bad input is refused with the same one-line
  messages as the in-process path; ids are checked on the driver by `pipeline.ingest.check_unique_ids`,
  chunk by chunk as `run_batch` checks them.
* Duplicates: on the driver, by the in-process job's own code. The batch's id, field, time and
  running-number columns are streamed to the driver chunk by chunk in input order (one Arrow collect per
  `chunk_rows` chunk of the cached batch, the next one collected while this one is linked) and given
  `pipeline.score.LINK_ROWS` rows at a time to `pipeline.score.link_chunk` with the matcher
  `DuplicateModel.matcher(reference, evict=True)`, as `run_batch` does: the same candidates, scores,
  tie-breaks, clusters and reasons by construction, not by a second implementation. The matcher's index is
  sequential state (each record is compared with every record indexed before it), so it lives in one
  process: the driver holds the reference's index (the `window` latest records of each block and the
  values they need, as in-process), no executor does. The running-number state before each part is
  carried in the same pass, as `run_batch --workers` carries it. The duplicate stage therefore runs at one
  core's speed whatever the cluster, and the driver needs the memory the in-process job needs for the index.
* Errors and anomalies: on the executors, one Spark job of one task per linked part (`LINK_ROWS` rows),
  calling `pipeline.score.assess_chunk` itself with the part's links, matched values and running-number
  state (shipped with the task), so every part is judged exactly as in-process. The driver links the next
  parts meanwhile, at most four per core of the cluster ahead, as `run_batch --workers` does.
* Writing: executors format their rows as CSV text (the same `csv` writer settings as `run_batch`); the
  driver appends the parts in input order to records.csv, spills their flags as sorted runs
  (`pipeline.score.FlagRuns`) merged into flags.csv and counted as they are (`pipeline.score.finish_flags`),
  and writes summary and report with the helpers of `pipeline.report`, in a staging folder that is moved
  into place at the end.

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
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
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
    SeenIds,
    check_header,
    check_readable,
    check_unique_ids,
    detect_format,
    file_digest,
    is_excel,
    is_parquet,
    not_utf8_error,
)
from pipeline.reference import PreparedReference, ReferenceCache, prepare_reference
from pipeline.score import (
    CSV_LINE_END,
    HISTOGRAM_BINS,
    LINK_ROWS,
    SCORE_COLUMNS,
    FlagRuns,
    assess_chunk,
    empty_flags,
    finish_flags,
    link_chunk,
    prepare_output,
    publish,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

logger = logging.getLogger(__name__)

ROW = "_row"
BAD = "_bad"
MONO = "_mono"
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
    """A file read by Spark: `frame` has `_row` and the columns `c0..cN` (text, "" = missing).

    `frame` is a projection of the read as cached, in its partitions, with each row's
    `monotonically_increasing_id` (`_mono`: the partition above bit 33, the row within it below), which
    rises with `_row`; `starts` maps each partition to the file row its first row is (`first_data` is 1
    when the file's first row is its header)."""

    path: str
    frame: DataFrame
    header: list[str]
    rows: int
    starts: dict[int, int] = dataclasses.field(default_factory=dict)
    first_data: int = 0

    def column(self, name: str) -> str:
        return f"c{self.header.index(name)}"

    def rows_between(self, start: int, stop: int) -> Any:
        """A filter for the rows `start` to `stop` (exclusive) by their `_mono` range, which the cache's
        column-batch statistics answer: only the batches holding these rows are read."""
        from pyspark.sql import functions as F

        stop = min(stop, self.rows)
        if start >= stop:
            return F.lit(False)
        return F.col(MONO).between(self.mono_of(start), self.mono_of(stop - 1))

    def mono_of(self, row: int) -> int:
        line = row + self.first_data
        partition = max(p for p, first in self.starts.items() if first <= line)
        return (partition << PARTITION_BITS) + line - self.starts[partition]


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
    cache: ReferenceCache | None = None,
) -> dict[str, Any]:
    """Scores a batch file on Spark into `output`, exactly as `run_batch` does. Returns the summary.

    `input_path` and `reference_path` are single CSV or Parquet files, local or on storage every executor
    can read (`hdfs://`, `s3a://`, ...). An active Spark session is reused (`master` and `spark_conf` are
    then ignored); otherwise one is started with `master` and `spark_conf` and stopped at the end. A local
    reference is prepared on the driver by `pipeline.reference.prepare_reference`, from `cache` when it
    holds it, as `run_batch` prepares it (the driver holds the matcher's index anyway).
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
        logger.debug("spark: session ready (%.1f s)", time.perf_counter() - started)
        config = bundle.config
        # Checked in run_batch's order, so a run with several faults reports the same one first.
        reference = None
        if reference_path is not None:
            reference = _prepared_reference(spark, bundle, reference_path, cached, cache)
            # The error model's lookups also know the reference's records, as in run_batch; then shipped.
            bundle = dataclasses.replace(bundle, errors=reference.errors)
            logger.debug("spark: reference read and checked (%.1f s)", time.perf_counter() - started)
        model = _ship_model(spark, bundle, shipped)
        logger.debug("spark: model shipped (%.1f s)", time.perf_counter() - started)
        batch = _read(spark, input_path, cached, ReadOptions.from_config(config))
        _require(batch, [config.id_column, *config.fields], what="configured")
        for name in s.RECORD_COLUMNS:
            if name in batch.header:
                raise OutputError(f"{input_path}: input already has an output column {name!r}")
        logger.info(
            "spark: read %d batch rows, %d reference rows (%.1f s)",
            batch.rows,
            reference.rows if reference is not None else 0,
            time.perf_counter() - started,
        )

        runs = FlagRuns(staging / ".flag-runs")
        histograms = {name: np.zeros(HISTOGRAM_BINS, dtype=int) for name in SCORE_COLUMNS}
        records_path = staging / s.RECORDS_FILE
        with open(records_path, "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh, lineterminator=CSV_LINE_END).writerow([*batch.header, *s.RECORD_COLUMNS])
            for text, chunk_flags, chunk_histograms in _scored_chunks(
                spark, bundle, model, batch, reference, chunk_rows
            ):
                fh.write(text)
                runs.add(chunk_flags)
                for name, counts in chunk_histograms.items():
                    histograms[name] += np.asarray(counts, dtype=int)
        reference_rows = reference.rows if reference is not None else 0
        del reference
        logger.info("spark: scored %d rows (%.1f s)", batch.rows, time.perf_counter() - started)
        # From here on as `run_batch`: flags merged from the sorted runs, counted for summary and report.
        flags = finish_flags(runs, staging, output_format)
        summary = build_summary(
            bundle,
            flags=flags,
            rows=batch.rows,
            input_path=input_path,  # type: ignore[arg-type] # a URI stays as given
            input_digest=_digest(input_path),
            reference_rows=reference_rows,
            reference_path=reference_path,  # type: ignore[arg-type] # a URI stays as given
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


def _prepared_reference(
    spark: SparkSession,
    bundle: ModelBundle,
    path: str | Path,
    cached: list[DataFrame],
    cache: ReferenceCache | None,
) -> PreparedReference:
    """The reference as `run_batch` prepares it: the error model whose lookups know it, the matcher indexing
    it, its ids and rows. All of it lives on the driver, so a local file is read there by the in-process
    code (`prepare_reference`, with its cache and messages); a remote one (or a workbook, refused) by Spark,
    its configured columns then collected and prepared the same way."""
    config = bundle.config
    options = ReadOptions.from_config(config)
    if _is_local(path) and not is_excel(_local(path)):
        return prepare_reference(bundle, _local(path), options=options, cache=cache)
    table = _read(spark, path, cached, options)
    _require(table, config.required_columns(), what="configured")
    stored = table.frame.select(*[table.column(name) for name in config.required_columns()]).toPandas()
    stored.columns = config.required_columns()
    check_unique_ids(stored[config.id_column], source=table.path, id_column=config.id_column)
    errors = bundle.errors.with_reference(stored)
    matcher = bundle.duplicates.matcher(stored, evict=True)
    return PreparedReference(errors, matcher, stored[config.id_column].tolist(), table.rows)


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
    # The cached read as it is, in file order within each partition: `_mono` rises with `_row`, so a range
    # of rows is a range of `_mono` that the cache's batch statistics answer (`_Table.rows_between`),
    # without a shuffle into sorted ranges or a second cached copy of the batch.
    frame = raw.select(row, *columns, MONO).filter(F.col(ROW) >= 0)
    rows = total - first_data
    return _Table(str(path), frame, list(header), rows, starts=offsets, first_data=first_data)


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


# ------------------------------------------------------------------------------------ duplicates, then rows


@dataclass
class _LinkedChunk:
    """One chunk of input rows (`start` to `stop`) after the driver's pass: what `link_chunk` gave for it
    and the running-number state before it (`RunningNumbers.to_dict`)."""

    start: int
    stop: int
    links: pd.DataFrame
    matched: pd.DataFrame | None
    numbers: dict[str, Any]


def _driver_columns(bundle: ModelBundle, batch: _Table) -> list[str]:
    """The columns the driver's pass reads: what the matcher reads (the id, every config field, the time
    column) and the running-number fields."""
    config = bundle.config
    names = [config.id_column, *config.fields, *bundle.errors.running_numbers().names]
    if config.time_column:
        names.append(config.time_column)
    return [name for name in dict.fromkeys(names) if name in batch.header]


def _batch_chunks(batch: _Table, names: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The batch's `names` columns, `chunk_rows` rows at a time in input order, indexed by row number as
    `pipeline.ingest.iter_table` indexes them: one small Arrow collect per chunk (the cached frame's rows
    rise within each column batch, so a chunk reads few of them). The next chunk is collected while the
    caller works on this one: its Spark job is queued before the executors' jobs for this chunk's parts, so
    the driver's pass, the one sequential stage, never waits behind them for a free core."""
    from concurrent.futures import ThreadPoolExecutor

    from pyspark.sql import functions as F

    columns = [F.col(batch.column(name)).alias(f"k{i}") for i, name in enumerate(names)]

    def fetch(start: int) -> pd.DataFrame:
        started = time.perf_counter()
        pdf = (
            batch.frame.filter(batch.rows_between(start, start + chunk_rows)).select(ROW, *columns).toPandas()
        )
        logger.debug("spark: rows %d+ fetched (%.1f s)", start, time.perf_counter() - started)
        pdf = pdf.sort_values(ROW, kind="stable")
        return pd.DataFrame(
            {name: pdf[f"k{i}"].to_numpy(dtype=object) for i, name in enumerate(names)},
            index=pd.Index(pdf[ROW].to_numpy(dtype=np.int64)),
        )

    starts = range(0, batch.rows, chunk_rows)
    with ThreadPoolExecutor(1, thread_name_prefix="pipeline-spark-fetch") as pool:
        ahead = pool.submit(fetch, starts[0]) if starts else None
        for start in starts:
            chunk = ahead.result()
            ahead = pool.submit(fetch, start + chunk_rows) if start + chunk_rows < batch.rows else None
            yield chunk


def _linked_chunks(
    bundle: ModelBundle, batch: _Table, reference: PreparedReference | None, chunk_rows: int
) -> Iterator[_LinkedChunk]:
    """The driver's pass: the duplicate links of every part of the batch, made by the in-process job's own
    code (the batch streamed here in input order, chunk by chunk, each chunk given `LINK_ROWS` rows at a
    time to `pipeline.score.link_chunk` with the matcher `pipeline.reference.build_reference` builds, as
    `link_chunk` cuts it itself: the same links), and the running numbers carried from part to part as
    `run_batch` carries them. The index is sequential state (each record is matched against every earlier
    one), so it lives in one place: here, not on the executors. Ids are checked chunk by chunk against the
    reference's and the earlier chunks', as `run_batch` checks them, so the same fault is reported first.

    Each part is yielded as soon as it is linked, so executors assess it while the next is linked: a part
    scores as it would within its chunk (a row's result depends on its row, its match and the running
    numbers before it only), as `run_batch --workers` relies on too.
    """
    id_column = bundle.config.id_column
    seen = SeenIds()  # as hashes, as `run_batch` keeps them (a set of a million ids was ~100 MB)
    if reference is not None:
        matcher = reference.matcher
        seen.add(reference.ids)
    else:
        matcher = bundle.duplicates.matcher(None, evict=True)
    state = bundle.errors.running_numbers()
    for chunk in _batch_chunks(batch, _driver_columns(bundle, batch), chunk_rows):
        check_unique_ids(chunk[id_column], source=batch.path, id_column=id_column, seen=seen)
        for start in range(0, len(chunk), LINK_ROWS):
            part = chunk.iloc[start : start + LINK_ROWS]
            before = state
            state = state.then(bundle.errors.running_numbers(part))
            started = time.perf_counter()
            links, matched = link_chunk(part, bundle, matcher)
            logger.debug("spark: rows %d+ linked (%.1f s)", part.index[0], time.perf_counter() - started)
            yield _LinkedChunk(int(part.index[0]), int(part.index[-1]) + 1, links, matched, before.to_dict())


def _scored_chunks(
    spark: SparkSession,
    bundle: ModelBundle,
    model: str,
    batch: _Table,
    reference: PreparedReference | None,
    chunk_rows: int,
) -> Iterator[tuple[str, pd.DataFrame, dict[str, list[int]]]]:
    """Each part's records (CSV text), flags (with `_row`) and score histograms, in input order.

    While the driver links part after part, the executors assess the parts already linked: one Spark job
    of one task per part, at most four per core of the cluster in flight, so every core has the next part
    queued when it finishes one, and the driver's linking, the one sequential stage, goes on while the
    executors start their Python workers and load the model (the first parts take several times longer
    there), with memory still bounded (a part's links and its CSV text, a few MB).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    in_flight = 4 * max(spark.sparkContext.defaultParallelism, 1)
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(in_flight, thread_name_prefix="pipeline-spark") as pool:
        try:
            for linked in _linked_chunks(bundle, batch, reference, chunk_rows):
                pending.append(pool.submit(_assess_on_executor, model, batch, linked))
                while len(pending) > in_flight or (pending and pending[0].done()):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _assess_on_executor(
    model: str, batch: _Table, linked: _LinkedChunk
) -> tuple[str, pd.DataFrame, dict[str, list[int]]]:
    """One chunk scored by `pipeline.score.assess_chunk` in one executor task: its rows read from the
    cached batch there, its links and running-number state shipped with the task."""
    started = time.perf_counter()
    frame = batch.frame.filter(batch.rows_between(linked.start, linked.stop)).drop(MONO).coalesce(1)
    pieces = frame.mapInPandas(_assess(model, batch.header, linked), "part string, payload string").collect()
    logger.debug("spark: rows %d+ assessed (%.1f s)", linked.start, time.perf_counter() - started)
    by_part = {row.part: row.payload for row in pieces}
    flags = _flags_from_json(by_part["flags"]) if "flags" in by_part else empty_flags()
    return by_part["records"], flags, json.loads(by_part["hist"])


def _assess(model: str, header: list[str], linked: _LinkedChunk) -> Any:
    """Executor side of `_assess_on_executor`."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        parts = [pdf for pdf in batches if len(pdf)]
        if not parts:
            return
        bundle = _load_bundle(model)
        pdf = pd.concat(parts, ignore_index=True).sort_values(ROW, kind="stable")
        chunk = pd.DataFrame(
            {name: pdf[f"c{i}"].to_numpy(dtype=object) for i, name in enumerate(header)},
            index=pd.Index(pdf[ROW].to_numpy(dtype=np.int64)),
        )
        if not chunk.index.equals(linked.links.index):
            raise RuntimeError(f"spark: rows {linked.start}-{linked.stop} did not arrive whole")
        numbers = RunningNumbers.from_dict(linked.numbers)
        result = assess_chunk(chunk, bundle, linked.links, linked.matched, numbers)
        # Column by column as NumPy object arrays, zipped into rows, as `run_batch` writes them (walking
        # Arrow-backed text with `itertuples` is several times slower).
        columns = [
            frame.iloc[:, j].to_numpy(dtype=object)
            for frame in (chunk, result.columns)
            for j in range(frame.shape[1])
        ]
        text = io.StringIO()
        csv.writer(text, lineterminator=CSV_LINE_END).writerows(zip(*columns, strict=True))
        histograms = {
            name: np.histogram(
                result.columns[name].to_numpy(dtype=float), bins=HISTOGRAM_BINS, range=(0.0, 1.0)
            )[0].tolist()
            for name in SCORE_COLUMNS
        }
        pieces = [("records", text.getvalue()), ("hist", json.dumps(histograms))]
        if len(result.flags):
            pieces.append(("flags", _flags_to_json(result.flags)))
        yield pd.DataFrame(pieces, columns=["part", "payload"])

    return run


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

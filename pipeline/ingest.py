"""Reading records and logs exactly as they are: every cell as text, an empty cell as missing.

CSV is parsed with the standard `csv` module rather than pandas' parser, because the contract needs what
pandas quietly smooths over: a row with too many or too few cells is an error naming the row, `NA` and
`null` stay text, leading zeros stay, and bytes that are not UTF-8 are reported by line. Parquet columns
are cast to text with Arrow. Both are read in chunks of rows so a batch of any size fits in memory.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.exceptions import InputFileError, SchemaError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 50_000
PARQUET_SUFFIXES = (".parquet", ".pq")

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class TableInfo:
    """What was read: the columns, the row count and a SHA-256 digest of the file's bytes."""

    path: Path
    columns: list[str]
    rows: int
    digest: str


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, in hex; logged instead of any content."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    if path.is_dir():
        raise InputFileError(f"{path}: is a folder, expected a CSV or Parquet file")
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror})") from None
    if not first:
        raise InputFileError(f"{path}: file is empty (expected at least a header row)")


def iter_table(path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Yields the file's rows as DataFrames of text (empty string = missing), `chunk_rows` at a time.

    The index of each chunk continues the row numbers of the file (0-based data rows), so messages can
    name the row. At least one (possibly empty) chunk is yielded, carrying the header's columns.
    """
    path = Path(path)
    _check_readable(path)
    if is_parquet(path):
        yield from _iter_parquet(path, chunk_rows)
    else:
        yield from _iter_csv(path, chunk_rows)


def _iter_csv(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        try:
            header = next(reader)
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        except csv.Error as exc:
            raise InputFileError(f"{path}: line 1: malformed CSV header ({exc})") from None
        _check_header(path, header)
        width = len(header)
        rows: list[list[str]] = []
        start = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError:
                raise _not_utf8(path) from None
            except csv.Error as exc:
                raise InputFileError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
            if len(row) != width:
                if not row:  # a blank line is not a row
                    continue
                raise InputFileError(
                    f"{path}: row {start + len(rows) + 1} (line {reader.line_num}) has {len(row)} cells, "
                    f"the header has {width}"
                )
            rows.append(row)
            if len(rows) == chunk_rows:
                yield _frame(rows, header, start)
                start += len(rows)
                rows = []
        if rows or start == 0:
            yield _frame(rows, header, start)


def _not_utf8(path: Path) -> InputFileError:
    """The error for a file that is not UTF-8, naming the line of the first bad byte.

    The text reader decodes ahead in blocks, so its position says nothing; the bytes are scanned again.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line = newlines + block.count(b"\n", 0, max(exc.start, 0)) + 1
                return InputFileError(
                    f"{path}: line {line} is not UTF-8 text (byte {offset + exc.start}); "
                    "save the file as UTF-8"
                )
            offset += len(block)
            newlines += block.count(b"\n")
    return InputFileError(f"{path}: is not UTF-8 text; save the file as UTF-8")


def _frame(rows: list[list[str]], header: list[str], start: int) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame.index = pd.RangeIndex(start, start + len(rows))
    return frame


def _check_header(path: Path, header: Sequence[str]) -> None:
    if not header or all(not name.strip() for name in header):
        raise InputFileError(f"{path}: the first line must be a header row naming the columns")
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        if name == "":
            raise InputFileError(f"{path}: header column {position} has no name")
        if name in seen:
            raise InputFileError(f"{path}: header names column {name!r} twice")
        seen.add(name)


def _iter_parquet(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputFileError(f"{path}: not a readable Parquet file ({exc})") from None
    header = parquet.schema_arrow.names
    _check_header(path, header)
    start = 0
    for batch in parquet.iter_batches(batch_size=chunk_rows):
        columns = {}
        for name, column in zip(header, batch.columns, strict=True):
            text = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
            columns[name] = pc.fill_null(text, "").to_numpy(zero_copy_only=False).astype(object)
        frame = pd.DataFrame(columns, columns=header, dtype=object)
        frame.index = pd.RangeIndex(start, start + len(frame))
        start += len(frame)
        yield frame
    if start == 0:
        yield _frame([], list(header), 0)


def read_table(path: str | Path) -> pd.DataFrame:
    """Reads a whole (history-sized) file as text; see `iter_table`."""
    chunks = list(iter_table(path))
    frame = pd.concat(chunks) if len(chunks) > 1 else chunks[0]
    logger.info("read %s: %d rows, %d columns", path, len(frame), frame.shape[1])
    return frame


def require_columns(frame: pd.DataFrame, columns: Sequence[str], *, source: str | Path, what: str) -> None:
    """Raises `SchemaError` naming the first of `columns` the frame lacks."""
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise SchemaError(
            f"{source}: missing column {missing[0]!r} ({what}); the file has {list(frame.columns)[:12]}"
        )


def check_unique_ids(
    ids: pd.Series, *, source: str | Path, id_column: str, seen: set[str] | None = None
) -> None:
    """Raises `SchemaError` naming the first empty or repeated id (also against ids in `seen`)."""
    empty = ids.index[ids == ""]
    if len(empty):
        raise SchemaError(f"{source}: row {empty[0] + 1}: empty {id_column!r}; every record needs an id")
    repeated = ids.index[ids.duplicated()]
    if len(repeated):
        row = repeated[0]
        raise SchemaError(f"{source}: row {row + 1}: {id_column} {ids[row]!r} appears more than once")
    if seen:
        clash = ids.index[ids.isin(seen)]
        if len(clash):
            row = clash[0]
            raise SchemaError(f"{source}: row {row + 1}: {id_column} {ids[row]!r} appears more than once")

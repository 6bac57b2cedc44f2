"""Reading records and logs as departments export them: every cell as text, an empty cell as missing.

Three kinds of file, told apart by the file name and confirmed by the first bytes:

- **CSV** separated by `,` `;` tab or `|`, in UTF-8 (with or without BOM) or Windows-1252. Both the
  separator and the encoding are detected; `ReadOptions` (the config's `delimiter` and `encoding`)
  overrides either. Parsed with the standard `csv` module rather than pandas' parser, because the
  contract needs what pandas quietly smooths over: a row with too many or too few cells is an error
  naming the row, `NA` and `null` stay text, leading zeros stay.
- **Excel `.xlsx`** through openpyxl in read-only mode (it streams rows, so a large sheet fits in memory):
  the first sheet, or `ReadOptions.sheet`. Cells become the text Excel would show in a CSV export.
- **Parquet**, every column cast to text with Arrow.

All are read in chunks of rows, so a batch of any size fits in memory. A guess that does not fit is never
silent: rows that do not line up with the header under the detected separator, or bytes that are neither
UTF-8 nor Windows-1252, are errors that name the file, what was tried and the config key that fixes it.

>>> options = ReadOptions(delimiter=";", encoding="windows-1252")
>>> options.encoding
'cp1252'
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
import io
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import pandas as pd

from pipeline.duplicates.sorted_runs import SortedRuns
from pipeline.exceptions import InputFileError, SchemaError
from pipeline.memory import collector_paused

if TYPE_CHECKING:
    from pipeline.config import Config

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 50_000
PARQUET_SUFFIXES = (".parquet", ".pq")
EXCEL_SUFFIXES = (".xlsx", ".xlsm")
DELIMITERS: Final = (",", ";", "\t", "|")
UTF8: Final = "utf-8"
CP1252: Final = "cp1252"
UTF16: Final = "utf-16"

_DELIMITER_ALIASES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
_ENCODING_LABELS = {UTF8: "UTF-8", CP1252: "Windows-1252", UTF16: "UTF-16"}
# The five bytes Windows-1252 leaves undefined: a file holding one is not Windows-1252 text.
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")
_SNIFF_BYTES = 1 << 16
_BLOCK = 1 << 20
# Read to check that a file is text in its encoding: each block is decoded to a str and dropped. Decoded
# 1 MiB at a time, the freed strs left ~130 MB of free heap at 2,000,000 rows (under the batch job's
# `memory.map_large_allocations`), resident until the first chunk was done; 64 KiB ones reuse their room.
_DECODE_BLOCK = 1 << 16
_MAGIC_PARQUET = b"PAR1"
_MAGIC_ZIP = b"PK\x03\x04"
_MAGIC_OLE = b"\xd0\xcf\x11\xe0"  # the old binary .xls

csv.field_size_limit(sys.maxsize)


# ------------------------------------------------------------------------------------------------ options


def parse_delimiter(value: str) -> str:
    """One of `,` `;` tab `|`; `tab` and a literal backslash-t (YAML's `'\\t'`) also mean tab."""
    delimiter = _DELIMITER_ALIASES.get(value.lower(), value) if isinstance(value, str) else value
    if delimiter not in DELIMITERS:
        raise ValueError(f"delimiter {value!r} is not one of ',' ';' '|' or tab (write tab as \"\\t\")")
    return delimiter


def parse_encoding(value: str) -> str:
    """A text encoding Python knows, by its canonical name (`windows-1252` -> `cp1252`)."""
    try:
        info = codecs.lookup(value)
    except (LookupError, TypeError):
        raise ValueError(f"encoding {value!r} is unknown; use utf-8 or cp1252 (Windows-1252)") from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"encoding {value!r} is not a text encoding; use utf-8 or cp1252 (Windows-1252)")
    return "utf-8" if info.name in ("utf-8", "utf-8-sig") else info.name


@dataclass(frozen=True)
class ReadOptions:
    """How to read input files; `None` means detect. The config's `delimiter`, `encoding` and `sheet`.

    `delimiter` and `encoding` apply to CSV files, `sheet` to `.xlsx` workbooks; each is ignored for the
    other kinds, so one config serves a department whose history is a workbook and whose log is a CSV.
    """

    delimiter: str | None = None
    encoding: str | None = None
    sheet: str | None = None

    def __post_init__(self) -> None:
        if self.delimiter is not None:
            object.__setattr__(self, "delimiter", parse_delimiter(self.delimiter))
        if self.encoding is not None:
            object.__setattr__(self, "encoding", parse_encoding(self.encoding))

    @classmethod
    def from_config(cls, config: Config) -> ReadOptions:
        """The options a config names (all `None`, i.e. detect, in a config without them)."""
        return cls(
            delimiter=getattr(config, "delimiter", None),
            encoding=getattr(config, "encoding", None),
            sheet=getattr(config, "sheet", None),
        )


DETECT: Final = ReadOptions()
# The product's own output files (records.csv, flags.csv): always UTF-8 and comma-separated.
OUTPUT_CSV: Final = ReadOptions(delimiter=",", encoding=UTF8)


@dataclass(frozen=True)
class FileFormat:
    """How a file is read: its kind and, for CSV, the separator and encoding (detected or configured)."""

    kind: Literal["csv", "xlsx", "parquet"]
    delimiter: str = ","
    encoding: str = UTF8
    sheet: str | None = None
    delimiter_detected: bool = True
    encoding_detected: bool = True

    def describe(self) -> str:
        """E.g. `separator ';' (detected), encoding Windows-1252 (set in the config)`."""
        if self.kind == "parquet":
            return "Parquet"
        if self.kind == "xlsx":
            return f"sheet {self.sheet!r}" if self.sheet else "the first sheet"
        return (
            f"separator {_show(self.delimiter)} ({_source(self.delimiter_detected)}), "
            f"encoding {encoding_label(self.encoding)} ({_source(self.encoding_detected)})"
        )


def _show(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else repr(delimiter)


def _source(detected: bool) -> str:
    return "detected" if detected else "set in the config"


def _yaml_delimiter(delimiter: str) -> str:
    return '"\\t"' if delimiter == "\t" else repr(delimiter)


def encoding_label(encoding: str) -> str:
    """The name a user knows an encoding by: `cp1252` -> `Windows-1252`."""
    return _ENCODING_LABELS.get(encoding, encoding)


# ------------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class TableInfo:
    """What was read: the columns, the row count and a SHA-256 digest of the file's bytes."""

    path: Path
    columns: list[str]
    rows: int
    digest: str


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def is_excel(path: Path) -> bool:
    return path.suffix.lower() in EXCEL_SUFFIXES


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, in hex; logged instead of any content."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            sha.update(block)
    return sha.hexdigest()


def check_readable(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: file not found")
    if path.is_dir():
        raise InputFileError(f"{path}: is a folder, expected a CSV, .xlsx or Parquet file")
    try:
        with open(path, "rb") as fh:
            first = fh.read(1)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror})") from None
    if not first:
        raise InputFileError(f"{path}: file is empty (expected at least a header row)")


def detect_format(path: str | Path, options: ReadOptions = DETECT) -> FileFormat:
    """Decides how to read a file: by its name, its first bytes and, for CSV, its text.

    Encoding: strict UTF-8 when every byte is (a BOM is dropped), else Windows-1252; a file that mixes
    the two, or holds a byte Windows-1252 leaves undefined, is refused. Separator: the candidate that
    splits the header into most columns with every sampled row the header's width.
    """
    path = Path(path)
    check_readable(path)
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if head.startswith(_MAGIC_OLE) or path.suffix.lower() == ".xls":
        raise InputFileError(f"{path}: is an old Excel .xls workbook; save it from Excel as .xlsx or CSV")
    if is_parquet(path) or (head.startswith(_MAGIC_PARQUET) and not is_excel(path)):
        return FileFormat("parquet")
    if is_excel(path) or head.startswith(_MAGIC_ZIP):
        return FileFormat("xlsx", sheet=options.sheet)
    encoding = options.encoding or _detect_encoding(path, head)
    delimiter = options.delimiter or _detect_delimiter(path, head, encoding)
    return FileFormat(
        "csv",
        delimiter=delimiter,
        encoding=encoding,
        delimiter_detected=options.delimiter is None,
        encoding_detected=options.encoding is None,
    )


def _detect_encoding(path: Path, head: bytes) -> str:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not head.startswith(codecs.BOM_UTF8):
        return UTF16
    decoder = codecs.getincrementaldecoder(UTF8)()
    offset = newlines = 0
    non_ascii_line = None  # the first line holding UTF-8 text beyond ASCII
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_DECODE_BLOCK), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                start = max(exc.start, 0)
                line = newlines + block.count(b"\n", 0, start) + 1
                if non_ascii_line is None and not block[:start].removeprefix(codecs.BOM_UTF8).isascii():
                    non_ascii_line = _first_non_ascii_line(block[:start], newlines)
                return _cp1252_or_refuse(path, fh, block, offset, newlines, line, start, non_ascii_line)
            if non_ascii_line is None and not block.removeprefix(codecs.BOM_UTF8).isascii():
                non_ascii_line = _first_non_ascii_line(block, newlines)
            offset += len(block)
            newlines += block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        line = newlines + 1
        raise InputFileError(
            f"{path}: line {line} is not UTF-8 text (the file ends inside a character); "
            "save the file as UTF-8, or set `encoding` in the config"
        ) from None
    return UTF8


def _first_non_ascii_line(block: bytes, newlines: int) -> int:
    body = block.removeprefix(codecs.BOM_UTF8)
    skipped = len(block) - len(body)
    position = next(i for i, byte in enumerate(body) if byte >= 0x80) + skipped
    return newlines + block.count(b"\n", 0, position) + 1


def _cp1252_or_refuse(
    path: Path,
    fh: Any,
    block: bytes,
    offset: int,
    newlines: int,
    line: int,
    start: int,
    non_ascii_line: int | None,
) -> str:
    """The file is not UTF-8 from byte `offset + start` on: Windows-1252, unless it mixes or cannot be."""
    where = f"line {line} is not UTF-8 text (byte {offset + start})"
    if non_ascii_line is not None:
        raise InputFileError(
            f"{path}: {where}, but line {non_ascii_line} is: the file mixes encodings; save it as UTF-8, "
            f"or set `encoding: cp1252` in the config to read it all as Windows-1252"
        )
    while block:
        undefined = _CP1252_UNDEFINED.search(block)
        if undefined:
            bad_line = newlines + block.count(b"\n", 0, undefined.start()) + 1
            raise InputFileError(
                f"{path}: {where}, nor Windows-1252 (byte 0x{block[undefined.start()]:02x} on line "
                f"{bad_line}); save the file as UTF-8, or set `encoding` in the config to its encoding"
            )
        newlines += block.count(b"\n")
        block = fh.read(_BLOCK)
    return CP1252


def _detect_delimiter(path: Path, head: bytes, encoding: str) -> str:
    whole = path.stat().st_size <= len(head)
    text = codecs.getincrementaldecoder(_open_encoding(encoding))(errors="replace").decode(head, final=whole)
    fits: dict[str, int] = {}  # separators under which every sampled row is the header's width
    fallback, fallback_width = ",", 1
    for delimiter in DELIMITERS:
        widths, broken = _sample_widths(text, delimiter, whole)
        if not widths:
            continue
        width = widths[0]
        if width > 1 and not broken and all(w == width for w in widths[1:]):
            fits[delimiter] = width
        if width > fallback_width:
            fallback, fallback_width = delimiter, width
    if not fits:
        return fallback  # reading will name the first row that does not fit
    chosen = max(fits, key=lambda d: fits[d])  # the first of equals, in the order of DELIMITERS
    tied = [d for d in fits if d != chosen and fits[d] == fits[chosen]]
    if tied:
        logger.warning(
            "%s: separators %s and %s both fit; read with %s (set `delimiter` in the config to choose)",
            path,
            _show(chosen),
            _show(tied[0]),
            _show(chosen),
        )
    return chosen


def _sample_widths(text: str, delimiter: str, whole: bool) -> tuple[list[int], bool]:
    """Cells per non-blank row of a sample; the last row is dropped when the sample is cut off."""
    widths: list[int] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    broken = False
    try:
        for row in reader:
            if row:
                widths.append(len(row))
    except csv.Error:
        broken = whole  # in a cut-off sample the error may be the cut itself
    if not whole and len(widths) > 1:
        widths.pop()
    return widths, broken


def _open_encoding(encoding: str) -> str:
    return "utf-8-sig" if encoding == UTF8 else encoding


# --------------------------------------------------------------------------------------------- iterating


def iter_table(
    path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS, *, options: ReadOptions = DETECT
) -> Iterator[pd.DataFrame]:
    """Yields the file's rows as DataFrames of text (empty string = missing), `chunk_rows` at a time.

    The index of each chunk continues the row numbers of the file (0-based data rows), so messages can
    name the row. At least one (possibly empty) chunk is yielded, carrying the header's columns.
    """
    path = Path(path)
    fmt = detect_format(path, options)
    if fmt.kind == "parquet":
        yield from _iter_parquet(path, chunk_rows)
    elif fmt.kind == "xlsx":
        yield from _iter_xlsx(path, chunk_rows, fmt)
    else:
        logger.debug("%s: reading CSV with %s", path, fmt.describe())
        yield from _iter_csv(path, chunk_rows, fmt)


def _iter_csv(path: Path, chunk_rows: int, fmt: FileFormat) -> Iterator[pd.DataFrame]:
    with open(path, encoding=_open_encoding(fmt.encoding), newline="") as fh:
        reader = csv.reader(fh, delimiter=fmt.delimiter, strict=True)
        try:
            header = next(reader)
        except UnicodeDecodeError:
            raise _not_decodable(path, fmt) from None
        except csv.Error as exc:
            raise InputFileError(f"{path}: line 1: malformed CSV header ({exc}; {fmt.describe()})") from None
        except StopIteration:
            header = []
        check_header(path, header)
        _check_single_column(path, header, fmt)
        yield from _chunks(_csv_rows(path, reader, header, fmt), header, chunk_rows)


def _csv_rows(path: Path, reader: Any, header: list[str], fmt: FileFormat) -> Iterator[list[str]]:
    """The data rows of a CSV reader past its header, each as wide as the header (blank lines skipped)."""
    width = len(header)
    count = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise _not_decodable(path, fmt) from None
        except csv.Error as exc:
            raise InputFileError(
                f"{path}: line {reader.line_num}: malformed CSV ({exc}; {fmt.describe()})"
            ) from None
        if len(row) != width:
            if not row:  # a blank line is not a row
                continue
            raise _ragged(path, count + 1, reader.line_num, row, header, fmt)
        count += 1
        yield row


def _chunks(rows: Iterator[list[str]], header: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Rows grouped into frames of `chunk_rows`; at least one (possibly empty) frame, with the header."""
    start = 0
    while True:
        # A chunk's cells are many small strings and no cycles, which the collector would walk again
        # and again while they are read (a quarter of the reading time); on again before the frame goes.
        with collector_paused():
            chunk = list(islice(rows, chunk_rows))
            frame = _frame(chunk, header, start) if chunk or start == 0 else None
        if frame is None:
            return
        yield frame
        if len(chunk) < chunk_rows:
            return
        start += len(chunk)


def _check_single_column(path: Path, header: list[str], fmt: FileFormat) -> None:
    """A one-column header holding another separator is a separator read wrongly, not a column name."""
    if len(header) != 1:
        return
    others = [d for d in DELIMITERS if d != fmt.delimiter and d in header[0]]
    if others:
        raise InputFileError(
            f"{path}: the header is one column {header[0][:60]!r} read with {fmt.describe()}; it holds "
            f"{_show(others[0])}: set `delimiter: {_yaml_delimiter(others[0])}` in the config"
        )


def _ragged(
    path: Path, row_number: int, line: int, row: list[str], header: list[str], fmt: FileFormat
) -> InputFileError:
    """Too many or too few cells: says which separator was used and what would line the row up."""
    message = (
        f"{path}: row {row_number} (line {line}) has {len(row)} cells, the header has {len(header)} "
        f"(read with {fmt.describe()})"
    )
    for other in DELIMITERS:
        if other == fmt.delimiter:
            continue
        head = _resplit(header, fmt.delimiter, other)
        if len(head) > 1 and len(_resplit(row, fmt.delimiter, other)) == len(head):
            return InputFileError(f"{message}; set `delimiter: {_yaml_delimiter(other)}` in the config")
    if fmt.delimiter_detected:
        fix = (
            f"put values holding {_show(fmt.delimiter)} in double quotes, or set `delimiter` in the config "
            "to the file's separator"
        )
    else:
        fix = (
            f"check `delimiter` in the config, or put values holding {_show(fmt.delimiter)} in double quotes"
        )
    return InputFileError(f"{message}; {fix}")


def _resplit(cells: list[str], delimiter: str, other: str) -> list[str]:
    return next(csv.reader([delimiter.join(cells)], delimiter=other), [])


def _not_decodable(path: Path, fmt: FileFormat) -> InputFileError:
    """The error for text that does not decode, naming the line of the first bad byte.

    The text reader decodes ahead in blocks, so its position says nothing; the bytes are scanned again.
    """
    label = encoding_label(fmt.encoding)
    source = _source(fmt.encoding_detected)
    if fmt.encoding_detected:
        fix = "save the file as UTF-8"
    else:
        fix = (
            "set `encoding` in the config to the encoding the file was saved in (cp1252 for Windows-1252), "
            "or leave `encoding` out to have it detected"
        )
    decoder = codecs.getincrementaldecoder(fmt.encoding)()
    offset = newlines = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_DECODE_BLOCK), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line = newlines + block.count(b"\n", 0, max(exc.start, 0)) + 1
                return InputFileError(
                    f"{path}: line {line} is not {label} text (byte {offset + exc.start}; encoding {label} "
                    f"{source}); {fix}"
                )
            offset += len(block)
            newlines += block.count(b"\n")
    return InputFileError(f"{path}: is not {label} text (encoding {label} {source}); {fix}")


def not_utf8_error(path: Path) -> InputFileError:
    """The error for a file read as UTF-8 that is not (the Spark engine's reader uses it too)."""
    return _not_decodable(path, FileFormat("csv", encoding=UTF8))


def _frame(rows: list[list[str]], header: list[str], start: int) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame.index = pd.RangeIndex(start, start + len(rows))
    return frame


def check_header(path: Path, header: Sequence[str]) -> None:
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
    check_header(path, header)
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


# ------------------------------------------------------------------------------------------------- Excel


def _iter_xlsx(path: Path, chunk_rows: int, fmt: FileFormat) -> Iterator[pd.DataFrame]:
    """A sheet's rows as text. Fully empty rows are skipped, as blank lines are in a CSV; the first
    non-empty row is the header."""
    try:
        import openpyxl
    except ImportError:  # pragma: no cover - a dependency, but say what to do if it was left out
        raise InputFileError(f"{path}: reading .xlsx needs openpyxl: pip install 'openpyxl>=3.1'") from None
    # A file object, not the name: openpyxl refuses names without an Excel suffix, and the content
    # (a zip archive) already said this is a workbook.
    fh = open(path, "rb")  # noqa: SIM115 - closed in the finally below, after the last row
    try:
        book = openpyxl.load_workbook(fh, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl reports a damaged workbook with many exception types
        fh.close()
        raise InputFileError(
            f"{path}: not a readable .xlsx workbook ({exc.__class__.__name__}: {exc}); "
            "save it from Excel as .xlsx, or export it as CSV"
        ) from None
    try:
        if fmt.sheet is None:
            sheet = book.worksheets[0]
        elif fmt.sheet in book.sheetnames:
            sheet = book[fmt.sheet]
        else:
            names = ", ".join(repr(name) for name in book.sheetnames)
            raise InputFileError(
                f"{path}: has no sheet {fmt.sheet!r} (set in the config); its sheets are {names}: "
                "set `sheet` in the config to one of them"
            )
        yield from _iter_sheet(path, sheet, chunk_rows)
    finally:
        book.close()
        fh.close()


def _iter_sheet(path: Path, sheet: Any, chunk_rows: int) -> Iterator[pd.DataFrame]:
    where = f"sheet {sheet.title!r}"
    values = enumerate(sheet.iter_rows(values_only=True), start=1)
    header: list[str] = []
    for _, cells in values:
        if any(cell is not None for cell in cells):
            header = [cell_text(cell) for cell in cells]
            while header and header[-1] == "":
                header.pop()
            break
    if not header:
        raise InputFileError(f"{path}: {where} is empty (expected at least a header row)")
    check_header(path, header)
    yield from _chunks(_sheet_rows(path, where, values, len(header)), header, chunk_rows)


def _sheet_rows(path: Path, where: str, values: Iterator, width: int) -> Iterator[list[str]]:
    """The data rows of a sheet past its header, as text, each as wide as the header (empty rows skipped)."""
    count = 0
    for excel_row, cells in values:
        if all(cell is None for cell in cells):
            continue
        row = [cell_text(cell) for cell in cells]
        if len(row) > width:
            beyond = next((i for i in range(width, len(row)) if row[i] != ""), None)
            if beyond is not None:
                raise InputFileError(
                    f"{path}: row {count + 1} ({where} row {excel_row}) has a value in column "
                    f"{_column_letter(beyond)}, beyond the header's {width} columns; name that column "
                    "in the header row or clear the cell"
                )
            del row[width:]
        elif len(row) < width:
            row.extend([""] * (width - len(row)))
        count += 1
        yield row


def cell_text(value: object) -> str:
    """An Excel cell as the text a CSV export would hold.

    Text as is; a whole number without a decimal point (`123`, also when stored as `123.0`); other
    numbers in their shortest exact form; dates as ISO `YYYY-MM-DD`, with the time only when it is not
    midnight; booleans as `TRUE`/`FALSE`; an empty cell as "".

    >>> [cell_text(v) for v in (None, "007", 123.0, 0.1, True, dt.datetime(2024, 7, 2))]
    ['', '007', '123', '0.1', 'TRUE', '2024-07-02']
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)


def _column_letter(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return letters


# ------------------------------------------------------------------------------------------------ tables


def read_table(
    path: str | Path,
    *,
    options: ReadOptions = DETECT,
    columns: Sequence[str] | None = None,
    share_repeated: bool = False,
) -> pd.DataFrame:
    """Reads a whole (history-sized) file as text; see `iter_table`. With `columns`, only those of them
    the file has are kept, chunk by chunk (a large reference costs what the models use of it). With
    `share_repeated`, equal cells of a column hold one string object (`SharedValues`): the same values,
    in a fraction of the memory when a column repeats them (a customer's name on each of their orders)."""
    shared = SharedValues() if share_repeated else None
    chunks = []
    for chunk in iter_table(path, options=options):
        if columns is not None:
            chunk = chunk[[name for name in columns if name in chunk.columns]]
        chunks.append(chunk if shared is None else shared.chunk(chunk))
        del chunk  # a shared chunk lets the strings it replaced go before the next chunk is read
    frame = pd.concat(chunks) if len(chunks) > 1 else chunks[0]
    logger.info("read %s: %d rows, %d columns", path, len(frame), frame.shape[1])
    return frame


class SharedValues:
    """Makes equal cells of a column, across the chunks of one file, hold one string object.

    The CSV reader makes a new string for every cell, so a column that repeats few values (a city, a VAT
    rate, a customer's name on each of their orders) holds each of them once per row: at 1,000,000 rows of
    the demo history about half of the frame's memory. Columns whose chunk is mostly distinct values (ids,
    order numbers) are left as read: sharing them would only add the lookup table. The values, their order
    and the dtype are unchanged.

    >>> shared = SharedValues()
    >>> one = shared.chunk(pd.DataFrame({"city": ["Delft".lower(), "Delft".lower()]}, dtype=object))
    >>> one["city"].iloc[0] is one["city"].iloc[1]
    True
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[str, str]] = {}

    def chunk(self, chunk: pd.DataFrame) -> pd.DataFrame:
        """The chunk as a new frame (object dtype, same index) whose repeated cells share their strings."""
        arrays = []
        for name in chunk.columns:
            column = chunk[name].to_numpy(dtype=object)
            codes, distinct = pd.factorize(column, use_na_sentinel=False)
            if 2 * len(distinct) > len(column):
                arrays.append(column.copy())  # a copy: no view left holding the chunk's block alive
                continue
            known = self.values.setdefault(name, {})
            first = np.array([known.setdefault(value, value) for value in distinct], dtype=object)
            arrays.append(first[codes])
        frame = pd.DataFrame(dict(enumerate(arrays)), index=chunk.index, dtype=object)
        frame.columns = chunk.columns
        return frame


def require_columns(frame: pd.DataFrame, columns: Sequence[str], *, source: str | Path, what: str) -> None:
    """Raises `SchemaError` naming the first of `columns` the frame lacks."""
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise SchemaError(
            f"{source}: missing column {missing[0]!r} ({what}); the file has {list(frame.columns)[:12]}"
        )


class SeenIds:
    """The ids of a batch seen so far, for `check_unique_ids`: each id's 64-bit hash and 32 bits of a second
    one (independent keys), ~12 bytes per id instead of a str in a set (~100 bytes), looked up a chunk at a
    time without building a hash table of all of them again. Two different ids count as one only if both
    hashes agree (about 2**-96 per pair; at 10**8 ids, below 10**-12).

    The pairs are a `SortedRuns` table: each chunk's keys are appended as a sorted run, where `np.insert`
    into one sorted array copied the whole table per chunk (quadratic in the batch). The table holds
    distinct keys, so an id whose 64-bit hash another id already has (rare, but then the 32-bit check must
    still tell them apart) is kept in `clashes`, a set of (key, check) pairs, instead.

    >>> seen = SeenIds()
    >>> seen.add(["R1", "R2"]).tolist()
    [False, False]
    >>> seen.add(["R2", "R3"]).tolist()  # R2 was added before: neither is added now
    [True, False]
    >>> seen.contains(["R1", "R3"]).tolist(), len(seen)
    ([True, False], 2)
    """

    KEY = "pipeline:seen-id"
    CHECK = "pipeline:seen-ck"

    def __init__(self) -> None:
        self._table = SortedRuns(np.uint64, check=np.uint32)
        self.clashes: set[tuple[int, int]] = set()  # ids whose key the table holds for another id

    def __len__(self) -> int:
        return len(self._table) + len(self.clashes)

    def _hashes(self, ids: Sequence[str] | pd.Series) -> tuple[np.ndarray, np.ndarray]:
        values = np.asarray(ids, dtype=object)
        return (
            pd.util.hash_array(values, hash_key=self.KEY, categorize=False),
            pd.util.hash_array(values, hash_key=self.CHECK, categorize=False).astype(np.uint32),
        )

    def add(self, ids: Sequence[str] | pd.Series) -> np.ndarray:
        """Adds distinct ids (a chunk's) if none of them was added before; per id, whether it was (then
        nothing is added, so a chunk refused for a repeated id leaves the set as it was). One hashing and
        one look-up serve both the check and the adding."""
        keys, checks = self._hashes(ids)
        places = self._table.find(keys)
        found = self._held(keys, checks, places)
        if found.any():
            return found
        new_key = np.flatnonzero(places < 0)
        _, first = np.unique(keys[new_key], return_index=True)
        to_table = new_key[first]  # the first id of each key not held yet
        clashing = np.ones(len(keys), dtype=bool)
        clashing[to_table] = False
        self._table.append(keys[to_table], check=checks[to_table])
        self.clashes.update(zip(keys[clashing].tolist(), checks[clashing].tolist(), strict=True))
        self._table.release()  # a chunk's look-ups touch most pages; between chunks none need be resident
        return found

    def contains(self, ids: Sequence[str] | pd.Series) -> np.ndarray:
        """Per id: whether it was added before."""
        keys, checks = self._hashes(ids)
        return self._held(keys, checks, self._table.find(keys))

    def _held(self, keys: np.ndarray, checks: np.ndarray, places: np.ndarray) -> np.ndarray:
        """Per id (its hashes and its key's place in the table, `SortedRuns.find`): whether it was added."""
        held = np.flatnonzero(places >= 0)
        found = np.zeros(len(keys), dtype=bool)
        found[held] = self._table.take("check", places[held]) == checks[held]
        if self.clashes:  # a key held for another id: this id may be one of the clashes
            other = held[~found[held]]
            pairs = zip(keys[other].tolist(), checks[other].tolist(), strict=True)
            found[other] = [pair in self.clashes for pair in pairs]
        return found


def check_unique_ids(
    ids: pd.Series, *, source: str | Path, id_column: str, seen: SeenIds | None = None
) -> None:
    """Raises `SchemaError` naming the first empty or repeated id, also against the ids in `seen`, to which
    the ids are added when they pass (a batch checked chunk by chunk; a refused chunk adds none)."""
    empty = ids.index[ids == ""]
    if len(empty):
        raise SchemaError(f"{source}: row {empty[0] + 1}: empty {id_column!r}; every record needs an id")
    repeated = ids.index[ids.duplicated()]
    if len(repeated):
        row = repeated[0]
        raise SchemaError(f"{source}: row {row + 1}: {id_column} {ids[row]!r} appears more than once")
    if seen is not None:
        clash = ids.index[seen.add(ids)]
        if len(clash):
            row = clash[0]
            raise SchemaError(f"{source}: row {row + 1}: {id_column} {ids[row]!r} appears more than once")

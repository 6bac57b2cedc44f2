"""Review decisions (`decisions.csv`, contract section 4): the flags of a score folder, and the append-only
file of what a clerk decided about them.

Every decision is one appended row, flushed and fsync'd before the write returns, so a closed tab, a
killed server or a power cut loses at most the decision being typed. Writers are serialized by a lock in
the process and an exclusive `flock` on the file across processes, so two tabs (or two servers) on one
folder never interleave or lose rows. A later row for the same flag replaces an earlier one when read.

>>> key = flag_key({"record_id": "R1", "kind": "error", "field": "city", "match_id": ""})
>>> key
('R1', 'error', 'city', '')
"""

from __future__ import annotations

import contextlib
import csv
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd

from pipeline import schema as s
from pipeline.exceptions import InputFileError

try:  # POSIX; elsewhere the in-process lock is all there is
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# RFC 4180 line ends, like the score outputs: a value holding a lone carriage return round-trips.
CSV_LINE_END = "\r\n"
FlagKey = tuple[str, str, str, str]

_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def flag_key(row: Mapping[str, str]) -> FlagKey:
    """The columns that name one flag in a folder: record, kind, field and matched record."""
    return tuple(str(row.get(name, s.MISSING) or s.MISSING) for name in s.FLAG_KEY)  # type: ignore[return-value]


def read_csv_text(path: Path) -> pd.DataFrame:
    """A CSV written by this package (UTF-8, header row) as text; the index is the 0-based data row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh, strict=True))
    except FileNotFoundError:
        raise InputFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(f"{path}: cannot read ({exc})") from None
    if not rows:
        raise InputFileError(f"{path}: file is empty (expected at least a header row)")
    header, body = rows[0], [row for row in rows[1:] if row]
    for number, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise InputFileError(f"{path}: row {number} has {len(row)} cells, the header has {len(header)}")
    return pd.DataFrame(body, columns=header, dtype=object)


def load_flags(folder: Path) -> pd.DataFrame:
    """The review queue of a score folder (`flags.csv`), in file order, every cell as text."""
    path = Path(folder) / s.FLAGS_FILE
    if not path.exists():
        raise InputFileError(f"{folder}: not a score output folder ({s.FLAGS_FILE} is missing)")
    flags = read_csv_text(path)
    optional = getattr(s, "FLAG_SUGGEST_EMPTY", None)  # added later; older folders lack it
    missing = [name for name in s.FLAG_COLUMNS if name not in flags.columns and name != optional]
    if missing:
        raise InputFileError(f"{path}: missing column {missing[0]!r}")
    if optional and optional not in flags.columns:
        flags[optional] = "false"
    return flags


def read_decisions(path: Path) -> pd.DataFrame:
    """Every row of a decisions file (an absent file has none); the index is the 0-based data row."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame({name: pd.Series(dtype=object) for name in s.DECISION_COLUMNS})
    with _shared(path):
        frame = read_csv_text(path)
    for name in s.DECISION_COLUMNS:
        if name not in frame.columns:
            frame[name] = s.MISSING
    return frame


def latest(decisions: pd.DataFrame) -> pd.DataFrame:
    """One row per flag: the last decision for it. The index (the file's row) is kept."""
    if not len(decisions):
        return decisions
    keys = decisions[list(s.FLAG_KEY)].fillna(s.MISSING)
    return decisions[~keys.duplicated(keep="last")]


def append_decision(path: Path, row: Mapping[str, str]) -> None:
    """Appends one decision row (the contract's columns) durably: flushed and fsync'd on return."""
    path = Path(path)
    values = [str(row.get(name, s.MISSING) or s.MISSING) for name in s.DECISION_COLUMNS]
    with _process_lock(path), open(path, "a", encoding="utf-8", newline="") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            writer = csv.writer(fh, lineterminator=CSV_LINE_END)
            if fh.seek(0, os.SEEK_END) == 0:
                writer.writerow(s.DECISION_COLUMNS)
            writer.writerow(values)
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _process_lock(path: Path) -> threading.Lock:
    key = path.resolve()
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


@contextlib.contextmanager
def _shared(path: Path) -> Iterator[None]:
    """A shared lock while reading, so a reader never sees half of a row being appended."""
    if fcntl is None:
        yield
        return
    with open(path, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def decision_problem(row: Mapping[str, str], flag: Mapping[str, str]) -> str | None:
    """Why a decision cannot stand for this flag, or None. Shared by the review page and `feedback`."""
    decision = row.get(s.DECISION, s.MISSING)
    if decision not in s.DECISIONS:
        return f"decision {decision!r} is not one of {', '.join(s.DECISIONS)}"
    for name in (s.FLAG_VALUE, s.FLAG_SUGGESTION):
        given = row.get(name, s.MISSING) or s.MISSING
        if given != flag[name]:
            return f"{name} {given!r} differs from the flag's {flag[name]!r} in {s.FLAGS_FILE}"
    if (
        decision == s.DECISION_ACCEPT
        and flag[s.FLAG_KIND] == s.KIND_ERROR
        and flag[s.FLAG_SUGGESTION] == s.MISSING
        and flag.get("suggest_empty", "false") != "true"
    ):
        return "the flag has no suggestion to accept; type the right value (edit) or reject it"
    if decision == s.DECISION_EDIT:
        if flag[s.FLAG_KIND] != s.KIND_ERROR:
            return "only an error flag can be edited; accept or reject it"
        if (row.get(s.DECISION_NEW_VALUE, s.MISSING) or s.MISSING) == flag[s.FLAG_VALUE]:
            return "the typed value equals the flagged value; reject the flag instead"
    seconds = row.get(s.DECISION_SECONDS, s.MISSING) or s.MISSING
    if seconds:
        try:
            ok = float(seconds) >= 0
        except ValueError:
            ok = False
        if not ok:
            return f"seconds {seconds!r} is not a number of seconds"
    return None

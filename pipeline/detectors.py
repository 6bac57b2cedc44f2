"""Detector families: what the history says a cell of each field usually looks like, and how far a cell is
from that.

Every family is learned from data, never written for one data set:

- **frequency**: how often the value occurs in the field;
- **shape**: its character classes, length and separators against the field's usual shapes;
- **dependencies**: for each pair of fields (A, B), how strongly A determines B in the history, and whether
  the value disagrees with what the record's other fields imply (postcode -> city, code <-> name);
- **numbers**: against their group (an amount against that customer's usual amounts) and overall;
- **dates**: against the entry time and the field's usual format;
- **missing**: empty where the field is normally filled;
- **checksums**: IBAN mod 97, EAN/GTIN, Dutch BSN 11-test and e-mail syntax, where the field usually has
  that shape;
- **edit history**: how often the value, or its shape, was corrected in the log.

`build_profile` learns the first seven from a table of records; `EditHistory` learns the last from the
records as entered and their cell labels. `cell_features` turns a chunk into one feature frame per field,
all with the same columns (`FEATURES`), so the error model can stack them into one row per cell.
Everything is vectorised per column: values are parsed once per distinct value and mapped back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from stdnum import ean, iban, isbn, luhn
from stdnum.nl import bsn

from pipeline import schema as s
from pipeline.config import Config
from pipeline.fields import date as date_type
from pipeline.fields import number as number_type

logger = logging.getLogger(__name__)

MIN_DEPENDENCY_STRENGTH = 0.85
MIN_DEPENDENCY_COVERAGE = 0.3
# A dependency is near-certain evidence for one source value when at least CERTAIN_SUPPORT stored records
# hold that value with the same target, at least CERTAIN_SHARE of that value's records (the stored history
# keeps the errors staff missed), and the dependency holds for CERTAIN_STRENGTH of all rows (a VAT rate that
# a customer's orders follow 97% of the time is a habit, not a rule: the other 3% are legitimate).
CERTAIN_SUPPORT = 5
CERTAIN_SHARE = 0.9
CERTAIN_STRENGTH = 0.99
MIN_GROUP_ROWS = 3
MIN_GROUP_EXPLAINED = 0.2
# An identifier check is adopted for a field when it applies to at least SCHEME_SHARE of the stored
# values, to at least MIN_SCHEME_VALUES of them, and at least SCHEME_PASS of those pass it.
SCHEME_SHARE = 0.5
SCHEME_PASS = 0.98
MIN_SCHEME_VALUES = 20
SMOOTHING = 5.0
# Up to this many values, look-ups go value by value through a dictionary: cheaper than building pandas
# indexes for a one-record check.
SMALL_CHUNK = 64
DATE_FORMATS = date_type.DATE_FORMATS

FEATURES: tuple[str, ...] = (
    "missing",
    "missing_where_filled",
    "value_log_count",
    "value_share",
    "value_unseen",
    "shape_share",
    "coarse_shape_share",
    "length_z",
    "case_unusual",
    "whitespace_odd",
    "dep_known",
    "dep_agree",
    "dep_disagree",
    "dep_agree_weight",
    "dep_disagree_weight",
    "rev_known",
    "rev_agree",
    "rev_disagree",
    "rev_disagree_weight",
    "number_unparsed",
    "number_log",
    "number_z",
    "group_log_ratio",
    "group_abs_log_ratio",
    "group_pow10_gap",
    "group_rows",
    "date_unparsed",
    "date_other_format",
    "date_delta_days",
    "date_outside",
    "checksum_invalid",
    "dep_certain_disagree",
    "sequence_gap",
    "sequence_rows",
    "year_mismatch",
    "edit_value_rate",
    "edit_value_count",
    "edit_shape_rate",
    "edit_field_rate",
)


# ---------------------------------------------------------------------------------------------------------
# Per-value parsing (each runs once per distinct value)


_SHAPE_TABLE = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
    "A" * 26 + "a" * 26 + "9" * 10,
)
_RUNS = re.compile(r"(.)\1+")


def shape_of(value: str) -> str:
    """The value's character classes: upper `A`, lower `a`, digit `9`, anything else as itself.

    >>> shape_of("1234 AB"), shape_of("C-10233")
    ('9999 AA', 'A-99999')
    """
    out = value.translate(_SHAPE_TABLE)
    if out.isascii():
        return out
    # Accented letters count as letters.
    return "".join(("A" if ch.isupper() else "a") if ch.isalpha() and ch not in "Aa" else ch for ch in out)


@functools.lru_cache(maxsize=65536)
def coarse_shape(shape: str) -> str:
    """A shape with runs collapsed, so lengths do not matter: `'9999 AA'` -> `'9 A'`."""
    return _RUNS.sub(r"\1", shape)


def leading_number(text: str) -> float:
    """The value's only number when it leads the text (`'12.0 oz.'` -> 12.0, `'0.09%'` -> 0.09), else NaN:
    the number behind a unit, percent sign or note that the field does not write."""
    reading = number_type.read_number(text)
    if reading.value is None or any(ch.isalnum() for ch in reading.before):
        return math.nan
    return math.nan if any(ch.isdigit() for ch in reading.after) else reading.value


def write_number(value: float, fp: FieldProfile) -> str:
    """A number written the way the field writes its numbers: with its fixed decimals when it has them
    (`1250.00`), else in the shortest form (`12`, `19.2`, `0.072`)."""
    return number_type.write_number(value, fp.decimals if fp.fixed_decimals else None)


def _case_of(value: str) -> str:
    if value.isascii():  # the same answer from C string methods: every ASCII letter is cased
        if value.upper() == value.lower():
            return "none"
        return (
            "upper"
            if value.isupper()
            else "lower"
            if value.islower()
            else "title"
            if value.istitle()
            else "mixed"
        )
    letters = [ch for ch in value if ch.isalpha()]
    if not letters:
        return "none"
    if all(ch.isupper() for ch in letters):
        return "upper"
    if all(ch.islower() for ch in letters):
        return "lower"
    if value.istitle():
        return "title"
    return "mixed"


# Checksums of well-known identifier schemes -------------------------------------------------------------

_IBAN = re.compile(r"^[A-Z]{2}\d{2}[A-Z0-9]{10,30}$")
_EMAIL_LIKE = re.compile(r"@")
_EMAIL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}$"
)


def _digits_of_length(text: str, lengths: tuple[int, ...]) -> str | None:
    t = text.strip()
    return t if t.isdigit() and len(t) in lengths else None


def iban_valid(text: str) -> bool | None:
    """True/False when the value looks like an IBAN (checked by `stdnum.iban`), None when it does not."""
    compact = text.replace(" ", "").upper()
    return iban.is_valid(compact) if _IBAN.match(compact) else None


def gtin_valid(text: str) -> bool | None:
    """True/False for an EAN/GTIN-8/12/13/14 (`stdnum.ean`), None when the value does not have that shape."""
    t = _digits_of_length(text, (8, 12, 13, 14))
    return ean.is_valid(t) if t else None


def bsn_valid(text: str) -> bool | None:
    """True/False for a Dutch BSN (11-test, `stdnum.nl.bsn`), None when the value is not 8 or 9 digits."""
    t = _digits_of_length(text, (8, 9))
    return bsn.is_valid(t) if t else None


def isbn_valid(text: str) -> bool | None:
    """True/False for an ISBN-10 or ISBN-13 written with or without hyphens (`stdnum.isbn`), else None."""
    compact = text.replace("-", "").replace(" ", "").upper()
    if not (len(compact) == 10 and compact[:9].isdigit() and compact[9] in "0123456789X") and not (
        len(compact) == 13 and compact.isdigit() and compact[:3] in ("978", "979")
    ):
        return None
    return isbn.is_valid(compact)


def luhn_valid(text: str) -> bool | None:
    """True/False for a 13-19 digit card or account number (Luhn check, `stdnum.luhn`), else None."""
    compact = text.replace(" ", "").replace("-", "")
    if not compact.isdigit() or not 13 <= len(compact) <= 19:
        return None
    return luhn.is_valid(compact)


def email_valid(text: str) -> bool | None:
    """True/False for a value containing `@` (syntax check), None otherwise."""
    t = text.strip()
    if not _EMAIL_LIKE.search(t):
        return None
    return bool(_EMAIL.match(t))


SCHEMES: dict[str, Callable[[str], bool | None]] = {
    "IBAN": iban_valid,
    "EAN": gtin_valid,
    "BSN": bsn_valid,
    "ISBN": isbn_valid,
    "Luhn": luhn_valid,
    "e-mail": email_valid,
}
SCHEME_NAMES = {"Luhn": "card number", "e-mail": "e-mail address"}


def scheme_evidence(counts: pd.Series, scheme: str) -> tuple[float, int, float]:
    """How a field's stored values (`counts`: value -> rows) bear out an identifier check: the share of
    rows it applies to, how many rows that is, and the share of those that pass.

    >>> scheme_evidence(pd.Series({"4006381333931": 30, "12345678": 1}), "EAN")
    (1.0, 31, 0.967741935483871)
    """
    check = SCHEMES[scheme]
    verdicts = [check(str(v)) for v in counts.index]
    weights = counts.to_numpy(dtype=float)
    applies = np.array([v is not None for v in verdicts], dtype=bool)
    passes = np.array([bool(v) for v in verdicts], dtype=bool)
    total = float(weights.sum())
    applied = float(weights[applies].sum())
    return (
        applied / total if total else 0.0,
        int(applied),
        float(weights[passes].sum()) / applied if applied else 0.0,
    )


def adopted_schemes(counts: pd.Series) -> list[str]:
    """The identifier checks the stored values support: each applies to at least `SCHEME_SHARE` of the
    values (and `MIN_SCHEME_VALUES` rows), and at least `SCHEME_PASS` of those pass. Random 8-digit ids
    have the shape of an EAN-8 and a BSN, but only about 10% pass either: they adopt neither."""
    out = []
    for scheme in SCHEMES:
        share, rows, passing = scheme_evidence(counts, scheme)
        if share >= SCHEME_SHARE and rows >= MIN_SCHEME_VALUES and passing >= SCHEME_PASS:
            out.append(scheme)
    return out


# Running numbers ----------------------------------------------------------------------------------------

_LAST_DIGITS = re.compile(r"^(.*?)(\d+)(\D*)$")
_YEAR = re.compile(r"(?<!\d)(19\d\d|20\d\d)(?!\d)")


def split_running_number(text: str) -> tuple[str, int, int] | None:
    """A code's prefix, running number (its last digit group) and the group's width, or None.

    >>> split_running_number("SO-2024-004711")
    ('SO-2024-', 4711, 6)
    """
    found = _LAST_DIGITS.match(text)
    if not found or len(found.group(2)) > 15:
        return None
    return found.group(1), int(found.group(2)), len(found.group(2))


def embedded_year(text: str) -> int | None:
    """A year (1900-2099) written inside a code, `'SO-2024-004711'` -> 2024, else None."""
    found = _YEAR.search(text)
    return int(found.group(1)) if found else None


SEQUENCE_SAMPLE = 20_000


def _is_sequence(values: pd.Series, times: pd.Series | None) -> bool:
    """A field of nearly unique codes whose running number grows with entry time (order numbers)."""
    filled = values[values != s.MISSING]
    if len(filled) > SEQUENCE_SAMPLE:  # evenly spaced rows decide it as well as all of them
        filled = filled.iloc[:: -(-len(filled) // SEQUENCE_SAMPLE)]
    if len(filled) < 20 or filled.nunique() < 0.8 * len(filled):
        return False
    parts = per_value(filled, split_running_number)
    ok = parts.notna()
    if ok.mean() < 0.9:
        return False
    prefix = parts[ok].map(lambda p: p[0])
    number = parts[ok].map(lambda p: p[1]).astype(float)
    order = times.reindex(number.index).rank(method="first") if times is not None else None
    if order is None:
        order = pd.Series(np.arange(len(number), dtype=float), index=number.index)
    top = prefix.value_counts()
    top = top[top >= 10].index
    correlations = [number[prefix == p].corr(order[prefix == p], method="spearman") for p in top]
    return bool(correlations) and float(np.nanmedian(correlations)) > 0.9


# The running number a row should have comes from the rows entered before it with the same prefix (at most
# SEQUENCE_WINDOW of them, at least SEQUENCE_MIN_ROWS, none entered more than the field's
# `sequence_horizon` before it), never from rows after it: so a batch scored chunk by chunk, carrying the
# last rows of each prefix over (`RunningNumbers`), gets the same expectations as in one piece, wherever
# the chunks are cut.
SEQUENCE_WINDOW = 8
SEQUENCE_MIN_ROWS = 3
# A window of earlier rows is trusted up to this many times the age (entry time of the row less that of
# its SEQUENCE_WINDOW-th earlier row) that 99% of the history's windows stay within: a batch that follows
# its reference after a gap does not take the reference's last numbers as its neighbours.
SEQUENCE_HORIZON_FACTOR = 2.0


def running_parts(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each value's prefix and running number (`split_running_number`; parsed once per distinct value),
    and whether it has one (filled and parsed).

    >>> prefix, number, ok = running_parts(pd.Series(["SO-2024-000007", "", "x"]))
    >>> prefix.tolist(), number.tolist()[:1], ok.tolist()
    (['SO-2024-', '', ''], [7.0], [True, False, False])
    """
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=False)
    parts = [split_running_number(v) if v != s.MISSING else None for v in uniques]
    prefix = np.array([p[0] if p else "" for p in parts], dtype=object)
    number = np.array([p[1] if p else math.nan for p in parts], dtype=float)
    ok = np.array([p is not None for p in parts], dtype=bool)
    if not len(uniques):
        return prefix, number, ok
    return prefix[codes], number[codes], ok[codes]


def entry_days(times: pd.Series | None, n: int) -> np.ndarray:
    """Entry times as days since 1970 (float), NaN where unknown (all of them without a time column)."""
    if times is None:
        return np.full(n, np.nan)
    stamps = times.to_numpy(dtype="datetime64[ns]")
    return np.where(np.isnat(stamps), np.nan, stamps.astype(np.int64) / 86_400e9)


def _row_median(values: np.ndarray) -> np.ndarray:
    """The median of each row's non-NaN values (NaN for a row without any)."""
    ordered = np.sort(values, axis=1)  # NaN last
    count = (~np.isnan(values)).sum(axis=1)
    rows = np.arange(len(values))
    low = ordered[rows, np.maximum(count - 1, 0) // 2]
    high = ordered[rows, np.maximum(count, 1) // 2]
    return np.where(count > 0, (low + high) / 2, np.nan)


def _expect_after(
    tails: dict[str, np.ndarray],
    prefix: np.ndarray,
    number: np.ndarray,
    days: np.ndarray,
    horizon: float = math.inf,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per row (rows in entry order, all with a running number, entered on `days`): the number it should
    have given the earlier rows of its prefix (`tails`' last rows per prefix, each a 2 x k array of numbers
    and entry days, then the rows before it here) entered at most `horizon` days before it (and not after
    it), how many earlier rows that rests on, and the tails after these rows (`_tails_after` gives those
    alone).

    The expectation is robust to slips among the earlier rows and to a step other than 1 (a batch holding
    every k-th number): the median slope of all pairs of earlier rows (Theil-Sen), then the median of the
    earlier numbers carried forward by it.
    """
    grouped = _group_by_prefix(tails, prefix, number, days)
    expected, count = _expected_in_groups(grouped, SEQUENCE_WINDOW, horizon)
    return expected, count, _tails_of(tails, grouped)


@dataclass(frozen=True)
class _Grouped:
    """The carried tails' rows then the new rows, grouped by prefix (each group in entry order, carried
    rows first): `ordered` their numbers and entry days (2 x n), `order` each grouped row's input place,
    `codes`/`uniques` its prefix, `first_row` the input place of the first new row."""

    ordered: np.ndarray
    order: np.ndarray
    codes: np.ndarray
    uniques: np.ndarray
    first_row: int

    def group_start(self) -> np.ndarray:
        ordered_codes = self.codes[self.order]
        return np.searchsorted(ordered_codes, ordered_codes, side="left")


def _group_by_prefix(
    tails: dict[str, np.ndarray], prefix: np.ndarray, number: np.ndarray, days: np.ndarray
) -> _Grouped:
    carried = [p for p in dict.fromkeys(prefix.tolist()) if p in tails]
    before = [tails[p] for p in carried]
    every_prefix = np.concatenate(
        [*(np.full(t.shape[1], p, dtype=object) for p, t in zip(carried, before, strict=True)), prefix]
    )
    every = np.concatenate([*before, np.vstack([number, days])], axis=1).astype(float)
    codes, uniques = pd.factorize(every_prefix)
    order = np.argsort(codes, kind="stable")  # by prefix, each in entry order (carried rows first)
    return _Grouped(every[:, order], order, codes, np.asarray(uniques), every.shape[1] - len(number))


def _tails_of(tails: dict[str, np.ndarray], grouped: _Grouped) -> dict[str, np.ndarray]:
    """The tails after the grouped rows: per prefix, its last `SEQUENCE_WINDOW` rows."""
    codes = grouped.codes[grouped.order]
    group_end = np.searchsorted(codes, codes, side="right")
    last = np.flatnonzero(np.arange(len(codes)) >= group_end - SEQUENCE_WINDOW)
    after = dict(tails)
    for code in np.unique(codes[last]):
        after[str(grouped.uniques[code])] = grouped.ordered[:, last[codes[last] == code]]
    return after


def _tails_after(
    tails: dict[str, np.ndarray], prefix: np.ndarray, number: np.ndarray, days: np.ndarray
) -> dict[str, np.ndarray]:
    """The tails after rows (in entry order, all with a running number): `_expect_after`'s last result
    alone, for a table whose own expectations nobody reads."""
    return _tails_of(tails, _group_by_prefix(tails, prefix, number, days))


def _expected_in_groups(grouped: _Grouped, width: int, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """`_expect_after`'s expectations and row counts of the new rows (in their input order)."""
    ordered, order, first_row = grouped.ordered, grouped.order, grouped.first_row
    at = np.flatnonzero(order >= first_row)
    index = at[:, None] - width + np.arange(width)  # the earlier rows, oldest first
    earlier = index >= grouped.group_start()[at, None]
    safe = np.maximum(index, 0)
    with np.errstate(invalid="ignore"):
        age = ordered[1, at][:, None] - ordered[1, safe]
        earlier &= ~((age > horizon) | (age < 0))  # unknown times count as recent
    window = np.where(earlier, ordered[0, safe], np.nan)
    rows = earlier.sum(axis=1)
    left, right = np.triu_indices(width, k=1)
    with np.errstate(invalid="ignore"):
        slope = _row_median((window[:, right] - window[:, left]) / (right - left))
        guess = window + slope[:, None] * (width - np.arange(width))
    expected_sorted = np.where(rows >= SEQUENCE_MIN_ROWS, _row_median(guess), np.nan)
    expected = np.full(len(order) - first_row, np.nan)
    count = np.zeros(len(order) - first_row)
    expected[order[at] - first_row] = expected_sorted
    count[order[at] - first_row] = rows
    return expected, count


def sequence_horizon(
    values: pd.Series,
    times: pd.Series | None,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> float:
    """How long before a row its earlier rows may have been entered and still be its neighbours, in days:
    `SEQUENCE_HORIZON_FACTOR` times the 99th percentile of the history's window ages (inf without times).
    `parts`: the values' `running_parts`, when known."""
    if times is None:
        return math.inf
    prefix, _, ok = running_parts(values) if parts is None else parts
    days = entry_days(times, len(values))
    order = _entry_order(times, len(values))
    frame = pd.DataFrame({"prefix": prefix[order], "days": days[order]})[ok[order]]
    ages = frame.groupby("prefix", sort=False)["days"].diff(SEQUENCE_WINDOW).dropna()
    if ages.empty:
        return math.inf
    return float(max(SEQUENCE_HORIZON_FACTOR * ages.quantile(0.99), 1.0))


@dataclass(frozen=True)
class RunningNumbers:
    """Where each running-number field stands after the rows seen so far: per field and prefix, the last
    `SEQUENCE_WINDOW` numbers (with their entry days) in input order. The only state the error model
    carries from chunk to chunk.

    `expect` reads a chunk's expectations from the state before it; `advance` (or `of` then `then`, which
    compose: `a.then(b).then(c) == a.then(b.then(c))`) gives the state after it. A state is small (a few
    numbers per prefix) and can cross processes: `to_dict`/`from_dict`.

    >>> values = pd.Series([f"SO-{n:04d}" for n in (1, 2, 3, 4, 50, 6, 7)])
    >>> start = RunningNumbers(("no",))
    >>> expected, _ = start.advance(pd.DataFrame({"no": values[:5]})).expect("no", values[5:])
    >>> expected.tolist()
    [6.0, 7.0]
    """

    names: tuple[str, ...] = ()
    tails: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def expect(
        self,
        name: str,
        values: pd.Series | np.ndarray,
        times: pd.Series | None = None,
        horizon: float = math.inf,
        parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per value (in input order, after the rows this state has seen; entered at `times`): the running
        number it should have (NaN when it has none or too few earlier rows share its prefix within
        `horizon` days) and the number of earlier rows that rests on. `parts`: `running_parts(values)`,
        when the caller has it already."""
        expected, rows, _ = self._expect(name, values, times, horizon, parts)
        return expected, rows

    def _expect(
        self,
        name: str,
        values: pd.Series | np.ndarray,
        times: pd.Series | None = None,
        horizon: float = math.inf,
        parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, RunningNumbers]:
        """`expect`, and the state after the values (of the field `name` only)."""
        prefix, number, ok = running_parts(values) if parts is None else parts
        days = entry_days(times, len(prefix))
        expected = np.full(len(prefix), np.nan)
        rows = np.zeros(len(prefix))
        tails = self.tails.get(name, {})
        if ok.any():
            expected[ok], rows[ok], tails = _expect_after(tails, prefix[ok], number[ok], days[ok], horizon)
        return expected, rows, RunningNumbers((name,), {name: tails})

    @classmethod
    def of(cls, chunk: pd.DataFrame, names: Iterable[str], time_column: str | None = None) -> RunningNumbers:
        """What a chunk adds: per field in `names` and prefix, its own last numbers and entry days."""
        names = tuple(names)
        days = entry_days(entry_times(chunk, time_column), len(chunk))
        tails = {}
        for name in names:
            prefix, number, ok = running_parts(text_column(chunk, name))
            tails[name] = _tails_after({}, prefix[ok], number[ok], days[ok]) if ok.any() else {}
        return cls(names, tails)

    @classmethod
    def of_table(cls, frame: pd.DataFrame, names: Iterable[str], time_column: str | None) -> RunningNumbers:
        """What a table of stored records adds (the history, a reference), its rows taken in entry time
        order when it has a time column (ties and missing times in table order)."""
        names = tuple(name for name in names if name in frame.columns)
        columns = [*names, *([time_column] if time_column in frame.columns else [])]
        texts = pd.DataFrame({name: text_column(frame, name) for name in columns}, index=frame.index)
        order = _entry_order(entry_times(frame, time_column), len(frame))
        return cls.of(texts.iloc[order], names, time_column)

    def then(self, later: RunningNumbers) -> RunningNumbers:
        """The state after this one's rows and then `later`'s."""
        tails = {}
        for name in dict.fromkeys((*self.names, *later.names)):
            mine, theirs = self.tails.get(name, {}), later.tails.get(name, {})
            merged = dict(mine)
            for prefix, rows in theirs.items():
                if prefix in mine and rows.shape[1] < SEQUENCE_WINDOW:
                    rows = np.concatenate([mine[prefix], rows], axis=1)[:, -SEQUENCE_WINDOW:]
                merged[prefix] = rows
            tails[name] = merged
        return RunningNumbers(tuple(dict.fromkeys((*self.names, *later.names))), tails)

    def advance(self, chunk: pd.DataFrame, time_column: str | None = None) -> RunningNumbers:
        """The state after `chunk`'s rows."""
        return self.then(RunningNumbers.of(chunk, self.names, time_column))

    def to_dict(self) -> dict[str, dict[str, list[list[float]]]]:
        return {name: {p: v.tolist() for p, v in self.tails.get(name, {}).items()} for name in self.names}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, list[list[float]]]]) -> RunningNumbers:
        tails = {
            name: {p: np.asarray(v, dtype=float).reshape(2, -1) for p, v in t.items()}
            for name, t in data.items()
        }
        return cls(tuple(data), tails)


def _entry_order(times: pd.Series | None, n: int) -> np.ndarray:
    """Row positions in entry time order (ties and missing times in table order), or as they come."""
    if times is None:
        return np.arange(n)
    when = pd.DataFrame({"when": times.to_numpy(), "pos": np.arange(n)})
    return when.sort_values(["when", "pos"], kind="stable", na_position="last")["pos"].to_numpy()


EXPECT_ROWS = 250_000


def sequence_expectation(
    values: pd.Series, times: pd.Series | None, horizon: float = math.inf
) -> tuple[pd.Series, pd.Series]:
    """For running numbers of a whole table (the training history): the number each row should have given
    the rows entered before it (`RunningNumbers`), and how many earlier rows that rests on. Rows are taken
    in entry time order when `times` is given (ties and missing times in table order), else as they come.
    """
    order = _entry_order(times, len(values))
    ordered_times = times.iloc[order] if times is not None else None
    ordered = values.to_numpy(dtype=object)[order]
    # EXPECT_ROWS rows at a time, each part after the state the earlier ones left: the same numbers as in
    # one piece (`RunningNumbers`), without a million rows' windows and pairs in memory at once.
    state = RunningNumbers(("_",))
    parts_expected, parts_rows = [], []
    for start in range(0, len(ordered), EXPECT_ROWS):
        part = slice(start, start + EXPECT_ROWS)
        part_times = ordered_times.iloc[part] if ordered_times is not None else None
        expected, rows, state = state._expect("_", ordered[part], part_times, horizon)
        parts_expected.append(expected)
        parts_rows.append(rows)
    out_expected = np.empty(len(values))
    out_rows = np.empty(len(values))
    if len(ordered):
        out_expected[order] = np.concatenate(parts_expected)
        out_rows[order] = np.concatenate(parts_rows)
    return pd.Series(out_expected, index=values.index), pd.Series(out_rows, index=values.index)


# ---------------------------------------------------------------------------------------------------------
# Profiles


def per_value(values: pd.Series, fn: Callable[[str], object]) -> pd.Series:
    """Applies `fn` once per distinct value and maps the result back (the vectorisation trick): one
    factorisation, one call per distinct value, one `take`; no Python loop over the rows.

    >>> per_value(pd.Series(["a1", "b22", "a1"]), len).tolist()
    [2, 3, 2]
    """
    codes, uniques = pd.factorize(values.to_numpy(dtype=object), use_na_sentinel=False)
    table = pd.Series([fn(value) for value in uniques])
    out = table.take(codes) if len(table) else table
    out.index = values.index
    return out


def text_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """The column as plain Python strings (object dtype), `''` for missing."""
    col = frame[name]
    # One NumPy pass (no per-element iteration of Arrow-backed strings, no pandas `where`).
    values = col.to_numpy(dtype=object, na_value=s.MISSING)
    return pd.Series(values, index=col.index, name=col.name, dtype=object, copy=False)


@dataclass
class FieldProfile:
    """What one field usually looks like in the history."""

    name: str
    kind: str
    rows: int
    filled: int
    counts: dict[str, int]
    shapes: dict[str, int]
    coarse: dict[str, int]
    shape_example: dict[str, str]
    length_mean: float
    length_std: float
    case: str
    case_share: float
    schemes: list[str]
    number_center: float = math.nan
    number_spread: float = math.nan
    decimals: int = 0
    date_format: str | None = None
    delta_low: float = math.nan
    delta_high: float = math.nan
    delta_median: float = math.nan
    sequence: bool = False
    sequence_horizon: float = math.inf
    embeds_year: bool = False
    fixed_decimals: bool = False

    @property
    def vocab(self) -> pd.Index:
        """The field's known values, in a fixed order: value codes index into it."""
        cached = self.__dict__.get("_vocab")
        if cached is None:
            cached = pd.Index(list(self.counts), dtype=object)
            self.__dict__["_vocab"] = cached
            self.__dict__["_count_array"] = np.fromiter(
                self.counts.values(), dtype=float, count=len(self.counts)
            )
        return cached

    def codes(self, values: np.ndarray) -> np.ndarray:
        """Each value's position in `vocab` (-1 when unseen or missing)."""
        if len(values) > SMALL_CHUNK:
            return self.vocab.get_indexer(values)
        # A few values (a one-record check): dictionary look-ups, without building a pandas index.
        positions = self.__dict__.get("_positions")
        if positions is None:
            positions = self.__dict__["_positions"] = {value: i for i, value in enumerate(self.counts)}
        get = positions.get
        return np.fromiter((get(v, -1) for v in values), dtype=np.intp, count=len(values))

    def __getstate__(self) -> dict:
        # The look-up dictionary is rebuilt on use.
        return {k: v for k, v in self.__dict__.items() if k != "_positions"}

    def recurring_share(self, min_count: int) -> float:
        """The share of filled rows holding a value that occurs at least `min_count` times (0 when none is
        filled): how far one value's history speaks for the next record holding it."""
        if not self.filled:
            return 0.0
        return sum(n for n in self.counts.values() if n >= min_count) / self.filled

    def count_of(self, codes: np.ndarray) -> np.ndarray:
        self.vocab  # noqa: B018 - builds the arrays
        counts = self.__dict__["_count_array"]
        return np.where(codes >= 0, counts[np.maximum(codes, 0)] if len(counts) else 0.0, 0.0)

    @property
    def fill_rate(self) -> float:
        return self.filled / self.rows if self.rows else 0.0

    @property
    def top_shape(self) -> str:
        return max(self.shapes, key=self.shapes.get) if self.shapes else ""


@dataclass
class Dependency:
    """Field `source` determines field `target` with `strength` (share of rows agreeing with the mode)."""

    source: str
    target: str
    strength: float
    implied: dict[str, str]
    support: dict[str, int]
    total: dict[str, int]
    implied_code: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    weight: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    certain: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    # Whether the look-up arrays match the vocabularies of the profile this dependency was made for (set by
    # `_align`; a copy made with `dataclasses.replace` starts unaligned).
    aligned: bool = field(default=False, init=False, repr=False, compare=False)

    def index(self, source_vocab: pd.Index, target_vocab: pd.Index) -> None:
        """Aligns the mapping with the fields' vocabularies, for `lookup` on value codes (done already when
        `ProfileTable.profile` made it from value codes)."""
        if self.aligned:
            return
        keys = source_vocab.to_numpy(dtype=object)
        implied = np.array([self.implied.get(k, "") for k in keys], dtype=object)
        codes = target_vocab.get_indexer(implied) if len(keys) else np.zeros(0, dtype=np.int64)
        support = np.array([self.support.get(k, 0) for k in keys], dtype=float)
        total = np.array([self.total.get(k, 1) for k in keys], dtype=float)
        self._align(np.where(implied == "", -1, codes).astype(np.int64), support, total)

    def _align(self, implied_code: np.ndarray, support: np.ndarray, total: np.ndarray) -> None:
        """Sets the look-up arrays from, per source vocabulary position, the implied target's position
        (-1: none), the support and the total."""
        self.implied_code = implied_code
        self.weight = self.strength * (support / np.maximum(total, 1)) * np.log1p(support)
        sure = (support >= CERTAIN_SUPPORT) & (support >= CERTAIN_SHARE * total)
        sure &= (self.implied_code >= 0) & (self.strength >= CERTAIN_STRENGTH)
        self.certain = np.where(sure, self.weight, 0.0)
        self.aligned = True

    def certain_weight(self, source_codes: np.ndarray) -> np.ndarray:
        """Per source value code, the weight of the dependency where it is near-certain evidence, else 0."""
        if not len(self.certain):
            return np.zeros(len(source_codes))
        has = source_codes >= 0
        return np.where(has, self.certain[np.where(has, source_codes, 0)], 0.0)

    def lookup(self, source_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The implied target code (-1 unknown) and the evidence weight per source value code."""
        has = source_codes >= 0
        safe = np.where(has, source_codes, 0)
        if not len(self.implied_code):
            return np.full(len(source_codes), -1), np.zeros(len(source_codes))
        return np.where(has, self.implied_code[safe], -1), np.where(has, self.weight[safe], 0.0)


@dataclass
class NumberGroup:
    """A number field's usual (log10) value per value of the grouping field."""

    target: str
    group: str
    explained: float
    medians: dict[str, float]
    rows: dict[str, int]


@dataclass
class Profile:
    """All detector families learned from one table of records."""

    fields: dict[str, FieldProfile]
    dependencies: list[Dependency]
    groups: dict[str, NumberGroup]
    time_column: str | None
    rows: int
    by_target: dict[str, list[Dependency]] = field(default_factory=dict)
    by_source: dict[str, list[Dependency]] = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        # The lookup cache is keyed by object ids, which do not survive pickling; it is rebuilt on use.
        return {**self.__dict__, "cache": {}}

    def __post_init__(self) -> None:
        self.by_target = {}
        self.by_source = {}
        for dep in self.dependencies:
            dep.index(self.fields[dep.source].vocab, self.fields[dep.target].vocab)
            self.by_target.setdefault(dep.target, []).append(dep)
            self.by_source.setdefault(dep.source, []).append(dep)


def entry_times(frame: pd.DataFrame, time_column: str | None) -> pd.Series | None:
    """The entry time as naive UTC timestamps, or None without a time column."""
    if not time_column or time_column not in frame.columns:
        return None
    stamps = pd.to_datetime(
        text_column(frame, time_column).replace(s.MISSING, None), errors="coerce", format="ISO8601", utc=True
    )
    return stamps.dt.tz_localize(None)


parse_dates = date_type.parse_dates
SCHEME_VALUES = 20_000


def profile_field(
    values: pd.Series, name: str, kind: str, times: pd.Series | None, schemes: list[str] | None = None
) -> FieldProfile:
    """Learns one field's profile from its values (text, `''` = missing); `schemes` fixes its identifier
    checks (by default those its values support, `adopted_schemes`)."""
    return _profile_values(_FieldValues.of(values), None, name, kind, times, schemes)


@dataclass
class _FieldValues:
    """One field's values coded once (`codes` into `uniques`, first-appearance order) with what profiling
    needs of each distinct value (shape, case, length, decimals written), computed once however many
    subsets of the rows (cross-fitting folds) are profiled. Only the codes are kept per row: a million
    rows' texts would be a million Python strings per field."""

    index: pd.Index
    codes: np.ndarray
    uniques: np.ndarray
    missing: int
    facts: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, values: pd.Series) -> _FieldValues:
        coded = _Coded.of(values)
        return cls(values.index, coded.codes, coded.uniques, coded.missing)

    def values(self, rows: np.ndarray | None) -> pd.Series:
        """The texts at `rows` (positions; None: all) with their index, as `text_column` gives them."""
        if rows is None:
            return pd.Series(self.uniques[self.codes], index=self.index, dtype=object)
        return pd.Series(self.uniques[self.codes[rows]], index=self.index[rows], dtype=object)

    def fact(self, name: str, fn: Callable[[str], object]) -> np.ndarray:
        """`fn` of each distinct value (object array aligned with `uniques`; cached under `name`)."""
        if name not in self.facts:
            self.facts[name] = np.array([fn(v) for v in self.uniques] + [None], dtype=object)[:-1]
        return self.facts[name]

    def coded(self, rows: np.ndarray | None) -> _Coded:
        """The `_Coded` of the values at `rows` (positions; None: all), as `_Coded.of` would code them."""
        if rows is None:
            return _Coded(self.codes, self.uniques, self.missing, np.arange(len(self.uniques)))
        codes, present = pd.factorize(self.codes[rows])  # integers: first-appearance order, as the texts
        where = np.flatnonzero(present == self.missing)
        missing = int(where[0]) if len(where) else -1
        return _Coded(codes.astype(np.int64), self.uniques[present], missing, present.astype(np.int64))

    def running_parts(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`running_parts` of the values coded `codes`, each distinct value parsed once per table."""
        if "running_prefix" not in self.facts:
            prefix, number, ok = running_parts(self.uniques)
            self.facts.update(running_prefix=prefix, running_number=number, running_ok=ok)
        facts = self.facts
        return facts["running_prefix"][codes], facts["running_number"][codes], facts["running_ok"][codes]

    def fact_of_all(self, name: str, fn: Callable[[object], bool]) -> bool:
        """Whether `fn` holds for every distinct value (cached under `name`)."""
        if name not in self.facts:
            self.facts[name] = np.array([all(fn(v) for v in self.uniques)])
        return bool(self.facts[name][0])


def _value_counts(codes: np.ndarray, missing: int, n_uniques: int) -> tuple[np.ndarray, np.ndarray]:
    """The filled values' codes and counts in `Series.value_counts` order: most frequent first, ties in
    order of first appearance."""
    filled = codes[codes != missing]
    counts = np.bincount(filled, minlength=n_uniques)
    present, first = np.unique(filled, return_index=True)
    appearance = present[np.argsort(first, kind="stable")]
    order = appearance[np.argsort(-counts[appearance], kind="stable")]
    return order, counts[order]


def _profile_values(
    column: _FieldValues,
    rows: np.ndarray | None,
    name: str,
    kind: str,
    times: pd.Series | None,
    schemes: list[str] | None = None,
) -> FieldProfile:
    """`profile_field` of the values at `rows` (positions into `column`; None: all of them)."""
    codes = column.codes if rows is None else column.codes[rows]
    values = column.values(rows)
    is_filled = codes != column.missing
    filled = values[is_filled]
    order, n = _value_counts(codes, column.missing, len(column.uniques))
    distinct = column.uniques[order]
    counts = pd.Series(n, index=pd.Index(distinct, dtype=object), name="count")
    shapes = column.fact("shape", shape_of)[order]
    # Per shape, in order of first appearance among the values by count: its rows and its first value.
    by_shape = pd.DataFrame({"n": n, "value": distinct}).groupby(shapes, sort=False)
    shape_counts = {str(k): int(v) for k, v in by_shape["n"].sum().items()}
    shape_example = {str(k): v for k, v in by_shape["value"].first().items()}
    coarse_counts: dict[str, int] = {}
    for sh, count in shape_counts.items():
        c = coarse_shape(sh)
        coarse_counts[c] = coarse_counts.get(c, 0) + count
    lengths = pd.Series(column.fact("length", len)[codes[is_filled]].astype(np.int64))
    case_totals = pd.Series(n, index=column.fact("case", _case_of)[order]).groupby(level=0).sum()
    case = str(case_totals.idxmax()) if len(case_totals) else "none"
    case_share = float(case_totals.max() / case_totals.sum()) if len(case_totals) else 0.0
    # A check digit on a date is a coincidence of its shape, never a rule of the field.
    if schemes is None:
        schemes = adopted_schemes(counts.iloc[:SCHEME_VALUES]) if len(filled) and kind != "date" else []
    profile = FieldProfile(
        name=name,
        kind=kind,
        rows=len(values),
        filled=len(filled),
        counts=dict(zip(distinct.tolist(), n.tolist(), strict=True)),
        shapes=shape_counts,
        coarse=coarse_counts,
        shape_example={
            k: shape_example[k] for k in sorted(shape_counts, key=shape_counts.get, reverse=True)[:20]
        },
        length_mean=float(lengths.mean()) if len(filled) else 0.0,
        length_std=float(lengths.std(ddof=0)) if len(filled) > 1 else 0.0,
        case=case,
        case_share=case_share,
        schemes=list(schemes),
    )
    places_of = column.fact("decimals", number_type.decimals_written)[order]
    written = places_of != None  # noqa: E711 - elementwise on an object array
    if written.any():
        places = pd.Series(places_of[written].astype(np.int64)).repeat(n[written])
        usual = int(places.mode().iloc[0])
        profile.decimals = usual
        profile.fixed_decimals = usual > 0 and float((places == usual).mean()) >= 0.9
    if kind == "number":
        plain = column.fact("plain_number", number_type.plain_number)[codes[is_filled]]
        numbers = pd.Series(plain.astype(float), index=filled.index)
        logs = np.log10(numbers.abs().clip(lower=1e-9))[numbers.notna() & (numbers != 0)]
        if len(logs):
            profile.number_center = float(logs.median())
            profile.number_spread = float(max((logs - logs.median()).abs().median() * 1.4826, 0.05))
        decimals = column.fact("decimals", number_type.decimals_written)[codes[is_filled]]
        decimals = pd.Series(np.where(decimals == None, 0, decimals).astype(np.int64))  # noqa: E711
        profile.decimals = int(decimals.mode().iloc[0]) if len(decimals) else 0
    if kind == "code":
        profile.sequence = _is_sequence(values, times)
        if profile.sequence:
            profile.sequence_horizon = sequence_horizon(values, times, column.running_parts(codes))
        years = per_value(filled.iloc[:2000], embedded_year)
        profile.embeds_year = bool(len(years)) and years.notna().mean() > 0.9
    if kind == "date":
        profile.date_format = date_type.best_date_format(filled)
        if profile.date_format and times is not None:
            dates = parse_dates(values, profile.date_format)
            delta = (dates - times.reindex(values.index)).dt.total_seconds() / 86400.0
            delta = delta.dropna()
            if len(delta) >= 5:
                profile.delta_low = float(delta.quantile(0.005))
                profile.delta_high = float(delta.quantile(0.995))
                profile.delta_median = float(delta.median())
    return profile


@dataclass
class _Coded:
    """A column as integer codes (first-appearance order), its distinct values and the code of `''`."""

    codes: np.ndarray
    uniques: np.ndarray
    missing: int
    origin: np.ndarray | None = None  # made by `_FieldValues.coded`: each value's code in the whole column

    @classmethod
    def of(cls, values: pd.Series) -> _Coded:
        codes, uniques = pd.factorize(values.to_numpy(dtype=object))
        uniques = np.asarray(uniques, dtype=object)
        where = np.flatnonzero(uniques == s.MISSING)
        return cls(codes.astype(np.int64), uniques, int(where[0]) if len(where) else -1)


def _dependency_stats(src: _Coded, tgt: _Coded) -> tuple[float, float, tuple[np.ndarray, ...]] | None:
    """Coverage and strength of `src` -> `tgt`, and per source value its mode target, the mode's count and
    the source value's rows; None when no source value repeats. One `np.unique` over code pairs."""
    modes = _mode_targets(src, tgt)
    if modes is None:
        return None
    best_source, best_target, best_count, best_total = modes
    repeated = best_total >= 2
    if not repeated.any():
        return None
    coverage = float(best_total[repeated].sum() / best_total.sum())
    strength = float(best_count[repeated].sum() / best_total[repeated].sum())
    return coverage, strength, modes


def _mode_targets(src: _Coded, tgt: _Coded) -> tuple[np.ndarray, ...] | None:
    """Per filled source value (code): its most frequent target (code), that count and the source value's
    rows; None when the source is empty throughout."""
    keep = src.codes != src.missing
    if not keep.any():
        return None
    n_tgt = max(len(tgt.uniques), 1)
    key = src.codes[keep] * n_tgt + tgt.codes[keep]
    pairs, counts = np.unique(key, return_counts=True)
    source, target = pairs // n_tgt, pairs % n_tgt
    # Per source value, its most frequent target; ties go to the target more frequent in the whole table
    # (a slip is rarer than the value it replaced), then to the one seen first.
    frequency = np.bincount(tgt.codes, minlength=n_tgt)[target]
    order = np.lexsort((target, -frequency, -counts, source))
    first = order[np.r_[True, source[order][1:] != source[order][:-1]]]
    totals = np.bincount(source, weights=counts, minlength=len(src.uniques))
    best_source, best_target, best_count = source[first], target[first], counts[first]
    return best_source, best_target, best_count, totals[best_source]


def _accepts(stats: tuple | None, tgt: _Coded) -> bool:
    if stats is None:
        return False
    coverage, strength, _ = stats
    if coverage < MIN_DEPENDENCY_COVERAGE or strength < MIN_DEPENDENCY_STRENGTH:
        return False
    # A target that is nearly constant is "determined" by anything; it carries no information.
    target_top = np.bincount(tgt.codes).max() / len(tgt.codes)
    return strength > target_top + 0.02


def _dependency_of(
    source: str,
    target: str,
    src: _Coded,
    tgt: _Coded,
    positions: tuple[np.ndarray, int, np.ndarray] | None = None,
) -> Dependency | None:
    """The dependency `source` -> `target`, or None. `positions` (the source's vocabulary position per
    `src` code, the vocabulary's size, the target's vocabulary position per `tgt` code; -1 for values
    outside it) aligns the look-up arrays here, from the codes, instead of in `Dependency.index` by
    looking up every vocabulary value in the dictionaries (the same numbers)."""
    stats = _dependency_stats(src, tgt)
    if not _accepts(stats, tgt):
        return None
    _, strength, (best_source, best_target, best_count, best_total) = stats
    keys = src.uniques[best_source]
    implied_values = tgt.uniques[best_target]
    filled = implied_values != s.MISSING
    if positions is None:
        implied = {str(k): str(v) for k, v in zip(keys[filled], implied_values[filled], strict=True)}
        support = {str(k): int(v) for k, v in zip(keys, best_count, strict=True)}
        total = {str(k): int(v) for k, v in zip(keys, best_total, strict=True)}
    else:  # every value is a string already: the same dictionaries without a call per value
        implied = dict(zip(keys[filled].tolist(), implied_values[filled].tolist(), strict=True))
        support = dict(zip(keys.tolist(), best_count.astype(np.int64).tolist(), strict=True))
        total = dict(zip(keys.tolist(), best_total.astype(np.int64).tolist(), strict=True))
    dep = Dependency(
        source=source, target=target, strength=strength, implied=implied, support=support, total=total
    )
    if positions is not None:
        source_at, size, target_at = positions
        at = source_at[best_source]
        implied_code = np.full(size, -1, dtype=np.int64)
        support, total = np.zeros(size), np.ones(size)
        implied_code[at] = np.where(filled, target_at[best_target], -1)
        support[at] = best_count.astype(np.int64)
        total[at] = best_total.astype(np.int64)
        dep._align(implied_code, support, total)  # `Profile` calls `index`, which then keeps these arrays
    return dep


def _dependency(frame: pd.DataFrame, source: str, target: str) -> Dependency | None:
    """How strongly `source` determines `target` in `frame` (text columns), or None when it does not."""
    return _dependency_of(source, target, _Coded.of(frame[source]), _Coded.of(frame[target]))


_INTEGER = re.compile(r"^\d{1,18}$")


def can_determine(values: pd.Series, kind: str) -> bool:
    """Whether a field may be the source of a dependency: not dates or measured numbers, but numbers that
    are identifiers (whole numbers, e.g. a brewery or provider number) are."""
    if kind == "date":
        return False
    if kind != "number":
        return True
    filled = values[values != s.MISSING]
    if filled.empty:
        return False
    distinct = pd.unique(filled.to_numpy(dtype=object))
    return bool(np.mean([bool(_INTEGER.match(v)) for v in distinct]) >= 0.95)


def find_dependencies(frame: pd.DataFrame, fields: dict[str, str]) -> list[tuple[str, str]]:
    """The ordered field pairs (A, B) where A determines B in this table."""
    coded = {name: _Coded.of(frame[name]) for name in fields}
    return _dependencies_of(coded, fields, lambda name: frame[name])


def _dependencies_of(
    coded: dict[str, _Coded], fields: dict[str, str], values: Callable[[str], pd.Series]
) -> list[tuple[str, str]]:
    """`find_dependencies` of a table coded per field; `values(name)` gives a field's texts."""
    pairs = []
    for source, kind in fields.items():
        if not can_determine(values(source), kind):
            continue
        for target in fields:
            if target != source and _accepts(_dependency_stats(coded[source], coded[target]), coded[target]):
                pairs.append((source, target))
    return pairs


def _number_group(frame: pd.DataFrame, target: str, fields: dict[str, str]) -> NumberGroup | None:
    """The field whose values best explain `target`'s numbers (text columns), or None."""
    numbers = per_value(frame[target], number_type.plain_number).to_numpy(dtype=float)
    candidates = (
        (group, frame[group].to_numpy(dtype=object), s.MISSING, _key_texts)
        for group, kind in fields.items()
        if group != target and kind not in ("number", "date")
    )
    return _best_number_group(target, numbers, candidates)


def _key_texts(keys: pd.Index) -> np.ndarray:
    return np.array([str(k) for k in keys], dtype=object)


def _best_number_group(
    target: str,
    numbers: np.ndarray,
    candidates: Iterable[tuple[str, np.ndarray, object, Callable[[pd.Index], np.ndarray]]],
) -> NumberGroup | None:
    """The number group of `target` (its values read as numbers, NaN where not one) that explains the most
    variance of their logarithm: per candidate (the group field, its key per row, the key of a missing
    value, and the texts of a set of keys), the median per key held by at least `MIN_GROUP_ROWS` rows,
    kept when it covers 30% of the rows and explains at least `MIN_GROUP_EXPLAINED`. Keys may be texts or
    value codes (the same numbers either way; the medians are listed by text)."""
    ok = ~np.isnan(numbers) & (numbers > 0)
    if ok.sum() < 10:
        return None
    logs = pd.Series(np.log10(numbers[ok]))
    total_var = float(logs.var(ddof=0))
    if total_var <= 0:
        return None
    best: NumberGroup | None = None
    for group, keys, missing, texts_of in candidates:
        keys = keys[ok]
        stats = logs.groupby(keys).agg(["median", "size"])
        stats = stats[(stats["size"] >= MIN_GROUP_ROWS) & (stats.index != missing)]
        if stats.empty:
            continue
        at = stats.index.get_indexer(keys)
        med = np.where(at >= 0, stats["median"].to_numpy()[at], np.nan)
        covered = at >= 0
        if covered.mean() < 0.3:
            continue
        resid_var = float(((logs[covered] - pd.Series(med[covered], index=logs.index[covered])) ** 2).mean())
        explained = 1 - resid_var / total_var
        if explained >= MIN_GROUP_EXPLAINED and (best is None or explained > best.explained):
            names = texts_of(stats.index)
            order = sorted(range(len(names)), key=names.__getitem__)  # by text, as grouping texts sorts
            medians, sizes = stats["median"].to_numpy()[order], stats["size"].to_numpy()[order]
            best = NumberGroup(
                target=target,
                group=group,
                explained=explained,
                medians=dict(zip(names[order].tolist(), medians.tolist(), strict=True)),
                rows=dict(zip(names[order].tolist(), sizes.astype(np.int64).tolist(), strict=True)),
            )
    return best


def build_profile(
    frame: pd.DataFrame,
    config: Config,
    *,
    pairs: Iterable[tuple[str, str]] | None = None,
    schemes: dict[str, list[str]] | None = None,
) -> Profile:
    """Learns every detector family from a table of records (the history as stored).

    `pairs` fixes which dependencies to learn (so the profiles of cross-validation folds agree); by default
    they are found in `frame`. `schemes` fixes each field's identifier checks likewise (by default those
    the field's values support, `adopted_schemes`).
    """
    return ProfileTable.of(frame, config).profile(pairs=pairs, schemes=schemes)


def _is_text(value: object) -> bool:
    return type(value) is str


@dataclass
class ProfileTable:
    """A table of records coded once, to profile it and subsets of its rows (the error model's cross-fitting
    folds) without hashing its texts or parsing its entry times again: `table.profile(rows)` is
    `build_profile(frame.iloc[rows])`, the same numbers in the same order."""

    columns: dict[str, _FieldValues]
    kinds: dict[str, str]
    times: pd.Series | None
    time_column: str | None
    rows: int

    @classmethod
    def of(cls, frame: pd.DataFrame, config: Config) -> ProfileTable:
        kinds = {name: spec.type for name, spec in config.fields.items() if name in frame.columns}
        columns = {name: _FieldValues.of(text_column(frame, name)) for name in kinds}
        return cls(columns, kinds, entry_times(frame, config.time_column), config.time_column, len(frame))

    def profile(
        self,
        rows: np.ndarray | None = None,
        *,
        pairs: Iterable[tuple[str, str]] | None = None,
        schemes: dict[str, list[str]] | None = None,
    ) -> Profile:
        """The profile of the rows at `rows` (positions in table order; None: every row)."""
        kinds = self.kinds
        times = self.times if rows is None or self.times is None else self.times.iloc[rows]
        profiles = {
            name: _profile_values(
                self.columns[name],
                rows,
                name,
                kind,
                times,
                None if schemes is None else list(schemes.get(name, [])),
            )
            for name, kind in kinds.items()
        }
        texts = None
        if pairs is None:
            texts = self._texts(rows)
            pairs = find_dependencies(texts, kinds)
        pairs = list(pairs)
        coded = {name: self.columns[name].coded(rows) for name in {f for pair in pairs for f in pair}}
        at = {name: self._vocab_positions(name, rows, coded[name]) for name in coded}
        dependencies = []
        for a, b in pairs:
            aligned = None if at[a] is None or at[b] is None else (*at[a], at[b][0])
            if (dep := _dependency_of(a, b, coded[a], coded[b], aligned)) is not None:
                dependencies.append(dep)
        groups = {}
        for name, kind in kinds.items():
            if kind != "number":
                continue
            if all(column.fact_of_all("is_text", _is_text) for column in self.columns.values()):
                group = self._number_group(rows, name)
            else:
                texts = self._texts(rows) if texts is None else texts
                group = _number_group(texts, name, kinds)
            if group is not None:
                groups[name] = group
        return Profile(
            fields=profiles,
            dependencies=dependencies,
            groups=groups,
            time_column=self.time_column,
            rows=self.rows if rows is None else len(rows),
        )

    def dependencies(self) -> list[tuple[str, str]]:
        """`find_dependencies` of the whole table, from its codes: no Python string per row and field."""
        coded = {name: column.coded(None) for name, column in self.columns.items()}
        return _dependencies_of(coded, self.kinds, lambda name: self.columns[name].values(None))

    def _texts(self, rows: np.ndarray | None) -> pd.DataFrame:
        return pd.DataFrame({name: column.values(rows) for name, column in self.columns.items()})

    def _number_group(self, rows: np.ndarray | None, target: str) -> NumberGroup | None:
        """`_number_group` of the rows at `rows` from the value codes: each distinct value read as a number
        once per table, the groups formed on codes instead of texts (the same numbers, in the same order)."""
        column = self.columns[target]
        codes = column.codes if rows is None else column.codes[rows]
        numbers = column.fact("plain_number", number_type.plain_number)[codes].astype(float)
        candidates = (
            (group, keys.codes if rows is None else keys.codes[rows], keys.missing, keys.uniques.__getitem__)
            for group, kind in self.kinds.items()
            if group != target and kind not in ("number", "date")
            for keys in [self.columns[group]]
        )
        return _best_number_group(target, numbers, candidates)

    def _vocab_positions(
        self, name: str, rows: np.ndarray | None, coded: _Coded
    ) -> tuple[np.ndarray, int] | None:
        """Per code of `coded` (the field's values at `rows`), its position in the vocabulary of the field's
        profile of those rows (`FieldProfile.vocab`: filled values, most frequent first), -1 for `''`; and
        the vocabulary's size. None when the values are not all strings (the vocabulary then holds other
        keys than the dependencies' dictionaries, and `Dependency.index` looks them up as it always did)."""
        column = self.columns[name]
        if not column.fact_of_all("is_text", _is_text):
            return None
        codes = column.codes if rows is None else column.codes[rows]
        order, _ = _value_counts(codes, column.missing, len(column.uniques))
        position = np.full(len(column.uniques), -1, dtype=np.int64)
        position[order] = np.arange(len(order))
        return position[coded.origin], len(order)


def extend_profile(profile: Profile, frame: pd.DataFrame) -> Profile:
    """A copy of `profile` whose lookups also know the records of `frame` (e.g. the reference as stored):
    the values of each field (known codes), the source values of each dependency (a customer name and its
    code) and the group keys of each number group (a customer's usual amount) that the profile does not
    know are added with their counts in `frame`.

    What the profile knows stays as it is, and so does everything else it learned (shapes, lengths, number
    scale, date range, identifier checks, which pairs are dependencies and how strong): a classifier was
    fitted on those. Only the profiled columns of `frame` are read; each is counted once, vectorised.

    >>> from pipeline.config import Config
    >>> fields = {"name": {"type": "text"}, "code": {"type": "code"}}
    >>> cfg = Config.model_validate({"name": "x", "fields": fields})
    >>> old = build_profile(pd.DataFrame({"name": ["A", "A", "B", "B"], "code": ["1", "1", "2", "2"]}), cfg)
    >>> new = extend_profile(old, pd.DataFrame({"name": ["C", "A"], "code": ["3", "9"]}))
    >>> new.by_target["code"][0].implied, new.fields["code"].counts
    ({'A': '1', 'B': '2', 'C': '3'}, {'1': 2, '2': 2, '3': 1, '9': 1})
    """
    names = [name for name in profile.fields if name in frame.columns]
    texts = pd.DataFrame({name: text_column(frame, name) for name in names}, index=frame.index)
    coded = {name: _Coded.of(texts[name]) for name in names}
    fields = dict(profile.fields)
    for name in names:
        fp, column = profile.fields[name], coded[name]
        counts = np.bincount(column.codes, minlength=len(column.uniques))
        new = ~pd.Index(column.uniques).isin(fp.vocab) & (column.uniques != s.MISSING)
        if new.any():
            order = np.flatnonzero(new)[np.argsort(-counts[new], kind="stable")]  # most frequent first
            added = dict(zip([str(v) for v in column.uniques[order]], counts[order].tolist(), strict=True))
            fields[name] = dataclasses.replace(fp, counts={**fp.counts, **added})
    dependencies = []
    for dep in profile.dependencies:
        if dep.source not in coded or dep.target not in coded:
            dependencies.append(dataclasses.replace(dep))
            continue
        src, tgt = coded[dep.source], coded[dep.target]
        modes = _mode_targets(src, tgt)
        implied, support, total = dep.implied, dep.support, dep.total
        if modes is not None:
            best_source, best_target, best_count, best_total = modes
            keys = src.uniques[best_source]
            fresh = ~pd.Index(keys).isin(pd.Index(list(dep.support), dtype=object))
            keys = [str(k) for k in keys[fresh]]
            targets = [str(v) for v in tgt.uniques[best_target[fresh]]]
            # Source values new to the profile only: what it knew stays, in its order.
            implied = {
                **implied,
                **{k: v for k, v in zip(keys, targets, strict=True) if v != s.MISSING},
            }
            support = {**support, **dict(zip(keys, best_count[fresh].tolist(), strict=True))}
            total = {**total, **dict(zip(keys, best_total[fresh].astype(int).tolist(), strict=True))}
        dependencies.append(dataclasses.replace(dep, implied=implied, support=support, total=total))
    groups = dict(profile.groups)
    for name, group in profile.groups.items():
        if name not in texts or group.group not in texts:
            continue
        numbers = per_value(texts[name], number_type.plain_number).astype(float)
        ok = (numbers.notna() & (numbers > 0)).to_numpy()
        keys = texts[group.group].to_numpy(dtype=object)[ok]
        stats = np.log10(numbers[ok]).groupby(keys).agg(["median", "size"])
        stats = stats[(stats["size"] >= MIN_GROUP_ROWS) & (stats.index != s.MISSING)]
        stats = stats[~stats.index.isin(pd.Index(list(group.medians), dtype=object))]
        if len(stats):
            groups[name] = dataclasses.replace(
                group,
                medians={**group.medians, **{str(k): float(v) for k, v in stats["median"].items()}},
                rows={**group.rows, **{str(k): int(v) for k, v in stats["size"].items()}},
            )
    return Profile(
        fields=fields,
        dependencies=dependencies,
        groups=groups,
        time_column=profile.time_column,
        rows=profile.rows,
    )


# ---------------------------------------------------------------------------------------------------------
# Edit history (learned from the log)


@dataclass
class EditHistory:
    """How often each value and each shape of a field was corrected, from records as entered and labels."""

    value_errors: dict[str, dict[str, int]]
    value_seen: dict[str, dict[str, int]]
    shape_errors: dict[str, dict[str, int]]
    shape_seen: dict[str, dict[str, int]]
    field_rate: dict[str, float]
    cache: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        # The lookup cache is keyed by object ids, which do not survive pickling; it is rebuilt on use.
        return {**self.__dict__, "cache": {}}

    @classmethod
    def learn(cls, entered: pd.DataFrame, labels: pd.DataFrame, config: Config) -> EditHistory:
        """`labels` are `cell_labels` rows (record_id, field, old_value, new_value) of `entered`'s records."""
        id_column = config.id_column
        value_errors, value_seen, shape_errors, shape_seen, field_rate = {}, {}, {}, {}, {}
        for name in config.fields:
            if name not in entered.columns:
                continue
            values = text_column(entered, name)
            ids = set(labels.loc[labels[s.LOG_FIELD] == name, s.LOG_RECORD_ID])
            wrong = entered[id_column].isin(ids).to_numpy()
            shapes = per_value(values, shape_of)
            value_seen[name] = {str(k): int(v) for k, v in values.value_counts().items()}
            value_errors[name] = {str(k): int(v) for k, v in values[wrong].value_counts().items()}
            shape_seen[name] = {str(k): int(v) for k, v in shapes.value_counts().items()}
            shape_errors[name] = {str(k): int(v) for k, v in shapes[wrong].value_counts().items()}
            field_rate[name] = float(wrong.mean()) if len(wrong) else 0.0
        return cls(value_errors, value_seen, shape_errors, shape_seen, field_rate)


@dataclass
class EditTable:
    """A history as entered and its labels coded once, to learn the `EditHistory` of subsets of its rows
    (the error model's cross-fitting folds) by counting codes: `table.history(rows)` holds the same counts
    as `EditHistory.learn(entered.iloc[rows], labels of those rows, config)`, in another order (they are
    only looked up), and no value that none of `rows` holds."""

    # Per field: each row's value code, the values, each value's shape code, the shapes, the corrected rows.
    columns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, entered: pd.DataFrame, labels: pd.DataFrame, config: Config) -> EditTable:
        columns = {}
        for name in config.fields:
            if name not in entered.columns:
                continue
            values = text_column(entered, name)
            codes, uniques = pd.factorize(values.to_numpy(dtype=object), use_na_sentinel=False)
            shape_codes, shapes = pd.factorize(
                np.array([shape_of(value) for value in uniques], dtype=object), use_na_sentinel=False
            )
            ids = set(labels.loc[labels[s.LOG_FIELD] == name, s.LOG_RECORD_ID])
            wrong = entered[config.id_column].isin(ids).to_numpy()
            columns[name] = (codes, np.asarray(uniques, dtype=object), shape_codes, shapes, wrong)
        return cls(columns)

    def history(self, rows: np.ndarray) -> EditHistory:
        """The `EditHistory` of the rows at `rows` (positions)."""
        value_errors, value_seen, shape_errors, shape_seen, field_rate = {}, {}, {}, {}, {}
        for name, (codes, uniques, shape_codes, shapes, wrong) in self.columns.items():
            own, bad = codes[rows], wrong[rows]
            seen = np.bincount(own, minlength=len(uniques))
            errors = np.bincount(own[bad], minlength=len(uniques))
            value_seen[name] = _counts(uniques, seen)
            value_errors[name] = _counts(uniques, errors)
            shape_seen[name] = _counts(shapes, np.bincount(shape_codes, weights=seen, minlength=len(shapes)))
            shape_errors[name] = _counts(
                shapes, np.bincount(shape_codes, weights=errors, minlength=len(shapes))
            )
            field_rate[name] = float(bad.mean()) if len(bad) else 0.0
        return EditHistory(value_errors, value_seen, shape_errors, shape_seen, field_rate)


def _counts(keys: np.ndarray, counts: np.ndarray) -> dict[str, int]:
    """`{key: count}` for the keys counted at least once."""
    at = np.flatnonzero(counts)
    return dict(zip(keys[at].tolist(), counts[at].astype(np.int64).tolist(), strict=True))


def _rate(
    cache: dict, keys: np.ndarray, errors: dict[str, int], seen: dict[str, int], prior: float
) -> np.ndarray:
    return _smoothed(lookup(cache, errors, keys, 0.0), lookup(cache, seen, keys, 0.0), prior)


def _smoothed(errors: np.ndarray, seen: np.ndarray, prior: float) -> np.ndarray:
    """Error rates pulled towards `prior` by `SMOOTHING` pseudo-observations."""
    return (errors + prior * SMOOTHING) / (seen + SMOOTHING)


# ---------------------------------------------------------------------------------------------------------
# Features


def lookup(cache: dict, mapping: dict, keys: np.ndarray, default: float = np.nan) -> np.ndarray:
    """`mapping[key]` for each key as a float array (`default` where absent).

    Looks up each distinct key once (a chunk repeats its values); `cache` is kept for callers that pass
    one and is not needed any more.
    """
    if not len(mapping) or not len(keys):
        return np.full(len(keys), default, dtype=float)
    if len(keys) <= SMALL_CHUNK:
        get = mapping.get
        return np.fromiter((get(k, default) for k in keys), dtype=float, count=len(keys))
    codes, uniques = pd.factorize(np.asarray(keys, dtype=object), use_na_sentinel=False)
    get = mapping.get
    values = np.fromiter((get(k, default) for k in uniques), dtype=float, count=len(uniques))
    return values[codes]


def _dependency_features(codes: dict[str, np.ndarray], name: str, profile: Profile) -> dict[str, np.ndarray]:
    n = len(codes[name])
    own = codes[name]
    known = np.zeros(n)
    agree = np.zeros(n)
    disagree = np.zeros(n)
    agree_w = np.zeros(n)
    disagree_w = np.zeros(n)
    certain_w = np.zeros(n)
    for dep in profile.by_target.get(name, []):
        src = codes[dep.source]
        implied, weight = dep.lookup(src)
        has = implied >= 0
        same = implied == own
        known += has
        agree += has & same
        disagree += has & ~same
        agree_w += np.where(has & same, weight, 0)
        disagree_w += np.where(has & ~same, weight, 0)
        certain_w += np.where(has & ~same, dep.certain_weight(src), 0)
    rev_known = np.zeros(n)
    rev_agree = np.zeros(n)
    rev_disagree = np.zeros(n)
    rev_disagree_w = np.zeros(n)
    for dep in profile.by_source.get(name, []):
        implied, weight = dep.lookup(own)
        has = implied >= 0
        same = implied == codes[dep.target]
        rev_known += has
        rev_agree += has & same
        rev_disagree += has & ~same
        rev_disagree_w += np.where(has & ~same, weight, 0)
    return {
        "dep_known": known,
        "dep_agree": agree,
        "dep_disagree": disagree,
        "dep_agree_weight": agree_w,
        "dep_disagree_weight": disagree_w,
        "dep_certain_disagree": certain_w,
        "rev_known": rev_known,
        "rev_agree": rev_agree,
        "rev_disagree": rev_disagree,
        "rev_disagree_weight": rev_disagree_w,
    }


def _number_features(
    texts: pd.DataFrame, name: str, fp: FieldProfile, group: NumberGroup | None, cache: dict
) -> dict:
    values = texts[name]
    numbers = per_value(values, number_type.plain_number).astype(float).to_numpy()
    filled = (values != s.MISSING).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(numbers > 0, np.log10(np.abs(numbers)), np.nan)
    out = {
        "number_unparsed": np.where(filled, np.isnan(numbers).astype(float), np.nan),
        "number_log": logs,
        "number_z": (logs - fp.number_center) / fp.number_spread
        if math.isfinite(fp.number_spread)
        else logs * np.nan,
    }
    if group is not None:
        keys = texts[group.group].to_numpy(dtype=object)
        med = lookup(cache, group.medians, keys)
        rows = lookup(cache, group.rows, keys, 0.0)
        ratio = logs - med
        out["group_log_ratio"] = ratio
        out["group_abs_log_ratio"] = np.abs(ratio)
        out["group_pow10_gap"] = np.abs(ratio - np.round(ratio))
        out["group_rows"] = rows
    return out


def _date_features(texts: pd.DataFrame, name: str, fp: FieldProfile, times: pd.Series | None) -> dict:
    values = texts[name]
    filled = (values != s.MISSING).to_numpy()
    if not fp.date_format:
        return {}
    dates = parse_dates(values, fp.date_format)
    unparsed = dates.isna().to_numpy() & filled
    other = np.zeros(len(values), dtype=bool)
    if unparsed.any():
        rest = values[unparsed]
        ok = np.zeros(len(rest), dtype=bool)
        for fmt in DATE_FORMATS:
            if fmt != fp.date_format:
                ok |= parse_dates(rest, fmt).notna().to_numpy()
        other[np.flatnonzero(unparsed)] = ok
    out = {
        "date_unparsed": np.where(filled, unparsed.astype(float), np.nan),
        "date_other_format": np.where(filled, other.astype(float), np.nan),
    }
    if times is not None and math.isfinite(fp.delta_low):
        delta = ((dates - times).dt.total_seconds() / 86400.0).to_numpy(dtype=float)
        width = max(fp.delta_high - fp.delta_low, 1.0)
        outside = np.maximum(fp.delta_low - delta, 0) + np.maximum(delta - fp.delta_high, 0)
        out["date_delta_days"] = delta
        out["date_outside"] = outside / width
    return out


def _checksum_feature(values: pd.Series, fp: FieldProfile) -> np.ndarray:
    result = np.full(len(values), np.nan)
    for scheme in fp.schemes:
        verdict = per_value(values, SCHEMES[scheme]).to_numpy(dtype=object)
        applies = np.array([v is not None for v in verdict], dtype=bool)
        invalid = np.array([v is not None and not v for v in verdict], dtype=float)
        result = np.where(applies, np.fmax(np.nan_to_num(result, nan=0.0), invalid), result)
    return result


def record_year(texts: pd.DataFrame, profile: Profile, times: pd.Series | None) -> pd.Series:
    """Each record's year from its first date field (else its entry time), NaN when unknown."""
    for fp in profile.fields.values():
        if fp.kind == "date" and fp.date_format and fp.name in texts.columns:
            return parse_dates(texts[fp.name], fp.date_format).dt.year.astype(float)
    if times is not None:
        return times.dt.year.astype(float)
    return pd.Series(np.nan, index=texts.index)


def _sequence_features(
    texts: pd.DataFrame,
    name: str,
    fp: FieldProfile,
    profile: Profile,
    times: pd.Series | None,
    context: Context | None,
    numbers: RunningNumbers | None,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    values = texts[name]
    if fp.sequence:
        parts = running_parts(values)
        if context is not None:
            expected, rows = context.expectation(name)
            expected = expected.reindex(texts.index).to_numpy(dtype=float)
            rows = rows.reindex(texts.index).to_numpy(dtype=float)
        else:
            expected, rows = (numbers or RunningNumbers()).expect(
                name, values, times, fp.sequence_horizon, parts=parts
            )
        _, number, _ = parts
        # Whole numbers apart: the expectation is a median, halfway between two numbers when the window
        # holds a slip or a re-registered number, and a row right after them is no further off than one.
        out["sequence_gap"] = np.log1p(np.floor(np.abs(number - expected)))
        out["sequence_rows"] = rows
    if fp.embeds_year:
        years = per_value(values, embedded_year).astype(float).to_numpy()
        expected_year = record_year(texts, profile, times).to_numpy()
        out["year_mismatch"] = year_mismatch(years, expected_year, times)
    return out


def year_mismatch(years: np.ndarray, record_years: np.ndarray, times: pd.Series | None) -> np.ndarray:
    """1 where a value's embedded year differs from its record's year (`record_year`), 0 where it agrees,
    NaN when either is unknown. A year that agrees with the record's entry year is no mismatch: then the
    record's date is the odd one out (a slipped year in the date), not the number.

    >>> times = pd.Series(pd.to_datetime(["2024-07-10", "2024-07-10", None]))
    >>> year_mismatch(np.array([2024.0, 2023.0, 2023.0]), np.array([2025.0, 2024.0, 2024.0]), times).tolist()
    [0.0, 1.0, 1.0]
    """
    known = np.isfinite(years) & np.isfinite(record_years)
    mismatch = years != record_years
    if times is not None:
        entry_years = times.dt.year.to_numpy(dtype=float)
        mismatch &= ~(np.isfinite(entry_years) & (years == entry_years))
    return np.where(known, mismatch.astype(float), np.nan)


def field_features(
    texts: pd.DataFrame,
    name: str,
    profile: Profile,
    edits: EditHistory | None,
    times: pd.Series | None,
    context: Context | None = None,
    codes: dict[str, np.ndarray] | None = None,
    numbers: RunningNumbers | None = None,
) -> pd.DataFrame:
    """The feature frame (columns `FEATURES`) for one field of a chunk; `texts` holds the chunk's fields,
    `codes` their value codes (`FieldProfile.codes`; computed when not given).

    Running numbers are judged against the rows entered before them: those of `context` (texts and entry
    times of a larger frame holding the chunk, the training history) when given, else the rows before
    them in the chunk after those `numbers` has seen (the batch's earlier chunks; none by default).
    """
    fp = profile.fields[name]
    values = texts[name]
    keys = values.to_numpy(dtype=object)
    n = len(values)
    if codes is None:
        codes = {f: profile.fields[f].codes(texts[f].to_numpy(dtype=object)) for f in texts.columns}
    missing = keys == s.MISSING
    counts = fp.count_of(codes[name])
    inverse, uniques = pd.factorize(keys, use_na_sentinel=False)  # a hash table: no sort, no copy to str
    shapes_u = np.array([shape_of(v) for v in uniques], dtype=object)
    coarse_u = np.array([coarse_shape(v) for v in shapes_u], dtype=object)
    cases_u = np.array([_case_of(v) for v in uniques], dtype=object)
    odd_u = np.array([v != v.strip() or "  " in v for v in uniques], dtype=float)
    filled_n = max(fp.filled, 1)
    lengths = np.array([len(v) for v in uniques], dtype=float)[inverse]
    cases = cases_u[inverse]
    cache = profile.cache
    nan = np.full(n, np.nan)

    def unless_missing(array: np.ndarray) -> np.ndarray:
        return np.where(missing, np.nan, array)

    out: dict[str, np.ndarray] = {
        "missing": missing.astype(float),
        "missing_where_filled": missing * fp.fill_rate,
        "value_log_count": unless_missing(np.log1p(counts)),
        "value_share": unless_missing(counts / filled_n),
        "value_unseen": unless_missing((counts == 0).astype(float)),
        "shape_share": unless_missing(lookup(cache, fp.shapes, shapes_u, 0.0)[inverse] / filled_n),
        "coarse_shape_share": unless_missing(lookup(cache, fp.coarse, coarse_u, 0.0)[inverse] / filled_n),
        "length_z": unless_missing((lengths - fp.length_mean) / max(fp.length_std, 1.0)),
        "case_unusual": unless_missing(
            ((cases != fp.case) & (cases != "none")).astype(float) * fp.case_share
        ),
        "whitespace_odd": unless_missing(odd_u[inverse]),
    }
    out.update(_dependency_features(codes, name, profile))
    if fp.kind == "number":
        out.update(_number_features(texts, name, fp, profile.groups.get(name), cache))
    if fp.kind == "date":
        out.update(_date_features(texts, name, fp, times))
    out["checksum_invalid"] = _checksum_feature(values, fp) if fp.schemes else nan
    out.update(_sequence_features(texts, name, fp, profile, times, context, numbers))
    if edits is not None and name in edits.field_rate:
        prior = edits.field_rate[name]
        ecache = edits.cache
        # Looked up once per distinct value (and shape), then spread to the rows.
        corrected = lookup(ecache, edits.value_errors[name], uniques, 0.0)
        seen = lookup(ecache, edits.value_seen[name], uniques, 0.0)
        out["edit_value_rate"] = _smoothed(corrected, seen, prior)[inverse]
        # A value is evidence against itself only where staff corrected it more often than they kept it: a
        # typo corrected each time it was typed, not a date or an amount that one edit happened to fix.
        corrected, kept = corrected[inverse], seen[inverse] - corrected[inverse]
        out["edit_value_count"] = np.where(corrected > kept, np.log1p(corrected), 0.0)
        out["edit_shape_rate"] = _rate(
            ecache, shapes_u, edits.shape_errors[name], edits.shape_seen[name], prior
        )[inverse]
        out["edit_field_rate"] = np.full(n, prior)
    if fp.filled and not values_recur(fp):
        # How often a date occurs depends on when it was entered, not on whether it is right (a date just
        # after the history's end is rare in it); a running number or an amount is new in nearly every
        # record, right or wrong: such a field is judged by its format, its distance to the entry time, its
        # neighbours in the sequence or its group, and the value-frequency features say nothing.
        for key in VALUE_FREQUENCY:
            out.pop(key, None)
    matrix = np.column_stack([out.get(key, nan) for key in FEATURES]).astype(float)
    return pd.DataFrame(matrix, index=texts.index, columns=list(FEATURES))


# Value-frequency features, neutral (NaN) for filled fields whose values do not recur (`values_recur`; in a
# field never filled they describe the empty value, and stay).
VALUE_FREQUENCY = ("value_log_count", "value_share", "value_unseen", "edit_value_rate", "edit_value_count")
# A field's values recur when at least this share of its filled rows hold a value seen more than once.
RECURRING_SHARE = 0.5


def values_recur(fp: FieldProfile) -> bool:
    """Whether a field's values recur, so that how often a value occurred, or was corrected, says something
    about the next record holding it: not dates or running numbers (their values move with time), and at
    least `RECURRING_SHARE` of the filled rows hold a value seen more than once (not amounts or free text
    that is mostly unique)."""
    if fp.kind == "date" or fp.sequence or not fp.filled:
        return False
    return fp.recurring_share(2) >= RECURRING_SHARE


# Columns of `FEATURES` the label-free score reads.
_CHECKSUM = FEATURES.index("checksum_invalid")
_CERTAIN = FEATURES.index("dep_certain_disagree")
_DEP_AGREE = FEATURES.index("dep_agree_weight")
_DEP_DISAGREE = FEATURES.index("dep_disagree_weight")
_MISSING = FEATURES.index("missing")
_MISSING_WHERE_FILLED = FEATURES.index("missing_where_filled")
CHECKSUM_SCORE = 0.9
# An empty cell is near-certainly wrong only in a field filled in at least this share of stored records.
CERTAIN_FILL = 0.98


def weak_dependency_score(features: np.ndarray) -> np.ndarray:
    """The score of any dependency evidence, however thin (`1 - exp(-(disagree - agree))` over all weights):
    a city that three records of the same brewery write differently scores about 0.7. Used for fields the
    log never corrected only where the log shows it finds corrected errors out of fold."""
    net = np.nan_to_num(features[:, _DEP_DISAGREE]) - np.nan_to_num(features[:, _DEP_AGREE])
    return 1.0 - np.exp(-np.maximum(net, 0.0))


def unsupervised_score(features: np.ndarray, *, weak_dependencies: bool = False) -> np.ndarray:
    """An error score from near-certain evidence alone, for fields the log never corrected.

    `features`: rows of `FEATURES`. A value failing an identifier check that at least 98% of the field's
    stored values pass (`adopted_schemes`) scores `CHECKSUM_SCORE`. A value that near-certain dependencies
    imply otherwise (at least `CERTAIN_SUPPORT` stored records with the same source value, nearly all alike)
    scores by that weight net of any agreeing evidence (`1 - exp(-(certain - agree))`: about 0.8 for five
    records alike); an empty cell only in a field that is (nearly) always filled. Everything weaker (a tie
    between two records, a rare value) scores 0: without labels it cannot be told from a legitimate value,
    and a queue full of such guesses costs a clerk more than it finds.
    """
    checksum = np.nan_to_num(features[:, _CHECKSUM]) * CHECKSUM_SCORE
    net = np.nan_to_num(features[:, _CERTAIN]) - np.nan_to_num(features[:, _DEP_AGREE])
    dependency = 1.0 - np.exp(-np.maximum(net, 0.0))
    empty = features[:, _MISSING] == 1
    dependency = np.where(empty & (features[:, _MISSING_WHERE_FILLED] < CERTAIN_FILL), 0.0, dependency)
    if weak_dependencies:
        dependency = np.maximum(dependency, weak_dependency_score(features))
    return np.maximum(checksum, dependency)


@dataclass
class Context:
    """A larger frame holding a chunk's rows (the training history around a fold), where running numbers
    find the rows entered before them: its texts and entry times, and each field's expected running
    numbers, computed once however many folds ask."""

    texts: pd.DataFrame
    times: pd.Series | None
    expected: dict[str, tuple[pd.Series, pd.Series]] = field(default_factory=dict)

    @classmethod
    def of(cls, frame: pd.DataFrame, names: Iterable[str], time_column: str | None) -> Context:
        return cls(chunk_texts(frame, names), entry_times(frame, time_column))

    def expectation(self, name: str) -> tuple[pd.Series, pd.Series]:
        """`sequence_expectation` of the field over the whole context, within the horizon its own rows
        give (`sequence_horizon`; cached)."""
        if name not in self.expected:
            values = self.texts[name]
            horizon = sequence_horizon(values, self.times)
            self.expected[name] = sequence_expectation(values, self.times, horizon)
        return self.expected[name]


def chunk_texts(chunk: pd.DataFrame, names: Iterable[str]) -> pd.DataFrame:
    """The chunk's field columns as plain strings (`''` for missing), one copy made for all detectors."""
    return pd.DataFrame(
        {name: chunk[name].to_numpy(dtype=object, na_value=s.MISSING) for name in names},
        index=chunk.index,
        dtype=object,
    )


def cell_features(
    chunk: pd.DataFrame,
    profile: Profile,
    config: Config,
    fields: Iterable[str],
    edits: EditHistory | None = None,
    context: pd.DataFrame | Context | None = None,
    numbers: RunningNumbers | None = None,
) -> dict[str, pd.DataFrame]:
    """One feature frame per field in `fields` (same index as `chunk`, columns `FEATURES`).

    Every feature of a row depends on that row, the profile and the rows entered before it only, so a
    batch cut into chunks gets the features it gets in one piece. `context`: a larger frame holding the
    chunk's rows (training folds), where running numbers find the rows entered before them; else they are
    the chunk's earlier rows after those `numbers` (the state the batch's earlier chunks left) has seen.
    """
    names = [name for name in config.fields if name in profile.fields]
    texts = chunk_texts(chunk, names)
    times = entry_times(chunk, config.time_column)
    ctx = None
    if isinstance(context, Context):
        ctx = context
    elif context is not None:
        ctx = Context.of(context, names, config.time_column)
    codes = {name: profile.fields[name].codes(texts[name].to_numpy(dtype=object)) for name in names}
    return {name: field_features(texts, name, profile, edits, times, ctx, codes, numbers) for name in fields}

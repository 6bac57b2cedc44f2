"""`date` fields: order dates, invoice dates, dates of birth.

Read as ISO (`2024-03-05`, also with a time), compact (`20240305`) or day-first (`05-03-2024`, `5/3/2024`)
and normalised to ISO. Compared by days apart on a log scale, so a few days' slip is near, with day and
month swapped counting as one day; and by digit slips, so a mistyped year is near too. The graded levels
("more than 10 days apart") do not count a typing slip as another date: a one-digit slip or a year off by
one is not weeks or a year apart, and a year off by one or day and month swapped have levels of their own
(each also 1 for the same date, so that a slip may count nearly as much as an agreement, never more).
A date that is not a valid calendar date (a typo such as month 13) keeps its digits and is compared by
digits only.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from rapidfuzz.distance import OSA

from pipeline.fields.base import (
    BlockingKey,
    Difference,
    FieldType,
    beyond,
    capped_slips,
    made_keys,
    map_unique,
    vectorised,
)
from pipeline.schema import MISSING

MAX_DAYS = 3650
MAX_DIGIT_EDITS = 3
_ISO = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ].*)?$")
_COMPACT = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DAY_FIRST = re.compile(r"^(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})$")
_YEAR_SLASH = re.compile(r"^(\d{4})[/.](\d{1,2})[/.](\d{1,2})$")


class DateValue(NamedTuple):
    """A parsed date: the day number (None when not a calendar date) and its eight digits YYYYMMDD."""

    ordinal: int | None
    digits: str


def canonical_date(text: str) -> str:
    """`YYYY-MM-DD` for a valid date, the bare digits for an invalid one, `""` when there is no date.

    >>> [canonical_date(text) for text in ("5/3/2024", "20240305", "2024-13-05", "?")]
    ['2024-03-05', '2024-03-05', '20241305', '']
    """
    text = text.strip()
    parts: tuple[int, int, int] | None = None
    if match := _ISO.match(text) or _COMPACT.match(text) or _YEAR_SLASH.match(text):
        parts = (int(match[1]), int(match[2]), int(match[3]))
    elif match := _DAY_FIRST.match(text):
        day, month = int(match[1]), int(match[2])
        if month > 12 >= day:  # unambiguously month-first
            day, month = month, day
        parts = (int(match[3]), month, day)
    if parts is None:
        digits = re.sub(r"\D", "", text)
        return digits if len(digits) >= 6 else MISSING
    year, month, day = parts
    try:
        return dt.date(year, month, day).isoformat()
    except ValueError:
        return f"{year:04d}{month:02d}{day:02d}"


# The formats the error detectors learn a field's usual way of writing dates from (`best_date_format`).
DATE_FORMATS: tuple[str, ...] = (
    "%Y-%m-%d",
    "%d-%m-%Y",
    "%d/%m/%Y",
    "%m/%d/%Y",
    "%Y/%m/%d",
    "%d.%m.%Y",
    "%Y%m%d",
    "%d-%m-%y",
    "%d/%m/%y",
    "%m/%d/%y",
)
FORMAT_SHARE = 0.3


def read_date(text: str, fmt: str) -> dt.datetime | None:
    """The date in `text` written as `fmt` (a `DATE_FORMATS` entry), else None.

    >>> read_date("05-03-2024", "%d-%m-%Y").date(), read_date("2024-03-05", "%d-%m-%Y")
    (datetime.date(2024, 3, 5), None)
    """
    try:
        return dt.datetime.strptime(text.strip(), fmt)
    except ValueError:
        return None


def parse_dates(values: pd.Series, fmt: str) -> pd.Series:
    """Vectorised `read_date`: the dates written as `fmt` (NaT where a value does not fit it)."""
    return pd.to_datetime(values.replace(MISSING, None), format=fmt, errors="coerce")


def best_date_format(values: pd.Series) -> str | None:
    """The `DATE_FORMATS` entry that reads most of the field's filled values (at least `FORMAT_SHARE`)."""
    filled = values[values != MISSING]
    if filled.empty:
        return None
    sample = filled.iloc[:2000]
    best, best_share = None, 0.0
    for fmt in DATE_FORMATS:
        share = parse_dates(sample, fmt).notna().mean()
        if share > best_share + 1e-9:
            best, best_share = fmt, share
    return best if best_share > FORMAT_SHARE else None


def parse_date(normalised: str) -> DateValue | None:
    if normalised == MISSING:
        return None
    if len(normalised) == 10 and normalised[4] == "-":
        return DateValue(dt.date.fromisoformat(normalised).toordinal(), normalised.replace("-", ""))
    return DateValue(None, normalised)


def _swapped(a: DateValue, b: DateValue) -> bool:
    return a.digits[:4] == b.digits[:4] and a.digits[4:6] == b.digits[6:8] and a.digits[6:8] == b.digits[4:6]


def _days_between_many(
    xs: Sequence[DateValue], ys: Sequence[DateValue], year_slip: bool = False
) -> np.ndarray:
    """`days_between` per pair: the day numbers' difference, 1 where day and month are swapped (compared
    as the numbers YYYYMMDD of two calendar dates, whose digit positions are fixed), NaN where either is
    not a calendar date. `year_slip`: 1 also where the years are one apart and the rest the same
    (`year_off_by_one`), read from the same numbers (`days_apart`)."""
    a = np.array([np.nan if x.ordinal is None else x.ordinal for x in xs], dtype=np.float64)
    b = np.array([np.nan if y.ordinal is None else y.ordinal for y in ys], dtype=np.float64)
    ymd_a = np.array([int(x.digits) if x.ordinal is not None else -1 for x in xs], dtype=np.int64)
    ymd_b = np.array([int(y.digits) if y.ordinal is not None else -1 for y in ys], dtype=np.int64)
    year_a, month_a, day_a = ymd_a // 10_000, ymd_a // 100 % 100, ymd_a % 100
    year_b, month_b, day_b = ymd_b // 10_000, ymd_b // 100 % 100, ymd_b % 100
    both = ~np.isnan(a) & ~np.isnan(b)
    slip = both & (year_a == year_b) & (month_a == day_b) & (day_a == month_b) & (a != b)
    if year_slip:
        slip |= both & (ymd_a % 10_000 == ymd_b % 10_000) & (np.abs(year_a - year_b) == 1)
    return np.where(slip, 1.0, np.abs(a - b))


# log1p(days) / log1p(MAX_DAYS) for 0..MAX_DAYS days, computed by `math` as `days_apart` does (NumPy's log1p
# may differ in the last bit), so a table lookup gives the same values.
_LOG_DAYS = np.array([math.log1p(days) / math.log1p(MAX_DAYS) for days in range(MAX_DAYS + 1)])


def _days_apart_many(xs: Sequence[DateValue], ys: Sequence[DateValue]) -> np.ndarray:
    days = _days_between_many(xs, ys, year_slip=True)
    known = ~np.isnan(days)
    result = np.full(len(days), np.nan)
    result[known] = _LOG_DAYS[np.minimum(days[known], MAX_DAYS).astype(np.int64)]
    return result


@vectorised(_days_apart_many)
def days_apart(a: DateValue, b: DateValue) -> float:
    """Days between the dates on a log scale, 0 (same day) to 1 (ten years or more); day and month swapped
    and a year off by one count as one day: typing slips, each weighed by a level of its own
    (`same_or_...`), not a date months or a year apart (a re-registration that slipped its year would
    otherwise pay for the slip twice). NaN (treated as missing) when either is not a calendar date.

    >>> a, b = parse_date("2024-03-05"), parse_date("2024-05-03")
    >>> round(days_apart(a, b), 3) == round(days_apart(a, parse_date("2024-03-06")), 3)
    True
    >>> days_apart(a, parse_date("2023-03-05")) == days_apart(a, parse_date("2024-03-06"))
    True
    """
    if a.ordinal is None or b.ordinal is None:
        return math.nan
    slip = (_swapped(a, b) or year_off_by_one(a, b)) and a.ordinal != b.ordinal
    days = 1 if slip else abs(a.ordinal - b.ordinal)
    return math.log1p(min(days, MAX_DAYS)) / math.log1p(MAX_DAYS)


@vectorised(_days_between_many)
def days_between(a: DateValue, b: DateValue) -> float:
    """Days between two calendar dates (day and month swapped counts as one), NaN when either is not one."""
    if a.ordinal is None or b.ordinal is None:
        return math.nan
    return float(1 if _swapped(a, b) and a.ordinal != b.ordinal else abs(a.ordinal - b.ordinal))


def _calendar_parts(values: Sequence[DateValue]) -> tuple[np.ndarray, np.ndarray]:
    """Year and month-day (MMDD) of each calendar date as integers, -1 where a value is not one."""
    ymd = np.array([int(v.digits) if v.ordinal is not None else -1 for v in values], dtype=np.int64)
    return np.where(ymd >= 0, ymd // 10_000, -1), np.where(ymd >= 0, ymd % 10_000, -1)


def _one_digit_slips_many(xs: Sequence[DateValue], ys: Sequence[DateValue]) -> np.ndarray:
    return (capped_slips([x.digits for x in xs], [y.digits for y in ys], 2) == 1).astype(np.float64)


def _years_off_by_one_many(xs: Sequence[DateValue], ys: Sequence[DateValue]) -> np.ndarray:
    (year_a, day_a), (year_b, day_b) = _calendar_parts(xs), _calendar_parts(ys)
    return ((year_a >= 0) & (year_b >= 0) & (day_a == day_b) & (np.abs(year_a - year_b) == 1)).astype(
        np.float64
    )


def _days_swapped_many(xs: Sequence[DateValue], ys: Sequence[DateValue]) -> np.ndarray:
    (year_a, day_a), (year_b, day_b) = _calendar_parts(xs), _calendar_parts(ys)
    swapped = (day_a // 100 == day_b % 100) & (day_a % 100 == day_b // 100) & (day_a != day_b)
    return ((year_a >= 0) & (year_a == year_b) & swapped).astype(np.float64)


@vectorised(_one_digit_slips_many)
def one_digit_slip(a: DateValue, b: DateValue) -> float:
    """1 when the two dates' digits differ by one typing slip (one digit changed, added, dropped, or two
    neighbours swapped), else 0: `2024-07-04` typed as `2024-07-14` or `2023-07-04`."""
    return float(min(OSA.distance(a.digits, b.digits), 2) == 1)


@vectorised(_years_off_by_one_many)
def year_off_by_one(a: DateValue, b: DateValue) -> float:
    """1 when two calendar dates have the same day and month and years one apart (`2019-12-30` typed as
    `2020-12-30`, which is two digits), else 0."""
    if a.ordinal is None or b.ordinal is None:
        return 0.0
    return float(a.digits[4:] == b.digits[4:] and abs(int(a.digits[:4]) - int(b.digits[:4])) == 1)


@vectorised(_days_swapped_many)
def day_month_swapped(a: DateValue, b: DateValue) -> float:
    """1 when two calendar dates differ only by day and month swapped (`2024-07-02` vs `2024-02-07`)."""
    return float(a.ordinal is not None and b.ordinal is not None and a != b and _swapped(a, b))


def _same_many(xs: Sequence[DateValue], ys: Sequence[DateValue]) -> np.ndarray:
    return np.array([x.digits == y.digits for x, y in zip(xs, ys, strict=True)], dtype=np.float64)


@vectorised(lambda xs, ys: np.maximum(_years_off_by_one_many(xs, ys), _same_many(xs, ys)))
def same_or_year_off_by_one(a: DateValue, b: DateValue) -> float:
    """1 when the two dates are the same or `year_off_by_one`: a level on top of the exact match, so the
    classifier can weigh a slipped year near an agreement but never above it."""
    return max(year_off_by_one(a, b), float(a.digits == b.digits))


@vectorised(lambda xs, ys: np.maximum(_days_swapped_many(xs, ys), _same_many(xs, ys)))
def same_or_day_month_swapped(a: DateValue, b: DateValue) -> float:
    """1 when the two dates are the same or `day_month_swapped` (a level on top of the exact match)."""
    return max(day_month_swapped(a, b), float(a.digits == b.digits))


def _days_unless_slip_many(xs: Sequence[DateValue], ys: Sequence[DateValue]) -> np.ndarray:
    days = _days_between_many(xs, ys)
    slip = (_one_digit_slips_many(xs, ys) + _years_off_by_one_many(xs, ys)) > 0
    return np.where(slip & ~np.isnan(days), 0.0, days)


@vectorised(_days_unless_slip_many)
def days_unless_slip(a: DateValue, b: DateValue) -> float:
    """`days_between`, but 0 when the two differ by a typing slip (`one_digit_slip`, `year_off_by_one`;
    a day and month swap is already one day): the distance of the graded levels, so that a typo does not
    count as an order weeks or a year apart. NaN when either is not a calendar date."""
    days = days_between(a, b)
    if days == days and (one_digit_slip(a, b) or year_off_by_one(a, b)):
        return 0.0
    return days


# Graded levels: a re-registration keeps its date or slips a few days; weeks or years apart is another order.
# A typing slip is not a distance (`days_unless_slip`): a one-digit slip is weighed by `digit_slips`, a
# year off by one and a day and month swap by levels of their own (`same_or_...`).
DAY_LEVELS: tuple[int, ...] = (3, 10, 31, 365)
_DAY_LEVEL_COMPARATORS = tuple(
    beyond(days_unless_slip, n, f"more_than_{n}_days_apart_not_a_slip") for n in DAY_LEVELS
)


@vectorised(lambda xs, ys: capped_slips([x.digits for x in xs], [y.digits for y in ys], MAX_DIGIT_EDITS))
def digit_slips(a: DateValue, b: DateValue) -> float:
    """Typing slips between the two dates' digits (a swap of neighbours is one), capped at 3."""
    return min(OSA.distance(a.digits, b.digits), MAX_DIGIT_EDITS)


class DateField(FieldType):
    """Calendar dates."""

    type_name = "date"
    blocking = (
        BlockingKey("value"),
        BlockingKey("day_month_swapped"),
        BlockingKey("sorted_digits"),
        BlockingKey("month_day"),
        BlockingKey("year_month", weak=True),
    )

    def normalise(self, values: pd.Series) -> pd.Series:
        return map_unique(values.astype(str), canonical_date)

    def parse(self, normalised: str) -> DateValue | None:
        return parse_date(normalised)

    def variables(self) -> list[Any]:
        import dedupe  # here, not at import: a `--workers` helper needs no dedupe

        return [
            dedupe.variables.Exact(self.field, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=days_apart, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=digit_slips, has_missing=True),
            *(
                dedupe.variables.Custom(self.field, comparator=level, has_missing=True)
                for level in _DAY_LEVEL_COMPARATORS
            ),
            *(
                dedupe.variables.Custom(self.field, comparator=slip, has_missing=True)
                for slip in (same_or_year_off_by_one, same_or_day_month_swapped)
            ),
        ]

    def directions(self) -> list[int]:
        # "The same or differing by a typo": more alike than differing otherwise, less than the same.
        return [1, -1, -1, *(-1 for _ in DAY_LEVELS), 1, 1]

    def keys(self, normalised: pd.Series, names: Collection[str] | None = None) -> dict[str, pd.Series]:
        digits = normalised.str.replace("-", "", regex=False)
        valid = normalised.str.len() == 10
        year, month, day = digits.str.slice(0, 4), digits.str.slice(4, 6), digits.str.slice(6, 8)
        low = month.where(month <= day, day)
        high = day.where(month <= day, month)
        makers = {
            "value": lambda: normalised,
            "day_month_swapped": lambda: (year + "/" + low + "/" + high).where(valid, MISSING),
            "sorted_digits": lambda: map_unique(digits, lambda v: "".join(sorted(v))),
            "month_day": lambda: (month + day).where(valid, MISSING),
            "year_month": lambda: (year + month).where(valid, MISSING),
        }
        return made_keys(makers, names)

    def _describe(self, a: str, b: str) -> Difference:
        x, y = parse_date(a), parse_date(b)
        assert x is not None and y is not None
        if x.ordinal is not None and y.ordinal is not None:
            if _swapped(x, y):
                return Difference("near", "has day and month swapped")
            days = abs(x.ordinal - y.ordinal)
            if days <= 31:
                return Difference("near", f"{days} day{'s' if days > 1 else ''} apart")
        if OSA.distance(x.digits, y.digits) == 1:
            return Difference("near", "differs by one digit")
        if year_off_by_one(x, y):
            return Difference("near", "year off by one")
        if x.ordinal is not None and y.ordinal is not None:
            days = abs(x.ordinal - y.ordinal)
            if days < 365:
                return Difference("different", f"{days} days apart")
            return Difference("different", f"{days / 365.25:.0f} years apart")
        return Difference("different", "differs")

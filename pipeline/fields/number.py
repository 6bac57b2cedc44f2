"""`number` fields: amounts, quantities, rates.

Read whatever the clerk typed ("€ 1.234,50", "1,234.50", "1234.5") as one number, then compared by
relative difference (1,000 vs 1,010 is near; 10 vs 20 is far) and by whether they differ by a power of
ten, the decimal slip that a relative difference alone calls far.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Collection, Sequence
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from rapidfuzz.distance import OSA

from pipeline.fields.base import (
    BlockingKey,
    Comparator,
    Difference,
    FieldType,
    beyond,
    capped_slips,
    made_keys,
    map_distinct,
    map_unique,
    vectorised,
)
from pipeline.schema import MISSING

MAX_DIGIT_EDITS = 3


class NumberValue(NamedTuple):
    """A parsed number and its canonical text (for digit slips such as 81.81 typed as 81.18)."""

    value: float
    text: str


class NumberReading(NamedTuple):
    """A number as read from what a clerk typed: its value (None when there is none) and the text before
    and after it, with spaces and currency marks removed (`"12.0 oz."` -> 12.0, `""`, `"oz."`)."""

    value: float | None
    before: str
    after: str

    @property
    def plain(self) -> bool:
        """Only a number (and perhaps a currency mark): `"€ 1.234,50"` is plain, `"12 oz"` is not."""
        return self.value is not None and not self.before and not self.after


_NUMBER = re.compile(r"(?:(?<![\w.,])(?P<sign>[-+])\s*)?(?P<digits>\d(?:[\d.,]*\d)?)")
_CURRENCY = re.compile(r"[€$£¥]|\b(?:EUR|USD|GBP)\b", re.IGNORECASE)
_PLAIN_DECIMAL = re.compile(r"^[+-]?\d+([.,]\d+)?$")
# What most cells hold ("275.05", "21"): `read_number` reads it as `float` does, read here without it.
_ASCII_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _from_digits(digits: str) -> float | None:
    """Digits with `.` and `,` in either decimal convention: the last separator of two kinds is the decimal
    one; a lone `,` is decimal unless three digits follow it (`1,234`); repeated ones group thousands."""
    if "," in digits and "." in digits:
        decimal = "," if digits.rfind(",") > digits.rfind(".") else "."
        if digits.count(decimal) > 1:
            return None
        digits = digits.replace("." if decimal == "," else ",", "").replace(decimal, ".")
    elif "," in digits:
        single = digits.count(",") == 1 and len(digits) - digits.find(",") - 1 != 3
        digits = digits.replace(",", ".") if single else digits.replace(",", "")
    elif digits.count(".") > 1:
        digits = digits.replace(".", "")
    try:
        value = float(digits)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_number(text: str) -> NumberReading:
    """The first number in a text and what surrounds it; the one number parser of the product (the
    duplicate model, the error detectors, suggestions and the anomaly score all read numbers with it).

    >>> read_number("€ 1.234,50"), read_number("12.0 oz.").after, read_number("0,0725").value
    (NumberReading(value=1234.5, before='', after=''), 'oz.', 0.0725)
    """
    found = _NUMBER.search(text)
    if found is None:
        return NumberReading(None, _CURRENCY.sub("", text).strip(), "")
    value = _from_digits(found["digits"])
    before = _CURRENCY.sub("", text[: found.start()]).strip()
    negative = found["sign"] == "-"
    if before in ("-", "+") and not found["sign"]:  # "-€ 12"
        negative, before = before == "-", ""
    if value is not None and negative:
        value = -value
    return NumberReading(value, before, _CURRENCY.sub("", text[found.end() :]).strip())


def parse_number(text: str) -> float | None:
    """The number in a text in either decimal convention, whatever unit or note surrounds it, or None.

    >>> parse_number("€ 1.234,50"), parse_number("1,234.50"), parse_number("12,5"), parse_number("abc")
    (1234.5, 1234.5, 12.5, None)
    """
    if _ASCII_DECIMAL.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else None
    return read_number(text).value


def plain_number(text: str) -> float:
    """The value of a text that is only a number (`"€ 1.234,50"` -> 1234.5), else NaN (`"12 oz"`): how the
    error detectors read a number field, where a unit or note the field does not write is itself a sign.

    >>> plain_number("€ 1.234,50"), plain_number("12 oz")
    (1234.5, nan)
    """
    if _ASCII_DECIMAL.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else math.nan
    reading = read_number(text)
    return reading.value if reading.plain else math.nan


def decimals_written(text: str) -> int | None:
    """Digits after the decimal separator of a plain number as written (`"1250.00"` -> 2, `"12,5"` -> 1,
    `"7"` -> 0); None when the text is not a plain decimal number."""
    t = text.strip()
    if not _PLAIN_DECIMAL.match(t):
        return None
    for sep in (".", ","):
        if sep in t:
            return len(t.rsplit(sep, 1)[1])
    return 0


def write_number(value: float, decimals: int | None = None) -> str:
    """A number as text: with `decimals` fixed places (`1250.00`), else in the shortest form (`12`, `19.2`,
    float noise such as `0.07200000000000001` rounded away); `""` for NaN or infinity."""
    if not math.isfinite(value):
        return ""
    if decimals:
        return f"{value:.{decimals}f}"
    clean = float(f"{value:.10g}")
    return str(int(clean)) if clean.is_integer() and abs(clean) < 1e15 else repr(clean)


def _canonical(text: str) -> str:
    value = parse_number(text)
    if value is None:
        return MISSING
    return format(value + 0.0, ".12g")


# A plain decimal that `_canonical` writes as it is: no leading zero or trailing zero of the fraction, and
# few enough digits (9 + 3, 12 significant at most) between 0.0001 and 10**9 that `format(value, ".12g")`
# gives them back in positional notation.
_WRITTEN_AS_IS = re.compile(r"0|[1-9][0-9]{0,8}(?:\.[0-9]{0,2}[1-9])?|0\.0{0,3}[1-9](?:[0-9]{0,7}[1-9])?")


def _canonical_distinct(texts: list[str]) -> list[str]:
    """`_canonical` of each text, without the calls for the texts already written as it writes them
    (most amounts as typed: "275.05", "21")."""
    as_is = map(_WRITTEN_AS_IS.fullmatch, texts)
    return [text if match else _canonical(text) for text, match in zip(texts, as_is, strict=True)]


def _values(numbers: Sequence[NumberValue]) -> np.ndarray:
    return np.fromiter(map(_VALUE, numbers), dtype=np.float64, count=len(numbers))


def _texts(numbers: Sequence[NumberValue]) -> list[str]:
    return list(map(_TEXT, numbers))


_VALUE = operator.itemgetter(0)  # NumberValue.value, read in C
_TEXT = operator.itemgetter(1)  # NumberValue.text


def _relative_differences(xs: Sequence[NumberValue], ys: Sequence[NumberValue]) -> np.ndarray:
    return _relative_of(_values(xs), _values(ys))


def _relative_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.minimum(np.abs(a - b) / scale, 1.0)
    return np.where(scale == 0, 0.0, relative)


def _decimal_slips(xs: Sequence[NumberValue], ys: Sequence[NumberValue]) -> np.ndarray:
    """`decimal_slip` per pair. NumPy's log10 may differ from `math.log10` in the last bit, so it only
    picks the pairs within 1e-6 of a power of ten (a margin far wider than that bit); those are decided
    by the scalar function, with `math.log10`, as before."""
    return _slips_of(_values(xs), _values(ys))


# A decimal slip that shifts digits out of the written decimals rounds them (172.53 typed a place to the
# left is 17.25): the smaller then has at least two significant digits, so the ratio of the two is within
# 5% of a power of ten, a log10 within this of a whole number.
_ROUNDED_SLIP_LOG10 = 0.025


def _slips_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    slips = np.zeros(len(a))
    maybe = np.flatnonzero((a != 0) & (b != 0) & (a != b) & ((a < 0) == (b < 0)))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        exponent = np.abs(np.log10(np.abs(a[maybe]) / np.abs(b[maybe])))
        whole = np.round(exponent)
        off = np.abs(exponent - whole)
        exact = maybe[off < 1e-6]
        rounded = maybe[(whole >= 1) & (off >= 1e-6) & (off < _ROUNDED_SLIP_LOG10)]
        rounded = rounded[_maybe_rounded_slip(np.abs(a[rounded]), np.abs(b[rounded]))]
    near = np.concatenate([exact, rounded])
    slips[near] = [_is_decimal_slip(x, y) for x, y in zip(a[near].tolist(), b[near].tolist(), strict=True)]
    return slips


def _maybe_rounded_slip(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where `_is_decimal_slip` may find a rounded slip (a superset, with a margin for float rounding):
    its test in NumPy, so that only those few pairs are decided one at a time."""
    large, small = np.maximum(a, b), np.minimum(a, b)
    shift = np.round(np.log10(large / small))
    decimals = np.maximum(_decimals_many(large), _decimals_many(small))
    unit = 10.0**-decimals
    return (small >= unit * 9.9) & (np.abs(large / 10.0**shift - small) <= 0.5 * unit * 1.01 + 1e-9)


def _decimals_many(values: np.ndarray) -> np.ndarray:
    """`_decimals` of each value (non-negative), in NumPy."""
    decimals = np.full(len(values), _MAX_DECIMALS)
    for places in range(_MAX_DECIMALS - 1, -1, -1):
        written = np.abs(np.round(values, places) - values) <= 1e-9 * np.maximum(values, 1.0)
        decimals[written] = places
    return decimals


@vectorised(_relative_differences)
def relative_difference(x: NumberValue, y: NumberValue) -> float:
    """|a - b| relative to the larger magnitude, 0 (equal) to 1 (opposite or one of them zero).

    >>> relative_difference(NumberValue(100.0, "100"), NumberValue(101.0, "101"))
    0.009900990099009901
    """
    a, b = x.value, y.value
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else min(abs(a - b) / scale, 1.0)


def _relative_unless_slip_many(xs: Sequence[NumberValue], ys: Sequence[NumberValue]) -> np.ndarray:
    a, b = _values(xs), _values(ys)  # read once for both
    return np.where(_slips_of(a, b) > 0, 0.0, _relative_of(a, b))


@vectorised(_relative_unless_slip_many)
def relative_unless_slip(x: NumberValue, y: NumberValue) -> float:
    """`relative_difference`, but 0 when the two differ by a decimal slip (`decimal_slip`, x10 or /10 and
    any power of ten): the continuous distance the duplicate model compares and that of its graded levels,
    so that a misplaced decimal point does not count as another amount too; the slip is a level of its
    own, weighed by the classifier. (A one-digit slip of an amount stays a difference: a customer's orders
    of the day differ by one digit as often.)"""
    if decimal_slip(x, y):
        return 0.0
    return relative_difference(x, y)


# Graded levels of the relative difference: any difference, or another amount altogether; not a decimal
# slip. The first one tells a copied amount from a near one: a re-registration copies the amount (or slips
# its decimal point), while a customer's other order of the day may differ by a fraction of a percent
# (271.85 against 272.34), which the continuous difference alone weighs as nothing. There is no level
# between them ("more than 1%", up to format 5): merged pairs never differ by a near amount that is not a
# slip, so such a level only split the weight of "any difference" with it, and an amount 0.9% apart then
# paid for less than half of it (a customer's second order of the day was linked at 0.50).
apart_not_a_slip = beyond(relative_unless_slip, 0.0, "apart_not_a_slip")
more_than_10pct_apart = beyond(relative_unless_slip, 0.1, "more_than_10pct_apart_not_a_slip")


@vectorised(_decimal_slips)
def decimal_slip(x: NumberValue, y: NumberValue) -> float:
    """1 when the two differ by a power of ten (a misplaced decimal point or an extra zero), else 0."""
    return _is_decimal_slip(x.value, y.value)


def _digit_slips_many(xs: Sequence[NumberValue], ys: Sequence[NumberValue]) -> np.ndarray:
    slips = capped_slips(_texts(xs), _texts(ys), MAX_DIGIT_EDITS)
    return np.where(_decimal_slips(xs, ys) > 0, 1.0, slips)


@vectorised(_digit_slips_many)
def digit_slips(x: NumberValue, y: NumberValue) -> float:
    """Typing slips between the two numbers' digits (a swap of neighbours is one), capped at 3; a decimal
    slip (`decimal_slip`) is one slip of the finger however many places the point moved (4149.90 typed as
    414990.00 is two edits of the text), so a re-registration with it does not pay for it as two."""
    if decimal_slip(x, y):
        return 1.0
    return min(OSA.distance(x.text, y.text), MAX_DIGIT_EDITS)


# The comparators `NumberField.compare_distinct` computes together.
_SHARED_COMPARATORS = frozenset((relative_unless_slip, decimal_slip, digit_slips))


def _is_decimal_slip(a: float, b: float) -> float:
    """1.0 when `a` and `b` differ by a power of ten, exactly or with the digits the shift moved past the
    written decimals rounded off (172.53 and 17.25: the smaller, written with as many decimals as either,
    is the larger shifted and rounded, and keeps at least two significant digits), else 0.0."""
    if a == 0 or b == 0 or a == b or (a < 0) != (b < 0):
        return 0.0
    exponent = math.log10(abs(a) / abs(b))
    whole = round(exponent)
    if abs(exponent - whole) < 1e-9:
        return 1.0
    large, small = max(abs(a), abs(b)), min(abs(a), abs(b))
    shift = round(math.log10(large / small))
    if shift < 1:
        return 0.0
    decimals = max(_decimals(large), _decimals(small))
    if small * 10**decimals < 10 - 1e-9:  # one significant digit left: 1 and 14 are not a slip
        return 0.0
    return 1.0 if abs(large / 10**shift - small) <= 0.5 * 10.0**-decimals + 1e-9 else 0.0


_MAX_DECIMALS = 6


def _decimals(value: float) -> int:
    """The decimals of a non-negative number as written without trailing zeros (17.25 -> 2, 17.2 -> 1,
    17 -> 0), at most `_MAX_DECIMALS`."""
    for decimals in range(_MAX_DECIMALS):
        if abs(round(value, decimals) - value) <= 1e-9 * max(value, 1.0):
            return decimals
    return _MAX_DECIMALS


def _significant_digits(texts: list[str]) -> list[str]:
    digits = [text.replace("-", "").replace(".", "").strip("0") for text in texts]
    return [kept if len(kept) >= 2 else MISSING for kept in digits]


def _rounded(text: str) -> str:
    value = float(text)
    return MISSING if value == 0 else format(float(f"{value:.2g}"), "g")


class NumberField(FieldType):
    """Amounts and quantities."""

    type_name = "number"
    blocking = (
        BlockingKey("value"),
        BlockingKey("significant_digits"),
        BlockingKey("rounded", weak=True),
    )

    def normalise(self, values: pd.Series) -> pd.Series:
        return map_distinct(values.astype(str), _canonical_distinct)

    def parse(self, normalised: str) -> NumberValue | None:
        return NumberValue(float(normalised), normalised) if normalised != MISSING else None

    def parse_many(self, normalised: Sequence[str]) -> list[NumberValue | None]:
        texts = list(normalised)
        if MISSING in texts:
            return list(map(self.parse, texts))
        # `parse` of each, in C: `float` of each text, then each tuple made as `NumberValue._make` makes it.
        return list(map(tuple.__new__, repeat(NumberValue), zip(map(float, texts), texts, strict=True)))

    def compare_distinct(
        self, comparators: Sequence[Comparator], values: np.ndarray, left: np.ndarray, right: np.ndarray
    ) -> list[np.ndarray]:
        """`FieldType.compare_distinct`, each distinct number's value and text read once (not once per
        pair and comparator) and the decimal slips, which three comparators use, found once: the same
        values as each comparator's `many`."""
        if not set(comparators) <= _SHARED_COMPARATORS:
            return super().compare_distinct(comparators, values, left, right)
        numbers = _values(values)
        a, b = numbers[left], numbers[right]
        slips = _slips_of(a, b)
        compared = []
        for compare in comparators:
            if compare is decimal_slip:
                compared.append(slips)
            elif compare is relative_unless_slip:
                compared.append(np.where(slips > 0, 0.0, _relative_of(a, b)))
            else:  # digit_slips
                texts = np.empty(len(values), dtype=object)
                texts[:] = _texts(values)
                typed = capped_slips(texts[left].tolist(), texts[right].tolist(), MAX_DIGIT_EDITS)
                compared.append(np.where(slips > 0, 1.0, typed))
        return compared

    def variables(self) -> list[Any]:
        import dedupe  # here, not at import: a `--workers` helper needs no dedupe

        return [
            dedupe.variables.Exact(self.field, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=relative_unless_slip, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=decimal_slip, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=digit_slips, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=apart_not_a_slip, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=more_than_10pct_apart, has_missing=True),
        ]

    def directions(self) -> list[int]:
        return [1, -1, 1, -1, -1, -1]

    def keys(self, normalised: pd.Series, names: Collection[str] | None = None) -> dict[str, pd.Series]:
        present = normalised != MISSING
        makers = {
            "value": lambda: normalised,
            "significant_digits": lambda: map_distinct(normalised, _significant_digits),
            "rounded": lambda: map_unique(normalised.where(present, "0"), _rounded).where(present, MISSING),
        }
        return made_keys(makers, names)

    def _describe(self, a: str, b: str) -> Difference:
        x, y = float(a), float(b)
        if y == 0:
            return Difference("different", "is not zero")
        if x == 0:
            return Difference("different", "is zero")
        if (x < 0) != (y < 0):
            return Difference("different", "has the opposite sign")
        ratio = abs(x) / abs(y)
        if _is_decimal_slip(x, y):
            return (
                Difference("near", f"{ratio:.0f}x larger")
                if ratio > 1
                else Difference("near", f"{1 / ratio:.0f}x smaller")
            )
        change = ratio - 1
        if abs(change) < 0.005:
            return Difference("near", "differs by less than 1%")
        percent = f"{abs(change):.0%} {'higher' if change > 0 else 'lower'}"
        if abs(change) <= 0.1:
            return Difference("near", percent)
        if abs(change) < 1:
            return Difference("different", percent)
        return Difference("different", f"{ratio:.1f}x larger" if ratio > 1 else f"{1 / ratio:.1f}x smaller")

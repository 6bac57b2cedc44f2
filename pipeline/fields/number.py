"""`number` fields: amounts, quantities, rates.

Read whatever the clerk typed ("€ 1.234,50", "1,234.50", "1234.5") as one number, then compared by
relative difference (1,000 vs 1,010 is near; 10 vs 20 is far) and by whether they differ by a power of
ten, the decimal slip that a relative difference alone calls far.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import dedupe
import pandas as pd
from rapidfuzz.distance import OSA

from pipeline.fields.base import BlockingKey, Difference, FieldType, map_unique
from pipeline.schema import MISSING

_NOT_NUMERIC = re.compile(r"[^0-9,.\-]")
MAX_DIGIT_EDITS = 3


class NumberValue(NamedTuple):
    """A parsed number and its canonical text (for digit slips such as 81.81 typed as 81.18)."""

    value: float
    text: str


def parse_number(text: str) -> float | None:
    """A number from text in either decimal convention, or None.

    >>> parse_number("€ 1.234,50"), parse_number("1,234.50"), parse_number("12,5"), parse_number("abc")
    (1234.5, 1234.5, 12.5, None)
    """
    cleaned = _NOT_NUMERIC.sub("", text)
    negative = cleaned.startswith("-")
    cleaned = cleaned.replace("-", "")
    if "," in cleaned and "." in cleaned:
        decimal = "," if cleaned.rfind(",") > cleaned.rfind(".") else "."
        thousands = "." if decimal == "," else ","
        cleaned = cleaned.replace(thousands, "").replace(decimal, ".")
    elif cleaned.count(",") == 1 and len(cleaned) - cleaned.find(",") - 1 in (1, 2):
        cleaned = cleaned.replace(",", ".")
    elif "," in cleaned or cleaned.count(".") > 1:
        cleaned = cleaned.replace(",", "") if "," in cleaned else cleaned.replace(".", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return -value if negative else value


def _canonical(text: str) -> str:
    value = parse_number(text)
    if value is None:
        return MISSING
    return format(value + 0.0, ".12g")


def relative_difference(x: NumberValue, y: NumberValue) -> float:
    """|a - b| relative to the larger magnitude, 0 (equal) to 1 (opposite or one of them zero).

    >>> relative_difference(NumberValue(100.0, "100"), NumberValue(101.0, "101"))
    0.009900990099009901
    """
    a, b = x.value, y.value
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else min(abs(a - b) / scale, 1.0)


def decimal_slip(x: NumberValue, y: NumberValue) -> float:
    """1 when the two differ by a power of ten (a misplaced decimal point or an extra zero), else 0."""
    return _is_decimal_slip(x.value, y.value)


def digit_slips(x: NumberValue, y: NumberValue) -> float:
    """Typing slips between the two numbers' digits (a swap of neighbours is one), capped at 3."""
    return min(OSA.distance(x.text, y.text), MAX_DIGIT_EDITS)


def _is_decimal_slip(a: float, b: float) -> float:
    if a == 0 or b == 0 or a == b or (a < 0) != (b < 0):
        return 0.0
    exponent = math.log10(abs(a) / abs(b))
    return 1.0 if abs(exponent - round(exponent)) < 1e-9 else 0.0


def _significant_digits(text: str) -> str:
    digits = text.replace("-", "").replace(".", "").strip("0")
    return digits if len(digits) >= 2 else MISSING


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
        return map_unique(values.astype(str), _canonical)

    def parse(self, normalised: str) -> NumberValue | None:
        return NumberValue(float(normalised), normalised) if normalised != MISSING else None

    def variables(self) -> list[Any]:
        return [
            dedupe.variables.Exact(self.field, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=relative_difference, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=decimal_slip, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=digit_slips, has_missing=True),
        ]

    def directions(self) -> list[int]:
        return [1, -1, 1, -1]

    def keys(self, normalised: pd.Series) -> dict[str, pd.Series]:
        present = normalised != MISSING
        return {
            "value": normalised,
            "significant_digits": map_unique(normalised, _significant_digits),
            "rounded": map_unique(normalised.where(present, "0"), _rounded).where(present, MISSING),
        }

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

"""`code` fields: customer codes, order and invoice numbers, postcodes, phone numbers, IBANs.

Normalised to upper-case letters and digits only, so "nl-1234 ab" and "NL1234AB" are the same code.
Compared exactly and by an edit distance in which two swapped neighbouring characters count as one slip
(optimal string alignment): a transposed digit is near, a different code is far.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pandas as pd
from rapidfuzz.distance import OSA, Levenshtein

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

MAX_EDITS = 3


@vectorised(lambda xs, ys: capped_slips(xs, ys, MAX_EDITS))
def code_distance(a: str, b: str) -> float:
    """Slips between two codes (a swap of neighbours is one), capped at 3.

    >>> code_distance("123456", "124356"), code_distance("123456", "123457"), code_distance("1", "999999")
    (1, 1, 3)
    """
    return min(OSA.distance(a, b), MAX_EDITS)


two_or_more_slips = beyond(code_distance, 1, "two_or_more_slips")
three_or_more_slips = beyond(code_distance, 2, "three_or_more_slips")


def is_transposition(a: str, b: str) -> bool:
    """True when `b` is `a` with two neighbouring characters swapped."""
    return len(a) == len(b) and OSA.distance(a, b) == 1 and Levenshtein.distance(a, b) == 2


class CodeField(FieldType):
    """Identifiers with a structure."""

    type_name = "code"
    blocking = (
        BlockingKey("value"),
        BlockingKey("sorted_chars"),
        BlockingKey("first_half"),
        BlockingKey("second_half"),
        BlockingKey("digits"),
    )

    def normalise(self, values: pd.Series) -> pd.Series:
        # Upper case, every character but a digit or a letter A-Z dropped. The usual separators go by plain
        # replacement (a third of the pattern's time); the pattern runs only where another one is left.
        text = values.astype(str).str.upper()
        text = text.str.replace("-", "", regex=False).str.replace(" ", "", regex=False)
        odd = ~text.str.fullmatch("[0-9A-Z]*")
        if odd.any():
            text = text.where(~odd, text.str.replace(r"[^0-9A-Z]+", "", regex=True))
        return text

    def variables(self) -> list[Any]:
        import dedupe  # here, not at import: a `--workers` helper needs no dedupe

        return [
            dedupe.variables.Exact(self.field, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=code_distance, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=two_or_more_slips, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=three_or_more_slips, has_missing=True),
        ]

    def keys(self, normalised: pd.Series, names: Collection[str] | None = None) -> dict[str, pd.Series]:
        length = normalised.str.len()
        half = length // 2
        long_enough = length >= 4

        # One slip leaves either the first or the second half intact; a transposition keeps the sorted chars.
        def halves(second: bool) -> pd.Series:
            parts = [value[n:] if second else value[:n] for value, n in zip(normalised, half, strict=True)]
            return pd.Series(parts, index=normalised.index, dtype=object)

        def digits() -> pd.Series:
            found = normalised.str.replace(r"\D+", "", regex=True).str.lstrip("0")
            return found.where(found.str.len() >= 3, MISSING)

        makers = {
            "value": lambda: normalised,
            "sorted_chars": lambda: map_unique(normalised, lambda v: "".join(sorted(v))),
            "first_half": lambda: ("<" + halves(second=False)).where(long_enough, MISSING),
            "second_half": lambda: (">" + halves(second=True)).where(long_enough, MISSING),
            "digits": digits,
        }
        return made_keys(makers, names)

    def _describe(self, a: str, b: str) -> Difference:
        if is_transposition(a, b):
            return Difference("near", "has two characters swapped")
        if a.lstrip("0") == b.lstrip("0"):
            return Difference("near", "differs only in leading zeros")
        edits = OSA.distance(a, b)
        if edits == 1:
            return Difference("near", "differs by one character")
        if edits == 2 and min(len(a), len(b)) >= 6:
            return Difference("near", "differs by two characters")
        return Difference("different", "differs")

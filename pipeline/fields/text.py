"""`text` fields: names, streets, e-mail addresses, free text.

Compared with dedupe's affine-gap string distance (typing slips cost little, long runs of different letters
a lot) plus a token-set similarity, so "de Vries, Jan" and "Jan de Vries" are near.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import pandas as pd
from doublemetaphone import doublemetaphone
from rapidfuzz import fuzz, process
from rapidfuzz.distance import Levenshtein

from pipeline.fields.base import (
    BlockingKey,
    Difference,
    FieldType,
    first_chars,
    known_values,
    made_keys,
    map_unique,
    simple_text,
    vectorised,
)
from pipeline.schema import MISSING

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def _token_distances(xs: Sequence[str], ys: Sequence[str]) -> np.ndarray:
    if not len(xs):
        return np.zeros(0)
    return 1.0 - process.cpdist(xs, ys, scorer=fuzz.token_set_ratio, dtype=np.float64, workers=1) / 100.0


@known_values(same=0.0, lowest=0.0)
@vectorised(_token_distances)
def token_distance(a: str, b: str) -> float:
    """0 when both hold the same words in any order, up to 1 when they share nothing."""
    return 1.0 - fuzz.token_set_ratio(a, b) / 100.0


def _metaphone(value: str) -> str:
    return " ".join(doublemetaphone(token)[0] for token in value.split()) if value else MISSING


class TextField(FieldType):
    """Names, addresses, free text."""

    type_name = "text"
    blocking = (
        BlockingKey("value"),
        BlockingKey("first_token"),
        BlockingKey("last_token"),
        BlockingKey("prefix4"),
        BlockingKey("suffix4"),
        BlockingKey("sorted_tokens"),
        BlockingKey("metaphone"),
    )

    def normalise(self, values: pd.Series) -> pd.Series:
        return simple_text(values)

    def variables(self) -> list[Any]:
        import dedupe  # here, not at import: a `--workers` helper needs no dedupe

        return [
            dedupe.variables.Exact(self.field, has_missing=True),
            dedupe.variables.String(self.field, has_missing=True),
            dedupe.variables.Custom(self.field, comparator=token_distance, has_missing=True),
        ]

    def keys(self, normalised: pd.Series, names: Collection[str] | None = None) -> dict[str, pd.Series]:
        present = normalised != MISSING
        tokens = functools.cache(lambda: normalised.str.split())  # split once for the first and last token
        makers = {
            "value": lambda: normalised,
            "first_token": lambda: tokens().str[0].where(present, MISSING),
            "last_token": lambda: tokens().str[-1].where(present, MISSING),
            "prefix4": lambda: first_chars(normalised, 4),
            "suffix4": lambda: normalised.str.slice(-4).where(normalised.str.len() >= 4, MISSING),
            "sorted_tokens": lambda: map_unique(normalised, lambda v: " ".join(sorted(v.split()))),
            "metaphone": lambda: map_unique(normalised, _metaphone),
        }
        return made_keys(makers, names)

    def _describe(self, a: str, b: str) -> Difference:
        if sorted(a.split()) == sorted(b.split()):
            return Difference("near", "has its words in another order")
        edits = Levenshtein.distance(a, b)
        if edits <= 3:
            plural = "letter" if edits == 1 else "letters"
            return Difference("near", f"differs by {_NUMBER_WORDS[edits]} {plural}")
        if fuzz.token_set_ratio(a, b) >= 90:
            return Difference("near", "has a word more or less")
        return Difference("different", "differs")

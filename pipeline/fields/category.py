"""`category` fields: a small set of values (a city, a VAT rate, a status).

Compared exactly after normalising case and spacing. A category with many values (cities) also gets
dedupe's affine-gap distance, so a misspelt city is still near its right spelling.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pandas as pd
from rapidfuzz.distance import Levenshtein

from pipeline.fields.base import BlockingKey, Difference, FieldType, made_keys, simple_text
from pipeline.schema import MISSING

MANY_VALUES = 20


class CategoryField(FieldType):
    """A small set of values."""

    type_name = "category"
    blocking = (BlockingKey("value", weak=True),)

    def _set_params(self, *, distinct: int = 0) -> None:
        self.distinct = int(distinct)

    def fit(self, normalised: pd.Series) -> CategoryField:
        self.distinct = int(normalised[normalised != MISSING].nunique())
        return self

    def params(self) -> dict[str, Any]:
        return {"distinct": self.distinct}

    def normalise(self, values: pd.Series) -> pd.Series:
        return simple_text(values)

    def variables(self) -> list[Any]:
        import dedupe  # here, not at import: a `--workers` helper needs no dedupe

        variables: list[Any] = [dedupe.variables.Exact(self.field, has_missing=True)]
        if self.distinct > MANY_VALUES:
            variables.append(dedupe.variables.String(self.field, has_missing=True))
        return variables

    def keys(self, normalised: pd.Series, names: Collection[str] | None = None) -> dict[str, pd.Series]:
        return made_keys({"value": lambda: normalised}, names)

    def _describe(self, a: str, b: str) -> Difference:
        if self.distinct > MANY_VALUES and Levenshtein.distance(a, b) <= 2:
            return Difference("near", "is spelt differently")
        return Difference("different", "differs")

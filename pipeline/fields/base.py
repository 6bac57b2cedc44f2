"""The field-type plugin interface: what the duplicate model needs to know about one column's values.

A plugin normalises its values (so that trivial differences such as case, spacing or a currency sign do not
count), chooses the dedupe variables that compare two values, offers cheap blocking keys, and describes the
difference between two values in words a clerk understands. Values are text throughout; `""` is missing.

Plugins are small and stateless apart from what `fit` learns (e.g. the categories of a `category` field);
that state is plain JSON (`params`), so a saved model never needs a pickle.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pandas as pd

from pipeline.schema import MISSING

Agreement = Literal["same", "near", "different", "missing"]

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True)
class Difference:
    """How two values of one field compare, for the reason shown to a clerk.

    `agreement` sorts fields into the "same ..." part of a reason and the "... differs" part; `text` is the
    phrase after the field's name, e.g. "differs by one letter" or "2 days apart".
    """

    agreement: Agreement
    text: str


SAME = Difference("same", "same")
MISSING_IN_ONE = Difference("missing", "missing in one of them")


@dataclass(frozen=True)
class BlockingKey:
    """A named way to cut a field's values into blocks; `weak` keys (a city, a month) make blocks too large
    to be used alone, so the linkage only uses them combined with another key."""

    name: str
    weak: bool = False


class FieldType(ABC):
    """One column's comparison logic. Subclasses set `type_name` and implement the abstract methods.

    >>> from pipeline.fields import field_type
    >>> plugin = field_type("code")("order_number")
    >>> plugin.normalise(pd.Series(["ab-12 34", ""])).tolist()
    ['AB1234', '']
    """

    type_name: ClassVar[str]
    blocking: ClassVar[tuple[BlockingKey, ...]] = ()

    def __init__(self, field: str, **params: Any) -> None:
        self.field = field
        self._set_params(**params)

    def _set_params(self, **params: Any) -> None:
        if params:
            raise TypeError(f"{type(self).__name__} takes no parameters, got {sorted(params)}")

    def fit(self, normalised: pd.Series) -> FieldType:
        """Learns what the plugin needs from the normalised training values (nothing, by default)."""
        return self

    def params(self) -> dict[str, Any]:
        """The JSON-serialisable state learned by `fit`; `type(self)(field, **params)` rebuilds the plugin."""
        return {}

    @property
    def label(self) -> str:
        """The field's name as a clerk reads it: `customer_name` -> `customer name`."""
        return self.field.replace("_", " ").strip()

    @abstractmethod
    def normalise(self, values: pd.Series) -> pd.Series:
        """Vectorised: the values with trivial differences removed, still text, `""` for missing/unusable."""

    def parse(self, normalised: str) -> Any:
        """The value handed to the comparators (None when missing). Text by default."""
        return normalised if normalised != MISSING else None

    @abstractmethod
    def variables(self) -> list[Any]:
        """The dedupe variables comparing this field; all with `has_missing=True`, so a missing value adds a
        missing-indicator instead of counting as agreement or disagreement."""

    def directions(self) -> list[int]:
        """For each of `variables()`: +1 when a larger comparator value means more alike (an exact match),
        -1 for a distance. The classifier may not learn the opposite, so a quirk of the labels cannot teach
        it that a misspelt name makes a duplicate more likely."""
        return [1 if variable.type == "Exact" else -1 for variable in self.variables()]

    @abstractmethod
    def keys(self, normalised: pd.Series) -> dict[str, pd.Series]:
        """Vectorised blocking keys, one text Series per name in `blocking`; `""` means no key."""

    @abstractmethod
    def _describe(self, a: str, b: str) -> Difference:
        """How two present, normalised, unequal values differ."""

    def describe(self, a: str, b: str) -> Difference:
        """How two normalised values compare, as words for the clerk.

        >>> from pipeline.fields import field_type
        >>> field_type("number")("amount").describe("1200", "120").text
        '10x larger'
        """
        if a == MISSING or b == MISSING:
            return MISSING_IN_ONE
        if a == b:
            return SAME
        return self._describe(a, b)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field!r})"


def simple_text(values: pd.Series) -> pd.Series:
    """Lower case ASCII words separated by single spaces: accents, punctuation and spacing removed."""
    ascii_text = values.astype(str).str.normalize("NFKD").str.encode("ascii", "ignore").str.decode("ascii")
    return ascii_text.str.lower().str.replace(_NON_ALNUM, " ", regex=True).str.strip()


def map_unique(values: pd.Series, function: Callable[[str], str]) -> pd.Series:
    """Applies a per-value function once per distinct value; fast on the repetitive columns of a register."""
    uniques = pd.unique(values.to_numpy())
    mapping = {value: function(value) for value in uniques}
    return values.map(mapping).astype(object)


def first_chars(values: pd.Series, n: int) -> pd.Series:
    """The first `n` characters, or no key when the value is shorter (a short value makes a huge block)."""
    return values.str.slice(0, n).where(values.str.len() >= n, MISSING)

"""The field-type plugin interface: what the duplicate model needs to know about one column's values.

A plugin normalises its values (so that trivial differences such as case, spacing or a currency sign do not
count), chooses the dedupe variables that compare two values, offers cheap blocking keys, and describes the
difference between two values in words a clerk understands. Values are text throughout; `""` is missing.

Plugins are small and stateless apart from what `fit` learns (e.g. the categories of a `category` field);
that state is plain JSON (`params`), so a saved model never needs a pickle.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from affinegap import normalizedAffineGapDistance
from rapidfuzz import process
from rapidfuzz.distance import OSA

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

    def term_frequencies(self, normalised: pd.Series, scale_total: int | None = None) -> TermFrequencies:
        """How common each normalised value is (see `TermFrequencies`): what an exact agreement on it is
        worth. Counted on the values as normalised, so "C-1001" and "c 1001" are one value."""
        return TermFrequencies.count(normalised, scale_total)

    @property
    def label(self) -> str:
        """The field's name as a clerk reads it: `customer_name` -> `customer name`."""
        return field_label(self.field)

    @abstractmethod
    def normalise(self, values: pd.Series) -> pd.Series:
        """Vectorised: the values with trivial differences removed, still text, `""` for missing/unusable."""

    def parse(self, normalised: str) -> Any:
        """The value handed to the comparators (None when missing). Text by default."""
        return normalised if normalised != MISSING else None

    def parse_many(self, normalised: Sequence[str]) -> list[Any]:
        """`parse` of each of these normalised values: the matcher parses its candidates' values a part at
        a time, so a plugin may do it without a Python call per value."""
        return list(map(self.parse, normalised))

    def compare_distinct(
        self, comparators: Sequence[Comparator], values: np.ndarray, left: np.ndarray, right: np.ndarray
    ) -> list[np.ndarray]:
        """Each of these comparators (of `variables()`) on pairs of distinct parsed values:
        `compare_many(compare, values[left], values[right])` for each, float64. The matcher compares a
        part's distinct pairs of values this way, all of a field's comparators at once, so a plugin may
        read each distinct value once and share what its comparators have in common (`NumberField`)."""
        every = functools.cache(lambda: _pair_lists(values, left, right))
        # About half of a part's distinct pairs of names or streets are a value with itself (a customer's
        # orders repeat them): a comparator whose value there is known is called on the others only.
        differ = functools.cache(lambda: np.flatnonzero(left != right))
        differing = functools.cache(lambda: _pair_lists(values, left[differ()], right[differ()]))
        compared = []
        for compare in comparators:
            same = same_value(compare)
            if same is None:
                compared.append(compare_many(compare, *every()))
                continue
            found = np.full(len(left), same, dtype=np.float64)
            found[differ()] = compare_many(compare, *differing())
            compared.append(found)
        return compared

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
    def keys(self, normalised: pd.Series, names: Collection[str] | None = None) -> dict[str, pd.Series]:
        """Vectorised blocking keys, one text Series per name in `blocking` (only those in `names` when
        given: scoring makes only the keys its blocking rules use); `""` means no key."""

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


def field_label(name: str) -> str:
    """A field's name as a clerk reads it, in every reason the product writes: `customer_name` ->
    `customer name`."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class TermFrequencies:
    """How often each value of a field occurs among stored records: the u-probability of an exact match.

    Two records agreeing on a value that a tenth of the register shares (a busy customer's name, a usual
    amount) is weak evidence that they are one registration; agreeing on a value seen once is strong.
    `rarity` turns a value's share into that strength on a fixed scale, 0 (every record has it) to 1 (at
    most one in `scale_total`, the size of the records the model learned from), so the same value scores
    the same against a reference ten times larger. Values seen once are not stored (they count as 1).

    >>> tf = TermFrequencies.count(pd.Series(["a"] * 50 + ["b"] * 49 + ["c"]))
    >>> round(tf.rarity("a"), 2), round(tf.rarity("c"), 2), round(tf.rarity("never seen"), 2)
    (0.15, 1.0, 1.0)
    """

    total: int
    counts: dict[str, int]
    scale_total: int

    @classmethod
    def count(
        cls, normalised: pd.Series, scale_total: int | None = None, max_values: int = 20_000
    ) -> TermFrequencies:
        """Counts the present values; `scale_total` (default: their number) fixes the rarity scale."""
        present = normalised[normalised != MISSING]
        counts = present.value_counts()
        counts = counts[counts >= 2].iloc[:max_values]
        total = max(len(present), 1)
        return cls(total, {str(k): int(v) for k, v in counts.items()}, int(scale_total or total))

    def stored_counts(self, values: Sequence[str]) -> np.ndarray:
        """Each value's stored count (int64), -1 where it is not stored: `counts.get(value, -1)` of many
        values at once, without a Python call per value (the matcher asks for each distinct value of a
        chunk).

        >>> TermFrequencies.count(pd.Series(["a"] * 6 + ["b", "c"])).stored_counts(["a", "z"]).tolist()
        [6, -1]
        """
        texts = values.tolist() if isinstance(values, np.ndarray) else values
        return np.fromiter(map(self.counts.get, texts, repeat(-1)), dtype=np.int64, count=len(texts))

    def rarity(self, value: str) -> float:
        return self.rarity_of(self.counts.get(value, 1))

    def rarity_of(self, count: int) -> float:
        """`rarity` of a value held by `count` records (1 for a value not stored)."""
        share = count / self.total
        scale = math.log(max(self.scale_total, 2))
        return min(-math.log(share), scale) / scale

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "scale_total": self.scale_total, "counts": self.counts}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> TermFrequencies:
        return cls(
            int(document["total"]),
            {str(k): int(v) for k, v in document["counts"].items()},
            int(document["scale_total"]),
        )


Comparator = Callable[[Any, Any], float]
ManyComparator = Callable[[Sequence[Any], Sequence[Any]], np.ndarray]


def vectorised(many: ManyComparator) -> Callable[[Comparator], Comparator]:
    """Gives a comparator its vectorised form: `many(xs, ys)` compares `xs[i]` with `ys[i]` (present
    values) for all i at once and returns float64 values bit for bit equal to `compare(xs[i], ys[i])`, so
    a caller comparing many pairs (the matcher, once per distinct pair of values) may use either.

    >>> @vectorised(lambda xs, ys: np.abs(np.subtract(xs, ys), dtype=float))
    ... def gap(a, b):
    ...     return float(abs(a - b))
    >>> gap(1, 4), gap.many([1, 2], [4, 2]).tolist()
    (3.0, [3.0, 0.0])
    """

    def attach(compare: Comparator) -> Comparator:
        compare.many = many  # type: ignore[attr-defined]
        return compare

    return attach


def made_keys(
    makers: dict[str, Callable[[], pd.Series]], names: Collection[str] | None
) -> dict[str, pd.Series]:
    """`FieldType.keys` from one maker per key name: the keys in `names` (all when None), each made only
    when asked for."""
    return {name: make() for name, make in makers.items() if names is None or name in names}


def compare_many(compare: Comparator, xs: Sequence[Any], ys: Sequence[Any]) -> np.ndarray:
    """`compare(xs[i], ys[i])` for all i as float64: by its vectorised form when it has one (`vectorised`),
    else one call per pair."""
    many = getattr(compare, "many", None)
    if many is not None:
        return np.asarray(many(xs, ys), dtype=np.float64)
    if len(xs) != len(ys):
        raise ValueError(f"compare_many: {len(xs)} values against {len(ys)}")
    # `map` calls the comparator (dedupe's affine gap, in C) without a Python frame per pair.
    return np.fromiter(map(compare, xs, ys), dtype=np.float64, count=len(xs))


# What is known of comparators' values (`known_values`): per comparator, its value for a present value
# compared with itself and its least value for two present values. Dedupe's affine gap distance (affinegap
# 1.12), not ours to mark, costs each aligned pair of characters at least 1 and each character against a
# gap at least 7, over the two lengths: a text against itself is 0.5, and no two texts are below it.
# (`tests/test_fields.py` holds it to both.)
_KNOWN_VALUES: dict[Comparator, tuple[float, float]] = {normalizedAffineGapDistance: (0.5, 0.5)}


def known_values(*, same: float, lowest: float) -> Callable[[Comparator], Comparator]:
    """Marks a comparator whose value for any present value compared with itself is `same` and whose value
    for any two present values is at least `lowest`: the matcher does not call it for a value with itself
    (`FieldType.compare_distinct`), and bounds a score with `lowest` before calling it (`Matcher._settle`).
    """

    def attach(compare: Comparator) -> Comparator:
        _KNOWN_VALUES[compare] = (same, lowest)
        return compare

    return attach


def _pair_lists(values: np.ndarray, left: np.ndarray, right: np.ndarray) -> tuple[list[Any], list[Any]]:
    """The values of these pairs (places in `values`) as two lists, what comparators take."""
    return values[left].tolist(), values[right].tolist()


def same_value(compare: Comparator) -> float | None:
    """`compare(v, v)` for every present value v, when that is known to be one value (`known_values`)."""
    known = _KNOWN_VALUES.get(compare)
    return None if known is None else known[0]


def lowest_value(compare: Comparator) -> float | None:
    """The least value `compare` gives two present values, when known (`known_values`)."""
    known = _KNOWN_VALUES.get(compare)
    return None if known is None else known[1]


def capped_slips(xs: Sequence[str], ys: Sequence[str], cap: int) -> np.ndarray:
    """`min(OSA.distance(x, y), cap)` for each pair, in C (rapidfuzz's `cpdist`, which stops counting at
    the cap); the vectorised form of every "slips, capped" comparator."""
    if not len(xs):
        return np.zeros(0)
    found = process.cpdist(xs, ys, scorer=OSA.distance, score_cutoff=cap, workers=1)
    return np.minimum(found, cap).astype(np.float64)


def beyond(distance: Callable[[Any, Any], float], cut: float, name: str) -> Callable[[Any, Any], float]:
    """A graded comparison level as a comparator: 1.0 when `distance(a, b)` exceeds `cut`, else 0.0 (NaN
    stays NaN, i.e. missing). Several cuts of one distance let the linear classifier learn its shape: a
    few days apart is a slip, weeks apart is another order. `name` names the comparator in the saved model.

    >>> more_than_two = beyond(lambda a, b: abs(a - b), 2, "more_than_two")
    >>> more_than_two(1, 2), more_than_two(1, 9), more_than_two.__name__
    (0.0, 1.0, 'more_than_two')
    """

    def compare(a: Any, b: Any) -> float:
        value = distance(a, b)
        return value if value != value else float(value > cut)

    compare.__name__ = compare.__qualname__ = name
    # So a caller comparing many pairs can compute the distance once for all of its levels.
    compare.distance, compare.cut = distance, cut  # type: ignore[attr-defined]
    return compare


def simple_text(values: pd.Series) -> pd.Series:
    """Lower case ASCII words separated by single spaces: accents, punctuation and spacing removed."""
    text = values.astype(str)
    # Decomposing and dropping what is not ASCII leave ASCII text as it is: only the other values take
    # those steps, in one Python expression per value (through pandas, three passes and an assignment
    # into Arrow text took five times as long).
    ascii_only = (text.str.isascii() | text.isna()).to_numpy(dtype=bool)  # a missing value left as it is
    if not ascii_only.all():
        texts = text.to_numpy(dtype=object)  # a copy
        accented = np.flatnonzero(~ascii_only)
        texts[accented] = [
            unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode("ascii")
            for value in texts[accented].tolist()
        ]
        text = pd.Series(texts, index=values.index, dtype=str)
    # The pattern as text, not compiled: pandas then runs it over Arrow strings in C (the same matches on
    # ASCII text) rather than calling Python's `re` per value.
    return text.str.lower().str.replace(_NON_ALNUM.pattern, " ", regex=True).str.strip()


def map_unique(values: pd.Series, function: Callable[[str], str]) -> pd.Series:
    """Applies a per-value function once per distinct value; fast on the repetitive columns of a register."""
    return map_distinct(values, lambda distinct: [function(value) for value in distinct])


def map_distinct(values: pd.Series, function: Callable[[list[str]], list[str]]) -> pd.Series:
    """`map_unique` with a function of all the distinct values at once (a list in, a list as long out), for
    a mapping that needs no Python call per value."""
    codes, uniques = pd.factorize(values.to_numpy(dtype=object), use_na_sentinel=False)
    mapped = np.empty(len(uniques), dtype=object)
    mapped[:] = function(uniques.tolist())
    return pd.Series(mapped[codes], index=values.index, dtype=object)


def first_chars(values: pd.Series, n: int) -> pd.Series:
    """The first `n` characters, or no key when the value is shorter (a short value makes a huge block)."""
    return values.str.slice(0, n).where(values.str.len() >= n, MISSING)

"""Suggested corrections: candidate values for a flagged cell, ranked by a classifier learned from the log.

Candidates come from three places, as in Baran, but learned from this administration's own log:

- **dependencies**: the value the record's other fields imply (postcode -> city, name -> customer code),
  and the value of the record it duplicates (`matched`);
- **edit patterns**: value-to-value mappings seen in the log, and transformations such as moving the
  decimal point, swapping adjacent digits, swapping day and month, fixing the year, the running number a
  code should have given the records entered before it;
- **the field's usual format**: the value re-written in the field's most common shape or case, and the
  nearest frequent value of the field (typos).

`CandidateRanker` scores each (cell, candidate) pair with a gradient-boosted classifier trained on the
log's old -> new pairs; the best candidate is suggested only when its probability clears a threshold.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from rapidfuzz import fuzz, process
from rapidfuzz.distance import Levenshtein
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController

from pipeline import detectors as d
from pipeline import schema as s
from pipeline.fields import date as date_type
from pipeline.fields import number as number_type

logger = logging.getLogger(__name__)

NEAREST_CHOICES = 5000
NEAREST_LIMIT = 3
# Per cell, at most this many value-to-value mappings from the log (the most frequent): a missing customer
# code was filled with hundreds of different codes, and only the record's other fields say which.
LOG_MAPPING_LIMIT = 5
# A mapping old -> new is adopted when the log holds it at least this often (or staff corrected the old
# value more often than they kept it).
MAPPING_MIN_COUNT = 2
SOURCES: tuple[str, ...] = (
    "dependency",
    "matched",
    "log_mapping",
    "decimal",
    "digit_swap",
    "date_swap",
    "date_year",
    "date_format",
    "sequence",
    "year",
    "format",
    "number",
    "case",
    "nearest",
    "empty",
)
RANK_FEATURES: tuple[str, ...] = (
    *(f"from_{name}" for name in SOURCES),
    "sources",
    "source_prior",
    "dep_votes",
    "dep_share",
    "dep_weight",
    "log_mapping_count",
    "candidate_log_count",
    "candidate_unseen",
    "candidate_shape_share",
    "similarity",
    "edit_distance",
    "value_missing",
    "group_abs_log_ratio",
    "value_group_abs_log_ratio",
    "date_outside",
    "sequence_gap",
    "field_id",
)


@dataclass
class EditPatterns:
    """What the log teaches about corrections: value-to-value mappings per field, and how often each kind
    of candidate produced the right value in each field (`prior`)."""

    mapping: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    prior: dict[str, dict[str, float]] = field(default_factory=dict)
    to_empty: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def learn(
        cls,
        labels: pd.DataFrame,
        *,
        profile: d.Profile | None = None,
        edits: d.EditHistory | None = None,
    ) -> EditPatterns:
        """Learns the mappings from `cell_labels` rows; `prior` is filled by `learn_priors`.

        A mapping old -> new is a rule about a *value*, so it is adopted on evidence only (`adopt_mapping`):
        never in a field whose values do not recur (`d.values_recur` on the field's `profile`: dates, amounts,
        running numbers, where one edit says nothing about the next record holding that value), and
        elsewhere when the log holds it at least `MAPPING_MIN_COUNT` times or when staff corrected the old
        value more often than they kept it (`edits`, the entered history's counts; without them the count
        alone decides). Without `profile` every field counts as one whose values recur.

        >>> labels = pd.DataFrame({"field": ["city"] * 3, "old_value": ["Adam", "Adam", "Utrecht"],
        ...                        "new_value": ["Amsterdam", "Amsterdam", "Utrecht C"]})
        >>> EditPatterns.learn(labels).mapping["city"]
        {'Adam': {'Amsterdam': 2}}
        """
        mapping: dict[str, dict[str, dict[str, int]]] = {}
        to_empty: dict[str, dict[str, int]] = {}
        for name, rows in labels.groupby(s.LOG_FIELD, sort=False):
            fp = profile.fields.get(str(name)) if profile is not None else None
            recur = fp is None or d.values_recur(fp)
            seen = edits.value_seen.get(str(name), {}) if edits is not None else None
            errors = edits.value_errors.get(str(name), {}) if edits is not None else {}
            pairs = Counter(zip(rows[s.LOG_OLD_VALUE], rows[s.LOG_NEW_VALUE], strict=True))
            table: dict[str, dict[str, int]] = {}
            for (old, new), n in pairs.items():
                corrected = errors.get(old, 0)
                kept = None if seen is None else seen.get(old, 0) - corrected
                if recur and adopt_mapping(n, corrected, kept):
                    table.setdefault(old, {})[new] = n
            mapping[str(name)] = table
            empties = rows.loc[rows[s.LOG_NEW_VALUE] == s.MISSING, s.LOG_OLD_VALUE].map(d.shape_of)
            to_empty[str(name)] = {str(k): int(v) for k, v in empties.value_counts().items()}
        return cls(mapping=mapping, to_empty=to_empty)

    def __getstate__(self) -> dict:
        # The cache of `top` is rebuilt on use.
        return {k: v for k, v in self.__dict__.items() if k != "_top"}

    def top(self, name: str, value: str) -> list[tuple[str, int]]:
        """The most frequent corrections of `value` in field `name` (at most `LOG_MAPPING_LIMIT`).

        Only values the log maps are cached, so the cache is as large as `mapping` at most: a batch's
        flagged cells are mostly values the log never saw (near-unique order numbers and amounts), and
        caching those grew a long batch's memory by an entry per flagged cell."""
        table = self.mapping.get(name, {}).get(value)
        if not table:
            return []
        cache = self.__dict__.setdefault("_top", {})
        key = (name, value)
        found = cache.get(key)
        if found is None:
            found = cache[key] = sorted(table.items(), key=lambda item: -item[1])[:LOG_MAPPING_LIMIT]
        return found


def adopt_mapping(count: int, corrected: int, kept: int | None) -> bool:
    """Whether a value-to-value mapping seen `count` times in the log is evidence for the next record with
    that value: seen at least `MAPPING_MIN_COUNT` times, or its old value corrected (`corrected` times in
    the entered history) more often than kept (`kept`; None when unknown, then the count alone decides).

    >>> adopt_mapping(1, 1, 0), adopt_mapping(1, 1, 40), adopt_mapping(2, 2, 40), adopt_mapping(1, 0, None)
    (True, False, True, False)
    """
    if count >= MAPPING_MIN_COUNT:
        return True
    return kept is not None and corrected > kept


@dataclass
class CellContext:
    """What candidate generation needs to know about one cell."""

    field: str
    value: str
    row: dict[str, str]
    matched: str = ""
    expected_number: float = math.nan
    record_year: float = math.nan
    entry_time: pd.Timestamp | None = None


def _format_like(value: str, fp: d.FieldProfile) -> list[str]:
    """The value re-written in the field's usual shapes (`'1234ab'` -> `'1234 AB'`)."""
    core = [ch for ch in value if ch.isalnum()]
    out = []
    for shape in list(fp.shape_example)[:3]:
        slots = [ch for ch in shape if ch in "Aa9"]
        if len(slots) != len(core):
            continue
        chars = iter(core)
        built = []
        good = True
        for ch in shape:
            if ch in "Aa9":
                c = next(chars)
                if ch == "9" and not c.isdigit() or ch in "Aa" and not c.isalpha():
                    good = False
                    break
                built.append(c.upper() if ch == "A" else c.lower() if ch == "a" else c)
            else:
                built.append(ch)
        if good:
            out.append("".join(built))
    return out


def _recase(value: str, case: str) -> str:
    clean = " ".join(value.split())
    if case == "upper":
        return clean.upper()
    if case == "lower":
        return clean.lower()
    if case == "title":
        return clean.title()
    return clean


def _digit_swaps(value: str) -> list[str]:
    out = []
    for i in range(len(value) - 1):
        a, b = value[i], value[i + 1]
        if a.isdigit() and b.isdigit() and a != b:
            out.append(value[:i] + b + a + value[i + 2 :])
    return out


def _decimal_shifts(value: str, fp: d.FieldProfile) -> list[str]:
    number = number_type.plain_number(value)
    if not math.isfinite(number) or number == 0:
        return []
    return [number_type.write_number(number * 10.0**k, fp.decimals) for k in (-3, -2, -1, 1, 2, 3)]


def _date_variants(value: str, fp: d.FieldProfile) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"date_swap": [], "date_year": [], "date_format": []}
    if not fp.date_format:
        return out
    parsed = date_type.read_date(value, fp.date_format)
    if parsed is None:
        for fmt in date_type.DATE_FORMATS:
            other = date_type.read_date(value, fmt)
            if other is not None:
                out["date_format"].append(other.strftime(fp.date_format))
        return out
    if parsed.day <= 12 and parsed.day != parsed.month:
        out["date_swap"].append(parsed.replace(month=parsed.day, day=parsed.month).strftime(fp.date_format))
    for step in (-1, 1):
        try:
            out["date_year"].append(parsed.replace(year=parsed.year + step).strftime(fp.date_format))
        except ValueError:
            continue
    return out


def _nearest_cutoff(value: str) -> int:
    return max(1, min(3, len(value) // 5))


def _nearest(value: str, fp: d.FieldProfile, choices: list[str]) -> list[str]:
    if not value or not choices:
        return []
    found = process.extract(
        value, choices, scorer=Levenshtein.distance, limit=NEAREST_LIMIT, score_cutoff=_nearest_cutoff(value)
    )
    return [choice for choice, dist, _ in found if dist > 0]


NEAREST_BLOCK = 256  # values compared with all choices at a time (a block x choices matrix of distances)


def nearest_many(values: list[str], choices: list[str]) -> dict[str, list[str]]:
    """`_nearest` of many values of one field, once per distinct value: the distances to every choice in
    one rapidfuzz `cdist` call (C, capped at 3 edits) per block of values, then per value the
    `NEAREST_LIMIT` nearest within its cutoff, ties in choice order as `process.extract` gives them.

    >>> nearest_many(["Utrect", "Utrecht", ""], ["Utrecht", "Amsterdam", "Utrechts"])
    {'Utrect': ['Utrecht'], 'Utrecht': ['Utrechts']}
    """
    distinct = [value for value in dict.fromkeys(values) if value]
    out: dict[str, list[str]] = {}
    if not distinct or not choices:
        return out
    for start in range(0, len(distinct), NEAREST_BLOCK):
        block = distinct[start : start + NEAREST_BLOCK]
        distances = process.cdist(
            block, choices, scorer=Levenshtein.distance, score_cutoff=3, dtype=np.int32, workers=1
        )
        for value, row in zip(block, distances, strict=True):
            hits = np.flatnonzero(row <= _nearest_cutoff(value))
            nearest = hits[np.lexsort((hits, row[hits]))][:NEAREST_LIMIT]
            out[value] = [choices[j] for j in nearest.tolist() if row[j] > 0]
    return out


def generate_candidates(
    cell: CellContext,
    profile: d.Profile,
    patterns: EditPatterns,
    choices: dict[str, list[str]],
    nearest: dict[str, list[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """Candidate values for one cell: value -> {source: strength}. The cell's own value is never one.
    `nearest`: the field's `nearest_many` when the caller computed it for many cells at once."""
    fp = profile.fields[cell.field]
    value = cell.value
    found: dict[str, dict[str, float]] = {}

    def add(candidate: str, source: str, strength: float = 1.0) -> None:
        if candidate == value:
            return
        slot = found.setdefault(candidate, {})
        slot[source] = slot.get(source, 0.0) + strength

    for dep in profile.by_target.get(cell.field, []):
        source_value = cell.row.get(dep.source, s.MISSING)
        if source_value == s.MISSING:
            continue
        implied = dep.implied.get(source_value)
        if implied is not None:
            add(implied, "dependency", 1.0)
    if cell.matched:
        add(cell.matched, "matched")
    for new, n in patterns.top(cell.field, value):
        add(new, "log_mapping", float(n))
    if value:
        if fp.kind == "number":
            for candidate in _decimal_shifts(value, fp):
                add(candidate, "decimal")
        # The number the value holds, without the unit or sign the field does not write (`16.0 oz` -> `16`).
        number = d.leading_number(value)
        if math.isfinite(number):
            add(d.write_number(number, fp), "number")
        for candidate in _digit_swaps(value):
            add(candidate, "digit_swap")
        if fp.kind == "date":
            for source, values in _date_variants(value, fp).items():
                for candidate in values:
                    add(candidate, source)
        if fp.sequence and math.isfinite(cell.expected_number):
            parts = d.split_running_number(value)
            if parts is not None:
                prefix, _, width = parts
                add(f"{prefix}{int(round(cell.expected_number)):0{width}d}", "sequence")
        if fp.embeds_year and math.isfinite(cell.record_year):
            year = d.embedded_year(value)
            if year is not None and year != int(cell.record_year):
                add(value.replace(str(year), str(int(cell.record_year)), 1), "year")
        for candidate in _format_like(value, fp):
            add(candidate, "format")
        add(_recase(value, fp.case), "case")
        near = _nearest(value, fp, choices.get(cell.field, [])) if nearest is None else nearest.get(value, [])
        for candidate in near:
            add(candidate, "nearest")
        if patterns.to_empty.get(cell.field, {}).get(d.shape_of(value)):
            add(s.MISSING, "empty")
    return found


def candidate_features(
    cell: CellContext,
    candidates: dict[str, dict[str, float]],
    profile: d.Profile,
    patterns: EditPatterns,
    field_ids: dict[str, int],
) -> list[dict[str, float]]:
    """One feature row (`RANK_FEATURES`) per candidate of a cell."""
    fp = profile.fields[cell.field]
    deps = [dep for dep in profile.by_target.get(cell.field, []) if cell.row.get(dep.source, s.MISSING)]
    known = [dep for dep in deps if cell.row[dep.source] in dep.implied]
    prior = patterns.prior.get(cell.field, {})
    group = profile.groups.get(cell.field)
    group_median = math.nan
    if group is not None:
        group_median = group.medians.get(cell.row.get(group.group, s.MISSING), math.nan)
    value_ratio = _abs_log_ratio(cell.value, group_median)
    filled = max(fp.filled, 1)
    rows = []
    for candidate, sources in candidates.items():
        votes = [dep for dep in known if dep.implied[cell.row[dep.source]] == candidate]
        weight = sum(dep.strength * math.log1p(dep.support.get(cell.row[dep.source], 0)) for dep in votes)
        features: dict[str, float] = {f"from_{name}": float(name in sources) for name in SOURCES}
        features.update(
            sources=float(len(sources)),
            source_prior=max((prior.get(name, 0.0) for name in sources), default=0.0),
            dep_votes=float(len(votes)),
            dep_share=len(votes) / len(known) if known else math.nan,
            dep_weight=weight,
            log_mapping_count=sources.get("log_mapping", 0.0),
            candidate_log_count=math.log1p(fp.counts.get(candidate, 0)),
            candidate_unseen=float(candidate not in fp.counts),
            candidate_shape_share=fp.shapes.get(d.shape_of(candidate), 0) / filled,
            similarity=fuzz.ratio(cell.value, candidate) / 100.0,
            edit_distance=float(Levenshtein.distance(cell.value, candidate)),
            value_missing=float(cell.value == s.MISSING),
            group_abs_log_ratio=_abs_log_ratio(candidate, group_median),
            value_group_abs_log_ratio=value_ratio,
            date_outside=_date_outside(candidate, fp, cell.entry_time),
            sequence_gap=_sequence_gap(candidate, cell.expected_number) if fp.sequence else math.nan,
            field_id=float(field_ids.get(cell.field, -1)),
        )
        rows.append(features)
    return rows


def _abs_log_ratio(value: str, median: float) -> float:
    number = number_type.plain_number(value) if value else math.nan
    if not math.isfinite(number) or number <= 0 or not math.isfinite(median):
        return math.nan
    return abs(math.log10(number) - median)


def _date_outside(value: str, fp: d.FieldProfile, entry: pd.Timestamp | None) -> float:
    if fp.kind != "date" or not fp.date_format or entry is None or pd.isna(entry):
        return math.nan
    parsed = date_type.read_date(value, fp.date_format)
    if parsed is None or not math.isfinite(fp.delta_low):
        return math.nan
    delta = (parsed - entry).total_seconds() / 86400.0
    return max(fp.delta_low - delta, 0.0) + max(delta - fp.delta_high, 0.0)


def _sequence_gap(value: str, expected: float) -> float:
    parts = d.split_running_number(value)
    if parts is None or not math.isfinite(expected):
        return math.nan
    return math.log1p(abs(parts[1] - expected))


def nearest_choices(profile: d.Profile) -> dict[str, list[str]]:
    """The frequent values of each non-number field, for typo candidates."""
    out = {}
    for name, fp in profile.fields.items():
        if fp.kind in ("number", "date") or fp.sequence:
            continue
        top = sorted(fp.counts, key=fp.counts.get, reverse=True)[:NEAREST_CHOICES]
        out[name] = top
    return out


def learn_priors(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per field, the share of logged corrections each source proposed correctly (from a candidate frame
    with columns field, label and `from_*`)."""
    priors: dict[str, dict[str, float]] = {}
    for name, rows in frame.groupby("field", sort=False):
        cells = rows["cell"].nunique()
        hits = rows[rows["label"] == 1]
        priors[str(name)] = {
            source: float(hits[f"from_{source}"].sum()) / max(cells, 1) for source in SOURCES
        }
    return priors


def fill_empty_columns(
    X: np.ndarray, empty: np.ndarray | None = None, *, copy: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Columns that are NaN throughout training set to 0 (scikit-learn's binning fails on them); returns
    the matrix and the mask of such columns, to apply the same at prediction time. `copy` False: set in
    `X` itself (a matrix of the caller's own)."""
    if empty is None:
        empty = np.isnan(X).all(axis=0) if len(X) else np.zeros(X.shape[1], dtype=bool)
    if empty.any():
        if copy:
            X = X.copy()
        X[:, empty] = 0.0
    return X, empty


_THREADPOOLS: list[ThreadpoolController] = []


def one_thread() -> object:
    """A context in which scikit-learn's OpenMP loops run on one thread.

    The gradient-boosted models here are small, and OpenMP on a shared 2-core machine spends most of its
    time waiting for busy cores (25x slower than one thread when other jobs run). One thread per chunk is
    also what scales: chunks run side by side in processes or Spark tasks.
    """
    if not _THREADPOOLS:
        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1, user_api="openmp")


class CandidateRanker(BaseEstimator):
    """Scores (cell, candidate) pairs: the probability that the candidate is the corrected value."""

    def __init__(self, *, seed: int = 0, max_iter: int = 200, learning_rate: float = 0.1) -> None:
        self.seed = seed
        self.max_iter = max_iter
        self.learning_rate = learning_rate

    def fit(self, features: pd.DataFrame, labels: np.ndarray) -> CandidateRanker:
        """`features` has the columns `RANK_FEATURES`; `labels` is 1 where the candidate was right."""
        labels = np.asarray(labels, dtype=int)
        self.constant_ = None
        if len(np.unique(labels)) < 2:
            self.constant_ = float(labels.mean()) if len(labels) else 0.0
            self.model_ = None
            return self
        self.model_ = HistGradientBoostingClassifier(
            max_iter=self.max_iter,
            learning_rate=self.learning_rate,
            categorical_features=[RANK_FEATURES.index("field_id")],
            random_state=self.seed,
        )
        X, self.empty_columns_ = fill_empty_columns(features[list(RANK_FEATURES)].to_numpy(dtype=float))
        with one_thread():
            self.model_.fit(X, labels)
        return self

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Probability per row that the candidate is right."""
        check_is_fitted(self, "model_")
        if self.model_ is None:
            return np.full(len(features), self.constant_ or 0.0)
        if features.empty:
            return np.zeros(0)
        X, _ = fill_empty_columns(features[list(RANK_FEATURES)].to_numpy(dtype=float), self.empty_columns_)
        with one_thread():
            return self.model_.predict_proba(X)[:, 1]


def candidate_frame(
    cells: list[CellContext],
    profile: d.Profile,
    patterns: EditPatterns,
    field_ids: dict[str, int],
    choices: dict[str, list[str]],
) -> pd.DataFrame:
    """All candidates of `cells`, one row each: `cell` (position in `cells`), `field`, `candidate`, the
    sources as text, and `RANK_FEATURES`."""
    rows: list[dict[str, object]] = []
    fields = dict.fromkeys(cell.field for cell in cells)
    nearest = {
        name: nearest_many([cell.value for cell in cells if cell.field == name], choices.get(name, []))
        for name in fields
    }
    for position, cell in enumerate(cells):
        candidates = generate_candidates(cell, profile, patterns, choices, nearest[cell.field])
        for (candidate, sources), features in zip(
            candidates.items(),
            candidate_features(cell, candidates, profile, patterns, field_ids),
            strict=True,
        ):
            rows.append(
                {
                    "cell": position,
                    "field": cell.field,
                    "candidate": candidate,
                    "via": ",".join(sources),
                    **features,
                }
            )
    columns = ["cell", "field", "candidate", "via", *RANK_FEATURES]
    return pd.DataFrame(rows, columns=columns)


def best_candidates(frame: pd.DataFrame, probabilities: np.ndarray, n_cells: int) -> pd.DataFrame:
    """The most probable candidate per cell: columns candidate, probability, via (index = cell position);
    cells without candidates get `''` and 0."""
    out = pd.DataFrame(
        {"candidate": [s.MISSING] * n_cells, "probability": np.zeros(n_cells), "via": [""] * n_cells}
    )
    if frame.empty:
        return out
    cells = frame["cell"].to_numpy()
    probability = np.asarray(probabilities, dtype=float)
    # By cell, most probable first, ties in frame order (a stable sort); the first row of each cell wins.
    order = np.lexsort((-probability, cells))
    first = order[np.r_[True, cells[order][1:] != cells[order][:-1]]]
    top = cells[first]
    candidate = out["candidate"].to_numpy(dtype=object).copy()
    best = out["probability"].to_numpy(dtype=float).copy()
    via = out["via"].to_numpy(dtype=object).copy()
    candidate[top] = frame["candidate"].to_numpy(dtype=object)[first]
    best[top] = probability[first]
    via[top] = frame["via"].to_numpy(dtype=object)[first]
    return pd.DataFrame({"candidate": candidate, "probability": best, "via": via})

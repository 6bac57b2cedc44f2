"""Record anomaly score: how unusual a record is as a whole, for errors of kinds nobody corrected yet.

Each record is encoded per field as numbers the history makes meaningful, chosen so that a normal record of
a *later* period encodes like a normal record of the history (nothing drifts with time):

- **value rarity**, only for low-cardinality fields (most rows hold a value that recurs: cities, VAT rates,
  customer codes). In near-unique fields (order numbers, amounts) every new value is unseen, which says
  nothing; the fields whose values move with time (dates, numbers, running numbers) never use it. Rarity
  follows the chain rule: a field is judged *given the fields before it* where a dependency of the history
  says what it should be (customer code -> street). A street that is what the earlier records of its
  customer code hold is as rare as that customer, which the code's own rarity already counts; a customer
  with few orders is counted rare once, not once per field, and is not an anomaly for being a small
  customer. A street that differs from what its customer code implies keeps its own rarity;
- **shape rarity** (character classes; runs collapsed for free text and numbers), and for high-cardinality
  text and codes the length against the usual;
- **missing** where the field is normally filled;
- **numbers**: log size against the field's usual and against the usual of their group (an amount against
  that customer's usual amounts);
- **dates**: how far outside the usual distance to the entry time.

The history is encoded leave-one-out (each record's own value taken out of the counts), so it looks like
new data does to the fitted model. An IsolationForest learned on that encoding scores records; the score is
turned into 0..1 by its rank among the history's own scores, and only the far tail (above `quantile`) is
flagged, so a fresh batch of the same process has about `1 - quantile` of its normal records flagged. The
reason names the fields whose encodings are rarest in the history, in words a clerk reads.

>>> model = AnomalyModel(config, quantile=0.995).fit(stored)    # doctest: +SKIP
>>> model.score(batch)[["anomaly_score", "flagged", "reason"]]   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.ensemble import IsolationForest
from sklearn.utils.validation import check_is_fitted

from pipeline import detectors as d
from pipeline import schema as s
from pipeline.config import Config
from pipeline.fields import date as date_type
from pipeline.fields import number as number_type
from pipeline.fields.base import field_label

logger = logging.getLogger(__name__)

MODEL_FILE = "anomaly_model.joblib"
META_FILE = "anomaly_model.json"
ANOMALY_SCORE = s.ANOMALY_SCORE
FLAGGED = "flagged"
REASON = s.FLAG_REASON
TOP_FIELDS = 2
# Records a clerk found normal raise the cutoff at most to this quantile of the history's scores.
MAX_NORMAL_QUANTILE = 0.999
# A field's values count as low-cardinality (value rarity is meaningful) when this share of its filled
# rows holds a value seen at least `RECURRING` times.
RECURRING = 3
RECURRING_SHARE = 0.8
# A field is named in a reason when at most this share of history records is as unusual in it.
REASON_TAIL = 0.02
CLIP = 10.0
# `score` walks the forest this many records at a time (its node arrays are records x trees).
SCORE_ROWS = 5_000


class AnomalyModel(BaseEstimator):
    """IsolationForest on per-field encodings that do not drift with time (see the module docstring)."""

    def __init__(
        self, config: Config, *, quantile: float = 0.995, seed: int = 0, n_estimators: int = 100
    ) -> None:
        self.config = config
        self.quantile = quantile
        self.seed = seed
        self.n_estimators = n_estimators

    # ----------------------------------------------------------------------------------------- encoding

    def _plan(self) -> list[tuple[str, str]]:
        """The encoding's columns as (field, what) pairs, from the fitted profile."""
        plan = []
        for name, fp in self.profile_.fields.items():
            if fp.filled == 0:
                continue
            if _low_cardinality(fp):
                plan.append((name, "value"))
            plan.append((name, "shape"))
            if fp.kind in ("text", "code") and not _low_cardinality(fp):
                plan.append((name, "length"))
            plan.append((name, "missing"))
            if fp.kind == "number" and math.isfinite(fp.number_spread):
                plan.append((name, "number"))
                if name in self.profile_.groups:
                    plan.append((name, "group"))
            if fp.kind == "date" and fp.date_format and math.isfinite(fp.delta_low):
                plan.append((name, "date"))
        return plan

    def _givens(self, stored: pd.DataFrame) -> dict[str, list[Given]]:
        """Per field with a value-rarity column, the dependencies that judge it given an earlier field which
        has one too (the chain rule's order is the config's)."""
        rated = [name for name, what in self.owners_ if what == "value"]
        texts = d.chunk_texts(stored, rated)
        counts: dict[str, np.ndarray] = {}  # per field, each record's value count: shared by its dependencies
        givens: dict[str, list[Given]] = {}
        for position, name in enumerate(rated):
            earlier = set(rated[:position])
            for dep in self.profile_.by_target.get(name, []):
                if dep.source in earlier:
                    givens.setdefault(name, []).append(Given.of(dep, self.profile_, texts, counts))
        return givens

    def _given_rarity(
        self, name: str, seen: dict[str, tuple[np.ndarray, np.ndarray]], rarity: np.ndarray, own: float
    ) -> np.ndarray:
        """`rarity` of field `name` lowered to its rarity given an earlier field (`seen`: value codes and
        counts of the fields encoded so far; `own` takes the record itself out of the counts):

        - where the record holds the value the earlier field implies in the history, -log of the share of
          the earlier field's other records that agree (0 when all do);
        - where the earlier field's value and this one are both new to the history (a new customer with its
          own street), -log of how often a new value of the earlier field came with a new value of this one
          in the history (`Given.novel`).
        """
        out = rarity
        code, count = seen[name]
        new_value = (count - own <= 0) & (rarity > 0)
        for given in getattr(self, "givens_", {}).get(name, []):
            if given.source not in seen:
                continue
            key, key_count = seen[given.source]
            has = key >= 0
            at = np.where(has, key, 0)
            agrees = has & (given.implied[at] == code) & (code >= 0)
            total = given.total[at] - own
            agreeing = np.maximum(given.support[at] - own, 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                conditional = -np.log((agreeing + 1) / np.maximum(total + 1, 1.0))
            out = np.where(agrees & (total >= 1), np.minimum(out, conditional), out)
            new_key = (key_count - own <= 0) & ~np.isnan(key_count)
            out = np.where(new_key & new_value, np.minimum(out, given.novel), out)
        return out

    def _encode(self, chunk: pd.DataFrame, *, leave_one_out: bool = False) -> np.ndarray:
        """One column per `owners_` entry, higher = rarer. `leave_one_out` for the history itself: each
        record's own value is taken out of the counts it is judged by."""
        profile = self.profile_
        own = 1.0 if leave_one_out else 0.0
        texts = d.chunk_texts(chunk, [n for n in profile.fields if n in chunk.columns])
        times = d.entry_times(chunk, self.config.time_column)
        parsed: dict[str, dict[str, np.ndarray]] = {}
        seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # value codes and counts, value-rarity fields
        columns = []
        for name, what in self.owners_:
            fp = profile.fields[name]
            if name not in parsed:
                parsed[name] = _parse(texts[name] if name in texts else pd.Series("", index=chunk.index), fp)
            p = parsed[name]
            missing = p["missing"]
            filled = max(fp.filled - own, 1.0)
            if what == "value":
                code = fp.codes(p["values"])
                # NaN count: missing, neither new nor known.
                seen[name] = (code, np.where(missing, np.nan, fp.count_of(code)))
                counts = np.maximum(fp.count_of(code) - own, 0.0)
                col = np.where(missing, 0.0, -np.log((counts + 1) / (filled + 1)))
                col = self._given_rarity(name, seen, col, own)
            elif what == "shape":
                table = fp.coarse if _coarse(fp) else fp.shapes
                counts = np.maximum(d.lookup(profile.cache, table, p["shape"], 0.0) - own, 0.0)
                col = np.where(missing, 0.0, -np.log((counts + 1) / (filled + 1)))
            elif what == "length":
                col = np.where(missing, 0.0, np.abs(p["length"] - fp.length_mean) / max(fp.length_std, 1.0))
            elif what == "missing":
                col = missing * -np.log(max(1 - fp.fill_rate, 1e-3))
            elif what == "number":
                col = np.abs(p["log"] - fp.number_center) / fp.number_spread
            elif what == "group":
                group = profile.groups[name]
                keys = texts[group.group].to_numpy(dtype=object)
                col = np.abs(p["log"] - d.lookup(profile.cache, group.medians, keys)) / fp.number_spread
            else:  # date
                col = _date_outside(texts[name], fp, times)
            columns.append(np.clip(np.nan_to_num(col, nan=0.0, posinf=CLIP), 0.0, CLIP))
        if not columns:
            return np.zeros((len(chunk), 0))
        return np.column_stack(columns)

    # ------------------------------------------------------------------------------------------------ fit

    def fit(
        self,
        stored: pd.DataFrame,
        *,
        normal: pd.DataFrame | None = None,
        pairs: list[tuple[str, str]] | None = None,
        profile: d.Profile | None = None,
    ) -> AnomalyModel:
        """Learns the field profiles and the forest from the history (as stored).

        `normal`: records a clerk reviewed and found not unusual (rejected anomaly flags). The cutoff rises
        above their scores (up to the MAX_NORMAL_QUANTILE of the history), and a record encoded exactly as
        one of them is never flagged: the same false alarm does not come back. Nor does the same reason on
        another record: a record whose rare values (`_rare_values`) are all rare values of one normal record
        is not flagged (a VAT rate a clerk found normal once is no anomaly on its own next time).

        `pairs` (the dependencies `detectors.find_dependencies` finds in `stored`) and `profile` (a profile
        of `stored`, row for row in this order, e.g. the error model's `profile_`) spare learning them a
        second time from the same records; the model reads neither profile's identifier checks.
        """
        if profile is not None:
            if profile.rows != len(stored):
                raise ValueError(f"profile of {profile.rows} rows given for {len(stored)} records")
            self.profile_ = profile
        else:
            if pairs is None:
                kinds = {n: spec.type for n, spec in self.config.fields.items() if n in stored.columns}
                pairs = d.find_dependencies(d.chunk_texts(stored, kinds), kinds)
            self.profile_ = d.build_profile(stored, self.config, pairs=pairs)
        self.owners_ = self._plan()
        self.givens_ = self._givens(stored)
        X = self._encode(stored, leave_one_out=True)
        self.forest_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(X)
        raw = -self.forest_.score_samples(X)
        self.reference_ = np.sort(raw)
        self.cutoff_ = float(np.quantile(raw, self.quantile))
        self.normal_digests_: frozenset[str] = frozenset()
        if normal is not None and len(normal):
            encoded = self._encode(normal)
            highest = float((-self.forest_.score_samples(encoded)).max())
            cap = float(np.quantile(raw, MAX_NORMAL_QUANTILE))
            self.cutoff_ = max(self.cutoff_, min(np.nextafter(highest, np.inf), cap))
            self.normal_digests_ = frozenset(_digests(encoded))
        # Per column, the history's sorted encodings: how rare a record's value is in one field, for reasons.
        self.column_reference_ = np.sort(X, axis=0)
        # Each normal record's rare values, filed under each of them: a flagged record's are looked up
        # among the normal records sharing its first, not among all of them.
        self.normal_rare_: dict[str, list[frozenset[str]]] = {}
        if normal is not None and len(normal):
            rare = (self._rare_values(normal.iloc[i], encoded[i]) for i in range(len(normal)))
            for found in sorted({found for found in rare if found}, key=sorted):
                for digest in found:
                    self.normal_rare_.setdefault(digest, []).append(found)
        logger.info(
            "anomaly model: %d columns over %d fields, cutoff %.4f",
            X.shape[1],
            len(self.profile_.fields),
            self.cutoff_,
        )
        return self

    def for_scoring(self) -> AnomalyModel:
        """A copy holding what `score` and `reason` read: the profile without its dependencies, which only
        `fit` reads (`givens_` keeps what scoring needs of them, as arrays). The rest is shared, unchanged.

        For a scoring process: the dependencies' value tables were ~2/3 of a loaded model's memory (~14 MB
        of a 10,000-record history's model, in the job and in every `--workers` helper).
        """
        check_is_fitted(self, "forest_")
        model = copy.copy(self)
        model.profile_ = replace(self.profile_, dependencies=[], cache={})
        return model

    # -------------------------------------------------------------------------------------------- scoring

    def score(self, chunk: pd.DataFrame) -> pd.DataFrame:
        """Columns anomaly_score (0..1, the share of history records less unusual), flagged, reason."""
        check_is_fitted(self, "forest_")
        if len(chunk) == 0:
            return pd.DataFrame({ANOMALY_SCORE: [], FLAGGED: [], REASON: []}, index=chunk.index)
        X = self._encode(chunk)
        forest = self._flat_forest()
        raw = np.concatenate(
            [forest.anomaly(X[start : start + SCORE_ROWS]) for start in range(0, len(X), SCORE_ROWS)]
        )
        rank = np.searchsorted(self.reference_, raw, side="right") / max(len(self.reference_), 1)
        flagged = raw > self.cutoff_
        known = getattr(self, "normal_digests_", frozenset())
        if known and flagged.any():
            flagged &= ~np.isin(_digests(X), list(known))
        for i in np.flatnonzero(flagged) if getattr(self, "normal_rare_", None) else []:
            rare = self._rare_values(chunk.iloc[i], X[i])
            known_rare = self.normal_rare_.get(min(rare), []) if rare else []
            flagged[i] = not any(rare <= found for found in known_rare)
        reasons = np.full(len(chunk), "", dtype=object)
        for i in np.flatnonzero(flagged):
            reasons[i] = self._reason(chunk.iloc[i], X[i])
        return pd.DataFrame(
            {ANOMALY_SCORE: np.clip(rank, 0.0, 1.0), FLAGGED: flagged, REASON: reasons}, index=chunk.index
        )

    def _flat_forest(self) -> FlatForest:
        flat = self.__dict__.get("_flat")
        if flat is None:
            flat = self.__dict__["_flat"] = FlatForest(self.forest_)
        return flat

    def __getstate__(self) -> dict:
        # The flattened forest is rebuilt on first use.
        return {k: v for k, v in self.__dict__.items() if k != "_flat"}

    def _tail(self, encoded: np.ndarray) -> np.ndarray:
        """Per column, the share of history records at least as unusual as this encoded record (1.0 where
        it is not unusual at all)."""
        n = self.column_reference_.shape[0]
        return np.array(
            [
                (n - np.searchsorted(self.column_reference_[:, j], encoded[j], side="left")) / max(n, 1)
                if encoded[j] > 0
                else 1.0
                for j in range(len(encoded))
            ]
        )

    def _rare_values(self, record: pd.Series, encoded: np.ndarray) -> frozenset[str]:
        """What makes a record unusual, as a reason would name it: a digest of (field, column, value) for
        every column where at most `REASON_TAIL` of the history is as unusual (digests: the model keeps
        no values of the records a clerk reviewed)."""
        found = []
        for j in np.flatnonzero(self._tail(encoded) <= REASON_TAIL):
            name, what = self.owners_[j]
            key = "\x1f".join((name, what, _value(record, name))).encode("utf-8")
            found.append(hashlib.blake2b(key, digest_size=12).hexdigest())
        return frozenset(found)

    def _reason(self, record: pd.Series, encoded: np.ndarray) -> str:
        """ "unusual record: " and the rarest fields of the record, each in a few words."""
        tail = self._tail(encoded)
        phrases: list[str] = []
        named: set[str] = set()
        for j in np.argsort(tail, kind="stable"):
            if tail[j] > REASON_TAIL or len(phrases) == TOP_FIELDS:
                break
            name, what = self.owners_[j]
            if name in named:
                continue
            named.add(name)
            phrases.append(self._phrase(name, what, record))
        if not phrases:
            return "unusual record: an unusual combination of values"
        return "unusual record: " + "; ".join(phrases)

    def _phrase(self, name: str, what: str, record: pd.Series) -> str:
        label = field_label(name)
        value = _value(record, name)
        fp = self.profile_.fields[name]
        if what == "missing" or value == s.MISSING:
            return f"{label} is empty (filled in {fp.fill_rate:.0%} of earlier records)"
        if what == "value":
            return f"{label} {value!r} is rare in earlier records"
        if what == "shape":
            example = next(iter(fp.shape_example.values()), "")
            usual = f" (usually like {example!r})" if example else ""
            return f"{label} {value!r} has an unusual format{usual}"
        if what == "length":
            return f"{label} {value!r} is unusually {'long' if len(value) > fp.length_mean else 'short'}"
        if what in ("number", "group"):
            number = number_type.plain_number(value)
            if what == "group":
                group = self.profile_.groups[name]
                key = str(record.get(group.group, s.MISSING))
                return f"{label} {value} is far from the usual for {field_label(group.group)} {key!r}"
            size = (
                "large"
                if math.isfinite(number) and math.log10(abs(number) or 1) > fp.number_center
                else "small"
            )
            return f"{label} {value} is unusually {size}"
        return f"{label} {value} is unusually far from the entry date"

    # ------------------------------------------------------------------------------------------ save/load

    def save(self, folder: Path) -> None:
        """Writes the fitted model (joblib) and its metadata (JSON) into `folder`."""
        from pipeline.errors import write_meta

        check_is_fitted(self, "forest_")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        joblib.dump(self, folder / MODEL_FILE, compress=3)
        write_meta(folder / META_FILE, self, {"quantile": self.quantile, "cutoff": self.cutoff_})

    @classmethod
    def load(cls, folder: Path) -> AnomalyModel:
        """Reads a model written by `save`; raises `ModelLoadError` with a one-line message on any failure."""
        from pipeline.errors import load_model

        return load_model(cls, Path(folder), MODEL_FILE, META_FILE)


@dataclass(frozen=True)
class Given:
    """A dependency `source` -> `target` as arrays over the source's value codes: the implied target code
    (-1 none), how many history records of each source value hold it (`support`) and how many there are;
    and `novel`, the target's rarity given that the source value is new: -log of the share of history
    records whose source value occurs nowhere else that hold a target value occurring nowhere else."""

    source: str
    target: str
    implied: np.ndarray
    support: np.ndarray
    total: np.ndarray
    novel: float

    @classmethod
    def of(
        cls,
        dep: d.Dependency,
        profile: d.Profile,
        texts: pd.DataFrame,
        counts: dict[str, np.ndarray] | None = None,
    ) -> Given:
        """`counts`: each record's value count per field, filled as computed (a field is the source or the
        target of several dependencies; looking its values up once serves them all)."""
        counts = {} if counts is None else counts
        for name in (dep.source, dep.target):
            if name not in counts:
                fp = profile.fields[name]
                counts[name] = fp.count_of(fp.codes(texts[name].to_numpy(dtype=object)))
        keys = profile.fields[dep.source].vocab.to_numpy(dtype=object)
        key_count, value_count = counts[dep.source], counts[dep.target]
        new_key = (key_count == 1) & (texts[dep.target] != s.MISSING).to_numpy()
        both = new_key & (value_count == 1)
        return cls(
            source=dep.source,
            target=dep.target,
            implied=np.asarray(dep.implied_code, dtype=np.int64),
            support=np.array([dep.support.get(k, 0) for k in keys], dtype=float),
            total=np.array([dep.total.get(k, 0) for k in keys], dtype=float),
            novel=float(-np.log((both.sum() + 1) / (new_key.sum() + 2))),
        )


def _value(record: pd.Series, name: str) -> str:
    """A record's value in a field as text, `MISSING` where it has none (absent, None or NaN)."""
    raw = record.get(name, s.MISSING)
    return s.MISSING if raw is None or (isinstance(raw, float) and math.isnan(raw)) else str(raw)


def _digests(encoded: np.ndarray) -> list[str]:
    """A short digest of each encoded record: identifies a record the model has seen, without its values."""
    rows = np.ascontiguousarray(np.nan_to_num(encoded, nan=-1.0), dtype=np.float64)
    return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in rows]


class FlatForest:
    """A fitted IsolationForest's trees as flat arrays, evaluated for all trees at once.

    `anomaly(X)` equals `-forest.score_samples(X)` bit for bit (inputs compared as float32 like the trees
    do, path lengths summed tree after tree), without scikit-learn's per-tree loop through joblib, which
    costs milliseconds for a single record.
    """

    def __init__(self, forest: IsolationForest) -> None:
        trees = [estimator.tree_ for estimator in forest.estimators_]
        sizes = np.array([tree.node_count for tree in trees])
        offsets = np.r_[0, np.cumsum(sizes)[:-1]]
        left = np.concatenate([tree.children_left for tree in trees])
        right = np.concatenate([tree.children_right for tree in trees])
        shift = np.repeat(offsets, sizes)
        self.leaf = left == -1
        self.left = np.where(self.leaf, -1, left + shift)
        self.right = np.where(self.leaf, -1, right + shift)
        self.feature = np.concatenate([tree.feature for tree in trees]).astype(np.intp)
        self.threshold = np.concatenate([tree.threshold for tree in trees])
        self.path = np.concatenate(
            [
                lengths + averages - 1.0
                for lengths, averages in zip(
                    forest._decision_path_lengths, forest._average_path_length_per_tree, strict=True
                )
            ]
        )
        self.roots = offsets
        self.forest = forest
        self.subsampled = forest._max_features != forest.n_features_in_
        self.denominator = len(trees) * _average_path_length(forest._max_samples)

    def anomaly(self, X: np.ndarray) -> np.ndarray:
        """`-score_samples(X)`: higher = more anomalous."""
        X = np.asarray(X, dtype=np.float32)
        n = len(X)
        node = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        rows = np.arange(n)[:, None]
        if self.subsampled:  # each tree sees its own columns: not how AnomalyModel fits its forest
            return -self.forest.score_samples(X)
        active = ~self.leaf[node]
        while active.any():
            at = node[active]
            value = X[np.broadcast_to(rows, node.shape)[active], self.feature[at]]
            node[active] = np.where(value <= self.threshold[at], self.left[at], self.right[at])
            active = ~self.leaf[node]
        depths = np.cumsum(self.path[node], axis=1)[:, -1] if len(self.roots) else np.zeros(n)
        scores = 2 ** -np.divide(
            depths, self.denominator, out=np.ones_like(depths), where=self.denominator != 0
        )
        return scores


def _average_path_length(n: int) -> float:
    """scikit-learn's average path length of an unsuccessful search in a binary search tree of n nodes."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0
    return 2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n


def _low_cardinality(fp: d.FieldProfile) -> bool:
    """Whether value rarity means something: most rows hold a recurring value, and values do not drift."""
    if fp.kind in ("number", "date") or fp.sequence or not fp.filled:
        return False
    return fp.recurring_share(RECURRING) >= RECURRING_SHARE


def _coarse(fp: d.FieldProfile) -> bool:
    """Free text and numbers are judged by their coarse shape (runs collapsed), the rest by the full one."""
    return fp.kind in ("text", "number")


def _parse(values: pd.Series, fp: d.FieldProfile) -> dict[str, np.ndarray]:
    """Per-value facts of one field, computed once per distinct value."""
    keys = values.to_numpy(dtype=object)
    inverse, uniques = pd.factorize(keys, use_na_sentinel=False)  # a hash table: no sort, no str copy
    shapes = [d.shape_of(v) for v in uniques]
    if _coarse(fp):
        shapes = [d.coarse_shape(v) for v in shapes]
    out = {
        "values": keys,
        "missing": keys == s.MISSING,
        "shape": np.array(shapes, dtype=object)[inverse],
        "length": np.array([len(v) for v in uniques], dtype=float)[inverse],
    }
    if fp.kind == "number":
        numbers = np.array([number_type.plain_number(v) for v in uniques], dtype=float)[inverse]
        with np.errstate(divide="ignore", invalid="ignore"):
            out["log"] = np.where(numbers != 0, np.log10(np.abs(numbers)), np.nan)
    return out


def _date_outside(values: pd.Series, fp: d.FieldProfile, times: pd.Series | None) -> np.ndarray:
    """How far outside the usual (entry time to date) range, in units of that range's width."""
    if times is None or not fp.date_format:
        return np.zeros(len(values))
    dates = date_type.parse_dates(values, fp.date_format)
    delta = ((dates - times).dt.total_seconds() / 86400.0).to_numpy(dtype=float)
    width = max(fp.delta_high - fp.delta_low, 1.0)
    outside = np.maximum(fp.delta_low - delta, 0) + np.maximum(delta - fp.delta_high, 0)
    return np.nan_to_num(outside / width, nan=0.0)

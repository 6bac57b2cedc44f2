"""The duplicate model: learns from the merge log which records are second registrations of earlier ones.

dedupe stays underneath for what it is good at, its comparators (the field plugins' dedupe variables and
`DataModel`, which also adds the missing-value indicators) and its classifier (a logistic regression chosen
by cross-validation, as dedupe's `ActiveMatching` does). Two of dedupe's parts are replaced, because they
do not fit a batch job that learns from thousands of logged merges: its blocking learner (the index and
canopy predicates grow to many gigabytes) and its interactive labelling.

* Blocking: every field plugin offers cheap keys (whole code, sorted digits, first token, metaphone, ...).
  A record is compared with the `window` most recent earlier records that share a key value. A greedy set
  cover picks the keys (and combinations of a weak key such as a city with another key) that cover the
  known duplicate pairs up to the `recall` target at the fewest comparisons, and backs each pair up with a
  second rule on other fields, so that one mistyped field does not keep a new duplicate out of every block.
* Comparisons: each field plugin's dedupe comparators, graded levels among them (days apart beyond 3, 10, 31
  and 365; two or three slips in a code; any difference or more than 10% between numbers; none of them
  counting a typing slip as a real difference, which has levels of its own: `fields.date`, `fields.number`),
  plus a term-frequency feature per field (Splink's adjustment): an exact agreement counts by the value's
  rarity among the records entered up to the later of the two (in training the history in entry order, when
  scoring the reference and then the batch: `counted_rarity`), so a busy customer's name or usual amount is
  weak evidence, a rare one strong, and a day of a batch twenty times denser than the history counts as the
  busy day it is.
* Labels: positives are the known pairs (merge chains closed), negatives are candidate pairs of the learned
  blocking that were never merged (the hard ones), pairs a clerk rejected (`non_pairs`), pairs agreeing on
  one field, chance agreements (an unrelated record given another's values in one to three fields: what a
  register ten times larger produces by chance), denser look-alikes (a never-merged look-alike given the
  other's value in one field where they differ: a customer's second order of the day) and random pairs,
  `max_labels` in all.
* Scoring: each record's candidates are cut to the `top_k` that share most keys, compared field by field,
  and scored by the classifier; the best candidate above `threshold_` (never below 0.5 when `calibrate`
  chooses it) is the record it duplicates; every other reference record above `threshold_` is named too
  (a re-registration often ties its original and an earlier re-registration of the same order).

>>> # model = DuplicateModel(config).fit(entered_history, known_pairs)
>>> # links = model.matcher(reference).match(batch)   # duplicate_of, duplicate_score, cluster_id, reason,
>>> #                                       # duplicate_position, reference_duplicate_positions
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import dedupe
import numpy as np
import pandas as pd
from affinegap import normalizedAffineGapDistance
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

from pipeline import __version__
from pipeline import schema as s
from pipeline.config import Config, config_from_dict
from pipeline.corrections import cluster_roots
from pipeline.duplicates.blocking import BlockingLearner, BlockingRule, join_keys
from pipeline.duplicates.calibration import choose_link_threshold, link_floor
from pipeline.duplicates.classifier import PairClassifier, probabilities
from pipeline.duplicates.labels import LabelSampler
from pipeline.duplicates.reasons import ReasonWriter, importance_order
from pipeline.duplicates.sorted_runs import SortedRuns
from pipeline.duplicates.storage import (
    ColumnFile,
    FloatFile,
    Offsets,
    RecordFile,
    SpillBuffer,
    decode_slices,
    encode_texts,
)
from pipeline.exceptions import BadInputError, ModelLoadError, SchemaError, TrainingDataError
from pipeline.fields import FieldType, field_type
from pipeline.fields.base import TermFrequencies, lowest_value
from pipeline.fields.text import token_distance
from pipeline.memory import collector_paused

logger = logging.getLogger(__name__)

# 5: slips are not distances in `days_apart` and the amount's relative difference; 6: a number's decimal
# slip is one digit slip and may round off the digits it shifts out, no "more than 1% apart" level.
FORMAT_VERSION = 6
SETTINGS_FILE = "linkage_settings.json"
META_FILE = "linkage_meta.json"
# `fit` drops a never-merged "negative" its first fit scores at least this high as an unmerged duplicate.
UNMERGED_SUSPECT = 0.8
# `fit` draws candidate pairs (the candidate recall figure, the look-alike negatives) from at most this many
# of the latest records: the matcher's index of a whole history is its largest cost in time and memory, and
# a few hundred look-alikes need no more. Every label's features come from an index of the records it names.
CANDIDATE_RECORDS = 50_000
# A matcher indexes its reference this many records at a time (`Matcher`).
REFERENCE_ROWS = 50_000
# `calibrate` matches its held-out batch this many records at a time (its pair arrays grow with them).
MATCH_ROWS = 10_000
# Positions and block sizes are stored as 32-bit integers: a batch's index holds one value per record and
# rule, and no process holds two billion records anyway.
MAX_RECORDS = 2**31 - 1
# `Matcher._settle` computes a pair's deferred comparisons when its score bound is within this of its
# record's best score.
SETTLE_MARGIN = 1e-9
DEDUPE_VERSION = metadata.version("dedupe")
# Comparators never below 0 nor NaN for two present values, and costly: `Matcher._deferrable`.
_DEFERRABLE = (normalizedAffineGapDistance, token_distance)
# How often an idle pair helper checks that its parent is still there (`_serve_pairs`).
PAIR_HELPER_POLL_SECONDS = 1.0
_CODE_TYPES = (np.int8, np.int16, np.int32)  # of per-record value codes: 8, 16 and 32 bits


# Per match field: the value codes of pairs' left and right records, and where both hold a value.
_PairCodes = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
# Per match field: its distinct pairs of values (`Matcher._distinct_pairs`): the parsed values, each
# pair's places among them (left, right), and each compared pair's number among the distinct pairs.
_DistinctPairs = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class _Encoded:
    """A frame of records turned into what the matcher stores: normalised and parsed values per field, the
    blocking keys per rule, entry times (days, NaN when unknown), and the raw values of all config fields.

    Per match field the values are kept once per distinct normalised value, in order of first appearance
    (`values`, and `parsed`: None where the value is not usable), with each record's number among them
    (`inverse`): the matcher codes and counts values, not records."""

    ids: list[str]
    raw: list[np.ndarray]  # per config field present, in config order: the values as text (object arrays)
    values: dict[str, np.ndarray]  # object arrays of distinct normalised values
    inverse: dict[str, np.ndarray]  # per record: its value's place in `values`
    parsed: dict[str, np.ndarray]  # object arrays, one per distinct value
    keys: list[list[str]]
    times: list[float]

    def __len__(self) -> int:
        return len(self.ids)

    def normalised(self, field: str) -> np.ndarray:
        """The normalised value of each record (an object array)."""
        return self.values[field][self.inverse[field]]


class DuplicateModel:
    """Learns to find duplicate registrations from records as entered and the pairs staff merged.

    Parameters are only stored here (scikit-learn's convention); `fit` learns the field plugins' state,
    `blocking_rules_`, the classifier (`weights_`, `intercept_`), `label_counts_` and sets `threshold_`
    to 0.5 until `calibrate` chooses it on held-out data.
    """

    def __init__(
        self,
        config: Config,
        *,
        recall: float = 0.999,
        max_labels: int = 1000,
        seed: int = 0,
        window: int = 30,
        top_k: int = 8,
    ) -> None:
        self.config = config
        self.recall = recall
        self.max_labels = max_labels
        self.seed = seed
        self.window = window
        self.top_k = top_k

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {
            "config": self.config,
            "recall": self.recall,
            "max_labels": self.max_labels,
            "seed": self.seed,
            "window": self.window,
            "top_k": self.top_k,
        }

    # ------------------------------------------------------------------ training

    def fit(
        self,
        entered: pd.DataFrame,
        pairs: set[frozenset[str]],
        non_pairs: set[frozenset[str]] | frozenset[frozenset[str]] = frozenset(),
    ) -> DuplicateModel:
        """Learns blocking and the pairwise classifier from the history as entered and its known pairs.

        `pairs` are pairs of ids of `entered` that staff merged (chains closed); `non_pairs` pairs a clerk
        rejected as duplicates (review decisions), which join the labels as negatives so the same false
        alarm is not raised again; pairs with an id outside `entered` are ignored. Term frequencies are
        counted on `entered`. Raises `TrainingDataError` when there is too little to learn from.
        """
        started = time.perf_counter()
        self._check_columns(entered, "training history")
        records = entered.iloc[self._entry_order(entered)].reset_index(drop=True)
        ids = records[self.config.id_column].astype(str)
        position = pd.Series(np.arange(len(records)), index=ids.to_numpy())
        position = position[~position.index.duplicated(keep="last")]
        # Sorted, so the label sample (and the model) does not depend on the set's hash order.
        known = sorted(
            tuple(sorted(pair)) for pair in pairs if len(pair) == 2 and all(i in position.index for i in pair)
        )
        if len(records) < 4:
            raise TrainingDataError(
                f"training history: {len(records)} records are too few for the duplicate model; "
                "need at least 4"
            )
        known_set = set(known)
        rejected = sorted(
            pair
            for pair in (tuple(sorted(p)) for p in non_pairs if len(p) == 2)
            if pair not in known_set and all(i in position.index for i in pair)
        )
        if not known:
            return self._fit_unlabelled(records, started)
        left = position[[a for a, _ in known]].to_numpy()
        right = position[[b for _, b in known]].to_numpy()
        # Earlier record first, as in scoring where a record is matched against earlier ones.
        pair_a, pair_b = np.maximum(left, right), np.minimum(left, right)

        self.plugins_: list[FieldType] = []
        normalised: dict[str, pd.Series] = {}
        for name in self.config.match_fields:
            plugin = field_type(self.config.fields[name].type)(name)
            normalised[name] = plugin.normalise(records[name].fillna(s.MISSING).astype(str))
            plugin.fit(normalised[name])
            self.plugins_.append(plugin)
        self.term_frequencies_ = {
            plugin.field: plugin.term_frequencies(normalised[plugin.field]) for plugin in self.plugins_
        }
        self._build_data_model()

        blocking = BlockingLearner(self.plugins_, window=self.window, recall=self.recall)
        blocking.fit(normalised, pair_a, pair_b)
        self.rules_, self.blocking_recall_, wide = blocking.rules_, blocking.recall_, blocking.wide_rules_
        self.blocking_rules_ = [rule.name for rule in self.rules_]
        self.threshold_ = 0.5

        # Candidates among the latest CANDIDATE_RECORDS records (all of a smaller history), as positions
        # into `records`; the recall figure counts the known pairs inside them.
        tail = max(len(records) - CANDIDATE_RECORDS, 0)
        latest = records.iloc[tail:]
        cand_a, cand_b, _ = Matcher(self, None)._candidates(self._encode(latest))
        found = {(int(a) + tail, int(b) + tail) for a, b in zip(cand_a, cand_b, strict=True)}
        inside = pair_b >= tail  # the earlier record of the pair is among the latest
        hits = sum((int(a), int(b)) in found for a, b in zip(pair_a[inside], pair_b[inside], strict=True))
        self.candidate_recall_ = hits / int(inside.sum()) if inside.any() else self.blocking_recall_
        self.candidates_per_record_ = len(cand_a) / len(latest)
        # Hard negatives come from a wider blocking than the one scoring uses, so the classifier also sees
        # look-alikes that the chosen keys happen to keep apart in this history.
        wide_a, wide_b, _ = Matcher(self, None, rules=wide)._candidates(self._encode(latest, rules=wide))
        wide_a, wide_b = wide_a + tail, wide_b + tail
        made: list[pd.DataFrame] = []  # made-up negatives' records, numbered after the history's

        def add_records(frame: pd.DataFrame) -> int:
            made.append(frame)
            return len(records) + sum(len(part) for part in made[:-1])

        cluster = cluster_roots(known)

        sampler = LabelSampler(
            [plugin.field for plugin in self.plugins_], self.config.id_column, max_labels=self.max_labels
        )
        label_a, label_b, labels = sampler.sample(
            np.random.default_rng(self.seed),
            records,
            (pair_a, pair_b),
            (wide_a, wide_b),
            normalised,
            cluster,
            rejected,
            position,
            add_records,
        )
        self.label_counts_ = sampler.counts_
        features = self._label_features(records, made, label_a, label_b, normalised)
        # A thousand labels fit fastest on one thread; BLAS threads only contend on a shared machine.
        with threadpool_limits(1):
            self._fit_classifier(features, labels)
        # Staff do not find every duplicate: a "negative" the first fit scores as a likely match is most
        # likely an unmerged duplicate. Dropping those and refitting keeps them from teaching the
        # classifier that look-alikes are distinct. A pair a clerk rejected is known to be distinct: kept.
        # The cut is 0.8, not 0.9: the field-agreement negatives that agree on a near-unique value (an order
        # number, an amount) are often duplicates nobody merged (a review misses some, staff 15% on the
        # demo), which the first fit scores mostly 0.8 to 0.97 (demo seeds 3, 7, 11 over three review
        # rounds: 6 to 13 of ~900 negatives, against at most four true negatives at 0.8 or more); kept, they
        # teach the refit to miss the same kind of duplicate again.
        clerk_said_no = np.zeros(len(labels), dtype=bool)
        n_pos = self.label_counts_["positive"]
        clerk_said_no[n_pos : n_pos + sampler.rejected_given_] = True
        suspect = (labels == 0) & ~clerk_said_no & (self.probabilities(features) >= UNMERGED_SUSPECT)
        if suspect.any():
            features, labels = features[~suspect], labels[~suspect]
            with threadpool_limits(1):
                self._fit_classifier(features, labels)
        self.label_counts_["dropped_as_unmerged_duplicates"] = int(suspect.sum())
        self.n_features_ = features.shape[1]
        self.train_seconds_ = time.perf_counter() - started
        logger.info(
            "duplicate model: %d records, %d known pairs, blocking recall %.3f (%s), candidate recall %.3f "
            "at %.1f candidates per record, labels %s, trained in %.1f s",
            len(records),
            len(pair_a),
            self.blocking_recall_,
            " | ".join(self.blocking_rules_),
            self.candidate_recall_,
            self.candidates_per_record_,
            self.label_counts_,
            self.train_seconds_,
        )
        return self

    def _label_features(
        self,
        records: pd.DataFrame,
        made: list[pd.DataFrame],
        left: np.ndarray,
        right: np.ndarray,
        normalised: dict[str, pd.Series],
    ) -> np.ndarray:
        """The comparison features of labelled pairs, given as positions into `records` followed by the
        `made` records, from an index of only the records the pairs name: a pair's features depend on its
        two records' values and on how many records entered up to the later one held the value they share
        (`running_rarities` of `normalised`, each match field's values of `records`)."""
        n = len(records)
        counted = {
            plugin.field: running_rarities(
                normalised[plugin.field].to_numpy(dtype=object),
                self.term_frequencies_[plugin.field].scale_total,
            )
            for plugin in self.plugins_
        }
        real = np.unique(np.concatenate([left[left < n], right[right < n]]))
        matcher = Matcher(self, None, rules=[])
        matcher._add(self._encode(records.iloc[real], rules=[]))
        for frame in made:
            matcher._add(self._encode(frame, rules=[]))

        def indexed(positions: np.ndarray) -> np.ndarray:
            return np.where(positions < n, np.searchsorted(real, positions), len(real) + positions - n)

        # A pair's shared value counts by its rarity among the records entered up to the later of the two,
        # as the matcher counts it when scoring (`Matcher._count_density`); a made-up record takes its real
        # partner's count (the value they share is the partner's).
        later = np.where(right < n, np.where(left < n, np.maximum(left, right), right), left)
        rarities = {field: counted[field][np.minimum(later, n - 1)] for field in counted}
        # Row-major, as the classifier's fit sums it (the sums' rounding depends on the layout).
        return np.ascontiguousarray(matcher._features(indexed(left), indexed(right), rarities=rarities))

    def _fit_unlabelled(self, records: pd.DataFrame, started: float) -> DuplicateModel:
        """A model that links nothing, for a log without merges: with no labelled duplicate there is nothing
        to learn a match from, and guessing would flood the review queue. The rest of the product (error
        model, anomaly score) still runs; the warning says how to enable duplicates."""
        logger.warning(
            "duplicate model: no `merge` rows between training records; duplicates will not be flagged. "
            "Add the merges staff made to the corrections log to enable the duplicate model"
        )
        self.plugins_ = [field_type(self.config.fields[name].type)(name) for name in self.config.match_fields]
        self.term_frequencies_ = {}
        for plugin in self.plugins_:
            values = plugin.normalise(records[plugin.field].fillna(s.MISSING).astype(str))
            plugin.fit(values)
            self.term_frequencies_[plugin.field] = plugin.term_frequencies(values)
        self._build_data_model()
        self.blocking_rules_, self.rules_ = [], []
        self.blocking_recall_ = self.candidate_recall_ = self.candidates_per_record_ = 0.0
        self.weights_ = np.zeros(len(self.feature_names_))
        self.intercept_, self.c_ = -30.0, 1.0
        self.n_features_ = len(self.weights_)
        self.threshold_ = 1.0
        self.label_counts_ = {"positive": 0}
        self.train_seconds_ = time.perf_counter() - started
        self._importance_order()
        return self

    def _check_columns(self, frame: pd.DataFrame, source: str) -> None:
        needed = [self.config.id_column, *self.config.match_fields]
        missing = [column for column in needed if column not in frame.columns]
        if missing:
            raise SchemaError(f"{source}: missing column(s) {', '.join(missing)} that the config names")

    def _entry_order(self, frame: pd.DataFrame) -> np.ndarray:
        times = self._times(frame)
        return np.argsort(np.where(np.isnan(times), -np.inf, times), kind="stable")

    def _times(self, frame: pd.DataFrame) -> np.ndarray:
        """Entry times in days since the epoch, NaN where unknown (or no time column)."""
        column = self.config.time_column
        if not column or column not in frame.columns:
            return np.full(len(frame), np.nan)
        # Parsed once per distinct text: entry times repeat (a batch entered in the same hours).
        codes, texts = pd.factorize(frame[column].fillna(s.MISSING).astype(str))
        raw = pd.Series(texts, dtype=object).replace(s.MISSING, None)
        stamps = pd.to_datetime(raw, errors="coerce", format="ISO8601", utc=True)
        seconds = (stamps - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds()
        days = (seconds / 86400.0).to_numpy(dtype=float, na_value=np.nan)
        return days[codes] if len(days) else np.full(len(frame), np.nan)

    def _build_data_model(self) -> None:
        variables = [variable for plugin in self.plugins_ for variable in plugin.variables()]
        self.data_model_ = dedupe.datamodel.DataModel(variables)
        names = [variable.name for variable in self.data_model_.field_variables]
        missing = [f"{names[i]} present" for i in self.data_model_._missing_field_indices]
        if len(names) + len(missing) != len(self.data_model_):
            raise ValueError("field plugins must use one-column dedupe variables")
        # One term-frequency feature per field after dedupe's: the rarity of the value two records share.
        frequency = [f"({plugin.field}: term frequency)" for plugin in self.plugins_]
        self.feature_names_ = names + missing + frequency

    def _fit_classifier(self, features: np.ndarray, labels: np.ndarray) -> None:
        """The pair classifier (`PairClassifier`) with each comparison's sign fixed by its plugin's
        `directions` and a rarer agreement counting as more alike; its weights become the model's."""
        signs = [sign for plugin in self.plugins_ for sign in plugin.directions()]
        direction = np.zeros(features.shape[1], dtype=int)
        direction[: len(signs)] = signs
        direction[-len(self.plugins_) :] = 1  # a rarer agreement is more alike
        classifier = PairClassifier(direction.tolist(), seed=self.seed).fit(features, labels)
        self.weights_, self.intercept_, self.c_ = classifier.weights_, classifier.intercept_, classifier.c_
        self.dropped_features_ = [
            name for name, kept in zip(self.feature_names_, classifier.active_, strict=True) if not kept
        ]
        self._importance_order()

    def _importance_order(self) -> None:
        """Field order for reasons: fields whose comparisons move the score most come first."""
        fields = [variable.field for variable in self.data_model_.field_variables]
        self.reason_order_ = importance_order(self.plugins_, fields, self.weights_)
        self.reasons_ = ReasonWriter(self.plugins_, self.reason_order_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError("this DuplicateModel is not fitted yet; call fit() or load() first")

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The classifier's match probability for rows of comparison features."""
        return probabilities(features, self.weights_, self.intercept_)

    # ------------------------------------------------------------------ encoding

    def _encode(self, frame: pd.DataFrame, rules: list[BlockingRule] | None = None) -> _Encoded:
        self._check_columns(frame, "records")
        ids = frame[self.config.id_column].astype(str).tolist()
        all_fields = [name for name in self.config.fields if name in frame.columns]
        # As NumPy object arrays: iterating Arrow-backed text element by element is slow.
        raw = [_text_values(frame[name]) for name in all_fields]
        distinct: dict[str, np.ndarray] = {}
        inverses: dict[str, np.ndarray] = {}
        parsed: dict[str, np.ndarray] = {}
        single: dict[tuple[str, str], np.ndarray] = {}
        rules = self.rules_ if rules is None else rules
        needed = {part for rule in rules for part in rule.parts}
        for plugin in self.plugins_:
            # Normalising, parsing and keys work value by value: done once per distinct raw value (a
            # customer's name, street and city repeat on each of their orders), then spread to the rows.
            column = raw[all_fields.index(plugin.field)]
            inverse, first = _first_seen(column)
            normalised = plugin.normalise(pd.Series(column[first], dtype=object).astype(str))
            normalised = normalised.to_numpy(dtype=object)  # once: from Arrow-backed text, a copy each time
            # Raw values that normalise alike ("Jansen", "JANSEN") are one value from here on; in order of
            # first appearance among the records, since the raw values are.
            merged, kept = _first_seen(normalised)
            values = distinct[plugin.field] = normalised[kept]
            inverse = inverses[plugin.field] = merged[inverse]
            parsed[plugin.field] = _parse_distinct(plugin, values)
            wanted = {key for field, key in needed if field == plugin.field}
            if wanted == {"value"}:  # every plugin's `value` key is the normalised value itself
                single[(plugin.field, "value")] = values[inverse]
            elif wanted:
                for key_name, key_values in plugin.keys(pd.Series(values, dtype=object), wanted).items():
                    single[(plugin.field, key_name)] = key_values.to_numpy(dtype=object)[inverse]
        keys = [join_keys([single[part] for part in rule.parts]).tolist() for rule in rules]
        return _Encoded(ids, raw, distinct, inverses, parsed, keys, self._times(frame).tolist())

    def blocking_keys(self, frame: pd.DataFrame) -> tuple[list[list[str]], np.ndarray]:
        """Each record's key per blocking rule (`""` = none; one list per rule, in rule order) and its
        entry time in days (NaN when unknown): what another engine needs to form the same blocks."""
        self._check_fitted()
        encoded = self._encode(frame)
        return encoded.keys, np.asarray(encoded.times, dtype=float)

    def match_values(self, frame: pd.DataFrame) -> dict[str, list[str]]:
        """Each match field's values as the matcher counts them (normalised; `""` where the field has no
        usable value): what another engine needs to count how common a value is (`Matcher`'s density)."""
        self._check_fitted()
        encoded = self._encode(frame, rules=[])
        return {
            field: [
                value if parsed is not None else s.MISSING
                for value, parsed in zip(values, parsed_values, strict=True)
            ]
            for field, values, parsed_values in (
                (f, encoded.normalised(f), encoded.parsed[f][encoded.inverse[f]])
                for f in (p.field for p in self.plugins_)
            )
        }

    # ------------------------------------------------------------------ scoring

    def matcher(self, reference: pd.DataFrame | None, *, evict: bool = False) -> Matcher:
        """A matcher whose index holds the reference records (oldest first); built once per batch.

        Exact agreements count by how common the value is among the records indexed up to the later one
        (`Matcher._count_density`): the reference, then the batch. Without a reference, the counts start
        from those of the history the model was fitted on. Rarities stay on the fitted scale, so a
        reference ten times larger does not make agreements look rarer. `evict`: see `Matcher` (the batch
        job's flat memory).
        """
        self._check_fitted()
        return Matcher(self, reference, evict=evict, prior=reference is None or not len(reference))

    def candidate_scores(self, batch: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
        """Every scored candidate pair: record_id, candidate_id, score (for curves and plots)."""
        return self.matcher(reference)._score(batch)[1]

    def calibrate(
        self,
        batch: pd.DataFrame,
        reference: pd.DataFrame,
        truth: dict[str, str],
        clusters: dict[str, str] | None = None,
    ) -> dict[str, float]:
        """Chooses `threshold_` on held-out data and returns precision, recall and F1 at it.

        `truth` maps each batch record that re-registers an earlier record to its true cluster root;
        `clusters` maps reference records to their roots (default: the roots of the pairs given to `fit`
        are unknown here, so a reference record counts as its own root unless `truth` names it).
        The threshold maximises F1, or is the lowest whose precision meets `config.duplicate_min_precision`,
        with precision corrected for duplicates staff never merged (`label_frequency_`: the labelled share of
        links scored >= 0.99; 1.0 with fewer than 10 of them). The figures returned are at that threshold;
        `labelled_precision` is the uncorrected one.
        """
        self._check_fitted()
        # As the batch job matches: evicting, a part at a time (the links do not depend on the cuts).
        matcher = self.matcher(reference, evict=True)
        parts = range(0, max(len(batch), 1), MATCH_ROWS)
        best = pd.concat([matcher._score(batch.iloc[i : i + MATCH_ROWS])[0] for i in parts])
        del matcher
        wanted = self.config.duplicate_min_precision
        calibration = choose_link_threshold(best, truth, clusters, wanted, link_floor(self.label_counts_))
        self.label_frequency_ = calibration.label_frequency
        self.threshold_ = calibration.threshold
        if not calibration.scored:
            return {"threshold": self.threshold_, **calibration.figures}
        result = {
            **calibration.figures,
            "threshold": self.threshold_,
            "labelled_precision": calibration.figures["tp"]
            / max(calibration.figures["tp"] + calibration.figures["fp"], 1),
            "label_frequency": calibration.label_frequency,
        }
        logger.info("duplicate threshold %.3f: %s", self.threshold_, result)
        return result

    # ------------------------------------------------------------------ reasons

    def reason(
        self,
        record: dict[str, str],
        match: dict[str, str],
        match_id: str,
        days_after: float | None,
    ) -> str:
        """One sentence for the clerk from the normalised values of a record and the record it duplicates,
        e.g. "same order number and amount; customer name differs by one letter; entered 2 days after R1"
        (`ReasonWriter`)."""
        return self.reasons_.reason(record, match, match_id, days_after)

    # ------------------------------------------------------------------ persistence

    def save(self, folder: Path) -> None:
        """Writes the model as two JSON files: the settings (field plugins and their dedupe variables,
        blocking rules, classifier weights, threshold) and metadata (versions). No pickles, so a model
        loads in any environment whose dedupe comparators agree, and fails clearly where they do not."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        settings = {
            "format_version": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "params": {k: v for k, v in self.get_params().items() if k != "config"},
            "fields": [
                {"field": plugin.field, "type": plugin.type_name, "params": plugin.params()}
                for plugin in self.plugins_
            ],
            "dedupe_variables": [variable.name for variable in self.data_model_.field_variables],
            "blocking_rules": self.blocking_rules_,
            "term_frequencies": {field: tf.to_json() for field, tf in self.term_frequencies_.items()},
            "classifier": {
                "features": self.feature_names_,
                "weights": [float(w) for w in self.weights_],
                "intercept": self.intercept_,
                "C": self.c_,
            },
            "threshold": self.threshold_,
            "fitted": {
                "label_counts": self.label_counts_,
                "blocking_recall": self.blocking_recall_,
                "candidate_recall": self.candidate_recall_,
                "candidates_per_record": self.candidates_per_record_,
                "train_seconds": self.train_seconds_,
            },
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "dedupe_version": DEDUPE_VERSION,
            "field_plugins": {plugin.field: plugin.type_name for plugin in self.plugins_},
            "threshold": self.threshold_,
        }
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> DuplicateModel:
        """Reloads a saved model without its training data; `ModelLoadError` (one line) when the folder is
        missing, damaged, or written by an incompatible version."""
        folder = Path(folder)
        meta = _read_json(folder / META_FILE)
        settings = _read_json(folder / SETTINGS_FILE)
        for what, document in (("metadata", meta), ("settings", settings)):
            version = document.get("format_version")
            if version != FORMAT_VERSION:
                raise ModelLoadError(
                    f"{folder}: duplicate model {what} has format version {version!r}, this version reads "
                    f"{FORMAT_VERSION}; retrain the model with this version of the package"
                )
        saved_dedupe = str(meta.get("dedupe_version", ""))
        if saved_dedupe.split(".")[0] != DEDUPE_VERSION.split(".")[0]:
            raise ModelLoadError(
                f"{folder}: duplicate model was trained with dedupe {saved_dedupe or '(unknown)'}, "
                f"installed is {DEDUPE_VERSION}; retrain or install dedupe {saved_dedupe}"
            )
        try:
            config = config_from_dict(settings["config"], source=str(folder / SETTINGS_FILE))
            model = cls(config, **settings["params"])
            model.plugins_ = [
                field_type(item["type"])(item["field"], **item["params"]) for item in settings["fields"]
            ]
            model.term_frequencies_ = {
                field: TermFrequencies.from_json(document)
                for field, document in settings["term_frequencies"].items()
            }
            model._build_data_model()
            classifier = settings["classifier"]
            if classifier["features"] != model.feature_names_:
                raise ModelLoadError(
                    f"{folder}: the saved classifier's features do not match this version's field "
                    "comparators; retrain the model with this version of the package"
                )
            model.weights_ = np.asarray(classifier["weights"], dtype=float)
            model.intercept_ = float(classifier["intercept"])
            model.c_ = float(classifier["C"])
            model.n_features_ = len(model.weights_)
            model.blocking_rules_ = list(settings["blocking_rules"])
            model.rules_ = [BlockingRule.parse(name) for name in model.blocking_rules_]
            known = {(plugin.field, key.name) for plugin in model.plugins_ for key in plugin.blocking}
            if any(part not in known for rule in model.rules_ for part in rule.parts):
                raise ModelLoadError(
                    f"{folder}: a saved blocking rule uses a key this version does not offer"
                )
            model.threshold_ = float(settings["threshold"])
            fitted = settings["fitted"]
            model.label_counts_ = dict(fitted["label_counts"])
            model.blocking_recall_ = float(fitted["blocking_recall"])
            model.candidate_recall_ = float(fitted["candidate_recall"])
            model.candidates_per_record_ = float(fitted["candidates_per_record"])
            model.train_seconds_ = float(fitted["train_seconds"])
        except ModelLoadError:
            raise
        except BadInputError as exc:
            raise ModelLoadError(f"{folder}: saved duplicate model is not usable: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"{folder}: duplicate model settings are incomplete or damaged "
                f"({exc.__class__.__name__}: {exc})"
            ) from None
        model._importance_order()
        return model


class Matcher:
    """The index over the reference records and the batch records seen so far.

    `match` scores a chunk against everything indexed, then indexes the chunk, so duplicates within a
    batch are found across chunk borders. Each field's values are stored once (a code per record, the
    value per code), the entry times in a flat array, a record's cluster only when it joined another's.

    With `evict` (the batch job) a block keeps only its `window` latest records and its size, and a
    record that has left the window of every block it is in is dropped from the index at the start of the
    next chunk: candidates only ever come from those windows, so it could never be matched again. The
    results are the same as without eviction; `match(remember=False)` and the look-ups by id (`record`,
    `records`) are not available then: the links carry the positions of the records they name
    (`records_at`).
    """

    def __init__(
        self,
        model: DuplicateModel,
        reference: pd.DataFrame | None,
        rules: list[BlockingRule] | None = None,
        frequencies: dict[str, TermFrequencies] | None = None,
        *,
        evict: bool = False,
        prior: bool = False,
    ) -> None:
        self._model = model
        self._frequencies = model.term_frequencies_ if frequencies is None else frequencies
        self._fields = [plugin.field for plugin in model.plugins_]
        # Each record's id (one UTF-8 buffer) and, for the records held, id -> position as a hash table
        # checked against that buffer: a str, a list slot and a dict entry per record were ~170 bytes.
        # With `evict` there is no such table (8 bytes per record, and its rebuilt sorted arrays per
        # part): the batch job reads the records a link names by the positions the link carries
        # (`records_at`), and checks the batch's ids unique itself.
        self._ids = _TextList()
        self._position: _CodeTable | None = None if evict else _CodeTable()
        self._evicted = 0  # records dropped from the index (`_drop_left`)
        self._raw_fields: list[str] = list(model.config.fields)
        # The raw values (what `record` returns, read a few times per hundred records) in a temporary file.
        self._raw = RecordFile(len(self._raw_fields))
        # Each match field's values are stored once per field: a code per record and the value per code,
        # so a comparator runs once per distinct pair of values rather than once per pair of records.
        # Code -1 = no parsed value (its normalised text, when not empty, is kept by position in
        # `_unparsed`). The value -> code maps are sorted hash arrays (`_CodeTable`) and the texts one
        # UTF-8 buffer (`_TextList`): a batch adds a near-unique order number and amount per record, and
        # dicts and str objects made those tables most of the index.
        # Block sizes and positions in blocks as 32-bit integers (`MAX_RECORDS`); codes per record in as
        # few bytes as the field's codes need so far (`_store_codes`: a city or VAT rate in one).
        self._codes: dict[str, ColumnFile] = {field: ColumnFile(np.int8) for field in self._fields}
        self._code_of: dict[str, _CodeTable] = {field: _CodeTable() for field in self._fields}
        # Normalised, per code, as one UTF-8 buffer. The parsed values the comparators take are not kept:
        # a plugin parses a value from its normalised text alone, so they are parsed again for the values
        # of a chunk's candidate pairs (a str, float or date object per value was ~90 bytes per record).
        self._texts: dict[str, _TextList] = {field: _TextList() for field in self._fields}
        # ... but those of the latest `_add`'s values are at hand (sorted codes, values): every pair's
        # later record is one of them.
        self._latest_parsed: dict[str, tuple[np.ndarray, np.ndarray]] = {
            field: _latest_parsed(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object))
            for field in self._fields
        }
        self._unparsed: dict[str, dict[int, str]] = {field: {} for field in self._fields}
        self._times = FloatFile()  # entry times, read for a link's reason only: mostly on disk
        self._blocks = [_BlockIndex() for _ in (model.rules_ if rules is None else rules)]
        for block_index in self._blocks:
            block_index.track_leavers = evict
        self._clusters = _Clusters()  # only records that joined another record's cluster
        self._evict = evict
        self._live = ColumnFile(np.int8)  # per record: blocks whose window still holds it (with `evict`)
        self._leaving: list[int] = []  # records that left every window; dropped before the next chunk
        # How common each value is in the data being matched (see `_count_density`).
        # Counts per value code in as few bytes as the largest count needs so far (most values of a batch's
        # order numbers and amounts are held once or twice), in files (`ColumnFile`) released with the
        # other columns: a near-unique field adds a count per record.
        self._seen: dict[str, ColumnFile] = {field: ColumnFile(np.uint8) for field in self._fields}
        self._present: dict[str, int] = {field: 0 for field in self._fields}
        # Per record of the latest `_add` only (from `_counted_start` on): the rarity of its value among the
        # records indexed up to it counts for the later record of a pair, always one of the chunk being
        # matched, so older records' are never read again.
        self._rarity: dict[str, np.ndarray] = {field: np.zeros(0, dtype="f4") for field in self._fields}
        self._counted_start = 0
        # Without a reference, the counts start from those the model was fitted on.
        self._prior: dict[str, TermFrequencies] = self._frequencies if prior else {}
        for field, table in self._prior.items():
            self._present[field] = table.total
        self._lock = threading.RLock()
        if reference is not None and len(reference):
            # Indexed REFERENCE_ROWS at a time: encoding holds several text arrays per record, and the index
            # is the same however the records are cut (value codes in order of first appearance, density
            # counted in indexing order); with `evict`, what left every window is dropped between parts.
            order = model._entry_order(reference)
            for begin in range(0, len(order), REFERENCE_ROWS):
                self._drop_left()
                part = reference.iloc[order[begin : begin + REFERENCE_ROWS]]
                self._candidates(model._encode(part), collect=False)
        self._reference_rows = len(self._ids)  # records indexed before any batch row

    def export_state(self) -> dict[str, Any]:
        """The index as plain picklable data: everything but the model (dedupe's comparators do not
        pickle) and the lock. `from_state` with the same model restores an equal matcher; the reference
        cache stores it so a large reference is indexed once per model."""
        return {name: value for name, value in self.__dict__.items() if name not in ("_model", "_lock")}

    @classmethod
    def from_state(cls, model: DuplicateModel, state: dict[str, Any]) -> Matcher:
        """The matcher `export_state` was taken from, on `model` (the model it was built with)."""
        matcher = cls.__new__(cls)
        matcher.__dict__.update(state)
        matcher._model = model
        matcher._lock = threading.RLock()
        return matcher

    def __len__(self) -> int:
        """Records indexed so far (evicted ones included)."""
        return len(self._ids)

    @property
    def resident(self) -> int:
        """Records still held in the index (not evicted)."""
        return len(self._ids) - self._evicted

    def record(self, record_id: str) -> dict[str, str] | None:
        """The raw field values of an indexed record (reference or earlier batch), or None. Not with
        `evict`: see `records_at`."""
        position = self._positions([str(record_id)])[0]
        if position < 0:
            return None
        return dict(zip(self._raw_fields, self._raw[int(position)], strict=True))

    def records(self, record_ids: Sequence[str]) -> dict[str, list[str]]:
        """The raw values of these records, per config field (`""` for an id not held): `record` of
        each, with one look-up for all ids (a batch's links ask for thousands). Not with `evict`."""
        ids = np.empty(len(record_ids), dtype=object)
        ids[:] = [str(record_id) for record_id in record_ids]
        inverse, first = _first_seen(ids)
        return self.records_at(self._positions(ids[first])[inverse])

    def records_at(self, positions: Sequence[int] | np.ndarray) -> dict[str, list[str]]:
        """The raw values of the records at these index positions, per config field (`""` at -1): the
        records a link names, by the positions it carries (`DUPLICATE_POSITION`,
        `REFERENCE_DUPLICATE_POSITIONS`), with or without `evict` (values stay readable after eviction)."""
        positions = np.asarray(positions, dtype=np.int64)
        held = positions >= 0
        values = {field: [s.MISSING] * len(positions) for field in self._raw_fields}
        columns = list(values.values())
        for i, position in zip(np.flatnonzero(held).tolist(), positions[held].tolist(), strict=True):
            for column, value in zip(columns, self._raw[position], strict=True):  # one read per record
                column[i] = value
        return values

    def _positions(self, record_ids: Sequence[str]) -> np.ndarray:
        """The position of each of these distinct record ids in the index, -1 where it is not held."""
        if self._position is None:
            raise ValueError("an evicting matcher looks records up by position only (records_at)")
        return self._position.find(np.asarray(record_ids, dtype=object), self._ids)

    def _raw_value(self, field: str, position: int) -> str:
        return self._raw[position][self._raw_fields.index(field)]

    def _normalised_many(self, field: str, positions: np.ndarray) -> list[str]:
        """The normalised value texts of these indexed records of a match field (`""` where none), read with
        one `take`."""
        codes = self._codes[field].take(positions).astype(np.int64)
        values = np.empty(len(codes), dtype=object)
        held = codes >= 0
        values[held] = self._texts[field].take(codes[held])
        unparsed = self._unparsed[field]
        for i in np.flatnonzero(~held).tolist():
            values[i] = unparsed.get(int(positions[i]), s.MISSING)
        return values.tolist()

    def _parsed_value(self, field: str, position: int) -> Any:
        """The parsed value (as the comparators see it) of a field of an indexed record; None if missing."""
        code = self._code_array(field)[position]
        return None if code < 0 else self._parsed(field, np.array([code]))[0]

    def _parsed(self, field: str, codes: np.ndarray) -> np.ndarray:
        """The parsed values of these value codes (all >= 0) of a match field, as an object array."""
        values = np.empty(len(codes), dtype=object)
        known, known_values = self._latest_parsed[field]
        hit = np.zeros(len(codes), dtype=bool)
        if len(known):
            at = np.minimum(np.searchsorted(known, codes), len(known) - 1)
            hit = known[at] == codes
            values[hit] = known_values[at[hit]]
        missed = np.flatnonzero(~hit)
        if len(missed):
            plugin = self._plugin(field)
            texts = self._texts[field].take(codes[missed])
            # A text plugin's parsed value is the text (a code's text is never missing).
            values[missed] = (
                texts if type(plugin).parse is FieldType.parse else _objects(plugin.parse_many(texts))
            )
        return values

    def _add(self, encoded: _Encoded) -> int:
        start = len(self._ids)
        if start + len(encoded) > MAX_RECORDS:
            raise ValueError(f"a matcher indexes at most {MAX_RECORDS:,} records")
        if len(encoded) and len(encoded.raw) != len(self._raw_fields):
            present = set(self._raw_fields)
            raise SchemaError(f"records: expected the config's fields {sorted(present)} in every chunk")
        self._ids.extend(encoded.ids)
        for field in self._fields:
            # Distinct values in order of first appearance, so codes are given in that order.
            distinct, inverse = encoded.values[field], encoded.inverse[field]
            parsed = encoded.parsed[field]
            size = len(self._texts[field])
            table = self._code_of[field]
            hashes = table.hash(distinct)  # for `find`, then `insert` of the fresh values
            found = table.find(distinct, self._texts[field], hashes)
            usable = np.array([item is not None for item in parsed.tolist()], dtype=bool)
            fresh = np.flatnonzero((found < 0) & usable)
            if len(fresh):
                found[fresh] = np.arange(size, size + len(fresh))
                table.insert(distinct[fresh], found[fresh], hashes[fresh])
                new_texts = distinct[fresh].tolist()
                self._texts[field].extend(new_texts)
            self._latest_parsed[field] = _latest_parsed(found, parsed)
            codes = found[inverse] if len(inverse) else np.zeros(0, dtype=np.int64)
            self._store_codes(field, codes, len(self._texts[field]))
            unparsed = self._unparsed[field]
            for offset in np.flatnonzero(codes < 0).tolist():
                text = distinct[inverse[offset]]
                if text:
                    unparsed[start + offset] = text
        if len(encoded):
            self._raw.extend(encoded.raw)
        self._times.extend(encoded.times)
        if self._position is not None:
            ids = np.asarray(encoded.ids, dtype=object)
            # A repeated id is found at its last row, as a dict assigned in row order would leave it.
            last = ~pd.Series(ids, dtype=object).duplicated(keep="last").to_numpy()
            self._position.assign(ids[last], np.arange(start, start + len(ids))[last], self._ids)
        self._count_density(start)
        return start

    def _code_array(self, field: str) -> np.ndarray:
        """The value code of each indexed record of a match field (a view, int8, int16 or int32)."""
        return self._codes[field].view()

    def _store_codes(self, field: str, codes: np.ndarray, size: int) -> None:
        """Appends records' value codes (from -1 to `size` - 1), widening the field's column first when a
        code does not fit."""
        wide = next(code for code in _CODE_TYPES if size - 1 <= np.iinfo(np.dtype(code)).max)
        stored = self._codes[field] = self._codes[field].widened(wide)
        stored.extend(codes)

    def _count_density(self, start: int) -> None:
        """Counts the values of the records indexed from `start` on, and notes for each record and field
        the rarity of its value among the records indexed so far, itself included (`counted_rarity`): the
        term-frequency feature of the pairs it is the later record of.

        `fit` counts its labelled pairs' values the same way, over the history in entry order
        (`running_rarities`), so the classifier's weights say what agreeing on a value is worth at the
        density it had when the later record was entered, and a batch is scored the same way: a new day
        counts as the orders entered on it so far, a batch twenty times denser than the history makes its
        days' agreements twenty times more common, and so less rare (Fellegi-Sunter's u-probability,
        counted on the data being scored). Counted in indexing order, so a record's rarity does not depend
        on how the batch was cut into chunks. A matcher without a reference starts from the counts the
        model was fitted on (`prior`).
        """
        for field in self._fields:
            codes = self._code_array(field)[start:].astype(np.int64)
            seen = self._seen[field]
            size = len(self._texts[field])
            if len(seen) < size:  # new values: counted from 0, or from the fitted count (`prior`)
                fresh = np.zeros(size - len(seen), dtype=np.int64)
                if field in self._prior:
                    texts = self._texts[field].take(np.arange(len(seen), size))
                    fresh[:] = np.maximum(self._prior[field].stored_counts(texts), 0)
                seen = self._seen[field] = seen.widened(_count_type(int(fresh.max())))
                seen.extend(fresh)
            present = codes >= 0
            values = codes[present]
            count, total, (held, counts) = _running_counts(values, seen.view(), self._present[field])
            if len(count) and count.max() > np.iinfo(seen.dtype).max:  # `count` ends at the new counts
                seen = self._seen[field] = seen.widened(_count_type(int(count.max())))
            fitted = self._frequencies.get(field)
            rarity = np.zeros(len(codes), dtype="f4")
            rarity[present] = counted_rarity(count, total, fitted.scale_total) if fitted else 1.0
            seen.view()[held] = counts
            self._present[field] += len(values)
            self._rarity[field] = rarity
        self._counted_start = start

    def _uncount_density(self, start: int) -> None:
        """Takes the records indexed from `start` on out of the value counts again (see `_rollback`)."""
        for field in self._fields:
            codes = self._code_array(field)[start:].astype(np.int64)
            values = codes[codes >= 0]
            np.subtract.at(self._seen[field].view(), values, 1)
            self._present[field] -= len(values)

    def _counted(self, left: np.ndarray) -> dict[str, np.ndarray]:
        """Per field, the rarity of each given record's value among the records indexed up to it (one of the
        records the latest `_add` indexed; see `_count_density`)."""
        if len(left) and left.min() < self._counted_start:
            raise ValueError("counted rarities are kept for the latest indexed records only")
        return {field: self._rarity[field][left - self._counted_start] for field in self._fields}

    def _release_pages(self) -> None:
        """Unmaps from this process the pages of the growing columns and sorted tables the previous part
        read or wrote (`ColumnFile.release`, `SortedRuns.release`): its resident set then holds only those
        the next part touches."""
        offsets = [self._ids.ends, self._raw.ends, *(texts.ends for texts in self._texts.values())]
        columns = [self._live, *self._codes.values(), *self._seen.values()]
        columns += [block_index.prev for block_index in self._blocks]
        code_tables = [*self._code_of.values(), *([self._position] if self._position is not None else [])]
        tables = [*(codes.table for codes in code_tables), *(index.blocks for index in self._blocks)]
        for column in [*offsets, *columns, *tables]:
            column.release()

    def _drop_left(self) -> None:
        """Drops the records that left every block window while the previous chunk was indexed."""
        if not self._leaving:
            return
        leaving = np.asarray(self._leaving, dtype=np.int64)
        self._clusters.drop(leaving)
        for position in leaving.tolist():
            for field in self._fields:
                self._unparsed[field].pop(position, None)
        self._evicted += len(leaving)
        self._leaving = []

    def _candidates(
        self, encoded: _Encoded, collect: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Indexes the records in order; for each, the `top_k` earlier indexed records sharing most keys.

        Each shared key counts by its rarity (1 / block size), like an inverse document frequency: sharing
        a rare amount says more than sharing a busy city-and-date. A record is compared with the `window`
        latest records of each of its blocks, those before it in the chunk included. Returns (record
        position, candidate position, pre-score) arrays, by record; each record's candidates by most keys
        shared (then most recent) when it has more than `top_k`, else by the first rule and position that
        found them.
        """
        self._release_pages()
        start = self._add(encoded)
        window, top_k = self._model.window, self._model.top_k
        found = [
            index.add(keys, start, window, collect)
            for index, keys in zip(self._blocks, encoded.keys, strict=True)
        ]
        if self._evict:
            live = np.zeros(len(encoded), dtype=np.int8)
            for keys in encoded.keys:
                live += np.asarray(keys, dtype=object) != s.MISSING
            self._live.extend(live)
            counts = self._live.view()
            leaving = [start + np.flatnonzero(live == 0)]
            for index in self._blocks:
                np.subtract.at(counts, index.leavers, 1)
                leaving.append(index.leavers)
            gone = np.unique(np.concatenate(leaving))
            self._leaving.extend(gone[counts[gone] == 0].tolist())
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
        if not collect or not found:
            return empty
        query = np.concatenate([q for q, _, _ in found])
        if not len(query):
            return empty
        other = np.concatenate([o for _, o, _ in found])
        weight = np.concatenate([w for _, _, w in found])
        rule = np.concatenate([np.full(len(q), i) for i, (q, _, _) in enumerate(found)])
        query, other, rule, shared = _shared_keys(query, other, rule, weight, len(self._ids))
        many = np.bincount(query - start)[query - start] > top_k
        order = _lexsort_ranked(
            query, np.where(many, -shared, rule.astype(float)), np.where(many, -other, other), len(self._ids)
        )
        query, other, shared = query[order], other[order], shared[order]
        query_starts = np.flatnonzero(np.diff(query, prepend=-1))
        rank = np.arange(len(query)) - np.repeat(query_starts, np.diff(np.append(query_starts, len(query))))
        keep = rank < top_k
        return query[keep], other[keep], shared[keep]

    def _features(
        self,
        left: np.ndarray,
        right: np.ndarray,
        pair_codes: _PairCodes | None = None,
        *,
        rarities: dict[str, np.ndarray],
        scoring: bool = False,
        deferred: Collection[int] = (),
        compared: _DistinctPairs | None = None,
    ) -> np.ndarray:
        """dedupe's `DataModel.distances` for pairs of indexed positions (same values), computed a field at a
        time and once per distinct pair of values (registers repeat their cities, dates and amounts), then
        one term-frequency column per field; all written into one array, column by column (a column is
        contiguous in memory: the array is the transpose of a row-major one). `pair_codes`: `_pair_codes`
        of these pairs, if known.

        `scoring`: the features only feed the fitted classifier, so a comparison it weighs 0 (`_unweighed`)
        is not computed; its column holds 0 where both values are present, which scores the same.
        `deferred` (columns of `_deferrable`): not computed either; the comparator's least value
        (`lowest_value`) where both values are present, the bound `_settle` starts from. `compared`, if
        given, receives each compared field's distinct pairs of values (`_distinct_pairs`), for `_settle`
        to reuse.

        `rarities`: per field, per pair, the rarity of the left record's value as counted up to it
        (`counted_rarity`, `_counted`), for the term-frequency columns."""
        data_model = self._model.data_model_
        n, width = len(left), len(data_model)
        features = np.empty((width + len(self._fields), n), dtype="f4").T
        if pair_codes is None:
            pair_codes = self._pair_codes(left, right)
        exact = self._exact_comparators()
        skip = (self._unweighed() if scoring else set()) | set(deferred)
        distinct, computed = self._compare_distinct(pair_codes, exact, skip)
        if compared is not None:
            compared.update(distinct)
        for field, compare, start, _stop in data_model._field_comparators:
            code_left, code_right, present = pair_codes[field]
            column = features[:, start]
            column[:] = np.nan
            if start in skip:
                column[present] = lowest_value(compare) if start in deferred else 0
                continue
            if id(compare) in exact:
                # Equal parsed values <=> equal codes (a code per distinct normalised value; each plugin's
                # parsing tells distinct values apart): dedupe's Exact without a call per pair.
                column[present] = code_left[present] == code_right[present]
                continue
            if len(distinct[field][1]):
                # A graded level (`fields.base.beyond`) reuses its distance, computed once per field.
                distance = getattr(compare, "distance", compare)
                values = computed[(field, distance)]
                if distance is not compare:
                    values = np.where(np.isnan(values), np.nan, values > compare.cut)
                column[present] = values.astype("f4")[distinct[field][3]]
        self._add_derived_distances(features[:, :width])
        for column, field in enumerate(self._fields):
            code_left, code_right, _ = pair_codes[field]
            features[:, width + column] = 0
            same = np.flatnonzero((code_left >= 0) & (code_left == code_right))
            features[same, width + column] = rarities[field][same]
        return features

    def _exact_comparators(self) -> set[int]:
        """The ids of the data model's Exact comparators (compared by value codes, without a call)."""
        variables = self._model.data_model_.field_variables
        return {id(variable.comparator) for variable in variables if variable.type == "Exact"}

    def _unweighed(self) -> set[int]:
        """The data model's comparison columns that cannot change a score: the classifier weighs them 0,
        and their "both present" column too (or they have none). A weight of exactly 0 adds exactly 0 to
        the log-odds whatever the (finite) comparison, and the sign constraints often drop whole fields."""
        data_model, weights = self._model.data_model_, self._model.weights_
        indicator = {
            column: data_model._derived_start + offset
            for offset, column in enumerate(data_model._missing_field_indices)
        }
        return {
            start
            for _field, _compare, start, _stop in data_model._field_comparators
            if weights[start] == 0 and (start not in indicator or weights[indicator[start]] == 0)
        }

    def _deferrable(self) -> set[int]:
        """The comparison columns whose computation `_best` puts off until a pair may be its record's best:
        the text comparisons (`_DEFERRABLE`: dedupe's affine gap distance, a call per distinct pair of
        values that holds the GIL, and the token-set distance) where the classifier weighs them below 0.
        Neither is ever below its least value (`lowest_value`: 0.5 for the affine gap, 0 for the token-set
        distance) or NaN for two present values, so that value in its place gives a pair a score no lower
        than its own: a bound, the closer the fewer pairs `_settle` compares. With both deferred, a text
        field's values are not even read for the pairs that cannot be best."""
        data_model, weights = self._model.data_model_, self._model.weights_
        return {
            start
            for _field, compare, start, _stop in data_model._field_comparators
            if compare in _DEFERRABLE and weights[start] < 0
        }

    def _settle(
        self,
        query: np.ndarray,
        found: np.ndarray,
        features: np.ndarray,
        pair_codes: _PairCodes,
        deferred: set[int],
        compared: _DistinctPairs | None = None,
    ) -> np.ndarray:
        """The scores of pairs whose `deferred` columns hold their bound (`_features`), made exact for every
        pair that may be its record's best or reach the link threshold: first each record's pair with the
        highest bound, then every other pair whose bound reaches its record's best exact score so far or
        the threshold. The pairs left keep their bound, which is below their record's best score and below
        the threshold, so `_best_per_query` picks what it picks with every comparison computed (same pair,
        same score), and `_link` names every pair at or above the threshold. A pair's score does not
        depend on the other rows it is computed with (`probabilities` works row by row). `compared`: the
        distinct pairs of values `_features` compared, reused."""
        compared = {} if compared is None else compared
        scores = self._model.probabilities(features)
        first = _best_per_query(query, found, scores)
        self._compute_deferred(first, features, pair_codes, deferred, compared)
        scores[first] = self._model.probabilities(features[first])
        group, _ = pd.factorize(query)
        best = np.empty(len(first))
        best[group[first]] = scores[first]
        # The margin covers any rounding of the sigmoid (monotone up to far below it): a pair left out
        # scores below its record's best, and below the threshold, by more than it.
        reach = np.minimum(best[group], self._model.threshold_) - SETTLE_MARGIN
        rest = np.flatnonzero(scores >= reach)
        rest = rest[~np.isin(rest, first)]
        if len(rest):
            self._compute_deferred(rest, features, pair_codes, deferred, compared)
            scores[rest] = self._model.probabilities(features[rest])
        return scores

    def _compute_deferred(
        self,
        rows: np.ndarray,
        features: np.ndarray,
        pair_codes: _PairCodes,
        deferred: set[int],
        compared: _DistinctPairs,
    ) -> None:
        """Writes the `deferred` comparisons of these pairs (rows of `features`) in place, as `_features`
        would have: once per distinct pair of values (those of `compared`, when it holds the field's; else
        found once per field for all its deferred columns); a missing comparison (NaN) becomes 0 with its
        "both present" column 0, as `_add_derived_distances` makes it."""
        data_model = self._model.data_model_
        indicator = {
            column: data_model._derived_start + offset
            for offset, column in enumerate(data_model._missing_field_indices)
        }
        columns: dict[str, list[tuple[Any, int]]] = {}  # per field, its deferred (comparator, column)
        for field, compare, start, _stop in data_model._field_comparators:
            if start in deferred:
                columns.setdefault(field, []).append((compare, start))
        for field, wanted in columns.items():
            at = rows[pair_codes[field][2][rows]]
            if field in compared:
                # Each pair's number among the field's distinct pairs, by its place among the pairs whose
                # values are both present; only the numbers these pairs have are compared.
                values, xs, ys, inverse = compared[field]
                place = np.cumsum(pair_codes[field][2]) - 1
                inverse, numbers = pd.factorize(inverse[place[at]])
                xs, ys = xs[numbers], ys[numbers]
            else:
                code_left, code_right, _ = pair_codes[field]
                values, xs, ys, inverse = self._distinct_pairs(field, code_left[at], code_right[at])
            found = self._plugin(field).compare_distinct([compare for compare, _ in wanted], values, xs, ys)
            for (_compare, start), distances in zip(wanted, found, strict=True):
                distances = distances.astype("f4")[inverse]
                missing = np.isnan(distances)
                features[at, start] = np.where(missing, 0, distances)
                if missing.any() and start in indicator:
                    features[at[missing], indicator[start]] = 0

    def _compare_distinct(
        self, pair_codes: _PairCodes, exact: set[int], skip: set[int]
    ) -> tuple[_DistinctPairs, dict[tuple[str, Any], np.ndarray]]:
        """Per non-exact field, its distinct pairs of values (`_distinct_pairs`); per (field, distance
        function), the distance of each distinct pair, computed once for all graded levels of a distance.

        Columns in `skip` are not compared. All on this thread: with the vectorised comparators on a second
        one, each thread mostly waited for the GIL the other held (no wall time gained)."""
        distinct: _DistinctPairs = {}
        wanted: dict[str, dict[Any, None]] = {}  # per field, its distances in the data model's order
        for field, compare, start, _stop in self._model.data_model_._field_comparators:
            if id(compare) in exact or start in skip:
                continue
            if field not in distinct:
                code_left, code_right, present = pair_codes[field]
                distinct[field] = self._distinct_pairs(field, code_left[present], code_right[present])
            if len(distinct[field][1]):
                wanted.setdefault(field, {})[getattr(compare, "distance", compare)] = None
        computed = {}
        for field, distances in wanted.items():
            found = self._plugin(field).compare_distinct(list(distances), *distinct[field][:3])
            computed.update(zip(((field, distance) for distance in distances), found, strict=True))
        return distinct, computed

    def _pair_codes(self, left: np.ndarray, right: np.ndarray) -> _PairCodes:
        """Per match field, the pairs' value codes (left, right) and where both records hold a value."""
        pair_codes = {}
        for field in self._fields:
            codes = self._codes[field]
            code_left, code_right = codes.take(left).astype(np.int64), codes.take(right).astype(np.int64)
            pair_codes[field] = (code_left, code_right, (code_left >= 0) & (code_right >= 0))
        return pair_codes

    def _distinct_pairs(
        self, field: str, code_left: np.ndarray, code_right: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The distinct pairs of values among these pairs of codes (both present): the parsed values they
        hold (an object array, each value once), each distinct pair's places among them (left, right), and
        each given pair's number among the distinct pairs: a comparator runs once per distinct pair."""
        size = max(len(self._texts[field]), 1)
        # Hashed, not sorted: the order of the distinct pairs does not change what each one compares to.
        inverse, pairs = pd.factorize(code_left * size + code_right)
        # Each value parsed once, however many of the distinct pairs it is in (hashed too).
        where, codes = pd.factorize(np.concatenate([pairs // size, pairs % size]))
        return self._parsed(field, codes), where[: len(pairs)], where[len(pairs) :], inverse

    def _plugin(self, field: str) -> FieldType:
        """The field plugin of a match field."""
        return next(plugin for plugin in self._model.plugins_ if plugin.field == field)

    def _add_derived_distances(self, distances: np.ndarray) -> None:
        """dedupe's `DataModel._add_derived_distances` in place, a column at a time (its boolean masks over
        the whole row-major array cost more than the comparisons of a chunk): a missing comparison (NaN)
        becomes 0, and each field with `has_missing` gets a 1/0 column "both values present"."""
        data_model = self._model.data_model_
        if data_model._interaction_indices:  # no field plugin makes interactions; dedupe's own way then
            distances[:] = data_model._add_derived_distances(np.ascontiguousarray(distances))
            return
        derived = data_model._derived_start
        present = {}
        for index in range(derived):
            column = distances[:, index]
            missing = np.isnan(column)
            column[missing] = 0
            present[index] = ~missing
        for offset, index in enumerate(data_model._missing_field_indices):
            distances[:, derived + offset] = present[index]

    def _best(
        self, chunk: pd.DataFrame, *, every_pair: bool = True
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, tuple]:
        """Scores the chunk's candidates and indexes the chunk. Returns its record ids; per row the best
        candidate's score and position (-1: none) and the row's own position; and all scored pairs
        (record positions, candidate positions, scores), as arrays. Without `every_pair` only the best
        candidates' scores are sure to be exact: a pair that cannot be its record's best may keep a bound
        above its score (`_settle`), which skips most affine gap comparisons."""
        self._drop_left()
        encoded, query, found = self._index(chunk)
        scores = self._scores_of(query, found, every_pair)
        return self._pick_best(encoded.ids, len(self._ids) - len(encoded), query, found, scores)

    def _index(self, chunk: pd.DataFrame) -> tuple[_Encoded, np.ndarray, np.ndarray]:
        """Encodes and indexes the chunk; its candidate pairs (record positions, candidate positions)."""
        encoded = self._model._encode(chunk)
        query, found, _ = self._candidates(encoded)
        return encoded, query, found

    def _scores_of(self, query: np.ndarray, found: np.ndarray, every_pair: bool) -> np.ndarray:
        """`_pair_scores` of indexed records' candidate pairs, from their codes and rarities here."""
        if not len(query):
            return np.zeros(0)
        pair_codes = self._pair_codes(query, found)
        return self._pair_scores(query, found, pair_codes, self._counted(query), every_pair)

    def _pair_scores(
        self,
        query: np.ndarray,
        found: np.ndarray,
        pair_codes: _PairCodes,
        rarities: dict[str, np.ndarray],
        every_pair: bool,
    ) -> np.ndarray:
        """The classifier's score of each candidate pair (see `_best` for `every_pair`)."""
        deferred = set() if every_pair else self._deferrable()
        compared: _DistinctPairs = {}
        features = self._features(
            query,
            found,
            pair_codes,
            scoring=True,
            rarities=rarities,
            deferred=deferred,
            compared=compared,
        )
        if deferred:
            return self._settle(query, found, features, pair_codes, deferred, compared)
        return self._model.probabilities(features)

    def _pick_best(
        self, record_ids: list[str], start: int, query: np.ndarray, found: np.ndarray, scores: np.ndarray
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, tuple]:
        """`_best`'s result from the scored pairs of the records indexed from position `start` on."""
        best_score = np.zeros(len(record_ids))
        best_position = np.full(len(record_ids), -1, dtype=np.int64)
        if len(query):
            chosen = _best_per_query(query, found, scores)  # per row: highest score, then most recent
            best_score[query[chosen] - start] = scores[chosen]
            best_position[query[chosen] - start] = found[chosen]
        positions = np.arange(start, start + len(record_ids))
        return record_ids, best_score, best_position, positions, (query, found, scores)

    def _score(self, chunk: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Scores the chunk's candidates and indexes the chunk. Returns the best candidate per row (index =
        record id: candidate_id, score, position, candidate position) and all scored pairs."""
        record_ids, best_score, best_position, positions, (query, found, scores) = self._best(chunk)
        ids = self._ids
        best = pd.DataFrame(
            {
                "candidate_id": _take_ids(ids, best_position),
                "score": best_score,
                "position": positions,
                "candidate_position": best_position,
            },
            index=pd.Index(record_ids, dtype=object),
        )
        pairs = pd.DataFrame(
            {
                "record_id": ids.take(query),
                "candidate_id": ids.take(found),
                "score": scores,
            }
        )
        return best, pairs

    def match(self, chunk: pd.DataFrame, *, remember: bool = True) -> pd.DataFrame:
        """duplicate_of, duplicate_score, cluster_id and reason for each row of the chunk (same index), then
        remembers the chunk so later chunks are matched against it too.

        With `remember=False` the index is left as it was (the chunk's rows are still matched against each
        other): a check that must not add what it checks (not with `evict`). One chunk at a time changes
        the index, so threads may share a matcher.
        """
        if not remember and self._evict:
            raise ValueError("match(remember=False) needs a matcher built without evict")
        with self._lock:
            undo = None if remember else self._checkpoint(chunk)
            # A part's parsed values (a tuple per amount) and pandas' temporaries are many small objects
            # and no cycles: the cyclic collector walked the whole heap again and again while they were
            # made (~5% of a part's time).
            try:
                with collector_paused():
                    return self._match(chunk)
            finally:
                if undo is not None:
                    self._rollback(*undo)

    def _checkpoint(self, chunk: pd.DataFrame) -> tuple[int, dict[str, int], dict[str, int], tuple]:
        ids = pd.unique(chunk[self._model.config.id_column].astype(str).to_numpy(dtype=object))
        held = self._positions(ids)
        positions = {i: p for i, p in zip(ids.tolist(), held.tolist(), strict=True) if p >= 0}
        sizes = {field: len(self._texts[field]) for field in self._fields}
        # What is kept of the latest indexed records only (replaced, never changed in place, by `_add`).
        latest = (dict(self._rarity), self._counted_start, dict(self._latest_parsed))
        return len(self._ids), sizes, positions, latest

    def _rollback(
        self,
        start: int,
        sizes: dict[str, int],
        positions: dict[str, int],
        latest: tuple[dict[str, np.ndarray], int, dict[str, tuple[np.ndarray, np.ndarray]]],
    ) -> None:
        """Takes the records indexed from `start` on out of the index again (see `_checkpoint`)."""
        self._uncount_density(start)
        self._rarity, self._counted_start, self._latest_parsed = latest
        for block_index in self._blocks:
            block_index.rollback(start)
        for field in self._fields:
            size = sizes[field]
            self._code_of[field].truncate(size)
            self._texts[field].truncate(size)
            self._codes[field].truncate(start)
            self._seen[field].truncate(size)  # the new values' counts are back at 0
            unparsed = self._unparsed[field]
            for position in [p for p in unparsed if p >= start]:
                del unparsed[position]
        self._raw.truncate(start)
        self._clusters.truncate(start)
        self._position.truncate(start)
        self._ids.truncate(start)
        self._times.truncate(start)
        if positions:
            restored = np.empty(len(positions), dtype=object)
            restored[:] = list(positions)
            self._position.assign(restored, np.fromiter(positions.values(), np.int64), self._ids)

    def _match(self, chunk: pd.DataFrame) -> pd.DataFrame:
        record_ids, scores, others, positions, pairs = self._best(chunk, every_pair=False)
        return self._link(record_ids, scores, others, positions, chunk.index, pairs)

    def _link(
        self,
        record_ids: list[str],
        scores: np.ndarray,
        others: np.ndarray,
        positions: np.ndarray,
        index: pd.Index,
        pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> pd.DataFrame:
        """`match`'s frame from each row's best candidate (`_best`), the links remembered in row order, and
        the other reference records each row duplicates from its scored `pairs` (`_reference_duplicates`)."""
        ids = self._ids
        duplicate_of = np.full(len(record_ids), s.MISSING, dtype=object)
        cluster_ids = np.asarray(record_ids, dtype=object).copy()
        reasons = np.full(len(record_ids), s.MISSING, dtype=object)
        linked = np.flatnonzero((others >= 0) & (scores >= self._model.threshold_))
        # The links' ids and reasons' values read once for the chunk: a match is often an old record,
        # whose id and value texts are in the index's temporary files.
        candidate_ids = ids.take(others[linked])
        duplicate_of[linked] = candidate_ids
        duplicate_position = np.full(len(record_ids), -1, dtype=np.int64)
        duplicate_position[linked] = others[linked]
        reasons[linked] = self._reasons(positions[linked], others[linked], candidate_ids)
        roots = self._clusters.join(positions[linked], others[linked])
        cluster_ids[linked] = ids.take(roots)
        other_positions = self._reference_duplicates(positions, others, *pairs)
        return pd.DataFrame(
            {
                s.DUPLICATE_OF: duplicate_of.tolist(),
                s.DUPLICATE_SCORE: scores,
                s.CLUSTER_ID: cluster_ids.tolist(),
                "reason": reasons.tolist(),
                s.DUPLICATE_POSITION: duplicate_position,
                s.REFERENCE_DUPLICATE_POSITIONS: other_positions,
            },
            index=index,
        )

    def _reference_duplicates(
        self,
        positions: np.ndarray,
        best: np.ndarray,
        query: np.ndarray,
        found: np.ndarray,
        scores: np.ndarray,
    ) -> list[tuple[int, ...]]:
        """Per row (indexed `positions`, best candidate `best`), the index positions of the other reference
        records scoring at or above the threshold, highest score first, the latest among equal ones:
        records the row duplicates as surely as its link (a re-registration ties its original and the
        order's earlier re-registration, and only one of them can be `duplicate_of`). Exact scores
        (`_settle`). Reference records only: their values are as the department stored them, while an
        earlier batch row's are as entered, and a re-registration copied from a record with a slip repeats
        that slip."""
        at: list[tuple[int, ...]] = [()] * len(positions)
        kept = np.flatnonzero((scores >= self._model.threshold_) & (found < self._reference_rows))
        if len(kept):
            kept = kept[found[kept] != best[query[kept] - positions[0]]]
        if not len(kept):
            return at
        kept = kept[np.lexsort((-found[kept], -scores[kept], query[kept]))]
        rows = (query[kept] - positions[0]).tolist()
        for row, other in zip(rows, found[kept].tolist(), strict=True):
            at[row] = (*at[row], other)
        return at

    def _begin(self, chunk: pd.DataFrame) -> _PartInFlight:
        """Indexes the chunk, so that `_end` can link it from its pairs' scores (`_pair_inputs`, taken
        before the next chunk is indexed) after later chunks were indexed. The records that left every
        block window while it was indexed are dropped only at its `_drop` (its links may name them).
        Record ids must be unique across the batch (the batch job checks): a later chunk's ids then never
        meet an earlier one's in the index, and indexing it before the earlier one is linked changes
        nothing."""
        encoded, query, found = self._index(chunk)
        leaving, self._leaving = self._leaving, []
        start = len(self._ids) - len(encoded)
        return _PartInFlight(chunk.index, encoded.ids, start, query, found, leaving)

    def _pair_inputs(self, query: np.ndarray, found: np.ndarray, shipped: dict[str, int]) -> PairInputs:
        """The candidate pairs as `_pair_scores` reads them, in plain arrays: per field the pairs' value
        codes and the later records' rarities, and the texts of the values coded since those `shipped`
        before (per field a comparator reads: how many were; updated), for a `PairScorer` that holds
        the ones before."""
        codes = {}
        for field in self._fields:
            stored = self._codes[field]
            codes[field] = (stored.take(query), stored.take(found))
        texts = {}
        for field in self._compared_fields():
            size = len(self._texts[field])
            texts[field] = self._texts[field].take(np.arange(shipped.get(field, 0), size))
            shipped[field] = size
        return PairInputs(query, found, codes, texts, self._counted(query))

    def _compared_fields(self) -> list[str]:
        """The match fields whose values a comparator reads when scoring (not only their codes)."""
        data_model, exact, unweighed = self._model.data_model_, self._exact_comparators(), self._unweighed()
        compared = {
            field
            for field, compare, start, _stop in data_model._field_comparators
            if id(compare) not in exact and start not in unweighed
        }
        return [field for field in self._fields if field in compared]

    def _end(self, part: _PartInFlight, scores: np.ndarray) -> pd.DataFrame:
        """`match`'s frame for a chunk `_begin` indexed, from its pairs' scores (`PairScorer.scores`)."""
        record_ids, best, others, positions, pairs = self._pick_best(
            part.ids, part.start, part.query, part.found, scores
        )
        return self._link(record_ids, best, others, positions, part.index, pairs)

    def _drop(self, part: _PartInFlight) -> None:
        """Drops the records that left every block window while `part` was indexed (`_drop_left`)."""
        later, self._leaving = self._leaving, part.leaving
        self._drop_left()
        self._leaving, part.leaving = later, []

    def reason(self, position: int, other: int) -> str:
        """The clerk's sentence for indexed record `position` duplicating indexed record `other`."""
        return self._reasons(np.array([position]), np.array([other]))[0]

    def _reasons(
        self, positions: np.ndarray, others: np.ndarray, other_ids: list[str] | None = None
    ) -> list[str]:
        """`reason` of each pair (`positions[i]` duplicating `others[i]`), each field's values, the entry
        times and the ids (`other_ids`, if known) read once for all pairs."""
        if not len(positions):
            return []
        records = [self._normalised_many(field, positions) for field in self._fields]
        matches = [self._normalised_many(field, others) for field in self._fields]
        days = (self._times.take(positions) - self._times.take(others)).tolist()
        if other_ids is None:
            other_ids = self._ids.take(others)
        reasons = []
        for i, (other_id, day) in enumerate(zip(other_ids, days, strict=True)):
            record = {field: values[i] for field, values in zip(self._fields, records, strict=True)}
            match = {field: values[i] for field, values in zip(self._fields, matches, strict=True)}
            reasons.append(self._model.reason(record, match, other_id, None if math.isnan(day) else day))
        return reasons

    # ------------------------------------------------------------------ pairs given from outside

    def score_pairs(
        self,
        left: pd.DataFrame,
        right: pd.DataFrame,
        density: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> ScoredPairs:
        """Scores given pairs (row i of `left` against row i of `right`; same columns, text cells) with the
        model's comparisons and classifier, without blocking: the public entry of another engine (Spark
        finds the candidates itself and calls this per bucket). The matcher must be empty.

        `density` = (counts, totals), arrays of shape (pairs, match fields): for each left record and
        match field (`DuplicateModel.match_values` order), how many records indexed up to it (itself
        included) hold its value and hold any value, as `Matcher` counts them (see `_count_density`);
        without it, the left records are counted among themselves after the fitted counts."""
        if len(self._ids):
            raise ValueError("score_pairs needs an empty matcher (DuplicateModel.matcher(None))")
        if len(left) != len(right):
            raise ValueError(f"score_pairs: {len(left)} left rows but {len(right)} right rows")
        n = len(left)
        self._add(self._model._encode(left))
        positions = np.arange(n)
        rarities = self._counted(positions)  # as counted among the left records (and the fitted counts)
        if density is not None and n:
            counts, totals = density
            for column, field in enumerate(self._fields):
                present = self._code_array(field)[:n] >= 0
                fitted = self._frequencies.get(field)
                rarity = np.zeros(n, dtype="f4")
                rarity[present] = (
                    counted_rarity(counts[present, column], totals[present, column], fitted.scale_total)
                    if fitted
                    else 1.0
                )
                rarities[field] = rarity
        self._add(self._model._encode(right))
        features = self._features(positions, positions + n, scoring=True, rarities=rarities)
        scores = self._model.probabilities(features) if n else np.zeros(0)
        return ScoredPairs(self, scores)


class ScoredPairs:
    """Pairs scored by `Matcher.score_pairs`: `scores[i]` for pair i, its ids, reason and matched values."""

    def __init__(self, matcher: Matcher, scores: np.ndarray) -> None:
        self._matcher = matcher
        self.scores = scores

    def __len__(self) -> int:
        return len(self.scores)

    def left_id(self, i: int) -> str:
        return str(self._matcher._ids[i])

    def right_id(self, i: int) -> str:
        return str(self._matcher._ids[len(self) + i])

    def reason(self, i: int) -> str:
        """The clerk's sentence for pair i (left duplicates right)."""
        return self._matcher.reason(i, len(self) + i)

    def right_value(self, i: int, field: str) -> str:
        """The raw value of config field `field` of pair i's right record."""
        return self._matcher._raw_value(field, len(self) + i)


@dataclass
class PairInputs:
    """A matcher part's candidate pairs as plain arrays (they pickle cheaply, unlike the index): record and
    candidate positions; per match field the pairs' value codes (left, right); per field a comparator
    reads, the texts of the values coded since the part before (`Matcher._pair_inputs`); the later
    records' rarities (`Matcher._counted`)."""

    query: np.ndarray
    found: np.ndarray
    codes: dict[str, tuple[np.ndarray, np.ndarray]]
    texts: dict[str, list[str]]
    rarities: dict[str, np.ndarray]


class PairScorer(Matcher):
    """The scoring half of a `Matcher`, fed one part's `PairInputs` after another, with no index: the
    same methods (`_features`, `_settle` and those they call) on the shipped codes, and each compared
    field's value texts by code (kept, as the matcher keeps them). A value is parsed from its normalised
    text, as `Matcher._parsed` parses any value it does not hold parsed (and as `_encode` parsed the
    new ones), so the scores are the same, bit for bit."""

    def __init__(self, model: DuplicateModel) -> None:  # no super().__init__(): no index
        self._model = model
        self._fields = [plugin.field for plugin in model.plugins_]
        self._texts = {field: _TextList() for field in self._fields}
        nothing = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object))
        self._latest_parsed = dict.fromkeys(self._fields, nothing)

    def scores(self, inputs: PairInputs) -> np.ndarray:
        """`Matcher._pair_scores` of the part's pairs (without `every_pair`)."""
        for plugin in self._model.plugins_:
            # The values new since the part before are mostly this part's records': parsed once, at hand.
            field, texts = plugin.field, inputs.texts.get(plugin.field, [])
            size = len(self._texts[field])
            self._texts[field].extend(texts)
            parsed = _parse_distinct(plugin, _objects(texts))
            self._latest_parsed[field] = (np.arange(size, size + len(texts), dtype=np.int64), parsed)
        pair_codes = {}
        for field, (left, right) in inputs.codes.items():
            left, right = left.astype(np.int64), right.astype(np.int64)
            pair_codes[field] = (left, right, (left >= 0) & (right >= 0))
        return self._pair_scores(inputs.query, inputs.found, pair_codes, inputs.rarities, every_pair=False)


@dataclass
class _PartInFlight:
    """A chunk `Matcher._begin` indexed and `Matcher._end` has yet to link."""

    index: pd.Index
    ids: list[str]
    start: int
    query: np.ndarray
    found: np.ndarray
    leaving: list[int]


class PairHelperError(RuntimeError):
    """The duplicate pair helper process failed or exited; the batch cannot be linked."""


class PairHelper:
    """A long-lived process that scores matcher parts' candidate pairs (`PairScorer.scores`) beside the
    process that indexes, so two cores share the duplicate stage (see `MatchAhead`).

    Forked once (Linux only: `available`), after the duplicate model is loaded and before the reference
    is indexed: it shares the model's pages and holds no index. Parts go in and their scores come back,
    in order, through two queues (each written by its own thread, so neither side waits for the other
    to read: with a pipe, the helper could not start the next part before this process read the last
    one's scores). A helper that fails sends its error and exits; one that dies is noticed within
    `PAIR_HELPER_POLL_SECONDS` / 10: either way `receive` raises `PairHelperError`, never hangs.

    >>> # helper = PairHelper(model); helper.send(inputs); scores = helper.receive(); helper.close()
    """

    def __init__(self, model: DuplicateModel) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self._parts, self._answers = context.Queue(), context.Queue()
        self._process = context.Process(
            target=_serve_pairs,
            args=(model, self._parts, self._answers),
            name="pipeline-pair-helper",
            daemon=True,
        )
        self._process.start()

    @staticmethod
    def available() -> bool:
        """Whether a helper can be forked here (fork is unsafe on macOS and absent on Windows)."""
        import sys

        return sys.platform == "linux"

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def send(self, inputs: PairInputs) -> None:
        """Hands the helper a part's pairs (queued behind those it has not returned yet)."""
        if not self._process.is_alive():
            raise self._failure()
        self._parts.put(inputs)

    def receive(self) -> np.ndarray:
        """The scores of the oldest part sent and not yet received, once the helper has them."""
        while True:
            try:
                answer = self._answers.get(timeout=PAIR_HELPER_POLL_SECONDS / 10)
            except queue.Empty:
                if self._process.is_alive():
                    continue
                raise self._failure() from None
            if isinstance(answer, np.ndarray):
                return answer
            raise self._failure(answer)

    def _failure(self, answer: Any = None) -> PairHelperError:
        """Why the helper stopped: the error it sent (read past the scores still queued), else how it
        exited."""
        self._process.join(1)
        while not isinstance(answer, str):
            try:
                answer = self._answers.get_nowait()
            except (queue.Empty, OSError, EOFError):
                break
        if isinstance(answer, str):
            return PairHelperError(f"the duplicate pair helper failed: {answer}")
        return PairHelperError(
            f"the duplicate pair helper (pid {self.pid}) exited with code {self._process.exitcode} "
            "before returning its parts' scores"
        )

    def close(self) -> None:
        """Stops the helper (None at the end of its queue) and waits for it; kills it if it lingers."""
        if self._process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self._parts.put(None)
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        for channel in (self._parts, self._answers):
            channel.cancel_join_thread()  # what was never read is dropped, not waited on
            channel.close()

    def __enter__(self) -> PairHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve_pairs(model: DuplicateModel, parts: Any, answers: Any) -> None:
    """The pair helper's loop: a part's `PairInputs` in, its scores out (queued: written by the queue's
    thread, so the next part is started while the parent has not read them yet), until None."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked helper inherits the CLI's handler
    gc.freeze()  # what it inherited is never collected here, so its pages stay shared
    scorer = PairScorer(model)
    parent = os.getppid()
    with threadpool_limits(1):
        while True:
            try:
                inputs = parts.get(timeout=PAIR_HELPER_POLL_SECONDS)
            except queue.Empty:
                if os.getppid() != parent:  # the parent was killed: nobody will ever send or read
                    return
                continue
            if inputs is None:
                return
            try:
                with collector_paused():
                    answer = scorer.scores(inputs)
            except BaseException as error:  # sent back as text: the parent raises it, then closes us
                answers.put(f"{type(error).__name__}: {error}")
                return
            answers.put(answer)


class MatchAhead:
    """`Matcher.match` of part after part, with each part's candidate pairs scored by a `PairHelper`
    while the next parts are indexed here: the same links, in the same order, `AHEAD` parts later.

    `put(part)` indexes the part and returns the links of the parts now due (the part `AHEAD` before it;
    none at first); `finish()` returns the rest. A part's links name records the matcher drops at the
    next `put` or `finish` (those that left every block window): read their values (`Matcher.records`)
    before then. Needs record ids unique across the batch (`Matcher._begin`). Without a helper, each
    part is scored and linked here at its `put`.
    """

    # Parts indexed beyond the one the helper scores: it then has the next part queued when it finishes
    # one, rather than waiting for this process to be scheduled again (which, on a busy machine, each
    # handover did).
    AHEAD = 2

    def __init__(self, matcher: Matcher, helper: PairHelper | None = None) -> None:
        self.matcher, self.helper = matcher, helper
        self._sent: deque[_PartInFlight] = deque()  # in the helper's hands, oldest first
        self._linked: list[_PartInFlight] = []  # returned, their leavers not yet dropped
        self._shipped: dict[str, int] = {}  # per compared field: value texts the helper holds

    def put(self, part: pd.DataFrame) -> list[pd.DataFrame]:
        """Indexes `part`; returns the links of the parts due (oldest first)."""
        matcher = self.matcher
        with matcher._lock, collector_paused():
            self._drop_linked()
            begun = matcher._begin(part)
            query, found = begun.query, begun.found
            if self.helper is None:
                scores = matcher._scores_of(query, found, every_pair=False)
                self._linked.append(begun)
                return [matcher._end(begun, scores)]
            if len(query):
                self.helper.send(matcher._pair_inputs(query, found, self._shipped))
            self._sent.append(begun)
            return self._due(self.AHEAD)

    def finish(self) -> list[pd.DataFrame]:
        """The links of the parts put and not returned yet."""
        with self.matcher._lock, collector_paused():
            self._drop_linked()
            return self._due(0)

    def close(self) -> None:
        """Drops what the last returned part left (the index is then as `match` leaves it)."""
        with self.matcher._lock:
            self._drop_linked()

    def _due(self, ahead: int) -> list[pd.DataFrame]:
        """Links the oldest parts sent until `ahead` are left."""
        done = []
        while len(self._sent) > ahead:
            sent = self._sent.popleft()
            scores = self.helper.receive() if len(sent.query) else np.zeros(0)
            self._linked.append(sent)
            done.append(self.matcher._end(sent, scores))
        return done

    def _drop_linked(self) -> None:
        """Drops what the parts returned so far left (their links' values have been read by now)."""
        for part in self._linked:
            self.matcher._drop(part)
        self._linked = []


class _Clusters:
    """The cluster of each indexed record that joined another record's cluster, as two int32 arrays sorted by
    the member's position: its position and the position of its cluster's first record (whose id is the
    cluster's id). 8 bytes per linked record instead of a dict entry and two id strings (~150 bytes), a
    2,000,000-row batch's ~85,000 links. Records are linked in indexing order, so members are appended."""

    def __init__(self) -> None:
        self.members = np.zeros(0, dtype=np.int32)
        self.roots = np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.members)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Clusters)
            and np.array_equal(self.members, other.members)
            and np.array_equal(self.roots, other.roots)
        )

    def join(self, records: np.ndarray, matches: np.ndarray) -> np.ndarray:
        """Puts each record (increasing positions, after every member held) into the cluster of its match
        (an earlier record, possibly one of `records` before it); returns each record's cluster root."""
        roots = np.asarray(matches, dtype=np.int64).copy()
        if len(self.members):
            at = np.minimum(np.searchsorted(self.members, roots), len(self.members) - 1)
            held = self.members[at] == roots
            roots[held] = self.roots[at[held]]
        # A match among `records` (linked just before): its root, in row order.
        inside = {}
        for i, (record, match) in enumerate(zip(records.tolist(), matches.tolist(), strict=True)):
            roots[i] = inside.get(match, roots[i])
            inside[record] = int(roots[i])
        self.members = np.concatenate([self.members, np.asarray(records, dtype=np.int32)])
        self.roots = np.concatenate([self.roots, roots.astype(np.int32)])
        return roots

    def drop(self, positions: np.ndarray) -> None:
        """Forgets these records' clusters (records dropped from the index)."""
        keep = ~np.isin(self.members, positions)
        self.members, self.roots = self.members[keep], self.roots[keep]

    def truncate(self, size: int) -> None:
        """Forgets the clusters of the records from position `size` on."""
        keep = self.members < size
        self.members, self.roots = self.members[keep], self.roots[keep]


class _TextList:
    """An append-only list of texts stored as one UTF-8 buffer and end offsets (`Offsets`): ~4 bytes per
    text beyond its characters, instead of a str object and a list slot (~60 bytes). For raw values that
    are not the normalised ones (an order number as typed), which a batch adds one per record.

    The buffer is a `SpillBuffer`: its older part goes to an unlinked temporary file once `SPILL_BYTES`
    have gathered. A batch's ids and order numbers are read back a few per record matched (a candidate's
    value, a hash hit to check, a link's id), mostly the latest ones, which stay in memory, so at 2,000,000
    records the ~30 bytes per record of ids and order numbers are not resident. Pickles as its contents.
    """

    SPILL_BYTES = 1 << 20
    GAP = 1 << 14  # older texts closer than this are read with one `pread`...
    READ_BYTES = 1 << 18  # ... within the same 256 KiB of the file

    def __init__(self) -> None:
        self.ends = Offsets()
        self._buffer = SpillBuffer(self.SPILL_BYTES)

    def __len__(self) -> int:
        return len(self.ends)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TextList) and self.ends == other.ends and self._buffer == other._buffer

    def __getstate__(self) -> dict[str, Any]:
        return {"ends": self.ends, "data": self._buffer.getvalue()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.ends = state["ends"]
        self._buffer.append(state["data"])

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self.ends)
        end = self.ends[index]  # IndexError past the end, as a list
        start = self.ends[index - 1] if index else 0
        return self._buffer.read(start, end).decode("utf-8", "surrogatepass")  # from memory, the file or both

    def take(self, indices: np.ndarray | Sequence[int]) -> list[str]:
        """The texts at these places, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return []
        ends = self.ends.take(indices)
        starts = np.zeros(len(indices), dtype=np.int64)
        inside = indices > 0
        starts[inside] = self.ends.take(indices[inside] - 1)
        spilled, tail = self._buffer.spilled, self._buffer.tail
        if spilled and starts.min() < spilled:
            texts = np.empty(len(indices), dtype=object)
            cold = starts < spilled
            texts[cold] = self._read(starts[cold], ends[cold])
            hot = np.flatnonzero(~cold)
            texts[hot] = decode_slices(tail, starts[hot] - spilled, ends[hot] - spilled)
            return texts.tolist()
        return decode_slices(tail, starts - spilled, ends - spilled)

    def _read(self, starts: np.ndarray, ends: np.ndarray) -> list[str]:
        """The texts at these byte ranges of the buffer, in that order: one read per run of nearby texts."""
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
        reach = np.maximum.accumulate(ends)
        run = np.ones(len(starts), dtype=bool)
        # A new read after a gap, and at each `READ_BYTES` of the file: candidates' values spread over a
        # long batch's file would otherwise come in one read of all of it.
        run[1:] = (starts[1:] > reach[:-1] + self.GAP) | (
            starts[1:] // self.READ_BYTES > starts[:-1] // self.READ_BYTES
        )
        first = np.flatnonzero(run)
        last = np.append(first[1:], len(starts)) - 1
        texts = np.empty(len(starts), dtype=object)
        for begin, stop in zip(first.tolist(), last.tolist(), strict=True):
            base = int(starts[begin])
            chunk = self._buffer.read(base, int(reach[stop]))
            part = slice(begin, stop + 1)
            texts[part] = decode_slices(chunk, starts[part] - base, ends[part] - base)
        result = np.empty(len(starts), dtype=object)
        result[order] = texts
        return result.tolist()

    def extend(self, texts: Sequence[str]) -> None:
        if not len(texts):
            return
        data, sizes = encode_texts(texts)
        ends = np.cumsum(sizes) + len(self._buffer)
        self._buffer.append(data)
        self.ends.extend(ends)

    def truncate(self, size: int) -> None:
        """Keeps the first `size` texts."""
        if size < len(self.ends):
            self._buffer.truncate(self.ends[size - 1] if size else 0)
            self.ends.truncate(size)


class _CodeTable:
    """A value -> code map of distinct texts (code = the text's place in a list kept beside it), looked up
    a chunk at a time: the texts' 32-bit hashes, with their codes, in a `SortedRuns` searched with
    `np.searchsorted`, and every hit checked against the stored text (two texts sharing a hash: the later
    one is kept in a small dict, a few hundred entries at millions of values). About 8 bytes per value
    instead of a dict entry and an int object (~80 bytes): a batch's near-unique ids, order numbers and
    amounts are most of an index's values. Texts are only added, or cut back to the first ones
    (`truncate`, a rollback): an evicting matcher, the one that forgets records, keeps no id -> position
    table, and its value codes stay (counted, and read by position)."""

    HASH_KEY = "pipeline:values!"

    def __init__(self) -> None:
        self.table = SortedRuns(np.uint32, codes=np.int32)  # codes are below `MAX_RECORDS`
        self.clashes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.table) + len(self.clashes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _CodeTable):
            return False
        mine, theirs = self._held(), other._held()
        same = all(np.array_equal(mine[name], theirs[name]) for name in mine)
        return same and self.clashes == other.clashes

    def _held(self) -> dict[str, np.ndarray]:
        """The hashes held and their codes, by hash: the same for equal tables however they grew."""
        return self.table.in_key_order()

    def hash(self, values: np.ndarray) -> np.ndarray:
        """The hashes this table keeps of these distinct texts (an object array), for `find` and then
        `insert` of some of them: hashed once."""
        hashes = pd.util.hash_array(values, hash_key=self.HASH_KEY, categorize=False)  # distinct values
        return hashes.astype(np.uint32)

    def find(self, values: np.ndarray, texts: Sequence[str], hashes: np.ndarray | None = None) -> np.ndarray:
        """The code of each of these distinct texts (an object array), -1 where it has none; `texts` = the
        text of each code; `hashes` = `hash(values)`, if known."""
        return self._find(values, texts, hashes)[0]

    def _find(
        self, values: np.ndarray, texts: Sequence[str], hashes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`find`, and where each code found is held: its place in `table`, -1 in `clashes` or none."""
        found = np.full(len(values), -1, dtype=np.int64)
        slots = np.full(len(values), -1, dtype=np.int64)
        if not len(values) or not len(self):
            return found, slots
        if len(self.table):
            hashes = self.hash(values) if hashes is None else hashes
            at = self.table.find(hashes)
            hit = np.flatnonzero(at >= 0)
            codes = self.table.take("codes", at[hit])
            stored = np.empty(len(hit), dtype=object)
            take = getattr(texts, "take", None)  # a `_TextList`: its offsets read at once
            stored[:] = take(codes) if take is not None else list(map(texts.__getitem__, codes.tolist()))
            same = stored == values[hit]
            found[hit[same]] = codes[same]
            slots[hit[same]] = at[hit[same]]
        if self.clashes:
            # Only a value whose hash a clash has can be one: not a Python look-up per value not found (a
            # part's near-unique order numbers and amounts are mostly not found).
            hashes = self.hash(values) if hashes is None else hashes
            clashing = self.hash(np.array(list(self.clashes), dtype=object))
            for i in np.flatnonzero((found < 0) & np.isin(hashes, clashing)).tolist():
                found[i] = self.clashes.get(values[i], -1)
        return found, slots

    def assign(self, values: np.ndarray, codes: np.ndarray, texts: Sequence[str]) -> None:
        """Gives these distinct texts these codes, whether held before (then `texts` must still hold
        the old code's text) or not."""
        hashes = self.hash(values)
        found, slots = self._find(values, texts, hashes)
        held = slots >= 0
        self.table.put("codes", slots[held], codes[held])
        for i in np.flatnonzero((found >= 0) & ~held).tolist():
            self.clashes[values[i]] = int(codes[i])
        self.insert(values[found < 0], codes[found < 0], hashes[found < 0])

    def insert(self, values: np.ndarray, codes: np.ndarray, hashes: np.ndarray | None = None) -> None:
        """Adds distinct texts that `find` did not find, with their codes (`hashes` = `hash(values)`, if
        known)."""
        if not len(values):
            return
        hashes = self.hash(values) if hashes is None else hashes
        # The stable order by hash (of two values sharing one, the later is the clash), as one sort of
        # distinct keys: a fifth of the stable sort's time.
        order = np.argsort(hashes.astype(np.int64) * len(hashes) + np.arange(len(hashes)))
        hashes, values, codes = hashes[order], values[order], codes[order]
        taken = self.table.find(hashes) >= 0
        taken[1:] |= hashes[1:] == hashes[:-1]
        for i in np.flatnonzero(taken).tolist():
            self.clashes[values[i]] = int(codes[i])
        self.table.append(hashes[~taken], codes=codes[~taken])

    def truncate(self, size: int) -> None:
        """Forgets the texts with codes from `size` on."""
        self.table.delete(np.flatnonzero(self.table.column("codes") >= size))
        self.clashes = {value: code for value, code in self.clashes.items() if code < size}


class _BlockIndex:
    """One blocking rule's blocks as arrays, a chunk at a time: per key (a 64-bit hash of its text, in a
    `SortedRuns`, with 8 bits of a second hash to detect a collision) the block's size and latest record;
    per record the previous record of its block. A record's window is found by walking back from there.
    ~14 bytes per distinct key and 4 per record, instead of a dict entry, a key string and a list per
    block: a batch adds a near-unique order number (and amount) per record, so most keys are blocks of one,
    and a size is kept in one byte (`SMALL`), a larger one in a side table of the few keys that reach it.
    (The check only warns; 8 bits still catch 255 of 256 collisions, themselves ~1 in 10 million at
    millions of keys.)"""

    HASH_KEY = "0123456789123456"
    CHECK_KEY = "pipeline:blocks!"
    SMALL = 255  # a `count` of SMALL: the size is in `big`

    def __init__(self) -> None:
        # Per key: `checks`, `count` (the size up to SMALL) and `last` (the latest record).
        self.blocks = SortedRuns(np.uint64, checks=np.uint8, count=np.uint8, last=np.int32)
        self.big = SortedRuns(np.uint64, count=np.int64)  # per key whose block has SMALL records or more
        self.prev = ColumnFile(np.int32)
        self.track_leavers = False
        self.leavers = np.zeros(0, dtype=np.int64)
        self.undo: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def sizes(self, at: np.ndarray) -> np.ndarray:
        """The block sizes of the keys at these places of `blocks` (int64)."""
        sizes = self.blocks.take("count", at).astype(np.int64)
        big = np.flatnonzero(sizes == self.SMALL)
        if len(big):
            sizes[big] = self.big.take("count", self.big.find(self.blocks.take("keys", at[big])))
        return sizes

    def _set_sizes(self, at: np.ndarray, keys: np.ndarray, sizes: np.ndarray) -> None:
        """Sets the block sizes of these distinct keys, at these places of `blocks`."""
        sizes = np.asarray(sizes, dtype=np.int64)
        self.blocks.put("count", at, np.minimum(sizes, self.SMALL))
        self._set_big(keys, sizes)

    def _set_big(self, keys: np.ndarray, sizes: np.ndarray) -> None:
        """Keeps the sizes of these distinct keys' blocks in `big` where they reach SMALL, and takes out
        those back below it (a rollback)."""
        at = self.big.find(keys)
        big, held = sizes >= self.SMALL, at >= 0
        self.big.put("count", at[big & held], sizes[big & held])
        self.big.delete(at[~big & held])
        self.big.append(keys[big & ~held], count=sizes[big & ~held])

    def add(
        self, keys: Sequence[str], start: int, window: int, collect: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Adds records `start`, `start + 1`, ... with these keys (`""` = none) in order; returns, when
        `collect`, (record, earlier record, 1 / block size before the record) for each record's window."""
        values = np.asarray(keys, dtype=object)
        prev = np.full(len(values), -1, dtype=np.int64)
        rows = np.flatnonzero(values != s.MISSING)
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
        if not len(rows):
            self.prev.extend(prev)
            self.undo = (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64), np.zeros(0), np.zeros(0))
            return empty
        # `categorize=False`: the same hashes without factorizing the keys first, which costs three
        # times the hashing itself on a part's keys (most of them distinct).
        hashes = pd.util.hash_array(values[rows], hash_key=self.HASH_KEY, categorize=False)
        checks = pd.util.hash_array(values[rows], hash_key=self.CHECK_KEY, categorize=False).astype(np.uint8)
        order = np.argsort(hashes, kind="stable")  # by hash, then row: `rows` is increasing
        hashes, checks, rows = hashes[order], checks[order], rows[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        starts = np.flatnonzero(first)
        group = np.cumsum(first) - 1
        rank = np.arange(len(rows)) - starts[group]
        group_keys, group_checks = hashes[starts], checks[starts]
        at = self.blocks.find(group_keys)
        found = at >= 0
        if (self.blocks.take("checks", at[found]) != group_checks[found]).any():
            logger.warning("two blocking keys share a 64-bit hash; their blocks are merged")
        self.leavers = np.zeros(0, dtype=np.int64)
        old_count = np.zeros(len(starts), dtype=np.int64)
        old_last = np.full(len(starts), -1, dtype=np.int64)
        old_count[found] = self.sizes(at[found])
        old_last[found] = self.blocks.take("last", at[found])
        positions = start + rows
        before = np.empty(len(rows), dtype=np.int64)
        before[1:] = positions[:-1]
        before = np.where(rank > 0, before, old_last[group])
        prev[rows] = before
        self.prev.extend(prev)
        self.undo = (group_keys[~found], group_keys[found], old_count[found], old_last[found])
        ends = np.append(starts[1:], len(rows)) - 1
        new_count = old_count + (ends - starts + 1)
        new_last = positions[ends]
        self._set_sizes(at[found], group_keys[found], new_count[found])
        self.blocks.put("last", at[found], new_last[found])
        new = ~found
        self.blocks.append(
            group_keys[new],
            checks=group_checks[new],
            count=np.minimum(new_count[new], self.SMALL),
            last=new_last[new],
        )
        big = new & (new_count >= self.SMALL)
        self._set_big(group_keys[big], new_count[big])
        if not (collect or self.track_leavers):
            return empty
        chained = self._chains(old_last, window)
        if self.track_leavers:
            self.leavers = self._leavers(positions, group, rank, new_count - old_count, chained, window)
        if not collect:
            return empty
        return self._windows(positions, group, rank, old_count, chained, window)

    def _chains(self, last: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The `window` latest records of each block before this `add` (its latest is `last`, -1 for a
        new block): (record, its block's place in `last`, its step back from `last`, 0 for `last`), by
        block, then by step.

        A record's previous one in its block is older, so a walk down the chains reads ever older parts of
        the chain column: it is read from its newest `ColumnFile.WINDOW_BYTES` window down, each window
        once for all blocks and steps, and released after (`ColumnFile.release`). So the walk faults each
        page in once and holds one window's pages at a time, as one `take` does, instead of a `take` (a
        release and the pages faulted in again) per step."""
        blocks = np.flatnonzero(last >= 0)
        table = np.full((len(blocks), window), -1, dtype=np.int32)  # per block: its records, by step
        chain = self.prev.view()
        span = max(1, self.prev.WINDOW_BYTES // chain.itemsize)  # items per window
        waiting = [(np.arange(len(blocks)), np.zeros(len(blocks), dtype=np.int64), last[blocks])]
        while any(len(at) for _, _, at in waiting):
            row, step, at = (np.concatenate(parts) for parts in zip(*waiting, strict=True))
            floor = int(at.max()) // span * span  # the start of the newest window still to read
            inside = at >= floor
            waiting = [(row[~inside], step[~inside], at[~inside])]
            row, step, at = row[inside], step[inside], at[inside]
            while len(at):
                table[row, step] = at
                step, at = step + 1, chain[at].astype(np.int64)
                on = (step < window) & (at >= 0)
                below = on & (at < floor)
                waiting.append((row[below], step[below], at[below]))
                on &= ~below
                row, step, at = row[on], step[on], at[on]
            self.prev.release()
        row, step = np.nonzero(table >= 0)
        return table[row, step].astype(np.int64), blocks[row], step

    @staticmethod
    def _leavers(
        positions: np.ndarray,
        group: np.ndarray,
        rank: np.ndarray,
        grown: np.ndarray,
        chained: tuple[np.ndarray, np.ndarray, np.ndarray],
        window: int,
    ) -> np.ndarray:
        """The records this `add` pushed out of their block's window (its `window` latest): new ones with
        `window` or more newer ones in the block after the `grown` it gained, and those of `_chains`
        that many steps back."""
        records, block, step = chained
        newer = grown[group] - 1 - rank
        return np.concatenate([positions[newer >= window], records[step + grown[block] >= window]])

    @staticmethod
    def _windows(
        positions: np.ndarray,
        group: np.ndarray,
        rank: np.ndarray,
        old_count: np.ndarray,
        chained: tuple[np.ndarray, np.ndarray, np.ndarray],
        window: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record, earlier record, 1 / block size before the record) for each new record's window (the
        `window` latest records of its block before it), step by step: every record's nearest, then
        every record's second nearest, and so on.

        Before a block's new record at `rank` come its new ones at lower ranks, then those `_chains`
        found; laid out per block as those (oldest first), then the new ones by rank, a record's k-th
        nearest is k places before its own."""
        records, block, step = chained
        held = np.bincount(block, minlength=len(old_count))  # per block: records `_chains` found
        width = held + np.bincount(group, minlength=len(old_count))
        begin = np.cumsum(width) - width
        laid = np.empty(int(width.sum()), dtype=np.int64)
        laid[begin[block] + held[block] - 1 - step] = records
        own = begin[group] + held[group] + rank
        laid[own] = positions
        size_before = old_count[group] + rank
        has = np.flatnonzero(size_before > 0)
        query, weight, own = positions[has], 1.0 / size_before[has], own[has]
        reach = np.minimum(rank[has] + held[group[has]], window)  # records in its window
        queries, others, weights = [], [], []
        for k in range(1, window + 1):
            if not (reach >= k).all():
                keep = reach >= k
                query, weight, own, reach = query[keep], weight[keep], own[keep], reach[keep]
            if not len(query):
                break
            queries.append(query)
            others.append(laid[own - k])
            weights.append(weight)
        if not queries:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
        return np.concatenate(queries), np.concatenate(others), np.concatenate(weights)

    def rollback(self, start: int) -> None:
        """Undoes the last `add` (which indexed records from `start` on)."""
        if self.undo is None:
            return
        inserted, changed, old_count, old_last = self.undo
        if len(inserted):
            self._set_big(inserted, np.zeros(len(inserted), dtype=np.int64))  # out of the side table
            self.blocks.delete(self.blocks.find(inserted))  # mostly the newest run: little to move
        if len(changed):
            at = self.blocks.find(changed)
            self._set_sizes(at, changed, old_count)
            self.blocks.put("last", at, old_last)
        self.prev.truncate(start)
        self.undo = None


# ---------------------------------------------------------------------- helpers


def _take_ids(ids: _TextList, positions: np.ndarray) -> np.ndarray:
    """The ids at these positions as an object array ("" where a position is -1)."""
    taken = np.full(len(positions), s.MISSING, dtype=object)
    held = np.flatnonzero(positions >= 0)
    taken[held] = ids.take(positions[held])
    return taken


def _text_values(column: pd.Series) -> np.ndarray:
    """The column as an object array of text, `""` for missing: `fillna("").astype(str)`, without the
    round trip through Arrow when it holds text only (as read)."""
    values = column.to_numpy(dtype=object)
    if pd.api.types.infer_dtype(values, skipna=False) == "string":
        return values
    return column.fillna(s.MISSING).astype(str).to_numpy(dtype=object)


def _parse_distinct(plugin: FieldType, distinct: np.ndarray) -> np.ndarray:
    """`plugin.parse` of each of these distinct values as an object array; text plugins keep the default
    (the value itself, None when missing), which needs no call per value."""
    if type(plugin).parse is FieldType.parse:
        parsed = distinct.copy()
        parsed[distinct == s.MISSING] = None
        return parsed
    return _objects(plugin.parse_many(distinct.tolist()))


def _objects(items: list[Any]) -> np.ndarray:
    """The items as an object array, each one element: a list of tuples (parsed numbers and dates) given
    to NumPy as it is is first searched for a second dimension, ten times as long."""
    return np.fromiter(items, dtype=object, count=len(items))


def _latest_parsed(codes: np.ndarray, parsed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The parsed values (an object array) of a chunk's distinct values by their codes (-1 = none: left
    out), sorted by code for `np.searchsorted`."""
    held = np.flatnonzero(codes >= 0)
    order = held[np.argsort(codes[held])]  # distinct values have distinct codes: any sort is the stable one
    return codes[order], parsed[order]


def _shared_keys(
    query: np.ndarray, other: np.ndarray, rule: np.ndarray, weight: np.ndarray, records: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (record, candidate) pairs among the blocks' (given rule after rule, each pair once per
    rule), in no particular order: each with the first rule that found it and its keys' weights summed in
    rule order, as one record's keys are counted. By hashing the pairs, not sorting them (positions are
    below `MAX_RECORDS`, so a pair fits one 64-bit key)."""
    pair, distinct = pd.factorize(query * records + other)
    # `bincount` adds each pair's weights in the order given: rule after rule, from 0.
    shared = np.bincount(pair, weights=weight, minlength=len(distinct))
    # `factorize` numbers pairs in order of first appearance: a pair is first found where its number
    # exceeds every number before it.
    new = np.ones(len(pair), dtype=bool)
    new[1:] = pair[1:] > np.maximum.accumulate(pair)[:-1]
    return distinct // records, distinct % records, rule[new], shared


def _lexsort_ranked(query: np.ndarray, second: np.ndarray, third: np.ndarray, records: int) -> np.ndarray:
    """`np.lexsort((third, second, query))` for record positions `query` below `records`, any `second`
    (floats) and `third` between -`records` and `records`, as one sort of a combined 64-bit key (the
    rank of `second` in between) when it fits and the keys are distinct (then any sort gives lexsort's
    order): two quicksorts instead of three merge sorts."""
    # `np.unique(second, return_inverse=True)` by hashing (a few hundred levels among many pairs): the
    # levels' ranks, sorted once.
    codes, levels = pd.factorize(second, use_na_sentinel=False)
    ranks = np.empty(len(levels), dtype=np.int64)
    ranks[np.argsort(levels)] = np.arange(len(levels))
    rank = ranks[codes]
    span = 2 * records + 1
    if not len(query) or records * max(len(levels), 1) * span >= 2**62:
        return np.lexsort((third, second, query))
    key = (query * len(levels) + rank) * span + (third + records)
    order = np.argsort(key)
    if (np.diff(key[order]) == 0).any():
        return np.lexsort((third, second, query))
    return order


def _best_per_query(query: np.ndarray, found: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per query record, the place of its highest-scoring pair, the latest candidate among equal scores:
    the first of each query in `np.lexsort((-found, -scores, query))`, in query order. Without a sort
    when the pairs come grouped by query (as `_candidates` gives them) and no score is NaN."""
    starts = np.flatnonzero(np.diff(query, prepend=query[0] - 1))
    if np.any(query[1:] < query[:-1]) or np.isnan(scores).any():
        order = np.lexsort((-found, -scores, query))
        first = np.ones(len(order), dtype=bool)
        first[1:] = query[order][1:] != query[order][:-1]
        return order[first]
    top = np.maximum.reduceat(scores, starts)
    latest = np.where(scores == np.repeat(top, np.diff(np.append(starts, len(query)))), found, -1)
    # Within a query the candidates are distinct, so the latest of the best is one place.
    group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(query))))
    best_found = np.maximum.reduceat(latest, starts)
    return np.flatnonzero(latest == best_found[group])


def _first_seen(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each value's number among the distinct values in order of first appearance, and where each distinct
    value first appears: `(["b", "a", "b"])` -> `([0, 1, 0], [0, 1])`."""
    if not len(values):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    values = np.asarray(values, dtype=object)
    # Texts hold no missing value: with the sentinel, `factorize` skips its pass looking for one (a tenth
    # of the matcher's encoding), and any None or NaN still shows as -1, then numbered as before.
    inverse, _ = pd.factorize(values)
    if (inverse < 0).any():
        inverse, _ = pd.factorize(values, use_na_sentinel=False)
    inverse = inverse.astype(np.int64)
    # `factorize` numbers values in order of first appearance, so a value first appears where its number
    # exceeds every number before it: no sort needed.
    new = np.ones(len(inverse), dtype=bool)
    new[1:] = inverse[1:] > np.maximum.accumulate(inverse)[:-1]
    return inverse, np.flatnonzero(new)


def _count_type(largest: int) -> type:
    """The narrowest unsigned type holding counts up to `largest`."""
    return next(kind for kind in (np.uint8, np.uint16, np.uint32, np.uint64) if largest <= np.iinfo(kind).max)


def _running_counts(
    codes: np.ndarray, seen: np.ndarray, present: int
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """For each value code (>= 0) in order: how many records held it so far (`seen` before, then earlier
    in `codes`, then itself) and how many records held any value so far (`present` before, itself
    included); and the distinct codes with their counts after all of them (what `seen` becomes)."""
    index = np.arange(len(codes))
    # The stable order by code, as one sort of distinct keys (a fifth of the stable sort's time).
    if len(codes) and int(codes.max()) < 2**62 // max(len(codes), 1):
        order = np.argsort(codes.astype(np.int64) * len(codes) + index)
    else:
        order = np.argsort(codes, kind="stable")
    ranked = codes[order]
    first = np.ones(len(codes), dtype=bool)
    first[1:] = ranked[1:] != ranked[:-1]
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = index - np.maximum.accumulate(np.where(first, index, 0))
    count = seen[codes] + rank + 1
    last = np.append(first[1:], True)[: len(codes)]  # each code's last record, in the sorted order
    return count, present + index + 1, (ranked[last], count[order[last]])


def counted_rarity(count: np.ndarray, total: np.ndarray, scale_total: int) -> np.ndarray:
    """`TermFrequencies.rarity` of values held by `count` of the `total` records indexed up to and including
    each (the matcher's running counts), on the fitted scale: a share of `count / max(total, scale_total)`,
    0 (every record) to 1 (one in `scale_total` or rarer). The term-frequency feature counts a value this way
    both in training (the history in entry order) and when scoring (reference, then the batch), so a batch's
    new day counts as the records entered on it so far, as a day of the history did when it was new.

    >>> rarity = counted_rarity(np.array([1, 100, 50]), np.array([10, 1_000, 10_000]), 1_000)
    >>> [round(float(r), 2) for r in rarity]  # one of ten so far: one of the fitted 1,000
    [1.0, 0.33, 0.77]
    """
    scale = math.log(max(scale_total, 2))
    share = np.asarray(count, dtype=float) / np.maximum(np.asarray(total, dtype=float), max(scale_total, 1))
    return (np.minimum(-np.log(share), scale) / scale).astype("f4")


def running_rarities(values: np.ndarray, scale_total: int) -> np.ndarray:
    """`counted_rarity` of each value (normalised texts in entry order; `""` = missing, rarity 0) among the
    present values up to and including it."""
    codes, _ = pd.factorize(values)
    codes[values == s.MISSING] = -1
    present = codes >= 0
    seen = np.zeros(int(codes.max(initial=-1)) + 1, dtype=np.int64)
    count, total, _ = _running_counts(codes[present], seen, 0)
    rarity = np.zeros(len(values), dtype="f4")
    rarity[present] = counted_rarity(count, total, scale_total)
    return rarity


def _read_json(path: Path) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise ModelLoadError(f"{path.parent}: duplicate model folder not found")
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: duplicate model file missing; the folder is not a saved duplicate model"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read duplicate model file ({exc.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise ModelLoadError(f"{path}: duplicate model file is not a JSON object")
    return document

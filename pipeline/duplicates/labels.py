"""Label sampling: which pairs the duplicate classifier learns from, `max_labels` in all.

Positives are the known pairs (merge chains closed), at most half the labels. Negatives, never merged:
* rejected: the pairs a clerk said are not duplicates (at most a quarter of the negatives), first;
* look-alikes: candidate pairs of a wide blocking, the records a matcher actually weighs;
* field agreements: pairs that agree on one field (the same amount, the same date) but are not the same
  registration, spread evenly over the fields, so no single agreeing field can make a match on its own;
* random pairs, so the easy majority is represented too;
* chance agreements: an unrelated record given another's values in one to three fields (what a register
  ten times larger produces by chance);
* denser look-alikes: a never-merged look-alike given the other's value in one field where they differ
  (a customer's second order of the day). These take the place of as many random pairs.

The made-up records of the last two kinds are not in the history: `add_records` (given by the caller)
indexes them where the features are computed and returns the position of the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from pipeline import schema as s

LOOKALIKE_SHARE = 0.4
FIELD_AGREEMENT_SHARE = 0.3
CHANCE_SHARE = 0.2
CHANCE_MAX_FIELDS = 3
DENSER_SHARE = 0.2
REJECTED_SHARE = 0.25

Pairs = tuple[np.ndarray, np.ndarray]


def _no_pairs() -> Pairs:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)


class LabelSampler:
    """Samples labelled pairs as positions into the history in entry order (later record first).

    `fields` are the match fields, `id_column` the config's id column (made-up records get ids that no
    real record has). `sample` sets `counts_` (labels of each kind, plus `rejected_given`: the rejected
    pairs the caller gave, of which at most `rejected_negative` were used)."""

    def __init__(self, fields: Sequence[str], id_column: str, *, max_labels: int = 1000) -> None:
        self.fields = list(fields)
        self.id_column = id_column
        self.max_labels = max_labels

    def sample(
        self,
        rng: np.random.Generator,
        records: pd.DataFrame,
        known: Pairs,
        lookalikes: Pairs,
        normalised: dict[str, pd.Series],
        cluster: dict[str, str],
        rejected: list[tuple[str, str]],
        position: pd.Series,
        add_records: Callable[[pd.DataFrame], int],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(left, right, label) arrays: positives first, then rejected, look-alike, field-agreement, random,
        chance and denser negatives. `records` = the history in entry order, `position` = id -> position,
        `cluster` = id -> its merge cluster's root (records of one cluster are never a negative)."""
        ids = records[self.id_column].astype(str).to_numpy()
        rejected_a, rejected_b = self.rejected_positions(rejected, position, rng)
        label_a, label_b, labels = self._known_and_found(
            rng, ids, known, lookalikes, normalised, cluster, (rejected_a, rejected_b)
        )
        chance_a, chance_b = self.chance_agreements(
            rng, records, ids, cluster, add_records, self.counts_.pop("chance_budget")
        )
        self.counts_["chance_negative"] = len(chance_a)
        dense_a, dense_b = self.denser_agreements(
            rng, records, ids, normalised, cluster, lookalikes, add_records, self.counts_.pop("denser_budget")
        )
        self.counts_["denser_negative"] = len(dense_a)
        # The random negatives (last in the labels) make room for them; a shortfall stays random.
        keep = len(labels) - min(len(dense_a), self.counts_["random_negative"])
        self.counts_["random_negative"] -= len(labels) - keep
        label_a, label_b, labels = label_a[:keep], label_b[:keep], labels[:keep]
        self.rejected_given_ = len(rejected_a)
        return (
            np.concatenate([label_a, chance_a, dense_a]),
            np.concatenate([label_b, chance_b, dense_b]),
            np.concatenate([labels, np.zeros(len(chance_a) + len(dense_a), dtype=int)]),
        )

    def _known_and_found(
        self,
        rng: np.random.Generator,
        ids: np.ndarray,
        known: Pairs,
        lookalikes: Pairs,
        normalised: dict[str, pd.Series],
        cluster: dict[str, str],
        rejected: Pairs,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labels drawn from the history itself: positives, rejected, look-alike, field-agreement and
        random negatives (the last ones), and the budgets of the made-up kinds in `counts_`."""
        pair_a, pair_b = known
        n = len(ids)
        n_pos = min(len(pair_a), self.max_labels // 2)
        pick = np.sort(rng.choice(len(pair_a), size=n_pos, replace=False))
        n_neg = max(self.max_labels - n_pos, n_pos)

        def distinct(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            roots_a = [cluster.get(i, i) for i in ids[a]]
            roots_b = [cluster.get(i, i) for i in ids[b]]
            return (a != b) & np.array([x != y for x, y in zip(roots_a, roots_b, strict=True)], dtype=bool)

        def sample(a: np.ndarray, b: np.ndarray, size: int) -> Pairs:
            index = np.flatnonzero(distinct(a, b)) if len(a) else np.zeros(0, dtype=np.int64)
            if len(index) > size:
                index = np.sort(rng.choice(index, size=size, replace=False))
            return a[index], b[index]

        n_rejected = int(n_neg * REJECTED_SHARE)
        reject_a, reject_b = rejected[0][:n_rejected], rejected[1][:n_rejected]
        look_a, look_b = sample(*lookalikes, int(n_neg * LOOKALIKE_SHARE))
        agree_a: list[np.ndarray] = []
        agree_b: list[np.ndarray] = []
        per_field = int(n_neg * FIELD_AGREEMENT_SHARE) // max(len(normalised), 1)
        for values in normalised.values():
            codes, _ = pd.factorize(values.to_numpy(dtype=object))
            codes[values.to_numpy(dtype=object) == s.MISSING] = -1
            order = np.lexsort((rng.random(n), codes))
            same = (codes[order][1:] == codes[order][:-1]) & (codes[order][1:] >= 0)
            first, second = order[1:][same], order[:-1][same]
            a, b = sample(np.maximum(first, second), np.minimum(first, second), per_field)
            agree_a.append(a)
            agree_b.append(b)
        field_a, field_b = np.concatenate(agree_a), np.concatenate(agree_b)
        n_chance = int(n_neg * CHANCE_SHARE)
        n_denser = int(n_neg * DENSER_SHARE)
        n_random = max(n_neg - len(reject_a) - len(look_a) - len(field_a) - n_chance, 0)
        rand_a, rand_b = sample(
            rng.integers(0, n, size=2 * n_random), rng.integers(0, n, size=2 * n_random), n_random
        )
        self.counts_ = {
            "positive": int(n_pos),
            "rejected_negative": len(reject_a),
            "lookalike_negative": len(look_a),
            "field_agreement_negative": len(field_a),
            "random_negative": len(rand_a),
            "chance_budget": n_chance,
            "denser_budget": n_denser,
        }
        label_a = np.concatenate([pair_a[pick], reject_a, look_a, field_a, rand_a])
        label_b = np.concatenate([pair_b[pick], reject_b, look_b, field_b, rand_b])
        labels = np.concatenate([np.ones(n_pos), np.zeros(len(label_a) - n_pos)]).astype(int)
        return label_a, label_b, labels

    @staticmethod
    def rejected_positions(
        rejected: list[tuple[str, str]], position: pd.Series, rng: np.random.Generator
    ) -> Pairs:
        """Positions (later record first) of the pairs a clerk rejected, in a seeded random order."""
        if not rejected:
            return _no_pairs()
        left = position[[a for a, _ in rejected]].to_numpy()
        right = position[[b for _, b in rejected]].to_numpy()
        order = rng.permutation(len(rejected))
        return np.maximum(left, right)[order], np.minimum(left, right)[order]

    def chance_agreements(
        self,
        rng: np.random.Generator,
        records: pd.DataFrame,
        ids: np.ndarray,
        cluster: dict[str, str],
        add_records: Callable[[pd.DataFrame], int],
        size: int,
    ) -> Pairs:
        """Negatives a bigger register makes by chance: two unrelated records of which the second is given
        the first's values in one to `CHANCE_MAX_FIELDS` fields, at most a quarter of them (an amount and a
        date, a city and a name).

        A history of a few thousand records rarely shows two customers' orders with the same amount on the
        same day; a batch twenty times denser shows thousands. Without such pairs a classifier may learn
        that two such fields agreeing make a duplicate whatever the customer. Returns (real position,
        made-up position) pairs.
        """
        fields = self.fields
        if size <= 0 or not fields:
            return _no_pairs()
        n = len(records)
        a, b = rng.integers(0, n, 2 * size), rng.integers(0, n, 2 * size)
        roots = np.array([cluster.get(i, i) for i in ids], dtype=object)
        keep = np.flatnonzero((a != b) & (roots[a] != roots[b]))[:size]
        a, b = a[keep], b[keep]
        made = records.iloc[b].reset_index(drop=True)
        source = records.iloc[a].reset_index(drop=True)
        # At most a quarter of the fields, so a made-up pair stays far from a re-registration with slips.
        count = rng.integers(1, max(1, min(CHANCE_MAX_FIELDS, len(fields) // 4)) + 1, len(a))
        rank = np.argsort(np.argsort(rng.random((len(a), len(fields))), axis=1), axis=1)
        for column, field in enumerate(fields):
            copy = rank[:, column] < count
            made.loc[copy, field] = source.loc[copy, field].to_numpy()
        made[self.id_column] = [f"\x00chance-{k}" for k in range(len(a))]
        start = add_records(made)
        return a.astype(np.int64), start + np.arange(len(a), dtype=np.int64)

    def denser_agreements(
        self,
        rng: np.random.Generator,
        records: pd.DataFrame,
        ids: np.ndarray,
        normalised: dict[str, pd.Series],
        cluster: dict[str, str],
        lookalikes: Pairs,
        add_records: Callable[[pd.DataFrame], int],
        size: int,
    ) -> Pairs:
        """Negatives a denser batch makes by chance among look-alikes: two records that are not one
        registration but share much (a customer's two orders, weeks apart), of which the second is given
        the first's value in one field where they differ (its order date, its amount).

        A history of a few thousand records holds a busy customer's orders days or weeks apart; a batch
        twenty times denser holds several of them on one day, or two with one amount. A re-registration
        keeps nearly everything of the order it copies; a second order of the same customer that happens
        to share one more value still differs where orders differ. Without such pairs the classifier only
        ever sees look-alikes that differ in several order fields at once, and takes the second order of
        the day for a re-registration. Returns (real position, made-up position) pairs.
        """
        look_a, look_b = lookalikes
        fields = self.fields
        if size <= 0 or not len(look_a) or not fields:
            return _no_pairs()
        roots = np.array([cluster.get(i, i) for i in ids], dtype=object)
        keep = np.flatnonzero((look_a != look_b) & (roots[look_a] != roots[look_b]))
        keep = rng.permutation(keep)[: 2 * size]
        a, b = look_a[keep], look_b[keep]
        values = {field: normalised[field].to_numpy(dtype=object) for field in fields}
        differs = np.column_stack(
            [
                (values[f][a] != values[f][b]) & (values[f][a] != s.MISSING) & (values[f][b] != s.MISSING)
                for f in fields
            ]
        )
        count = differs.sum(axis=1)
        # One more agreement must still leave the pair apart somewhere: at least two fields differ.
        usable = np.flatnonzero(count >= 2)[:size]
        a, b, differs = a[usable], b[usable], differs[usable]
        if not len(a):
            return _no_pairs()
        pick = np.argmax(np.where(differs, rng.random(differs.shape), -1.0), axis=1)
        made = records.iloc[b].reset_index(drop=True)
        source = records.iloc[a].reset_index(drop=True)
        for column, field in enumerate(fields):
            copy = pick == column
            made.loc[copy, field] = source.loc[copy, field].to_numpy()
        made[self.id_column] = [f"\x00denser-{k}" for k in range(len(a))]
        start = add_records(made)
        return a.astype(np.int64), start + np.arange(len(a), dtype=np.int64)

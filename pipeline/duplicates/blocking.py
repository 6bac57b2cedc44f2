"""Blocking: which records a new record is compared with, and learning which keys to block on.

Every field plugin offers cheap keys (whole code, sorted digits, first token, metaphone, ...). A record is
compared with the `window` most recent earlier records that share a key value. `BlockingLearner` picks the
keys (and combinations of a weak key such as a city with another key) by a greedy set cover of the known
duplicate pairs, and backs each pair up with a second rule on other fields, so that one mistyped field does
not keep a new duplicate out of every block.

>>> BlockingRule.parse("city:value&amount:value").parts
(('city', 'value'), ('amount', 'value'))
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import schema as s
from pipeline.exceptions import TrainingDataError
from pipeline.fields import FieldType

logger = logging.getLogger(__name__)

KEY_SEPARATOR = "\x1f"
MAX_RULES = 12
WIDE_EXTRA_RULES = 6
BACKUP_WEIGHT = 0.5
MIN_RULE_GAIN = 0.001


@dataclass(frozen=True)
class BlockingRule:
    """Records share a block when all parts agree: `(("customer_name", "metaphone"), ("city", "value"))`."""

    parts: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return "&".join(f"{field}:{key}" for field, key in self.parts)

    @classmethod
    def parse(cls, name: str) -> BlockingRule:
        return cls(tuple(tuple(part.split(":", 1)) for part in name.split("&")))  # type: ignore[misc]


def join_keys(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Combines key columns; empty when any part is empty (no key, no block).

    >>> join_keys([np.array(["a", ""], dtype=object), np.array(["x", "y"], dtype=object)]).tolist()
    ['a\\x1fx', '']
    """
    if len(parts) == 1:
        return parts[0]
    joined = parts[0].astype(object)
    empty = parts[0] == s.MISSING
    for part in parts[1:]:
        joined = joined + KEY_SEPARATOR + part
        empty |= part == s.MISSING
    joined[empty] = s.MISSING
    return joined


def _key_codes(keys: np.ndarray) -> tuple[np.ndarray, int] | None:
    """A key column as codes in order of first appearance (`''`, no key, counted as a value and then coded
    -1, as `fit` codes a rule's joined keys) and the number of distinct values; None when a key holds
    `KEY_SEPARATOR`, where only the joined texts tell combined keys apart."""
    codes, uniques = pd.factorize(keys)
    uniques = np.asarray(uniques, dtype=object)
    if any(KEY_SEPARATOR in value for value in uniques if isinstance(value, str)):
        return None
    where = np.flatnonzero(uniques == s.MISSING)
    if len(where):
        codes = np.where(codes == where[0], -1, codes)
    # 32 bits while they fit (a history of millions holds 51 keys); `_rule_codes` widens them.
    small = len(uniques) < np.iinfo(np.int32).max
    return codes.astype(np.int32 if small else np.int64), len(uniques)


def _rule_codes(parts: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """What `pd.factorize(join_keys(keys))` codes a rule's records (`''` then set to -1), from its parts'
    `_key_codes`: the same numbers, without joining and hashing a text per record."""
    codes = parts[0][0].astype(np.int64)
    if len(parts) == 1:
        return codes
    combined = codes.copy()
    empty = codes < 0
    for part, size in parts[1:]:
        combined = combined * size + part
        empty |= part < 0
    combined[empty] = -1  # every record without a key shares the one empty key, as `join_keys` makes it
    joined, _ = pd.factorize(combined)
    joined = joined.astype(np.int64)
    joined[empty] = -1
    return joined


def _key_texts(
    texts: dict[tuple[str, str], np.ndarray],
    codes: dict[tuple[str, str], tuple[np.ndarray, int] | None],
    part: tuple[str, str],
) -> np.ndarray:
    """A key's texts where kept, else stand-ins from its codes that `join_keys` and `pd.factorize` cut
    the records by alike: `''` for no key, the code's digits otherwise (no separator, so no clash)."""
    if part in texts:
        return texts[part]
    key_codes = codes[part]
    assert key_codes is not None
    values = key_codes[0].astype(str).astype(object)
    values[key_codes[0] < 0] = s.MISSING
    return values


def candidate_rules(plugins: Sequence[FieldType]) -> list[BlockingRule]:
    """Every strong key alone, and every weak key combined with a strong key of another field."""
    singles = [(plugin.field, key) for plugin in plugins for key in plugin.blocking]
    strong = [(field, key.name) for field, key in singles if not key.weak]
    weak = [(field, key.name) for field, key in singles if key.weak]
    rules = [BlockingRule(((field, key),)) for field, key in strong]
    rules += [BlockingRule((w, other)) for w in weak for other in strong if other[0] != w[0]]
    return rules


class BlockingLearner:
    """Greedy set cover: keys that cover the known pairs to `recall` at the fewest comparisons.

    A rule's cost is the comparisons it makes (each record against up to `window` earlier records of its
    block); its gain the known pairs it newly covers, plus half the covered pairs it backs up with fields
    that none of their rules uses yet. It stops when both reach `recall` or no rule gains 0.1% of the
    pairs. Smoothing the cost by the record count keeps the number of rules (each a lookup per record)
    small. `fit` sets `rules_` (the chosen ones, in order), `recall_` (the share of known pairs they
    cover) and `wide_rules_` (the chosen ones plus the single keys that cover most pairs, whose candidates
    serve as hard negatives).
    """

    def __init__(self, plugins: Sequence[FieldType], *, window: int = 30, recall: float = 0.999) -> None:
        self.plugins = plugins
        self.window = window
        self.recall = recall

    def fit(
        self, normalised: dict[str, pd.Series], pair_a: np.ndarray, pair_b: np.ndarray
    ) -> BlockingLearner:
        """`normalised` = each field's normalised values in entry order; the known pairs as positions
        into them (later record first). Raises `TrainingDataError` when no key covers any pair."""
        # Each key as codes; its texts (one object per record) are kept only where the codes cannot stand
        # for them (`_key_codes` None): on a large history the texts of every key were gigabytes.
        single_keys: dict[tuple[str, str], np.ndarray] = {}
        single_codes: dict[tuple[str, str], tuple[np.ndarray, int] | None] = {}
        for plugin in self.plugins:
            for key_name, values in plugin.keys(normalised[plugin.field]).items():
                texts = values.to_numpy(dtype=object)
                single_codes[(plugin.field, key_name)] = _key_codes(texts)
                if single_codes[(plugin.field, key_name)] is None:
                    single_keys[(plugin.field, key_name)] = texts
                del texts, values
        n = len(next(iter(normalised.values())))
        coverage: list[np.ndarray] = []
        costs: list[float] = []
        rules: list[BlockingRule] = []
        seen: set[bytes] = set()
        for rule in candidate_rules(self.plugins):
            parts = [single_codes[part] for part in rule.parts]
            if all(part is not None for part in parts):
                codes = _rule_codes(parts)
            else:
                keys = join_keys([_key_texts(single_keys, single_codes, part) for part in rule.parts])
                codes, _ = pd.factorize(keys)
                codes[keys == s.MISSING] = -1
            # Two keys that cut the records the same way (a numeric code's value and its digits) are one rule.
            # Told apart by a digest of the codes: a copy per rule was gigabytes on a large history.
            partition = hashlib.sha256(np.ascontiguousarray(codes)).digest()
            if partition in seen:
                continue
            seen.add(partition)
            rules.append(rule)
            present = codes >= 0
            rank = pd.Series(codes).groupby(codes).cumcount().to_numpy()
            costs.append(float(np.minimum(rank[present], self.window).sum()))
            same = (codes[pair_a] == codes[pair_b]) & present[pair_a]
            coverage.append(same & (np.abs(rank[pair_a] - rank[pair_b]) <= self.window))
        # A known pair should also share a block under a second rule on other fields: a pair that only
        # one key (or keys of one field) put together in the history stands for new pairs that a single
        # typo keeps apart. `fields` holds, per pair, the fields of the rules that cover it so far.
        field_bit = {plugin.field: 1 << i for i, plugin in enumerate(self.plugins)}
        masks = np.array([sum(field_bit[f] for f in {f for f, _ in rule.parts}) for rule in rules])
        covered = np.zeros(len(pair_a), dtype=bool)
        backed = np.zeros(len(pair_a), dtype=bool)
        fields = np.zeros(len(pair_a), dtype=np.int64)
        chosen: list[int] = []
        target = self.recall * len(pair_a)
        while len(chosen) < MAX_RULES and (covered.sum() < target or backed.sum() < target):
            unbacked = covered & ~backed
            gains = np.array(
                [
                    (cov & ~covered).sum() + BACKUP_WEIGHT * (cov & unbacked & (fields & mask == 0)).sum()
                    for cov, mask in zip(coverage, masks, strict=True)
                ],
                dtype=float,
            )
            gains[chosen] = 0.0
            if gains.max() < MIN_RULE_GAIN * len(pair_a):
                break
            best = int(np.argmax(gains / (np.asarray(costs) + n)))
            backed |= coverage[best] & covered & (fields & masks[best] == 0)
            covered |= coverage[best]
            fields[coverage[best]] |= masks[best]
            chosen.append(best)
            logger.debug("rule %s: recall %.3f, backed %.3f", rules[best].name, covered.mean(), backed.mean())
        if not chosen:
            raise TrainingDataError(
                "training history: no blocking key puts any known duplicate pair together; "
                "check that the config's field types fit the columns"
            )
        self.recall_ = float(covered.mean())
        if self.recall_ < self.recall:
            logger.warning(
                "blocking covers %.3f of the known pairs, below the target %.3f", self.recall_, self.recall
            )
        by_recall = np.lexsort((np.asarray(costs), -np.array([cov.sum() for cov in coverage])))
        extra = [rules[i] for i in by_recall if i not in chosen and len(rules[i].parts) == 1]
        self.rules_ = [rules[i] for i in chosen]
        self.wide_rules_ = self.rules_ + extra[:WIDE_EXTRA_RULES]
        return self

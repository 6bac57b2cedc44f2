"""Calibration: the score from which a candidate becomes a link, chosen on held-out data.

The threshold maximises F1, or is the lowest whose precision meets the config's minimum, with precision
corrected for duplicates staff never merged: the labelled share of near-certain links estimates how often a
duplicate gets merged (the label frequency of positive-unlabelled learning). It is never below `link_floor`:
`MIN_THRESHOLD`, where the classifier itself rates a pair more likely two records than one, unless the
labels hold so few positives that their ratio, not the pairs, sets that boundary.

>>> best = pd.DataFrame(
...     {"candidate_id": ["R1", "R2", ""], "score": [0.97, 0.3, 0.0]}, index=["B1", "B2", "B3"]
... )
>>> result = choose_link_threshold(best, {"B1": "R1"})
>>> result.threshold >= MIN_THRESHOLD, result.figures["tp"], result.figures["fp"]
(True, 1, 0)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline import schema as s
from pipeline.metrics import choose_threshold, prf

logger = logging.getLogger(__name__)

MIN_THRESHOLD = 0.5  # never links below the classifier's own decision boundary
CONFIDENT_SCORE = 0.6  # links the model rates clearly likely; their labelled share estimates the merge rate
MIN_CONFIDENT_LINKS = 10
MIN_LABEL_FREQUENCY = 0.5
FLOOR_ODDS = 19  # negatives per positive label beyond which the floor asks a pair's evidence for no more


@dataclass(frozen=True)
class Calibration:
    """The chosen threshold, the estimated label frequency, and precision, recall, F1 (tp, fp, fn, ...)
    at the threshold (`figures`, as `metrics.prf`); `scored` is False when no held-out record had a
    candidate (the threshold is then 0.5 by default, not chosen)."""

    threshold: float
    label_frequency: float
    figures: dict[str, Any]
    scored: bool = True


def link_floor(label_counts: dict[str, int]) -> float:
    """The lowest link threshold for a classifier fitted on labels of these counts (`LabelSampler.counts_`
    after the fit): `MIN_THRESHOLD`, lowered when there are more than `FLOOR_ODDS` negatives per positive.

    A logistic regression's intercept takes in the labels' class ratio, so its 0.5 asks a pair's evidence
    for the odds of negatives to positives among the labels: 1:1 with 500 known pairs, about 6:1 with 150
    (the demo's review rounds), but 332:1 with 3 (demo_small_history: 12 of its batch's 14 true pairs
    scored 0.15 to 0.33 and were not linked, though out of fold every true pair scored above every other
    candidate). That is the label count speaking, not the pairs. Beyond `FLOOR_ODDS` negatives per positive
    the floor asks for those odds only, and the threshold chosen on held-out scores decides; below it
    (every log with 50 known pairs or more) the floor stays 0.5.

    >>> link_floor({"positive": 150, "lookalike_negative": 850})
    0.5
    >>> round(link_floor({"positive": 3, "random_negative": 997}), 3)
    0.054
    """
    positives = label_counts.get("positive", 0)
    negatives = sum(n for kind, n in label_counts.items() if kind.endswith("_negative"))
    negatives -= label_counts.get("dropped_as_unmerged_duplicates", 0)
    if positives <= 0 or negatives <= 0:
        return MIN_THRESHOLD
    # The classifier's odds that match FLOOR_ODDS once its intercept's class ratio is taken out.
    odds = positives * FLOOR_ODDS / negatives
    return MIN_THRESHOLD if odds >= 1 else odds / (1 + odds)


def choose_link_threshold(
    best: pd.DataFrame,
    truth: dict[str, str],
    clusters: dict[str, str] | None = None,
    min_precision: float | None = None,
    floor: float = MIN_THRESHOLD,
) -> Calibration:
    """`best` = each held-out record's best candidate (index = record id; `candidate_id`, "" for none, and
    `score`), as the matcher finds them; `truth` maps each held-out record that re-registers an earlier
    record to its true cluster root, `clusters` the reference records to theirs; `floor`: the lowest
    threshold (`link_floor` of the model's labels)."""
    roots = {**(clusters or {}), **truth}
    candidate = best["candidate_id"].to_numpy(dtype=object)
    score = best["score"].to_numpy(dtype=float)
    record_ids = best.index.to_numpy(dtype=object)
    correct = np.array(
        [
            bool(c) and r in truth and roots.get(c, c) == truth[r]
            for r, c in zip(record_ids, candidate, strict=True)
        ],
        dtype=bool,
    )
    order = np.argsort(-score, kind="stable")
    has_candidate = candidate[order] != s.MISSING
    # Staff merge only part of the duplicates, so some "false" positives are unmerged duplicates. The
    # share of near-certain links that are labelled estimates how often a duplicate gets merged (the
    # label frequency of positive-unlabelled learning); precision is corrected by it.
    confident = has_candidate & (score[order] >= CONFIDENT_SCORE)
    frequency = 1.0
    if confident.sum() >= MIN_CONFIDENT_LINKS:
        frequency = float(np.clip(correct[order][confident].mean(), MIN_LABEL_FREQUENCY, 1.0))
    scored = has_candidate & (score[order] > 0)
    if not scored.any():
        logger.warning("calibration: no candidate pairs in the held-out batch; threshold stays 0.5")
        figures = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": len(truth)}
        return Calibration(0.5, frequency, figures, scored=False)
    choice = choose_threshold(
        score[order][scored],
        correct[order][scored],
        min_precision=min_precision,
        placement="calibrated",
        n_positive=len(truth),
        label_frequency=frequency,
    )
    if min_precision is not None and choice.precision < min_precision:
        logger.warning(
            "calibration: no threshold reaches precision %.3f; maximising F1 instead", min_precision
        )
    threshold = choice.threshold if choice.chosen else 0.5
    figures = choice.as_dict()
    if threshold < floor:
        # A held-out period as sparse as the history leaves a wide gap between its lowest duplicate
        # and its highest look-alike; a batch twenty times denser fills it. Below the floor the model itself
        # rates a pair more likely two records than one, so no link is made there.
        flagged = score[order][scored] >= floor
        tp = int((correct[order][scored] & flagged).sum())
        figures = prf(tp, int(flagged.sum()) - tp, len(truth) - tp)
        figures["precision"] = min(figures["precision"] / frequency, 1.0)
        threshold = floor
    return Calibration(threshold, frequency, figures)

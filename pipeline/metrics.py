"""Metrics and threshold choice: the one definition every model, the evaluation and `promote` share.

A leaf module (numpy, pandas and scikit-learn only), so the models and the evaluation can both import it.

- `prf`: precision, recall and F1 from counts.
- `choose_threshold`: the cut through a score ranking with the best F1 (or the lowest reaching a wanted
  precision), built on scikit-learn's `precision_recall_curve` so ties always fall on one side.
- `link_metrics`: record-level duplicate figures against merge clusters.
- `promotion_decision`: whether a challenger's figures beat a champion's, both measured on the same data.
- `non_inferiority_decision`: whether a challenger measured on other held-out data than the champion is
  no worse than it, beyond the noise of the two measurements.

>>> prf(3, 1, 1)["f1"]
0.75
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve

Placement = Literal["lowest", "middle", "calibrated"]

PROMOTION_METRICS: tuple[str, ...] = ("test_duplicate_f1", "test_error_f1", "test_correction_f1")
PROMOTION_TOLERANCE = 0.01
# One-sided 95%: a challenger measured on other held-out data than the champion is "worse" on a task only
# when the gap exceeds this many standard errors of the difference.
NON_INFERIORITY_Z = 1.645


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1; 0 where undefined rather than NaN, so MLflow plots stay continuous."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise), 0 when there are no positives."""
    labels = np.asarray(labels)
    if len(scores) == 0 or labels.sum() == 0:
        return 0.0
    return float(average_precision_score(labels, scores))


@dataclass(frozen=True)
class ThresholdChoice:
    """A chosen threshold and the figures at it (on the data it was chosen on)."""

    threshold: float
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    chosen: bool  # False when there was nothing to choose on and `default` was returned

    def as_dict(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


def choose_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    default: float = 0.5,
    min_precision: float | None = None,
    f1_tolerance: float = 0.0,
    placement: Placement = "lowest",
    n_positive: int | None = None,
    label_frequency: float = 1.0,
    sample_weight: np.ndarray | None = None,
    anchor: float | None = None,
    smoothing: float = 0.0,
    anchor_z: float | None = None,
) -> ThresholdChoice:
    """The score threshold (flag when `score >= threshold`) with the best F1 on `(scores, labels)`.

    - `min_precision`: instead, the lowest threshold whose precision reaches it (max F1 when none does).
    - `f1_tolerance`: cuts within this much of the best F1 count as equally good; the lowest of them is
      taken, since labels are incomplete and a "false" alarm near the top may be an error staff missed.
    - `placement`: "lowest" returns the score of that cut; "middle" returns the midpoint between the best
      cut's score and the next lower score, so unseen positives scored a little lower are still found;
      "calibrated", for scores that are probabilities, the point of that gap nearest half the best F1: the
      F1-optimal threshold of a calibrated classifier (Lipton, Elkan & Naryanaswamy 2014), which a gap
      between few held-out scores only brackets.
    - `n_positive`: the number of true positives in all, when some are absent from `scores` (a duplicate
      with no candidate pair); recall is counted against it.
    - `label_frequency`: the share of true positives staff labelled; precision is divided by it (capped
      at 1), the positive-unlabelled correction.
    - `sample_weight`: how many cells each score stands for (a sampled cell counts 1 / its sampling rate);
      counts and precision are weighted.
    - `anchor`: a threshold in use (the one a retrained model's predecessor flags with), kept when its F1
      on these scores is within `f1_tolerance` of the best: cuts that good are equally good, and moving
      among them from one retraining to the next only moves the flags. Ignored with `min_precision`.
    - `smoothing`: the cuts are compared on the F1 curve averaged, at each cut, over the cuts flagging
      within this share of the positives' (weighted) count of as many cells: F1 differences from moving
      the cut by a few cells are noise, and on a flat curve the lowest cut within `f1_tolerance` of a
      noisy best jumps with it. The returned figures are those of the chosen cut itself.
    - `anchor_z`: the anchor is also kept unless the cells between it and the best cut show, by more
      than this many standard errors, that moving is better: flagging cells raises F1 only where their
      precision exceeds half the F1 (Lipton, Elkan & Naryanaswamy 2014), so a lower anchor is dropped
      only when the cells it adds are right clearly less often than half the best F1, a higher one only
      when the cells it leaves out are right clearly more often.

    >>> choose_threshold(np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0])).threshold
    0.8
    >>> scores, labels = np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0])
    >>> choose_threshold(scores, labels, placement="calibrated").threshold
    0.5
    >>> choose_threshold(scores, labels, anchor=0.5).threshold
    0.5
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    weight = np.ones(len(scores)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    positives = float(weight[labels].sum())
    total = int(round(positives)) if n_positive is None else int(n_positive)
    if len(scores) == 0 or labels.sum() == 0 or total == 0:
        return ThresholdChoice(default, 0.0, 0.0, 0.0, 0, 0, total, chosen=False)
    precision, recall, thresholds = precision_recall_curve(
        labels, scores, drop_intermediate=False, sample_weight=sample_weight
    )
    # Drop the curve's closing point (recall 0, no threshold); cut i flags every score >= thresholds[i],
    # thresholds ascending, so ties always fall on one side.
    precision = np.minimum(precision[:-1] / max(label_frequency, 1e-9), 1.0)
    tp = np.rint(recall[:-1] * positives).astype(int)
    order = np.argsort(scores, kind="stable")
    below = np.r_[0.0, np.cumsum(weight[order])]
    flagged = np.rint(below[-1] - below[np.searchsorted(scores[order], thresholds, side="left")]).astype(int)
    recall = tp / total
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(len(tp)), where=precision + recall > 0
    )
    anchored = False
    if min_precision is not None and (precision >= min_precision).any():
        cut = lowest = int(np.flatnonzero(precision >= min_precision)[0])  # the lowest reaching it
    else:
        compared = _smoothed(f1, flagged, smoothing * positives) if smoothing > 0 else f1
        cut = best = int(np.flatnonzero(compared == compared.max())[-1])  # the highest of the best cuts
        good = compared >= compared.max() - f1_tolerance - 1e-12
        lowest = int(np.flatnonzero(good)[0])
        if placement == "lowest":
            cut = lowest
        # The cut the anchor makes: it flags the scores >= anchor, as cut i flags those >= thresholds[i].
        kept = int(np.searchsorted(thresholds, anchor, side="left")) if anchor is not None else len(f1)
        if kept < len(f1) and good[kept]:
            cut, anchored = kept, True
        elif kept < len(f1) and anchor_z is not None:
            band = abs(float(flagged[kept] - flagged[best]))
            right = abs(float(tp[kept] - tp[best]))
            half = f1[best] / 2
            if band > 0 and half > 0:
                z = (right / band - half) / np.sqrt(half * (1 - half) / band)
                if (z > -anchor_z) if kept < best else (z < anchor_z):
                    cut, anchored = kept, True
    threshold = float(anchor) if anchored else float(thresholds[cut])
    if not anchored and placement in ("middle", "calibrated"):
        below = float(thresholds[lowest - 1]) if lowest > 0 else 0.0
        if placement == "middle":
            threshold = (threshold + below) / 2
        else:  # anywhere in (below, threshold] flags the same held-out scores
            threshold = float(np.clip(f1[cut] / 2, np.nextafter(below, np.inf), threshold))
    return ThresholdChoice(
        threshold=threshold,
        precision=float(precision[cut]),
        recall=float(recall[cut]),
        f1=float(f1[cut]),
        tp=int(tp[cut]),
        fp=int(flagged[cut] - tp[cut]),
        fn=int(total - tp[cut]),
        chosen=True,
    )


def _smoothed(values: np.ndarray, flagged: np.ndarray, width: float) -> np.ndarray:
    """Each cut's value averaged over the cuts flagging within `width` of as many cells (`flagged`, one
    count per cut, in either monotone order).

    >>> _smoothed(np.array([0.0, 1.0, 0.0, 1.0]), np.array([4, 3, 2, 1]), 1).round(2).tolist()
    [0.5, 0.33, 0.67, 0.5]
    """
    descending = len(flagged) > 1 and flagged[0] > flagged[-1]
    counts = flagged[::-1] if descending else flagged
    ordered = values[::-1] if descending else values
    lo = np.searchsorted(counts, counts - width, side="left")
    hi = np.searchsorted(counts, counts + width, side="right")
    total = np.r_[0.0, np.cumsum(ordered)]
    mean = (total[hi] - total[lo]) / (hi - lo)
    return mean[::-1] if descending else mean


def link_metrics(predicted: pd.DataFrame, truth: Mapping[str, str], clusters: Mapping[str, str]) -> dict:
    """Precision, recall and F1 of predicted links against the truth (the shared evaluation convention).

    `predicted` has the record ids as index and a `duplicate_of` column ("" = no link); `truth` maps each
    record that re-registers an earlier one to its true cluster root; `clusters` maps records (reference
    and batch) to their roots. A link r -> m is right when m's root is r's true root.

    >>> links = pd.DataFrame({"duplicate_of": ["A", "", "A"]}, index=["B", "C", "D"])
    >>> link_metrics(links, {"B": "A", "C": "A"}, {"A": "A", "B": "A", "C": "A"})["precision"]
    0.5
    """
    roots = {**clusters, **truth}
    tp = fp = 0
    for record_id, match in zip(predicted.index, predicted["duplicate_of"], strict=True):
        if not match:
            continue
        if record_id in truth and roots.get(match, match) == truth[record_id]:
            tp += 1
        else:
            fp += 1
    return prf(tp, fp, len(truth) - tp)


@dataclass(frozen=True)
class PromotionVerdict:
    """The outcome of comparing a challenger's figures with a champion's, and why."""

    promoted: bool
    reason: str


def promotion_decision(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    *,
    metrics: Sequence[str] = PROMOTION_METRICS,
    tolerance: float = PROMOTION_TOLERANCE,
) -> PromotionVerdict:
    """The challenger wins when there is no champion, or when its mean over `metrics` is not lower than
    the champion's and it loses no more than `tolerance` on any one of them.

    >>> promotion_decision({"a": 0.9, "b": 0.8}, {"a": 0.9, "b": 0.7}, metrics=("a", "b")).promoted
    True
    """
    if champion is None:
        return PromotionVerdict(True, "there is no champion yet")
    mean_new = sum(challenger[k] for k in metrics) / len(metrics)
    mean_old = sum(champion[k] for k in metrics) / len(metrics)
    worst = min(challenger[k] - champion[k] for k in metrics)
    if mean_new < mean_old:
        return PromotionVerdict(False, f"challenger mean F1 {mean_new:.4f} < champion {mean_old:.4f}")
    if worst < -tolerance:
        return PromotionVerdict(
            False, f"challenger loses {-worst:.4f} F1 on one task (tolerance {tolerance})"
        )
    return PromotionVerdict(
        True, f"challenger mean F1 {mean_new:.4f} >= champion {mean_old:.4f}, no task worse by > {tolerance}"
    )


def f1_standard_error(f1: float, positives: float) -> float:
    """The binomial standard error of an F1 measured on `positives` labelled positives (tp + fn), with the
    F1 kept half a label away from 0 and 1 so a perfect score on few labels is not taken as certain.

    >>> round(f1_standard_error(0.9, 100), 3)
    0.03
    """
    if positives <= 0:
        return float("inf")
    edge = 0.5 / positives
    f = min(max(f1, edge), 1.0 - edge)
    return float(np.sqrt(f * (1.0 - f) / positives))


def non_inferiority_decision(
    challenger: Mapping[str, float],
    champion: Mapping[str, float],
    *,
    metrics: Sequence[str] = PROMOTION_METRICS,
    tolerance: float = PROMOTION_TOLERANCE,
    z: float = NON_INFERIORITY_Z,
) -> PromotionVerdict:
    """For figures measured on different held-out data (each model's own held-out period): the challenger
    wins unless it is worse than the champion on some task by more than `z` standard errors of the
    difference (and at least `tolerance`). A task is judged only where both sides had labelled positives:
    `<prefix>_<task>_tp` + `_fn` for a metric named `<prefix>_<task>_f1`.

    >>> old = {"test_error_f1": 0.95, "test_error_tp": 95, "test_error_fn": 5}
    >>> non_inferiority_decision({"test_error_f1": 0.90, "test_error_tp": 27, "test_error_fn": 3},
    ...                          old, metrics=("test_error_f1",)).promoted
    True
    >>> non_inferiority_decision({"test_error_f1": 0.70, "test_error_tp": 210, "test_error_fn": 90},
    ...                          old, metrics=("test_error_f1",)).promoted
    False
    """
    judged, worst = [], None
    for key in metrics:
        stem = key.removesuffix("_f1")
        n_new = challenger.get(f"{stem}_tp", 0.0) + challenger.get(f"{stem}_fn", 0.0)
        n_old = champion.get(f"{stem}_tp", 0.0) + champion.get(f"{stem}_fn", 0.0)
        if n_new <= 0 or n_old <= 0:
            continue
        noise = np.hypot(f1_standard_error(challenger[key], n_new), f1_standard_error(champion[key], n_old))
        margin = max(tolerance, z * float(noise))
        gap = champion[key] - challenger[key]
        judged.append(key)
        if gap > margin and (worst is None or gap - margin > worst[1] - worst[2]):
            worst = (key, gap, margin)
    if not judged:
        return PromotionVerdict(False, "no task has labelled positives on both sides: the champion stays")
    if worst is not None:
        key, gap, margin = worst
        return PromotionVerdict(
            False, f"challenger is worse on {key} by {gap:.4f}, beyond the measurement noise ({margin:.4f})"
        )
    return PromotionVerdict(
        True, f"challenger no worse than the champion beyond the measurement noise on {len(judged)} task(s)"
    )

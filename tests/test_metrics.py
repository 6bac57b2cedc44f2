"""The one definition of the figures, threshold choice and the promotion rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import (
    PROMOTION_METRICS,
    average_precision,
    choose_threshold,
    f1_standard_error,
    link_metrics,
    non_inferiority_decision,
    prf,
    promotion_decision,
)


def test_prf_is_zero_not_nan_when_undefined() -> None:
    assert prf(0, 0, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}
    assert prf(3, 1, 1)["f1"] == pytest.approx(0.75)


def test_choose_threshold_max_f1_or_lowest_reaching_min_precision() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    truth = np.array([True, True, False, True, False, False])
    best = choose_threshold(scores, truth)
    assert best.threshold == pytest.approx(0.6)
    assert (best.tp, best.fp, best.fn) == (3, 1, 0)
    assert best.f1 == pytest.approx(2 * 0.75 / 1.75)
    strict = choose_threshold(scores, truth, min_precision=1.0)
    assert strict.threshold == pytest.approx(0.8)
    assert strict.recall == pytest.approx(2 / 3)


def test_choose_threshold_never_splits_tied_scores() -> None:
    scores = np.array([0.9, 0.7, 0.7, 0.2])
    truth = np.array([True, True, False, False])
    choice = choose_threshold(scores, truth)
    flagged = scores >= choice.threshold
    assert flagged[1] == flagged[2]
    assert choice.tp + choice.fp == int(flagged.sum())


def test_choose_threshold_tolerance_takes_the_lowest_near_best_cut() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    truth = np.array([True, True, False, True])
    # best F1 at 0.6 (p .75 r 1 -> .857); 0.8 gives p 1 r .667 -> .8
    assert choose_threshold(scores, truth, f1_tolerance=0.0).threshold == pytest.approx(0.6)
    scores = np.array([0.9, 0.5, 0.4, 0.3])
    truth = np.array([True, False, False, False])
    assert choose_threshold(scores, truth, f1_tolerance=0.0).threshold == pytest.approx(0.9)
    assert choose_threshold(scores, truth, f1_tolerance=0.4).threshold == pytest.approx(0.5)


def test_choose_threshold_smoothing_ignores_a_one_cut_spike() -> None:
    # 80 errors on top, a clean cell, then the spike: an error cell counting 10 right above a clean cell
    # counting 10 (F1 0.942 at that one cut, 0.88-0.90 on either side), then 10 errors among 30 clean cells.
    cells = [(1, 1)] * 80 + [(0, 1), (1, 10), (0, 10)] + [(0, 1), (1, 1)] * 10 + [(0, 1)] * 110
    truth = np.array([label for label, _ in cells], dtype=bool)
    weight = np.array([count for _, count in cells], dtype=float)
    scores = np.linspace(1, 0, len(cells), endpoint=False).round(4)
    spike = scores[81]
    raw = choose_threshold(scores, truth, f1_tolerance=0.01, sample_weight=weight)
    smooth = choose_threshold(scores, truth, f1_tolerance=0.01, sample_weight=weight, smoothing=0.1)
    assert raw.threshold == pytest.approx(spike)  # the one cut within 0.01 of its own best
    assert smooth.threshold < spike - 0.05
    # Without the spike's two cells, both rules land near where the smoothed one already was.
    keep = np.r_[0:81, 83 : len(cells)]
    args = (scores[keep], truth[keep])
    without_raw = choose_threshold(*args, f1_tolerance=0.01, sample_weight=weight[keep]).threshold
    without = choose_threshold(*args, f1_tolerance=0.01, sample_weight=weight[keep], smoothing=0.1).threshold
    assert abs(smooth.threshold - without) < 0.05 < 0.1 < abs(raw.threshold - without_raw)
    # The figures reported are the chosen cut's own, unsmoothed.
    assert (smooth.tp, smooth.fp) == (97, 19)
    # No smoothing (the default) is the raw curve.
    assert choose_threshold(scores, truth, f1_tolerance=0.01, sample_weight=weight, smoothing=0.0) == raw


def test_choose_threshold_keeps_an_anchor_only_within_the_tolerance() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    truth = np.array([True, True, False, True, False, False])
    # best F1 .857 at 0.6; the anchor 0.75 flags 0.9 and 0.8 (p 1, r 2/3: F1 .8)
    kept = choose_threshold(scores, truth, f1_tolerance=0.06, anchor=0.75)
    assert kept.threshold == 0.75
    assert (kept.tp, kept.fp, kept.fn) == (2, 0, 1)
    assert kept.f1 == pytest.approx(0.8)
    # within a tighter tolerance the anchor is clearly worse: the usual choice
    assert choose_threshold(scores, truth, f1_tolerance=0.05, anchor=0.75).threshold == pytest.approx(0.6)
    # an anchor above every score flags nothing: never kept
    assert choose_threshold(scores, truth, f1_tolerance=1.0, anchor=0.95).threshold == pytest.approx(0.1)
    # min_precision decides alone
    assert choose_threshold(scores, truth, min_precision=1.0, anchor=0.55).threshold == pytest.approx(0.8)


def test_choose_threshold_anchor_z_moves_only_on_clear_evidence() -> None:
    def cut(band: list[int], anchor: float, z: float | None) -> float:
        """100 errors scored 0.99-0.60, then `band` (1 error, 0 clean) in 0.40-0.30, then 200 clean."""
        truth = np.r_[np.ones(100), band, np.zeros(200)].astype(bool)
        scores = np.r_[
            np.linspace(0.99, 0.6, 100), np.linspace(0.4, 0.3, len(band)), np.linspace(0.2, 0, 200)
        ]
        return choose_threshold(scores, truth, f1_tolerance=0.0, anchor=anchor, anchor_z=z).threshold

    # A lower anchor adding 4 cells of which 1 is an error (precision .25 against half the best F1, .49):
    # not clearly worse (z -0.99), kept; the same share on 40 cells is clear (z -3.1): the best cut, 0.6.
    assert cut([0, 0, 0, 1], 0.3, None) == pytest.approx(0.6)
    assert cut([0, 0, 0, 1], 0.3, 1.645) == 0.3
    assert cut([0, 0, 0, 1] * 10, 0.3, 1.645) == pytest.approx(0.6)
    # A higher anchor (0.5) leaving out 2 errors among 3 cells (z 0.6): kept; 30 among 39 (z 3.3): not.
    assert cut([1, 0, 1, 0], 0.5, None) == pytest.approx(0.3 + 0.1 / 3)
    assert cut([1, 0, 1, 0], 0.5, 1.645) == 0.5
    best = cut([1, 1, 1, 0] * 10, 0.5, None)
    assert best < 0.4
    assert cut([1, 1, 1, 0] * 10, 0.5, 1.645) == pytest.approx(best)


def test_choose_threshold_middle_placement_and_missing_positives() -> None:
    scores = np.array([0.9, 0.8, 0.3, 0.2])
    truth = np.array([True, True, False, False])
    middle = choose_threshold(scores, truth, placement="middle")
    assert middle.threshold == pytest.approx((0.8 + 0.3) / 2)
    # two more true positives had no score at all: recall is counted against all four
    partial = choose_threshold(scores, truth, n_positive=4)
    assert partial.recall == pytest.approx(0.5)
    assert partial.fn == 2


def test_choose_threshold_label_frequency_raises_precision() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    truth = np.array([True, False, True, False])
    plain = choose_threshold(scores, truth, min_precision=0.9)
    corrected = choose_threshold(scores, truth, min_precision=0.9, label_frequency=0.5)
    assert plain.threshold == pytest.approx(0.9)
    assert corrected.threshold == pytest.approx(0.6)  # labelled precision 1/2 / 0.5 -> 1.0 at every cut


def test_choose_threshold_default_without_positives() -> None:
    choice = choose_threshold(np.array([0.3, 0.2]), np.array([False, False]), default=0.42)
    assert choice.threshold == 0.42
    assert not choice.chosen


def test_average_precision_zero_without_positives() -> None:
    assert average_precision(np.array([0.1, 0.2]), np.array([0, 0])) == 0.0
    assert average_precision(np.array([0.9, 0.1]), np.array([1, 0])) == pytest.approx(1.0)


def test_link_metrics_counts_right_cluster_only() -> None:
    links = pd.DataFrame({"duplicate_of": ["A", "", "X"]}, index=["B", "C", "D"])
    figures = link_metrics(links, {"B": "A", "C": "A"}, {"A": "A", "B": "A", "C": "A"})
    assert (figures["tp"], figures["fp"], figures["fn"]) == (1, 1, 1)


def _figures(dup: float, err: float, corr: float) -> dict[str, float]:
    return dict(zip(PROMOTION_METRICS, (dup, err, corr), strict=True))


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted", "why"),
    [
        (_figures(0.9, 0.8, 0.7), None, True, "no champion"),
        (_figures(0.9, 0.8, 0.7), _figures(0.9, 0.8, 0.7), True, ">="),
        (_figures(0.95, 0.85, 0.7), _figures(0.9, 0.8, 0.7), True, ">="),
        (_figures(0.89, 0.8, 0.7), _figures(0.9, 0.8, 0.7), False, "<"),
        # better on average but loses 0.05 on one task: more than the tolerance
        (_figures(1.0, 0.75, 0.8), _figures(0.9, 0.8, 0.7), False, "loses 0.0500"),
        # loses less than the tolerance on one task, better on average
        (_figures(0.995, 0.9, 0.7), _figures(1.0, 0.8, 0.7), True, ">="),
    ],
)
def test_promotion_decision_pins_the_rule(
    challenger: dict, champion: dict | None, promoted: bool, why: str
) -> None:
    verdict = promotion_decision(challenger, champion)
    assert verdict.promoted is promoted
    assert why in verdict.reason


def _counted(f1: float, positives: int) -> dict[str, float]:
    tp = round(f1 * positives)
    return {"test_error_f1": f1, "test_error_tp": tp, "test_error_fn": positives - tp}


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted", "why"),
    [
        # 0.05 lower on 30 labels against 100: within the noise of two small held-out periods
        (_counted(0.90, 30), _counted(0.95, 100), True, "no worse"),
        # 0.05 lower on 3,000 labels against 3,000: a real loss
        (_counted(0.90, 3000), _counted(0.95, 3000), False, "worse on test_error_f1"),
        # better is always fine
        (_counted(0.99, 10), _counted(0.95, 100), True, "no worse"),
        # the champion measured nothing on this task: nothing to judge, it stays
        (_counted(0.90, 30), _counted(0.0, 0), False, "champion stays"),
    ],
)
def test_non_inferiority_decision_allows_the_noise_of_two_held_out_periods(
    challenger: dict, champion: dict, promoted: bool, why: str
) -> None:
    verdict = non_inferiority_decision(challenger, champion, metrics=("test_error_f1",))
    assert verdict.promoted is promoted
    assert why in verdict.reason


def test_f1_standard_error_shrinks_with_labels_and_never_claims_certainty() -> None:
    assert f1_standard_error(0.9, 1000) < f1_standard_error(0.9, 100) < f1_standard_error(0.9, 10)
    assert f1_standard_error(1.0, 20) > 0
    assert f1_standard_error(0.5, 0) == float("inf")


def test_calibrated_placement_takes_half_the_best_f1_inside_the_gap() -> None:
    """Any threshold between the lowest positive and the highest negative scores the same; for probabilities
    the F1-optimal one is half the best F1, kept inside that gap."""
    truth = np.array([1, 1, 1, 0, 0])
    wide = choose_threshold(np.array([0.95, 0.9, 0.7, 0.2, 0.1]), truth, placement="calibrated")
    assert wide.threshold == pytest.approx(0.5) and wide.f1 == pytest.approx(1.0)
    high = choose_threshold(np.array([0.95, 0.9, 0.8, 0.6, 0.1]), truth, placement="calibrated")
    assert 0.6 < high.threshold <= 0.6 + 1e-9  # the gap (0.6, 0.8] lies above 0.5: its lowest point
    low = choose_threshold(np.array([0.45, 0.4, 0.35, 0.2, 0.1]), truth, placement="calibrated")
    assert low.threshold == pytest.approx(0.35)  # the gap (0.2, 0.35] lies below 0.5: its top

"""The duplicate model's parts, each alone on tiny literal data: blocking learner, label sampler, pair
classifier, calibration and reasons (`pipeline/duplicates/`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from pipeline.duplicates.blocking import (
    BlockingLearner,
    BlockingRule,
    _key_codes,
    _rule_codes,
    candidate_rules,
    join_keys,
)
from pipeline.duplicates.calibration import MIN_THRESHOLD, choose_link_threshold, link_floor
from pipeline.duplicates.classifier import C_GRID, PairClassifier, bounded_logistic, probabilities
from pipeline.duplicates.labels import LabelSampler
from pipeline.duplicates.reasons import ReasonWriter, importance_order
from pipeline.exceptions import TrainingDataError
from pipeline.fields import field_type


def plugins(**types: str) -> list:
    made = [field_type(kind)(name) for name, kind in types.items()]
    return made


# ---------------------------------------------------------------------- blocking


def test_blocking_rule_round_trips_through_its_name() -> None:
    rule = BlockingRule((("city", "value"), ("amount", "value")))
    assert rule.name == "city:value&amount:value"
    assert BlockingRule.parse(rule.name) == rule


def test_join_keys_is_empty_when_any_part_is_empty() -> None:
    a = np.array(["x", "", "y"], dtype=object)
    b = np.array(["1", "2", ""], dtype=object)
    assert join_keys([a, b]).tolist() == ["x\x1f1", "", ""]
    assert join_keys([a]) is a


def test_weak_keys_only_combine_with_a_strong_key_of_another_field() -> None:
    rules = candidate_rules(plugins(city="category", amount="number"))
    names = [rule.name for rule in rules]
    # City and rounded amount are weak keys: never alone, never with each other, only with a strong key.
    assert "city:value" not in names and not any("amount:rounded" in name for name in names)
    assert "city:value&amount:value" in names and "amount:value" in names
    assert all(not (len(r.parts) == 2 and r.parts[0][0] == r.parts[1][0]) for r in rules)


def test_blocking_learner_picks_the_key_that_covers_the_known_pairs() -> None:
    # Pairs (1, 0) and (3, 2) share their order number; cities are shared by everybody.
    normalised = {
        "order_number": pd.Series(["so1", "so1", "so2", "so2", "so3", "so4"], dtype=object),
        "city": pd.Series(["utrecht"] * 6, dtype=object),
    }
    learner = BlockingLearner(plugins(order_number="code", city="category"), window=5, recall=0.9)
    learner.fit(normalised, np.array([1, 3]), np.array([0, 2]))
    assert learner.recall_ == 1.0
    assert learner.rules_[0].parts[0][0] == "order_number"
    assert set(learner.rules_) <= set(learner.wide_rules_)


def test_rule_codes_are_the_codes_of_the_joined_keys() -> None:
    """A rule's records coded from its parts' codes equal the factorised joined texts (`''` where any part
    is empty, -1), numbering included; a key holding the separator falls back to the texts."""
    a = np.array(["", "x", "y", "x", "y", "x", ""], dtype=object)
    b = np.array(["1", "1", "", "2", "2", "1", "1"], dtype=object)
    for parts in ([a], [b], [a, b], [b, a]):
        keys = join_keys(parts)
        expected, _ = pd.factorize(keys)
        expected[keys == ""] = -1
        got = _rule_codes([_key_codes(part) for part in parts])
        assert got.tolist() == expected.tolist()
    assert _rule_codes([_key_codes(a), _key_codes(b)]).tolist() == [-1, 1, -1, 2, 3, 1, -1]
    assert _key_codes(np.array(["a\x1fb", "c"], dtype=object)) is None


def test_blocking_learner_fails_clearly_when_no_key_puts_a_pair_together() -> None:
    normalised = {"order_number": pd.Series(["so1", "xx9", "so2", "yy8"], dtype=object)}
    learner = BlockingLearner(plugins(order_number="code"), window=5)
    with pytest.raises(TrainingDataError, match="no blocking key"):
        learner.fit(normalised, np.array([1, 3]), np.array([0, 2]))


# ---------------------------------------------------------------------- labels


def _history(n: int = 40) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    records = pd.DataFrame(
        {
            "record_id": [f"R{i:03d}" for i in range(n)],
            "customer_name": [f"customer {i // 2}" for i in range(n)],
            "amount": [str(10 + i % 7) for i in range(n)],
        }
    )
    normalised = {field: records[field].astype(object) for field in ("customer_name", "amount")}
    return records, normalised


def test_label_sampler_keeps_positives_first_and_never_labels_a_cluster_negative() -> None:
    records, normalised = _history()
    known = (np.array([1, 3, 5]), np.array([0, 2, 4]))
    cluster = {"R001": "R000", "R000": "R000", "R003": "R002", "R002": "R002", "R005": "R004", "R004": "R004"}
    lookalikes = (np.arange(1, 40), np.arange(0, 39))
    position = pd.Series(np.arange(len(records)), index=records["record_id"].to_numpy())
    added: list[pd.DataFrame] = []

    def add(made: pd.DataFrame) -> int:
        added.append(made)
        return 1000 + 100 * (len(added) - 1)

    sampler = LabelSampler(["customer_name", "amount"], "record_id", max_labels=40)
    a, b, labels = sampler.sample(
        np.random.default_rng(0),
        records,
        known,
        lookalikes,
        normalised,
        cluster,
        [("R010", "R011")],
        position,
        add,
    )
    assert len(a) == len(b) == len(labels)
    assert labels[:3].tolist() == [1, 1, 1] and not labels[3:].any()
    assert sampler.counts_["positive"] == 3 and sampler.counts_["rejected_negative"] == 1
    assert sampler.rejected_given_ == 1
    assert (a[3], b[3]) == (11, 10)  # the clerk's rejection first among the negatives, later record first
    ids = records["record_id"].to_numpy()
    real = (a < len(records)) & (b < len(records))
    roots = [cluster.get(i, i) for i in ids]
    assert all(roots[x] != roots[y] for x, y in zip(a[real][3:], b[real][3:], strict=True))
    # Made-up records carry ids no real record has, and sit where `add_records` put them.
    assert all(made["record_id"].str.startswith("\x00").all() for made in added)
    assert (b[~real] >= 1000).all()
    assert sum(sampler.counts_[k] for k in sampler.counts_ if k != "positive") == len(labels) - 3


def test_label_sampler_is_seeded() -> None:
    records, normalised = _history()
    position = pd.Series(np.arange(len(records)), index=records["record_id"].to_numpy())
    runs = []
    for _ in range(2):
        sampler = LabelSampler(["customer_name", "amount"], "record_id", max_labels=30)
        runs.append(
            sampler.sample(
                np.random.default_rng(7),
                records,
                (np.array([1]), np.array([0])),
                (np.arange(1, 40), np.arange(0, 39)),
                normalised,
                {},
                [],
                position,
                lambda made: 500,
            )
        )
    assert all(np.array_equal(x, y) for x, y in zip(runs[0], runs[1], strict=True))


# ---------------------------------------------------------------------- classifier


def test_pair_classifier_drops_a_weight_with_the_wrong_sign() -> None:
    rng = np.random.default_rng(0)
    agree = rng.random(200)
    labels = (agree > 0.5).astype(int)
    noise = labels + rng.normal(0, 0.1, 200)  # a "distance" that rises with a match: wrong sign
    features = np.column_stack([agree, noise])
    classifier = PairClassifier([1, -1]).fit(features, labels)
    assert classifier.active_.tolist() == [True, False]
    assert classifier.weights_[1] == 0.0 and classifier.weights_[0] > 0
    p = classifier.predict_proba(np.array([[0.9, 0.0], [0.1, 0.0]]))
    assert p[0] > 0.5 > p[1]


def test_pair_classifier_needs_fit_and_matching_directions() -> None:
    with pytest.raises(NotFittedError):
        PairClassifier([1]).predict_proba(np.zeros((1, 1)))
    with pytest.raises(ValueError, match="directions"):
        PairClassifier([1]).fit(np.zeros((4, 2)), np.array([0, 1, 0, 1]))


def signed_data(seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Six correlated features and labels of a logistic model in which two of them weigh with the sign
    their directions `[1, 1, -1, -1, 1, 0]` rule out (feature 1 up, feature 3 down)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(400, 6))
    features = base + 0.6 * base[:, [0]]
    logits = features @ np.array([2.0, -1.0, -1.5, 0.8, 0.5, -0.7]) + 0.3
    labels = (rng.random(400) < 1 / (1 + np.exp(-logits))).astype(int)
    return features, labels


def test_bounded_fit_is_the_constrained_optimum_not_a_drop_and_refit() -> None:
    features, labels = signed_data()
    direction = np.array([1.0, 1.0, -1.0, -1.0, 1.0, 0.0])
    c = 1.0
    coef, intercept = bounded_logistic(features, labels, direction, c)
    # The conditions of the bounded optimum: zero gradient where a weight is off its bound; at a bound, a
    # gradient that only pushes the weight further into the ruled-out sign.
    n = len(labels)
    residual = 1 / (1 + np.exp(-(features @ coef + intercept))) - labels
    gradient = features.T @ residual / n + coef / (c * n)
    at_bound = (coef == 0) & (direction != 0)
    assert at_bound.tolist() == [False, True, False, True, False, False]
    assert np.abs(gradient[~at_bound]).max() < 1e-5 and abs(residual.mean()) < 1e-5
    assert (gradient[at_bound] * direction[at_bound] > 0).all()
    assert coef[0] > 0 and coef[2] < 0 and coef[4] > 0 and coef[5] < 0
    # Without bounds it is scikit-learn's L2 logistic regression with the same C.
    free, free_intercept = bounded_logistic(features, labels, np.zeros(6), c)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(features, labels)
    assert np.allclose(free, reference.coef_[0], atol=1e-4)
    assert abs(free_intercept - reference.intercept_[0]) < 1e-4


def test_pair_classifier_chooses_c_by_the_constrained_fit_and_fits_the_same_every_time() -> None:
    features, labels = signed_data(3)
    directions = [1, 1, -1, -1, 1, 0]
    first, second = (PairClassifier(directions, seed=5).fit(features, labels) for _ in range(2))
    assert list(first.cv_loss_) == list(C_GRID)
    # The strongest regularisation no worse than the lowest loss beyond noise: never a weaker one.
    assert first.c_ in C_GRID and first.c_ <= min(first.cv_loss_, key=first.cv_loss_.get)
    # Neighbouring Cs about half a decade apart (x3, x3.3): the choice cannot overshoot tenfold.
    assert all(b / a <= 10 / 3 + 1e-9 for a, b in zip(C_GRID, C_GRID[1:], strict=False))
    assert np.array_equal(first.weights_, second.weights_) and first.intercept_ == second.intercept_
    assert first.active_.tolist() == [True, False, True, False, True, True]
    # The folded weights score the raw features as the standardised fit does.
    scaled = (features - features.mean(axis=0)) / features.std(axis=0)
    coef, intercept = bounded_logistic(scaled, labels, np.sign(directions), first.c_)
    assert np.allclose(first.predict_proba(features), 1 / (1 + np.exp(-(scaled @ coef + intercept))))


def test_probabilities_do_not_depend_on_how_many_rows_are_scored() -> None:
    rng = np.random.default_rng(1)
    features = rng.random((1000, 6)).astype("f4")
    weights = rng.normal(size=6)
    whole = probabilities(features, weights, -0.3)
    parts = np.concatenate([probabilities(features[i : i + 7], weights, -0.3) for i in range(0, 1000, 7)])
    assert np.array_equal(whole, parts)
    assert (probabilities(features, weights, -2.3) < whole).all()  # the intercept counts


# ---------------------------------------------------------------------- calibration


def test_calibration_links_the_true_duplicates_and_not_below_one_half() -> None:
    best = pd.DataFrame(
        {"candidate_id": ["R1", "R2", "R3", "", "R9"], "score": [0.99, 0.95, 0.9, 0.0, 0.2]},
        index=["B1", "B2", "B3", "B4", "B5"],
    )
    truth = {"B1": "R1", "B2": "R2", "B3": "R3"}
    result = choose_link_threshold(best, truth)
    assert result.scored
    assert 0.2 < result.threshold <= 0.9 and result.threshold >= MIN_THRESHOLD
    assert (result.figures["tp"], result.figures["fp"], result.figures["fn"]) == (3, 0, 0)


def test_link_floor_is_one_half_unless_positives_are_fewer_than_one_label_in_twenty() -> None:
    assert link_floor({"positive": 150, "lookalike_negative": 600, "random_negative": 250}) == MIN_THRESHOLD
    assert link_floor({"positive": 50, "random_negative": 950}) == MIN_THRESHOLD  # one in twenty
    assert link_floor({"positive": 0}) == MIN_THRESHOLD  # an unlabelled model
    few = link_floor({"positive": 3, "lookalike_negative": 400, "random_negative": 597})
    fewer = link_floor({"positive": 1, "lookalike_negative": 400, "random_negative": 599})
    assert 0 < fewer < few < 0.1
    # The pairs dropped as unmerged duplicates are no longer negatives.
    dropped = {"positive": 40, "random_negative": 800, "dropped_as_unmerged_duplicates": 60}
    assert link_floor(dropped) == MIN_THRESHOLD


def test_calibration_links_below_one_half_with_the_floor_of_a_log_with_few_merges() -> None:
    # Four merges: the true pairs score 0.15 to 0.33 held out, every other candidate under 0.03.
    best = pd.DataFrame(
        {"candidate_id": ["R1", "R2", "R3", "R8", "R9"], "score": [0.33, 0.2, 0.15, 0.027, 0.02]},
        index=["B1", "B2", "B3", "B4", "B5"],
    )
    truth = {"B1": "R1", "B2": "R2", "B3": "R3"}
    assert choose_link_threshold(best, truth).figures["tp"] == 0  # 0.5: the labels' ratio decides
    floor = link_floor({"positive": 3, "lookalike_negative": 400, "random_negative": 597})
    result = choose_link_threshold(best, truth, floor=floor)
    assert floor <= result.threshold <= 0.15
    assert (result.figures["tp"], result.figures["fp"], result.figures["fn"]) == (3, 0, 0)


def test_calibration_counts_a_link_into_the_right_cluster_as_right() -> None:
    best = pd.DataFrame({"candidate_id": ["R7"], "score": [0.99]}, index=["B1"])
    result = choose_link_threshold(best, {"B1": "R1"}, clusters={"R7": "R1"})
    assert result.figures["tp"] == 1


def test_calibration_without_candidates_keeps_one_half() -> None:
    best = pd.DataFrame({"candidate_id": ["", ""], "score": [0.0, 0.0]}, index=["B1", "B2"])
    result = choose_link_threshold(best, {"B1": "R1"})
    assert not result.scored and result.threshold == 0.5 and result.figures["fn"] == 1


# ---------------------------------------------------------------------- reasons


def test_importance_order_sums_each_fields_weights() -> None:
    fields = plugins(order_number="code", amount="number")
    # Two dedupe variables of order_number, one of amount, then one term-frequency weight per field.
    order = importance_order(
        fields, ["order_number", "order_number", "amount"], np.array([0.1, -0.2, 3.0, 0.0, 0.0])
    )
    assert order == ["amount", "order_number"]


def test_reason_names_agreements_first_then_differences_then_when() -> None:
    writer = ReasonWriter(plugins(order_number="code", amount="number"), ["order_number", "amount"])
    same = writer.reason(
        {"order_number": "so1", "amount": "12.5"}, {"order_number": "so1", "amount": "12.5"}, "R1", 0.2
    )
    assert same == "same order number and amount; entered the same day as R1"
    differs = writer.reason(
        {"order_number": "so1", "amount": "12.5"}, {"order_number": "so1", "amount": "125"}, "R1", None
    )
    assert differs.startswith("same order number; amount ")
    assert differs.endswith("looks like R1")
    assert writer.reason(
        {"order_number": "so1", "amount": ""}, {"order_number": "so1", "amount": "9"}, "R2", -3
    ).endswith("entered 3 days before R2")

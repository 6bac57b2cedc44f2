"""The pair classifier: what a candidate pair's comparisons are worth, as a match probability.

A logistic regression on standardised features, its C chosen by cross-validated log loss (the one-standard-
error rule), refitted without any comparison whose weight comes out with the sign its field plugin rules
out (a distance that makes a match more likely). The scaling is folded into `weights_` and `intercept_`,
so scoring is one dot product, column by column (rounding that does not depend on the number of rows).

>>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]] * 5)
>>> y = np.array([1, 1, 0, 0] * 5)
>>> clf = PairClassifier(directions=[1, -1]).fit(X, y)
>>> (clf.predict_proba(X[:4]) > 0.5).tolist()
[True, True, False, False]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
CV_FOLDS = 4


class PairClassifier:
    """Logistic regression with sign constraints. `directions[i]` is +1 (a larger feature i makes a match
    more likely), -1 (less likely) or 0 (either); `fit` sets `weights_`, `intercept_`, `c_` and `active_`
    (the features kept)."""

    def __init__(self, directions: Sequence[int], *, seed: int = 0) -> None:
        self.directions = directions
        self.seed = seed

    def fit(self, features: np.ndarray, labels: np.ndarray) -> PairClassifier:
        mean = features.mean(axis=0)
        scale = features.std(axis=0)
        scale[scale == 0] = 1.0
        scaled = (features - mean) / scale
        direction = np.asarray(self.directions, dtype=float)
        if len(direction) != features.shape[1]:
            raise ValueError(f"{len(direction)} directions for {features.shape[1]} features")
        active = np.ones(features.shape[1], dtype=bool)
        self.c_ = self.choose_c(scaled, labels)
        while True:
            classifier = LogisticRegression(C=self.c_, max_iter=1000).fit(scaled[:, active], labels)
            coef, intercept = classifier.coef_[0], float(classifier.intercept_[0])
            full = np.zeros(features.shape[1])
            full[active] = coef
            wrong = active & (full * direction < 0)
            if not wrong.any():
                break
            active &= ~wrong
        weights = full / scale
        self.weights_ = weights
        self.intercept_ = float(intercept - (weights * mean).sum())
        self.active_ = active
        return self

    def choose_c(self, scaled: np.ndarray, labels: np.ndarray) -> float:
        """The regularisation strength chosen by cross-validated log loss (1.0 with too few labels)."""
        folds = int(min(CV_FOLDS, np.bincount(labels).min()))
        if folds < 2:
            return 1.0
        search = GridSearchCV(
            LogisticRegression(max_iter=1000),
            param_grid={"C": list(C_GRID)},
            scoring="neg_log_loss",
            cv=StratifiedKFold(folds, shuffle=True, random_state=self.seed),
            n_jobs=1,
            refit=False,
        )
        search.fit(scaled, labels)
        results = search.cv_results_
        mean, error = results["mean_test_score"], results["std_test_score"] / np.sqrt(folds)
        values = np.asarray(results["param_C"], dtype=float)
        best = int(np.argmax(mean))
        # The one-standard-error rule: the strongest regularisation within one standard error of the best.
        # Merge labels are often (nearly) separable (a log without edits gives the records as stored,
        # corrected; a rare slip level such as a day and month swap separates its few pairs): the best C
        # then only grows the weights, and the sign constraints drop features that a weak regularisation
        # lets swap sign (a model that ignores the name because the date and amount separate the labels).
        good = np.flatnonzero(mean >= mean[best] - error[best])
        return float(values[good].min())

    def predict_proba(self, features: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
        """The match probability per row; `offset` (log-odds, per row) is subtracted first."""
        if not hasattr(self, "weights_"):
            raise NotFittedError("this PairClassifier is not fitted yet; call fit() first")
        return probabilities(features, self.weights_, self.intercept_, offset)


def probabilities(
    features: np.ndarray, weights: np.ndarray, intercept: float, offset: np.ndarray | None = None
) -> np.ndarray:
    """`sigmoid(intercept + features @ weights - offset)`, summed column by column rather than as a matrix
    product, whose rounding depends on the number of rows: a pair scores the same in any chunk. A column
    weighed 0 is left out: it would add exactly 0 (features are finite; a missing comparison is 0)."""
    logits = np.full(len(features), intercept, dtype=np.float64)
    if offset is not None:
        logits -= offset
    for column, weight in zip(features.T, weights, strict=True):
        if weight != 0:
            logits += column.astype(np.float64) * weight
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))

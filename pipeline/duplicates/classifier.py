"""The pair classifier: what a candidate pair's comparisons are worth, as a match probability.

An L2-regularised logistic regression on standardised features in which each weight is held to the sign
its field plugin allows (`directions`: a distance can only make a match less likely, an agreement only
more), fitted as one bounded problem (L-BFGS-B with the analytic gradient, intercept free). A weight whose
best value has the ruled-out sign stays at 0 while the others adjust to it, in the same fit. C is chosen
by stratified cross-validated log loss of that constrained fit (the one-standard-error rule on paired
fold differences). The scaling is folded into `weights_` and `intercept_`, so scoring is one dot product,
column by column (rounding that does not depend on the number of rows).

>>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]] * 5)
>>> y = np.array([1, 1, 0, 0] * 5)
>>> clf = PairClassifier(directions=[1, -1]).fit(X, y)
>>> (clf.predict_proba(X[:4]) > 0.5).tolist()
[True, True, False, False]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import StratifiedKFold

# Half-decade steps: with the one-standard-error rule a decade grid jumps tenfold between neighbours, and on
# a history of ~90 known pairs it chose 1.0 where 0.3 was as good held out and 0.1 only just too weak
# (demo seed 11's first model then missed a re-registration, R0004133, at 0.48).
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
CV_FOLDS = 4


class PairClassifier:
    """Logistic regression with sign constraints. `directions[i]` is +1 (a larger feature i makes a match
    more likely), -1 (less likely) or 0 (either); `fit` sets `weights_`, `intercept_`, `c_`, `cv_loss_`
    (mean held-out log loss per C of `C_GRID`) and `active_` (the features not held at 0 by their sign)."""

    def __init__(self, directions: Sequence[int], *, seed: int = 0) -> None:
        self.directions = directions
        self.seed = seed

    def fit(self, features: np.ndarray, labels: np.ndarray) -> PairClassifier:
        direction = np.sign(np.asarray(self.directions, dtype=float))
        if len(direction) != features.shape[1]:
            raise ValueError(f"{len(direction)} directions for {features.shape[1]} features")
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels).astype(int)
        mean = features.mean(axis=0)
        scale = features.std(axis=0)
        scale[scale == 0] = 1.0
        scaled = (features - mean) / scale
        self.c_ = self.choose_c(scaled, labels)
        coef, intercept = bounded_logistic(scaled, labels, direction, self.c_)
        weights = coef / scale
        self.weights_ = weights
        self.intercept_ = float(intercept - (weights * mean).sum())
        self.active_ = ~((coef == 0) & (direction != 0))
        return self

    def choose_c(self, scaled: np.ndarray, labels: np.ndarray) -> float:
        """The smallest C of `C_GRID` whose stratified cross-validated log loss of the sign-constrained fit
        exceeds the lowest by at most one standard error of the fold-by-fold difference (1.0 with too few
        labels); `cv_loss_` keeps each C's mean loss."""
        folds = int(min(CV_FOLDS, np.bincount(labels, minlength=2).min()))
        if folds < 2:
            self.cv_loss_ = {}
            return 1.0
        direction = np.sign(np.asarray(self.directions, dtype=float))
        split = StratifiedKFold(folds, shuffle=True, random_state=self.seed).split(scaled, labels)
        losses = np.zeros((len(C_GRID), folds))
        for k, (train, test) in enumerate(split):
            start = None
            for j, c in enumerate(C_GRID):
                coef, intercept = bounded_logistic(scaled[train], labels[train], direction, c, start=start)
                start = (coef, intercept)
                losses[j, k] = log_loss(scaled[test] @ coef + intercept, labels[test]).mean()
        mean = losses.mean(axis=1)
        self.cv_loss_ = dict(zip(C_GRID, mean.tolist(), strict=True))
        # The one-standard-error rule, with the standard error of each C's loss minus the best C's, fold by
        # fold: every C is scored on the same folds, so a fold that is hard for all of them is no reason
        # to prefer a stronger regularisation (the spread of each C's own fold losses, used before, took
        # C = 0.1 on a ten-pair history, which then missed a one-day date slip). Merge labels are nearly
        # separable, so the lowest loss alone can take a weak regularisation that gains nothing held out.
        best = int(np.argmin(mean))
        gap = losses - losses[best]
        good = np.flatnonzero(gap.mean(axis=1) <= gap.std(axis=1) / np.sqrt(folds))
        return float(np.asarray(C_GRID)[good].min())

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """The match probability per row."""
        if not hasattr(self, "weights_"):
            raise NotFittedError("this PairClassifier is not fitted yet; call fit() first")
        return probabilities(features, self.weights_, self.intercept_)


def log_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's negative log-likelihood, `log(1 + e^z) - y z`, without overflow."""
    return np.logaddexp(0.0, logits) - labels * logits


def bounded_logistic(
    scaled: np.ndarray,
    labels: np.ndarray,
    direction: np.ndarray,
    c: float,
    *,
    start: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, float]:
    """The weights and intercept minimising `C * sum(log loss) + |w|^2 / 2` (scikit-learn's objective, here
    divided by `C n`) with `w[i] >= 0` where `direction[i] > 0`, `w[i] <= 0` where it is < 0, the intercept
    and the other weights free. Deterministic: L-BFGS-B from zero (or `start`) with the exact gradient.

    >>> X = np.array([[1.0, 1.0], [1.0, 0.8], [-1.0, -1.0], [-1.0, -0.8]])
    >>> w, b = bounded_logistic(X, np.array([1, 1, 0, 0]), np.array([1.0, -1.0]), 1.0)
    >>> bool(w[0] > 0), float(w[1])
    (True, 0.0)
    """
    n, width = scaled.shape
    y = labels.astype(np.float64)
    penalty = 1.0 / (c * n)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:width], theta[width]
        z = scaled @ w + b
        residual = (0.5 * (1.0 + np.tanh(0.5 * z)) - y) / n
        value = log_loss(z, y).sum() / n + 0.5 * penalty * (w @ w)
        gradient = np.empty(width + 1)
        gradient[:width] = scaled.T @ residual + penalty * w
        gradient[width] = residual.sum()
        return float(value), gradient

    bounds = [(0.0, None) if d > 0 else (None, 0.0) if d < 0 else (None, None) for d in direction]
    theta = np.zeros(width + 1)
    if start is not None:
        theta[:width], theta[width] = start
    result = minimize(
        objective,
        theta,
        jac=True,
        method="L-BFGS-B",
        bounds=[*bounds, (None, None)],
        options={"maxiter": 5000, "ftol": 1e-12, "gtol": 1e-8},
    )
    return result.x[:width].copy(), float(result.x[width])


def probabilities(features: np.ndarray, weights: np.ndarray, intercept: float) -> np.ndarray:
    """`sigmoid(intercept + features @ weights)`, summed column by column rather than as a matrix
    product, whose rounding depends on the number of rows: a pair scores the same in any chunk. A column
    weighed 0 is left out: it would add exactly 0 (features are finite; a missing comparison is 0)."""
    logits = np.full(len(features), intercept, dtype=np.float64)
    for column, weight in zip(features.T, weights, strict=True):
        if weight != 0:
            logits += column.astype(np.float64) * weight
    return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))

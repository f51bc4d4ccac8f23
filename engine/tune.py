"""Let history propose the scoring model: points per rule from a regularised logistic model.

Each person is a row: per scoring rule, how many of their events it matched (capped at
the rule's ``cap``), plus candidate rules the history suggests (a campaign source, a
landing page) as 0/1 columns; the label is "won". An L2-regularised logistic regression
(Newton's method, intercept not penalised) gives each column a weight in log-odds; the
weights become points on one scale, so the score the engine adds up orders people as
the model does, and the threshold is the score the target volume reaches
(:func:`volume_threshold`). The strength of regularisation is chosen by
5-fold cross-validated AUC; the folds are fixed by a hash of each person's One-ID, so a
run is repeatable. The baseline is computed on the same folds: each person's campaign
source and landing page target-encoded (the won rate of that value in the training
folds, smoothed towards the overall rate) and combined by the same logistic regression.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from engine.backtest import auc

FOLDS = 5
L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
SMOOTHING = 20.0  # target encoding: a value's rate counts as this many people at the mean
Matrix = npt.NDArray[np.float64]


def fit_logistic(x: Matrix, y: npt.NDArray[np.bool_], l2: float, steps: int = 50) -> Matrix:
    """Weights of an L2-regularised logistic regression; the last one is the intercept."""
    n, k = x.shape
    design = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(k + 1)
    penalty = np.full(k + 1, l2)
    penalty[-1] = 0.0  # the intercept is free
    target = y.astype(float)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(design @ w, -30, 30)))
        gradient = design.T @ (p - target) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def fold_of(one_ids: Sequence[str], folds: int = FOLDS) -> npt.NDArray[np.int64]:
    """Each person's fold, from a hash of the One-ID: the same split every run."""
    return np.array(
        [int(hashlib.blake2b(o.encode(), digest_size=4).hexdigest(), 16) % folds for o in one_ids]
    )


def cross_validated_auc(
    x: Matrix, y: npt.NDArray[np.bool_], fold: npt.NDArray[np.int64], l2: float
) -> float | None:
    """AUC of out-of-fold predictions (each fold scored by a model fitted without it)."""
    scores = np.zeros(len(y))
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        w = fit_logistic(x[train], y[train], l2)
        scores[test] = x[test] @ w[:-1]
    return auc(scores.tolist(), y.tolist())


def target_encoded(
    columns: Sequence[Sequence[str]], y: npt.NDArray[np.bool_], train: npt.NDArray[np.bool_]
) -> Matrix:
    """Each column's values replaced by their smoothed won rate in the ``train`` rows."""
    prior = float(y[train].mean()) if train.any() else 0.0
    out = np.zeros((len(y), len(columns)))
    for j, values in enumerate(columns):
        won: dict[str, float] = defaultdict(float)
        seen: dict[str, float] = defaultdict(float)
        for value, label, used in zip(values, y, train, strict=True):
            if used:
                seen[value] += 1
                won[value] += float(label)
        for i, value in enumerate(values):
            out[i, j] = (won[value] + SMOOTHING * prior) / (seen[value] + SMOOTHING)
    return out


def baseline_auc(
    columns: Sequence[Sequence[str]], y: npt.NDArray[np.bool_], fold: npt.NDArray[np.int64]
) -> float | None:
    """Cross-validated AUC of target-encoded ``columns`` combined by logistic regression."""
    scores = np.zeros(len(y))
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        encoded = target_encoded(columns, y, train)
        w = fit_logistic(encoded[train], y[train], 1.0)
        scores[test] = encoded[test] @ w[:-1]
    return auc(scores.tolist(), y.tolist())


def volume_threshold(scores: Matrix, selected: int) -> float:
    """A threshold that about ``selected`` people reach, halfway below their score.

    People share scores (the same source and page give the same points), so the volume
    moves in steps: the step closest to ``selected`` is taken (the smaller on a tie).
    The threshold sits halfway between that score and the next lower one (0 at least),
    so a score that decayed by a hair on its way still reaches it. 1.0 when nobody
    scores above zero.
    """
    values = np.unique(scores[scores > 0])[::-1]  # distinct positive scores, best first
    if not len(values):
        return 1.0
    reach = [int((scores >= v).sum()) for v in values]
    best = min(range(len(values)), key=lambda n: (abs(reach[n] - selected), n))
    below = float(values[best + 1]) if best + 1 < len(values) else 0.0
    return (float(values[best]) + below) / 2

"""The backtest's and tune's figures against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from engine.backtest import (
    PersonResult,
    auc,
    compare,
    gini,
    model_figures,
    precision_recall,
    sdr_load,
    weeks_spanned,
)
from engine.tune import (
    SMOOTHING,
    cross_validated_auc,
    fit_logistic,
    fold_of,
    target_encoded,
    volume_threshold,
)

H = 3_600_000  # an hour in ms


def test_auc_counts_pairs_won_above_not_won_and_ties_as_half() -> None:
    # Pairs (won, not won): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4): 3 of 4.
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    # (1 vs 1) is a tie: 0.5; (2 vs 1): 1. Two pairs: 0.75.
    assert auc([1, 1, 2], [True, False, True]) == 0.75
    assert auc([5, 5, 5, 5], [True, False, True, False]) == 0.5
    assert auc([1, 2], [True, True]) is None  # one class only: undefined


def test_gini_is_zero_when_even_and_grows_with_concentration() -> None:
    assert gini([3, 3, 3]) == 0.0
    # Sorted 0, 0, 0, 4: 2 * (4 * 4) / (4 * 4) - (4 + 1) / 4 = 0.75.
    assert gini([4, 0, 0, 0]) == pytest.approx(0.75)
    # Sorted 0, 1, 1: 2 * (2 + 3) / (3 * 2) - 4 / 3 = 1/3.
    assert gini([1, 0, 1]) == pytest.approx(1 / 3)
    assert gini([]) is None and gini([0, 0]) is None


def test_precision_and_recall_of_promotion_against_won() -> None:
    assert precision_recall({"a", "b", "c", "d"}, {"a", "e"}) == (0.25, 0.5)
    assert precision_recall(set(), {"a"}) == (None, 0.0)


def test_model_figures_by_hand() -> None:
    t0 = 1_700_000_000_000
    people = [
        PersonResult("a", 120, 40, t0 + 2 * H, t0, "won"),  # promoted 2 h after first touch
        PersonResult("b", 130, 30, t0 + 6 * H, t0, "lost"),  # promoted after 6 h
        PersonResult("c", 20, 50, None, t0 + 24 * H, "won"),
        PersonResult("d", 5, 10, None, t0 + 48 * H, ""),
    ]
    weeks = weeks_spanned(people)
    assert weeks == pytest.approx(2 / 7)  # first touches span 48 h
    f = model_figures(people, weeks)
    assert (f.people, f.won, f.promoted) == (4, 2, 2)
    assert (f.precision, f.recall) == (0.5, 0.5)
    # Behaviour: won a=120, c=20; not won b=130, d=5. a>d, c>d: 2 of 4 pairs.
    assert f.auc_behavior_score == 0.5
    # Fit: won 40, 50; not won 30, 10: every pair: 1.0.
    assert f.auc_fit == 1.0
    assert f.mqls_per_week == pytest.approx(2 / (2 / 7))
    assert f.hours_to_mql_median == pytest.approx(4.0)  # median of 2 and 6


def test_sdr_load_counts_each_decision_once_and_sdrs_given_nothing() -> None:
    decisions = [
        {"decision_id": "1", "queue": "inbound", "sdr": "ana"},
        {"decision_id": "1", "queue": "inbound", "sdr": "ana"},  # re-emitted after a crash
        {"decision_id": "2", "queue": "inbound", "sdr": "bruno"},
        {"decision_id": "3", "queue": "inbound", "sdr": ""},  # withheld: nobody
    ]
    load = sdr_load(decisions, {"inbound": ["ana", "bruno", "chen"]})
    assert load["inbound"]["leads"] == {"ana": 1, "bruno": 1, "chen": 0}
    assert load["inbound"]["gini"] == pytest.approx(1 / 3, abs=1e-4)


def test_compare_two_models_promotions() -> None:
    assert compare(["a", "b"], ["b", "c"]) == {
        "both": 1,
        "only_first": ["a"],
        "only_second": ["c"],
    }


def test_logistic_fit_is_the_regularised_optimum() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3))
    y = (x @ np.array([1.5, -2.0, 0.0]) + rng.normal(size=400)) > 0
    l2 = 2.0
    w = fit_logistic(x, y, l2)
    design = np.hstack([x, np.ones((400, 1))])
    p = 1 / (1 + np.exp(-(design @ w)))
    penalty = np.array([l2, l2, l2, 0.0])
    # The gradient of the penalised log-loss vanishes at the optimum.
    assert np.abs(design.T @ (p - y) + penalty * w).max() < 1e-6
    assert w[0] > 1 and w[1] < -1 and abs(w[2]) < 0.3  # the signs the data were made with
    folds = fold_of([f"p{i}" for i in range(400)])
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}
    cv = cross_validated_auc(x, y, folds, l2)
    assert cv is not None and cv > 0.85


def test_target_encoding_is_the_smoothed_won_rate_of_the_training_rows() -> None:
    y = np.array([True, False, True, True, False])
    train = np.array([True, True, True, True, False])
    encoded = target_encoded([["a", "a", "b", "b", "a"]], y, train)
    prior = 3 / 4  # the training rows' won rate
    # a: 1 won of 2 in training; b: 2 of 2; the fifth row (not training) is still encoded.
    assert encoded[0, 0] == pytest.approx((1 + SMOOTHING * prior) / (2 + SMOOTHING))
    assert encoded[2, 0] == pytest.approx((2 + SMOOTHING * prior) / (2 + SMOOTHING))
    assert encoded[4, 0] == encoded[0, 0]


def test_the_threshold_is_reached_by_about_the_target_volume() -> None:
    scores = np.array([4.0, 2.0, 2.0, 1.0, -1.0])
    # 2 reach 2.0 with 4.0 (3 people); 1 reaches 4.0: the closest to 2 is 1 (the smaller tie).
    assert volume_threshold(scores, 2) == 3.0  # halfway between 4 and 2
    assert volume_threshold(scores, 3) == 1.5  # 3 reach 2.0: halfway to 1.0
    assert volume_threshold(scores, 9) == 0.5  # all 4 positive: halfway to 0
    assert volume_threshold(np.array([-1.0, 0.0]), 1) == 1.0  # nobody above zero

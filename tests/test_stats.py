"""Bootstrap intervals and paired tests over queries, checked against hand-computed / enumerated answers."""

import itertools
from math import comb

import numpy as np
import pandas as pd
import pytest

from fashlib import metrics, stats


def test_scores_from_matches_hand_example():
    # query 0: R=2, results [hit, miss, hit] -> AP@R = (1/2)(1/1) = 0.5; hit@1 = 1
    # query 1: R=1, results [miss, hit, miss] -> AP@R = 0; hit@1 = 0, hit@2 = 1
    # query 2: R=0 -> AP@R NaN, hits 0
    matches = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], bool)
    s = stats.scores_from_matches(matches, np.array([2, 1, 0]), ks=(1, 2))
    assert s["recall@1"].tolist() == [1, 0, 0]
    assert s["recall@2"].tolist() == [1, 1, 0]
    assert s["ap@r"].iloc[:2].tolist() == [0.5, 0.0] and np.isnan(s["ap@r"].iloc[2])
    with pytest.raises(ValueError, match="shorter than the largest R"):
        stats.scores_from_matches(matches[:, :1], np.array([2, 1, 0]))


def test_per_query_scores_mean_equals_metrics():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32)
    ql, gl = rng.integers(0, 5, 40), rng.integers(0, 5, 60)
    s = stats.per_query_scores(q, ql, g, gl, ks=(1, 5))
    recall = metrics.recall_at_k(q, ql, g, gl, ks=(1, 5))
    assert s["recall@1"].mean() == pytest.approx(recall[1])
    assert s["recall@5"].mean() == pytest.approx(recall[5])
    assert s["ap@r"].mean() == pytest.approx(metrics.map_at_r(q, ql, g, gl))


def test_bootstrap_ci_matches_binomial_by_hand():
    # values [0,0,0,1]: a resample's mean is B/4 with B ~ Binomial(4, 1/4):
    # P(B<=2) = 0.949 < 0.975 <= P(B<=3) = 0.996 and P(B=0) = 0.316 >= 0.025 -> 95% CI = [0, 0.75]
    cdf = np.cumsum([comb(4, b) * 0.25**b * 0.75 ** (4 - b) for b in range(5)])
    assert cdf[2] < 0.975 <= cdf[3] and cdf[0] >= 0.025
    ci = stats.bootstrap_ci([0, 0, 0, 1], n_boot=20_000, seed=1)
    assert ci == (0.25, 0.0, 0.75)


def test_bootstrap_distribution_matches_enumeration():
    values = np.array([0.0, 0.2, 0.5, 1.0, 1.0])
    exact = np.array([values[list(idx)].mean() for idx in itertools.product(range(5), repeat=5)])
    boot = stats.bootstrap_means(values, n_boot=50_000, seed=3)
    grid = np.linspace(0, 1, 21)
    gap = np.abs((exact[:, None] <= grid).mean(0) - (boot[:, None] <= grid).mean(0)).max()
    assert gap < 0.01
    assert boot.mean() == pytest.approx(values.mean(), abs=0.005)


def test_bootstrap_is_seeded_and_ignores_nan():
    x = np.r_[np.random.default_rng(0).random(50), np.nan]
    assert stats.bootstrap_ci(x, seed=5) == stats.bootstrap_ci(x, seed=5)
    assert stats.bootstrap_ci(x, seed=5).value == pytest.approx(np.nanmean(x))
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ci(x, confidence=1.5)
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_ci([])


def test_sign_flip_exact_hand_example():
    # A finds 4 queries B misses, one tie: |sum| >= 4 only when all four signs agree -> 2 / 16
    assert stats.sign_flip_pvalue([1, 1, 1, 1, 0]) == pytest.approx(0.125)
    # d = [1, -1]: every assignment has |sum| in {0, 2} >= 0 -> p = 1
    assert stats.sign_flip_pvalue([1, -1]) == 1.0
    assert stats.sign_flip_pvalue([0, 0]) == 1.0
    # d = [3, 1, 1]: |sum| = 5 only for (+,+,+) and (-,-,-) -> 2/8
    assert stats.sign_flip_pvalue([3, 1, 1]) == pytest.approx(0.25)


def test_sign_flip_monte_carlo_agrees_with_exact():
    d = np.random.default_rng(2).normal(0.3, 1, size=14)
    exact = stats.sign_flip_pvalue(d)
    mc = stats.sign_flip_pvalue(d, n_perm=40_000, seed=0, exact_limit=0)
    assert mc == pytest.approx(exact, abs=0.01)


def test_paired_comparison():
    a = np.array([1, 1, 1, 1, 0, 1.0])
    b = np.array([0, 0, 0, 0, 0, 1.0])
    res = stats.paired_comparison(a, b, n_boot=20_000, seed=0)
    assert res.diff == pytest.approx(4 / 6)
    assert res.p_value == pytest.approx(0.125)
    # paired bootstrap of d = [1,1,1,1,0,0]: mean = B/6, B ~ Binomial(6, 2/3)
    cdf = np.cumsum([comb(6, k) * (2 / 3) ** k * (1 / 3) ** (6 - k) for k in range(7)])
    low = np.argmax(cdf >= 0.025) / 6
    high = np.argmax(cdf >= 0.975) / 6
    assert (res.low, res.high) == (pytest.approx(low), pytest.approx(high))
    with pytest.raises(ValueError, match="same queries"):
        stats.paired_comparison(a, b[:3])


def test_tables():
    a = pd.DataFrame({"recall@1": [1, 0, 1, 1.0], "ap@r": [0.5, 0.0, 1.0, np.nan]})
    b = pd.DataFrame({"recall@1": [0, 0, 1, 1.0], "ap@r": [0.5, 0.0, 0.5, 0.2]})
    table = stats.score_intervals(a, n_boot=2000)
    assert list(table.columns) == ["value", "low", "high"]
    assert table.loc["recall@1", "value"] == 0.75 and table.loc["ap@r", "value"] == pytest.approx(0.5)
    cmp = stats.compare_scores(a, b, n_boot=2000)
    assert cmp.loc["recall@1", "diff"] == 0.25 and cmp.loc["recall@1", "p_value"] == 1.0
    assert cmp.loc["ap@r", "diff"] == pytest.approx(0.5 / 3)  # the NaN query is dropped from both

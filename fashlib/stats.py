"""How sure is a retrieval number: per-query scores, bootstrap intervals and paired tests over queries.

Recall@K and mAP@R are means over queries, so their uncertainty is that of a mean over the query set:
resampling queries with replacement (the percentile bootstrap, Efron & Tibshirani 1993) gives an interval
for one system, and resampling the SAME queries for two systems (a paired bootstrap) gives an interval for
their difference. The p-value of a difference comes from the paired sign-flip permutation test (exact
enumeration up to 16 non-zero differences, Monte Carlo beyond), as recommended for IR comparisons by
Smucker, Allan & Carterette (CIKM 2007). "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020)
is the reason: gaps of one or two points between losses are often within this noise.

Per-query scores are computed here from ranked lists (the one search of `retrieval.Retrieval`, or any
re-ranked index array), so they follow metrics' tie rules; their mean equals `metrics.recall_at_k` /
`metrics.map_at_r`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

__all__ = [
    "relevant_counts",
    "scores_from_matches",
    "scores_from_ranking",
    "per_query_scores",
    "bootstrap_means",
    "bootstrap_ci",
    "Interval",
    "PairedComparison",
    "sign_flip_pvalue",
    "paired_comparison",
    "score_intervals",
    "compare_scores",
]

KS: tuple[int, ...] = (1, 5, 10, 20, 50)


# ------------------------------------------------------------------------------------------ per-query scores
def relevant_counts(query_labels: Any, gallery_labels: Any) -> np.ndarray:
    """R per query: the number of gallery items sharing its label, (Q,) int64."""
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    uniques, counts = np.unique(g, return_counts=True)
    pos = np.clip(np.searchsorted(uniques, q), 0, len(uniques) - 1)
    return np.where(uniques[pos] == q, counts[pos], 0).astype(np.int64)


def scores_from_matches(matches: np.ndarray, r: np.ndarray, ks: Sequence[int] = KS) -> pd.DataFrame:
    """Per-query hit@K (0/1) and AP@R from ranked label matches.

    matches: (Q, n) bool, True where the rank-j result shares the query's label (rank 1 first);
    r: (Q,) relevant counts. Columns `recall@k` (float 0/1) for every k <= n, and `ap@r` (NaN where R = 0,
    as metrics.map_at_r leaves those queries out). AP@R = (1/R) sum_{i<=R} P@i rel(i) (Musgrave et al. 2020);
    raises ValueError when n < max R (the ranked lists are too short to score AP@R).
    """
    matches = np.asarray(matches, dtype=bool)
    r = np.asarray(r, dtype=np.int64)
    if matches.ndim != 2 or len(matches) != len(r):
        raise ValueError(f"matches must be (Q, n) with Q = len(r) = {len(r)}, got shape {matches.shape}")
    n = matches.shape[1]
    if len(r) and r.max() > n:
        raise ValueError(
            f"ranked lists of length {n} are shorter than the largest R ({r.max()}); "
            "rank deeper (depth >= max R) to score AP@R"
        )
    found = np.logical_or.accumulate(matches, axis=1)
    out = {f"recall@{k}": found[:, k - 1].astype(float) for k in sorted(set(ks)) if 1 <= k <= n}
    rel = matches & (np.arange(n)[None, :] < r[:, None])
    precision = np.cumsum(rel, axis=1) / np.arange(1, n + 1)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["ap@r"] = np.where(r > 0, (precision * rel).sum(1) / r, np.nan)
    return pd.DataFrame(out)


def scores_from_ranking(
    indices: np.ndarray, query_labels: Any, gallery_labels: Any, ks: Sequence[int] = KS
) -> pd.DataFrame:
    """Per-query scores of ranked gallery indices (Q, n) int (e.g. after re-ranking); -1 means no result."""
    indices = np.asarray(indices)
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    matches = (indices >= 0) & (g[np.maximum(indices, 0)] == q[:, None])
    return scores_from_matches(matches, relevant_counts(q, g), ks)


def per_query_scores(
    query_emb: Any, query_labels: Any, gallery_emb: Any, gallery_labels: Any, ks: Sequence[int] = KS
) -> pd.DataFrame:
    """Per-query hit@K and AP@R of query embeddings against gallery embeddings (inner-product search).

    One row per query; the column means equal metrics.recall_at_k and metrics.map_at_r. One search
    (retrieval.Retrieval.from_arrays, read by Retrieval.per_query).
    """
    from .retrieval import Retrieval  # retrieval imports this module

    found = Retrieval.from_arrays(query_emb, query_labels, gallery_emb, gallery_labels, max_k=max(max(ks), 1))
    return found.per_query(ks)


# ------------------------------------------------------------------------------------------ bootstrap
class Interval(NamedTuple):
    """A point estimate (the mean over queries) with its percentile-bootstrap interval."""

    value: float
    low: float
    high: float


class PairedComparison(NamedTuple):
    """mean(a) - mean(b) over the same queries, its paired-bootstrap interval and sign-flip p-value."""

    diff: float
    low: float
    high: float
    p_value: float


def _clean(values: Any, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per query), got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty: no query to resample")
    return x


def bootstrap_means(values: Any, n_boot: int = 10_000, seed: int = 0, chunk: int = 1000) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement, same size) of per-query scores, (n_boot,) float64.

    NaN scores (queries without a relevant item, for AP@R) are dropped first. Seeded (numpy
    default_rng(seed)); resamples are drawn `chunk` at a time, so memory is chunk x Q indices.
    """
    x = _clean(values)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        raise ValueError("every score is NaN: no query has a relevant gallery item")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        out[start : start + size] = x[rng.integers(0, len(x), size=(size, len(x)))].mean(axis=1)
    return out


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def bootstrap_ci(values: Any, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> Interval:
    """Mean of per-query scores and its percentile-bootstrap interval (NaN scores ignored).

    The interval ends are the (1-confidence)/2 and (1+confidence)/2 quantiles (inverted-CDF definition)
    of `bootstrap_means`. Raises ValueError for empty input or a confidence outside (0, 1).
    """
    x = _clean(values)
    means = bootstrap_means(x, n_boot, seed)
    return Interval(float(np.nanmean(x)), *_percentiles(means, confidence))


def sign_flip_pvalue(differences: Any, n_perm: int = 10_000, seed: int = 0, exact_limit: int = 16) -> float:
    """Two-sided p-value of the paired sign-flip (permutation) test that the mean difference is 0.

    Under the null each query's difference a_i - b_i is as likely to have either sign; the p-value is the
    share of sign assignments whose |mean| is >= the observed |mean|. Zero differences do not matter and
    are dropped; with at most `exact_limit` non-zero ones all 2^n assignments are enumerated (exact), else
    `n_perm` seeded random ones are drawn and (1 + hits) / (1 + n_perm) is returned (never 0).
    """
    d = _clean(differences, "differences")
    d = d[~np.isnan(d)]
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-9 * np.abs(d).sum()  # tolerance: equal sums count as "as extreme"
    if len(d) <= exact_limit:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float((np.abs(signs @ d) >= observed).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 1000):
        size = min(1000, n_perm - start)
        signs = rng.choice((1.0, -1.0), size=(size, len(d)))
        hits += int((np.abs(signs @ d) >= observed).sum())
    return float((1 + hits) / (1 + n_perm))


def paired_comparison(
    a: Any, b: Any, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> PairedComparison:
    """Compare two systems' per-query scores on the SAME queries (row i of a and b is one query).

    diff = mean(a - b); [low, high] = percentile interval of the paired bootstrap (queries resampled
    jointly); p_value = sign_flip_pvalue(a - b). Queries where either score is NaN are dropped.
    Raises ValueError when a and b differ in length.
    """
    a, b = _clean(a, "a"), _clean(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same queries: {len(a)} vs {len(b)} values")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    low, high = _percentiles(bootstrap_means(d, n_boot, seed), confidence)
    return PairedComparison(float(d.mean()), low, high, sign_flip_pvalue(d, n_boot, seed))


# ------------------------------------------------------------------------------------------ tables
def score_intervals(
    scores: pd.DataFrame, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """One row per metric column of per-query `scores`: value, low, high (percentile bootstrap)."""
    rows = {col: bootstrap_ci(scores[col].to_numpy(), confidence, n_boot, seed)._asdict() for col in scores}
    return pd.DataFrame.from_dict(rows, orient="index")


def compare_scores(
    a: pd.DataFrame, b: pd.DataFrame, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """Paired comparison a - b for every metric column both per-query tables share: diff, low, high, p_value."""
    cols = [c for c in a.columns if c in b.columns]
    rows = {c: paired_comparison(a[c].to_numpy(), b[c].to_numpy(), confidence, n_boot, seed)._asdict() for c in cols}
    return pd.DataFrame.from_dict(rows, orient="index")

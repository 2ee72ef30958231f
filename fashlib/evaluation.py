"""Evaluation of embeddings on a table's query/gallery protocol: one search, read many ways.

`retrieve(table, embeddings)` runs ONE exact search of the table's queries against its gallery, deep enough
for every reading, and returns a `Retrieval` (fashlib.retrieval, re-exported here; `Retrieval.from_arrays`
builds one from query/gallery arrays without a table): Recall@K, mAP@R,
the Recall@K curve, per-query first-hit ranks, the hardest queries and per-query scores are all read from
it (as open-metric-learning's retrieval results are computed once, then read). `evaluate`, `recall_curve`
and `first_hit_ranks` are thin users of it; `pick_best` picks the best row of a results table.

Embeddings are (N, D) float arrays in table order (one row per table row); the query and gallery rows come
from fashlib.data.protocols.eval_rows. Metrics are fractions in [0, 1] (fashlib.metrics: DeepFashion
top-k accuracy for Recall@K, Musgrave et al. 2020 for mAP@R). The ranking is metrics' exact search with
its tie rule (score, then gallery index), so every number equals that of metrics.recall_at_k,
metrics.map_at_r and stats.per_query_scores on the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .data.protocols import check_embedding_rows, eval_rows
from .retrieval import KS, Retrieval, hardest_queries, kept_ks

__all__ = ["KS", "Retrieval", "retrieve", "evaluate", "recall_curve", "first_hit_ranks", "hardest_queries", "pick_best"]


def retrieve(table: pd.DataFrame, embeddings: np.ndarray, max_k: int = 50) -> Retrieval:
    """One search of the table's queries against its gallery (eval_rows), labels from its `label` column.

    table: a contract table (columns `split`, `label`) with N rows; embeddings: (N, D) float32/float64 numpy
    array, one row per table row in table order (L2-normalised rows for cosine similarity); max_k: the default
    depth (int >= 1) of the curve and the ranks. query_rows / gallery_rows of the result are table row
    positions (int64). ValueError when the table has no query or no gallery row (eval_rows) and as
    Retrieval.from_arrays raises it (non-finite embeddings, missing labels, a max_k that is not an integer),
    and when `embeddings` is not (N, D) for the table's N rows."""
    check_embedding_rows(table, embeddings)
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy()
    return Retrieval.from_arrays(
        embeddings[query], labels[query], embeddings[gallery], labels[gallery], max_k, query, gallery
    )


def evaluate(table: pd.DataFrame, embeddings: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K (DeepFashion top-k accuracy) and mAP@R of the table's queries against its gallery.

    table: contract table of N rows; embeddings: (N, D) float array in table order; ks: cut-offs (int >= 1).
    Returns {"recall@K": fraction in [0, 1], ..., "map@r": fraction in [0, 1]} (Python floats); K larger than
    the gallery are left out with a UserWarning; ValueError for a K that is not an integer >= 1, when no K is
    left, and as `retrieve` raises it."""
    ks = kept_ks(ks, len(eval_rows(table)[1]), stacklevel=2)
    return retrieve(table, embeddings, max_k=max(ks)).metrics(ks)


def recall_curve(table: pd.DataFrame, embeddings: np.ndarray, max_k: int = 50) -> dict[int, float]:
    """Recall@K for every K from 1 to min(max_k, gallery size): {K (int): fraction in [0, 1]}.

    table: contract table of N rows; embeddings: (N, D) float array in table order. Errors as `retrieve`."""
    return retrieve(table, embeddings, max_k=max_k).curve()


def first_hit_ranks(table: pd.DataFrame, embeddings: np.ndarray, max_k: int = 50) -> pd.DataFrame:
    """Per query: the rank (1-based) of its first correct gallery result within the top max_k, 0 if none.

    table: contract table of N rows; embeddings: (N, D) float array in table order. Returns a DataFrame, one
    row per query in table order, with `row` (int64, position in the table), `label` (str) and `rank` (int64,
    1..min(max_k, G), 0 for none); the largest ranks and the zeros are the hardest failures
    (Retrieval.first_hit_ranks). Errors as `retrieve`.
    """
    return retrieve(table, embeddings, max_k=max_k).first_hit_ranks()


def pick_best(results: pd.DataFrame, by: Sequence[str] = ("recall@1", "map@r")) -> Any:
    """Index label of the best row of `results`: highest by[0], ties broken by by[1], ... (rows with NaN lose;
    equal rows: the first in table order). ValueError for an empty table; KeyError for a column of `by` that
    `results` lacks."""
    if len(results) == 0:
        raise ValueError("pick_best needs at least one row")
    ranked = results.sort_values(list(by), ascending=False, na_position="last", kind="mergesort")
    return ranked.index[0]

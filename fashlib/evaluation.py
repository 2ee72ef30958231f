"""Evaluation of embeddings on a table's query/gallery protocol: Recall@K and mAP@R, the Recall@K curve,
per-query first-hit ranks and the hardest queries, and the best row of a results table.

Embeddings are (N, D) float arrays in table order (one row per table row); the query and gallery rows come
from fashlib.data.protocols.eval_rows. Metrics are fractions in [0, 1] (fashlib.metrics: DeepFashion
top-k accuracy for Recall@K, Musgrave et al. 2020 for mAP@R).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import metrics
from .data.protocols import eval_rows

KS: tuple[int, ...] = (1, 5, 10, 20, 50)


def evaluate(table: pd.DataFrame, embeddings: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K (DeepFashion top-k accuracy) and mAP@R of the table's queries against its gallery."""
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy()
    dropped = [k for k in ks if k > len(gallery)]
    if dropped:
        warnings.warn(f"Recall@K for K = {dropped} left out: the gallery has only {len(gallery)} images", stacklevel=2)
    ks = [k for k in ks if k <= len(gallery)]
    recall = metrics.recall_at_k(embeddings[query], labels[query], embeddings[gallery], labels[gallery], ks=ks)
    result = {f"recall@{k}": value for k, value in recall.items()}
    result["map@r"] = metrics.map_at_r(embeddings[query], labels[query], embeddings[gallery], labels[gallery])
    return result


def recall_curve(table: pd.DataFrame, embeddings: np.ndarray, max_k: int = 50) -> dict[int, float]:
    """Recall@K for every K from 1 to max_k (or the gallery size)."""
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy()
    ks = range(1, min(max_k, len(gallery)) + 1)
    return metrics.recall_at_k(embeddings[query], labels[query], embeddings[gallery], labels[gallery], ks=ks)


def first_hit_ranks(table: pd.DataFrame, embeddings: np.ndarray, max_k: int = 50) -> pd.DataFrame:
    """Per query: the rank (1-based) of its first correct gallery result within the top max_k, 0 if none.

    Rows: one per query, with `row` (position in the table), `label` and `rank`; the largest ranks and
    the zeros are the hardest failures.
    """
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy().astype(str)
    k = min(max_k, len(gallery))
    nb = metrics.neighbours(
        embeddings[query], embeddings[gallery], k=k, query_labels=labels[query], gallery_labels=labels[gallery]
    )
    hit = nb.matches.any(axis=1)
    rank = np.where(hit, nb.matches.argmax(axis=1) + 1, 0)
    return pd.DataFrame({"row": query, "label": labels[query], "rank": rank})


def hardest_queries(ranks: pd.DataFrame, n: int) -> pd.DataFrame:
    """The n queries whose first correct result comes last: those with none in the top K first, then by rank."""
    order = ranks.assign(missing=ranks["rank"] == 0).sort_values(
        ["missing", "rank", "row"], ascending=[False, False, True], kind="mergesort"
    )
    return order.drop(columns="missing").head(n)


def pick_best(results: pd.DataFrame, by: Sequence[str] = ("recall@1", "map@r")) -> Any:
    """Index label of the best row: highest by[0], ties broken by by[1], ... (rows with NaN lose)."""
    if len(results) == 0:
        raise ValueError("pick_best needs at least one row")
    ranked = results.sort_values(list(by), ascending=False, na_position="last", kind="mergesort")
    return ranked.index[0]

"""One exact search of queries against a gallery, read many ways: `Retrieval`.

Recall@K (DeepFashion top-k accuracy), mAP@R (Musgrave, Belongie & Lim, ECCV 2020), the Recall@K curve,
per-query first-hit ranks, the hardest queries and per-query scores are all read from ONE search
(`Retrieval.from_arrays`), as open-metric-learning's retrieval results are computed once and then read. The
search is fashlib.metrics' exact search with its tie rule (score, then gallery index) and its input checks,
so every number equals that of metrics.recall_at_k, metrics.map_at_r and stats.per_query_scores' former
separate searches on the same inputs. fashlib.evaluation builds a Retrieval from a table (`retrieve`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from . import metrics, stats

KS: tuple[int, ...] = (1, 5, 10, 20, 50)


def kept_ks(ks: Sequence[int], n_gallery: int, stacklevel: int) -> list[int]:
    """The cut-offs of `ks` that fit a gallery of n_gallery items, sorted and distinct (metrics._check_ks).

    A UserWarning names the K left out (K > gallery size); ValueError when none is left or one is not an
    integer >= 1. `stacklevel` is that of the caller to point the warning at (2: the caller of kept_ks)."""
    dropped = [k for k in ks if k > n_gallery]
    if dropped:
        warnings.warn(
            f"Recall@K for K = {dropped} left out: the gallery has only {n_gallery} images", stacklevel=stacklevel + 1
        )
    return metrics._check_ks([k for k in ks if k <= n_gallery])


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.setflags(write=False)


@dataclass(frozen=True, eq=False)
class Retrieval:
    """One exact search of Q queries against G gallery items, with everything the metrics read from it.

    Fields (read-only numpy arrays): `query_rows` (Q,) int64 and `gallery_rows` (G,) int64, positions in the
    table (0..Q-1 / 0..G-1 without a table); `query_labels` (Q,) and `gallery_labels` (G,) as given;
    `scores` (Q, depth) float32 inner products and `indices` (Q, depth) int64 gallery positions, best first,
    equal scores by gallery position (metrics' tie rule); `matches` (Q, depth) bool, True where the result
    shares the query's label; `relevant` (Q,) int64, R = the number of gallery items sharing the query's
    label. `max_k` (int) is the default depth of the ranks and the curve. depth = max(min(max_k, G), max R, 1),
    so Recall@K for every K <= min(max_k, G), AP@R for every query and the ranks are all read from it.
    Build with `evaluation.retrieve` (a table) or `Retrieval.from_arrays`; a reading deeper than `depth` is
    a ValueError.
    """

    query_rows: np.ndarray
    gallery_rows: np.ndarray
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    scores: np.ndarray
    indices: np.ndarray
    matches: np.ndarray
    relevant: np.ndarray
    max_k: int

    @classmethod
    def from_arrays(
        cls,
        query_emb: Any,
        query_labels: Any,
        gallery_emb: Any,
        gallery_labels: Any,
        max_k: int = 50,
        query_rows: np.ndarray | None = None,
        gallery_rows: np.ndarray | None = None,
    ) -> Retrieval:
        """Search query_emb (Q, D) against gallery_emb (G, D) once (numpy or torch, float; inner products,
        so pass L2-normalised rows for cosine) with labels (Q,) and (G,) (str or int, compared with ``==``).

        The search reaches depth max(min(max_k, G), max R, 1). ValueError as metrics.neighbours raises it
        (non-finite embeddings, missing or incomparable labels, empty query or gallery, dimension mismatch)
        and for a max_k that is not an integer."""
        if isinstance(max_k, (bool, np.bool_)) or not isinstance(max_k, (int, np.integer)):
            raise ValueError(f"max_k must be an integer, got {max_k!r}")
        query = metrics._as_matrix(query_emb, "query")
        gallery = metrics._as_matrix(gallery_emb, "gallery")
        q_lab, g_lab = metrics._label_pair(query_labels, gallery_labels, len(query), len(gallery))
        metrics._check_pair(query, gallery, 1)
        relevant = metrics._relevant_counts(q_lab, g_lab, exclude_self=False)
        depth = max(min(int(max_k), len(gallery)), int(relevant.max()), 1)
        nb = metrics.neighbours(query, gallery, depth, q_lab, g_lab)
        rows = (
            np.arange(len(query)) if query_rows is None else np.asarray(query_rows),
            np.arange(len(gallery)) if gallery_rows is None else np.asarray(gallery_rows),
        )
        rows = tuple(r.astype(np.int64) for r in rows)  # copies: the caller's arrays stay writable
        q_lab, g_lab = q_lab.copy(), g_lab.copy()
        _read_only(*rows, q_lab, g_lab, nb.scores, nb.indices, nb.matches, relevant)
        return cls(*rows, q_lab, g_lab, nb.scores, nb.indices, nb.matches, relevant, int(max_k))

    @property
    def depth(self) -> int:
        """How many ranked gallery items each query has (columns of scores / indices / matches)."""
        return self.indices.shape[1]

    @property
    def n_gallery(self) -> int:
        """G, the number of gallery items searched."""
        return len(self.gallery_labels)

    def _columns(self, k: int, what: str) -> np.ndarray:
        """The first k columns of `matches` (Q, k); ValueError when k < 1 or k > depth."""
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > self.n_gallery:
            raise ValueError(f"k={k} is larger than the gallery ({self.n_gallery} items)")
        if k > self.depth:
            raise ValueError(
                f"{what} needs the top {k} results but the search reached {self.depth}: build the Retrieval "
                f"with max_k >= {k} (retrieve(table, embeddings, max_k={k}))"
            )
        return self.matches[:, :k]

    @cached_property
    def _found(self) -> np.ndarray:
        """(Q, depth) bool: whether a same-label item is among the top j+1 results."""
        return np.logical_or.accumulate(self.matches, axis=1)

    def recall(self, ks: Sequence[int] = KS) -> dict[int, float]:
        """Recall@K {K: fraction of queries with a same-label item in their top K} for sorted distinct ks.

        DeepFashion top-k accuracy: every query counts (one without a relevant gallery item is a miss).
        ValueError for a K that is not an integer >= 1, larger than the gallery or deeper than the search."""
        ks = metrics._check_ks(ks)
        self._columns(max(ks), "Recall@K")
        return {k: float(self._found[:, k - 1].mean()) for k in ks}

    def map_at_r(self) -> float:
        """mAP@R (Musgrave, Belongie & Lim, ECCV 2020): mean over queries with R > 0 of
        (1/R) sum_{i<=R} P@i rel(i); 0.0 when no query has R > 0 (as metrics.map_at_r)."""
        keep = self.relevant > 0
        if not keep.any():
            return 0.0
        r = self.relevant[keep]
        width = int(r.max())  # metrics.map_at_r ranks exactly max R deep: the same array, the same sums
        rel = self.matches[keep, :width] & (np.arange(width)[None, :] < r[:, None])
        precision = np.cumsum(rel, axis=1) / np.arange(1, width + 1)[None, :]
        return float(((precision * rel).sum(1) / r).mean())

    def metrics(self, ks: Sequence[int] = KS, stacklevel: int = 2) -> dict[str, float]:
        """{"recall@K": ..., "map@r": ...}: what `evaluate` returns. K larger than the gallery are left out
        with a UserWarning (pointed `stacklevel` frames up); ValueError when no K is left."""
        ks = kept_ks(ks, self.n_gallery, stacklevel)
        result = {f"recall@{k}": value for k, value in self.recall(ks).items()}
        result["map@r"] = self.map_at_r()
        return result

    def curve(self, max_k: int | None = None) -> dict[int, float]:
        """Recall@K for every K from 1 to min(max_k, G) (max_k defaults to the Retrieval's): {K (int): fraction in
        [0, 1]}. ValueError when max_k < 1 or reaches deeper than the search; TypeError when it is no integer."""
        max_k = self.max_k if max_k is None else max_k
        return self.recall(range(1, min(max_k, self.n_gallery) + 1))

    def first_hit_ranks(self, max_k: int | None = None) -> pd.DataFrame:
        """Per query: the rank (1-based) of its first correct gallery result within the top min(max_k, G),
        0 if none (max_k defaults to the Retrieval's).

        Columns: `row` (int64, position in the table), `label` (str) and `rank` (int64); the largest ranks
        and the zeros are the hardest failures. ValueError when max_k reaches deeper than the search."""
        max_k = self.max_k if max_k is None else max_k
        top = self._columns(min(max_k, self.n_gallery), "first_hit_ranks")
        rank = np.where(top.any(axis=1), top.argmax(axis=1) + 1, 0)
        return pd.DataFrame({"row": self.query_rows, "label": self.query_labels.astype(str), "rank": rank})

    def hardest(self, n: int, max_k: int | None = None) -> pd.DataFrame:
        """The n queries whose first correct result comes last (hardest_queries of first_hit_ranks): a DataFrame
        of at most n rows with columns `row` (int64), `label` (str), `rank` (int64, 0 = none in the top K)."""
        return hardest_queries(self.first_hit_ranks(max_k), n)

    def ranked(self, rows: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k of the given queries, named by their table rows (`query_rows` values): (gallery table
        rows (n, k) int64, label matches (n, k) bool), best first. ValueError for a row that is not a query
        or a k beyond the search."""
        rows = np.asarray(rows, dtype=np.int64)
        where = {row: i for i, row in enumerate(self.query_rows.tolist())}
        missing = [row for row in rows.tolist() if row not in where]
        if missing:
            raise ValueError(f"rows {missing[:5]} are not queries of this Retrieval (query_rows); pick query rows")
        pick = np.array([where[row] for row in rows.tolist()], dtype=np.int64)
        matches = self._columns(k, "ranked")[pick]
        return self.gallery_rows[self.indices[pick, :k]], matches

    def per_query(self, ks: Sequence[int] = KS) -> pd.DataFrame:
        """Per-query hit@K (0/1 float, column `recall@K` for K <= depth used) and AP@R (`ap@r`, NaN where
        R = 0): stats.scores_from_matches on the top min(max(max ks, max R, 1), G) results, as
        stats.per_query_scores. Column means equal recall() and map_at_r()."""
        depth = min(max(max(ks), int(self.relevant.max(initial=1))), self.n_gallery)
        top = self._columns(depth, "per_query")
        return stats.scores_from_matches(top, self.relevant, [k for k in ks if k <= depth])


def hardest_queries(ranks: pd.DataFrame, n: int) -> pd.DataFrame:
    """The n queries whose first correct result comes last: those with none in the top K first, then by rank
    (largest first), ties by table row.

    ranks: first_hit_ranks' DataFrame (columns `row`, `label`, `rank`, rank 0 = no correct result in the top K).
    Returns its first min(n, Q) rows in that order, same columns and index. KeyError for a missing column."""
    order = ranks.assign(missing=ranks["rank"] == 0).sort_values(
        ["missing", "rank", "row"], ascending=[False, False, True], kind="mergesort"
    )
    return order.drop(columns="missing").head(n)

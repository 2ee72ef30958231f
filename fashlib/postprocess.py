"""Post-processing of retrieval embeddings: test-time view averaging, query expansion, database-side
augmentation, k-reciprocal re-ranking and gallery centroids.

Every step takes and returns plain float32 arrays (rows = images, L2-normalised), so steps compose:
``g = database_augmentation(g, k=2); q = query_expansion(q, g, k=2); d, i = k_reciprocal_rerank(q, g)``.
Similarities are inner products (cosine similarity for unit rows). Neighbour searches are exact and run
in query chunks, so no step holds more than `chunk` x N similarities at once (N = rows searched).

References: average query expansion (Chum et al., ICCV 2007); alpha-weighted query expansion and
database-side augmentation (Radenovic, Tolias & Chum, TPAMI 2019; Arandjelovic & Zisserman, CVPR 2012);
k-reciprocal re-ranking (Zhong, Zheng, Cao & Li, CVPR 2017); gallery centroids (Wieczorek, Rychalska &
Dabrowski, "On the Unreasonable Effectiveness of Centroids in Image Retrieval", ICONIP 2021).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

__all__ = [
    "l2_normalize",
    "average_views",
    "topk",
    "query_expansion",
    "database_augmentation",
    "k_reciprocal_rerank",
    "gallery_centroids",
    "rank",
]

CHUNK = 512


def l2_normalize(x: Any) -> np.ndarray:
    """Rows scaled to unit length as float32 (zero rows stay zero); ValueError unless 2-D."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (N, D) array, got shape {x.shape}")
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def average_views(views: Sequence[Any], weights: Sequence[float] | None = None) -> np.ndarray:
    """Test-time augmentation: the re-normalised (weighted) mean of several views' features of the same rows.

    views: arrays (N, D) of the same images, e.g. the image and its mirror (flip averaging) or several input
    sizes (multi-scale); each is L2-normalised first so every view weighs the same. Returns (N, D) float32.
    Raises ValueError for no view, or views of different shapes.
    """
    if len(views) == 0:
        raise ValueError("average_views needs at least one view")
    arrays = [l2_normalize(v) for v in views]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"views differ in shape: {[a.shape for a in arrays]}")
    w = np.ones(len(arrays)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(arrays),):
        raise ValueError(f"{len(arrays)} views but {w.size} weights")
    return l2_normalize(sum(wi * a for wi, a in zip(w, arrays)))


def topk(
    query: Any, gallery: Any, k: int, *, exclude_self: bool = False, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k gallery rows per query by inner product, in query chunks: (scores, indices), both (Q, k).

    Ties are broken by the lower gallery row. `exclude_self` drops gallery row i from query i's list (the
    queries are the gallery). Peak memory: chunk x G float32 similarities (plus as many int64).
    """
    query, gallery = np.asarray(query, np.float32), np.asarray(gallery, np.float32)
    available = len(gallery) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be between 1 and the {available} gallery rows available")
    scores = np.empty((len(query), k), np.float32)
    indices = np.empty((len(query), k), np.int64)
    for start in range(0, len(query), chunk):
        sim = query[start : start + chunk] @ gallery.T
        if exclude_self:
            rows = np.arange(start, start + len(sim))
            sim[np.arange(len(sim)), rows] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(sim, top, 1)
        order = np.lexsort((top, -top_scores), axis=1)
        scores[start : start + len(sim)] = np.take_along_axis(top_scores, order, 1)
        indices[start : start + len(sim)] = np.take_along_axis(top, order, 1)
    return scores, indices


def _expand(rows: np.ndarray, scores: np.ndarray, indices: np.ndarray, pool: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(row + sum_i w_i pool[indices_i]) with w_i = max(score_i, 0)^alpha (alpha = 0: w_i = 1)."""
    weights = np.maximum(scores, 0.0) ** alpha if alpha else np.ones_like(scores)
    return l2_normalize(rows + np.einsum("qk,qkd->qd", weights, pool[indices]))


def query_expansion(query: Any, gallery: Any, k: int = 2, alpha: float = 0.0, chunk: int = CHUNK) -> np.ndarray:
    """Expanded queries (Q, D) float32: each query plus its top-k gallery neighbours, re-normalised.

    alpha = 0 is average query expansion (Chum et al. 2007): equal weights. alpha > 0 is alpha-weighted
    query expansion (alphaQE, Radenovic et al. 2019): neighbour i weighs max(sim_i, 0)^alpha, the query 1.
    k = 0 returns the queries unchanged. Search the gallery again with the result.
    """
    query, gallery = l2_normalize(query), l2_normalize(gallery)
    if k == 0:
        return query
    scores, indices = topk(query, gallery, k, chunk=chunk)
    return _expand(query, scores, indices, gallery, alpha)


def database_augmentation(gallery: Any, k: int = 2, alpha: float = 0.0, chunk: int = CHUNK) -> np.ndarray:
    """Database-side augmentation (DBA): every gallery row plus its top-k OTHER gallery rows, re-normalised.

    Same weights as query_expansion (alpha = 0: plain average; alpha > 0: sim^alpha). Apply it to the
    gallery before searching (and before query expansion, which then expands with augmented rows).
    Returns (G, D) float32; k = 0 returns the gallery unchanged.
    """
    gallery = l2_normalize(gallery)
    if k == 0:
        return gallery
    scores, indices = topk(gallery, gallery, k, exclude_self=True, chunk=chunk)
    return _expand(gallery, scores, indices, gallery, alpha)


def rank(query: Any, gallery: Any, depth: int, chunk: int = CHUNK) -> np.ndarray:
    """Ranked gallery indices (Q, depth) int64 by descending inner product (ties: lower row first)."""
    return topk(query, gallery, depth, chunk=chunk)[1]


# ------------------------------------------------------------------------------------------ k-reciprocal
def _neighbour_table(points: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-(k+1) neighbours of every point among all points (itself included) and each row's largest
    squared distance 2 - 2 sim, used to scale distances to [0, 1] as Zhong et al.'s code does."""
    n = len(points)
    table = np.empty((n, k + 1), np.int64)
    row_max = np.empty(n, np.float32)
    for start in range(0, n, chunk):
        sim = points[start : start + chunk] @ points.T
        row_max[start : start + len(sim)] = np.maximum(2.0 - 2.0 * sim.min(axis=1), 1e-12)
        top = np.argpartition(-sim, k, axis=1)[:, : k + 1]
        top_scores = np.take_along_axis(sim, top, 1)
        table[start : start + len(sim)] = np.take_along_axis(top, np.lexsort((top, -top_scores), axis=1), 1)
    return table, row_max


def _reciprocal(table: np.ndarray, k: int, chunk: int) -> list[np.ndarray]:
    """R(i, k): the points j in i's top-(k+1) list whose own top-(k+1) list contains i."""
    forward = table[:, : k + 1]
    out: list[np.ndarray] = []
    for start in range(0, len(forward), chunk):
        fw = forward[start : start + chunk]
        ids = np.arange(start, start + len(fw))[:, None, None]
        mutual = (forward[fw] == ids).any(axis=2)  # (c, k+1)
        out.extend(row[m] for row, m in zip(fw, mutual))
    return out


def _expanded_sets(table: np.ndarray, k1: int, chunk: int) -> list[np.ndarray]:
    """R*(i): R(i, k1) plus R(j, k1/2) of each candidate j sharing more than 2/3 of its set with R(i, k1)."""
    full = _reciprocal(table, k1, chunk)
    half = _reciprocal(table, int(round(k1 / 2)), chunk)
    sets = []
    for recip in full:
        parts = [recip]
        for cand in recip:
            small = half[cand]
            if len(np.intersect1d(small, recip)) > 2 / 3 * len(small):
                parts.append(small)
        sets.append(np.unique(np.concatenate(parts)))
    return sets


def _encode(
    points: np.ndarray, sets: list[np.ndarray], row_max: np.ndarray, table: np.ndarray, k2: int
) -> sparse.csr_matrix:
    """Sparse V (N, N): row i spreads weight exp(-d(i, j)) over R*(i), rows summing to 1; then local query
    expansion averages the V rows of each point's k2 nearest neighbours."""
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    cols = np.concatenate(sets)
    dist = (2.0 - 2.0 * np.einsum("nd,nd->n", points[rows], points[cols])) / row_max[rows]
    weight = np.exp(-dist)
    weight /= np.bincount(rows, weights=weight, minlength=len(sets))[rows]
    v = sparse.csr_matrix((weight, (rows, cols)), shape=(len(sets), len(sets)))
    if k2 > 1:
        qe_rows = np.repeat(np.arange(len(sets)), k2)
        average = sparse.csr_matrix((np.full(qe_rows.size, 1.0 / k2), (qe_rows, table[:, :k2].ravel())), shape=v.shape)
        v = (average @ v).tocsr()
    return v


def k_reciprocal_rerank(
    query: Any,
    gallery: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    top: int | None = None,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017): Jaccard distance of k-reciprocal sets mixed with
    the original distance, final = (1 - lambda) d_J + lambda d, over query + gallery points.

    Follows the authors' re_ranking code (original distance = squared Euclidean 2 - 2 sim scaled by each
    row's maximum; R*(i) expansion by R(j, k1/2) sets sharing > 2/3; local query expansion over k2 neighbours)
    but never builds an N x N matrix (N = Q + G): neighbours are found in chunks of `chunk` rows (peak
    chunk x N float32 + int64), the k-reciprocal encoding is sparse (about N x k1 x k2 non-zeros), and the
    final distances are formed `chunk` queries at a time (chunk x G float64), of which the `top` smallest
    (default all G) are kept. Returns (distances, indices), both (Q, top), ascending distance.
    Raises ValueError when k1 + 1 > N or k2 > k1 + 1.
    """
    query, gallery = l2_normalize(query), l2_normalize(gallery)
    points = np.concatenate([query, gallery])
    n_q, n_g = len(query), len(gallery)
    top = n_g if top is None else int(top)
    if not 1 <= k1 < len(points) or not 1 <= k2 <= k1 + 1 or not 1 <= top <= n_g:
        raise ValueError(
            f"need 1 <= k1 < N={len(points)}, 1 <= k2 <= k1 + 1 and 1 <= top <= G={n_g}; "
            f"got k1={k1}, k2={k2}, top={top}"
        )
    table, row_max = _neighbour_table(points, k1, chunk)
    v = _encode(points, _expanded_sets(table, k1, chunk), row_max, table, k2)
    v_gallery_t = v[n_q:].T.tocsr()  # (N terms, G)
    out_d = np.empty((n_q, top), np.float32)
    out_i = np.empty((n_q, top), np.int64)
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        shared = np.zeros((stop - start, n_g))
        for r, i in enumerate(range(start, stop)):
            terms, values = v.indices[v.indptr[i] : v.indptr[i + 1]], v.data[v.indptr[i] : v.indptr[i + 1]]
            sub = v_gallery_t[terms]
            sub.data = np.minimum(sub.data, np.repeat(values, np.diff(sub.indptr)))
            shared[r] = np.asarray(sub.sum(axis=0)).ravel()
        jaccard = 1.0 - shared / (2.0 - shared)
        original = (2.0 - 2.0 * (query[start:stop] @ gallery.T)) / row_max[start:stop, None]
        final = (1 - lambda_value) * jaccard + lambda_value * original
        best = (
            np.argpartition(final, top - 1, axis=1)[:, :top]
            if top < n_g
            else np.tile(np.arange(n_g), (stop - start, 1))
        )
        best_d = np.take_along_axis(final, best, 1)
        order = np.lexsort((best, best_d), axis=1)
        out_d[start:stop] = np.take_along_axis(best_d, order, 1)
        out_i[start:stop] = np.take_along_axis(best, order, 1)
    return out_d, out_i


# ------------------------------------------------------------------------------------------ centroids
def gallery_centroids(gallery: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """One re-normalised mean embedding per gallery label (Wieczorek et al. 2021): (centroids (L, D), labels (L,)).

    For item-level datasets (In-shop, Consumer2Shop) where a gallery label is one product photographed
    several times: searching the centroids returns each product once, with its views pooled. On a
    category-level set (CC0) it turns retrieval into nearest-class-mean classification: a different task.
    """
    gallery = l2_normalize(gallery)
    labels = np.asarray(labels)
    if len(labels) != len(gallery):
        raise ValueError(f"{len(gallery)} gallery rows but {len(labels)} labels")
    codes, uniques = pd.factorize(pd.Series(labels), sort=True)
    sums = np.zeros((len(uniques), gallery.shape[1]), np.float64)
    np.add.at(sums, codes, gallery)
    return l2_normalize(sums), np.asarray(uniques)

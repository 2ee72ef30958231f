"""Retrieval search and metrics: exact inner-product search (numpy; faiss for IVF/HNSW), Recall@K, mAP@R, ranked lists.

Scores are inner products, so pass L2-normalised embeddings to rank by cosine similarity
(fashlib Embedders already return normalised vectors). Inputs may be numpy arrays or torch
tensors; labels may be strings or integers (compared with ``==``).

Tie rule of exact search (index="flat", with or without faiss installed): gallery rows are ranked
by score, best first, and rows with EQUAL scores by gallery index, ascending (a stable sort). The
top-k list is the first k of that one ranking, so Recall@K never depends on which other K are asked
for, and a collapsed model (all scores equal) ranks the gallery in file order. Approximate indexes
(ivf, hnsw) rank as faiss does; a query they answer with fewer than k rows gives an
IncompleteSearchWarning.

Inputs are checked: embeddings with NaN or infinite values (or float64 values beyond float32), missing
labels (None, NaN), query/gallery labels of kinds that can never be equal (numbers against strings, str
against bytes) and cut-offs K that are not integers >= 1 are a ValueError.

Self-exclusion rule (``exclude_self=True``): the queries ARE the gallery, row for row; query i's
own row i is removed from its ranked list (by position, whatever the scores), and also from its
relevant set when computing R for MAP@R. Query and gallery must then have the same number of rows.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

try:
    import faiss
except ImportError:  # e.g. a GPU box without faiss: exact search needs only numpy (see _flat)
    faiss = None

# ---------------------------------------------------------------- inputs


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A C-contiguous float32 (N, D) array from numpy / torch input.

    ValueError when not 2-D or when rows hold NaN or infinite values (count and first rows named).
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # bfloat16 has no numpy dtype
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {x.shape}")
    if x.dtype.kind == "f" and x.dtype.itemsize > 4 and x.size:
        big = np.isfinite(x) & (np.abs(x) > np.finfo(np.float32).max)
        if big.any():
            raise ValueError(
                f"{name} has values beyond the float32 range (e.g. {x[big][0]!r}) in "
                f"{int(big.any(axis=1).sum())} rows; search runs in float32: L2-normalise the rows first."
            )
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{name} has {len(bad)} of {len(x)} rows with NaN or infinite values (rows "
            f"{bad[:5].tolist()}{' ...' if len(bad) > 5 else ''}); a diverged model or an empty "
            "crop gives such rows: fix or drop them before searching."
        )
    return x


def _as_labels(labels: Any, n: int, name: str) -> np.ndarray:
    """Labels as a 1-D numpy array of length ``n``."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{name} must be 1-D with one label per row ({n}), got shape {labels.shape}")
    return labels


def _label_kinds(labels: np.ndarray) -> set[str]:
    """{'number'}, {'text'}, {'bytes'} or several: what the labels are, for the comparability check.

    Text and bytes are different kinds: numpy never finds 'a' == b'a' (labels read with h5py are bytes)."""
    if labels.dtype.kind in "biuf":
        return {"number"}
    if labels.dtype.kind == "U":
        return {"text"}
    if labels.dtype.kind == "S":
        return {"bytes"}
    return {
        "text"
        if isinstance(v, str)
        else "bytes"
        if isinstance(v, bytes)
        else "number"
        if isinstance(v, (int, float, np.number))
        else type(v).__name__
        for v in labels.tolist()
    }


def _missing_labels(labels: np.ndarray) -> np.ndarray:
    """Positions of missing labels: None, or NaN (which equals nothing, not even another NaN)."""
    if labels.dtype.kind == "f":
        return np.flatnonzero(np.isnan(labels))
    if labels.dtype.kind != "O":
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero([v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) for v in labels.tolist()])


def _label_pair(query_labels: Any, gallery_labels: Any, n_query: int, n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """(query labels, gallery labels) as arrays; ValueError when their kinds can never compare equal."""
    q_lab = _as_labels(query_labels, n_query, "query_labels")
    g_lab = _as_labels(gallery_labels, n_gallery, "gallery_labels")
    for name, lab in (("query_labels", q_lab), ("gallery_labels", g_lab)):
        missing = _missing_labels(lab)
        if len(missing):
            raise ValueError(
                f"{name} has {len(missing)} missing label(s) (None or NaN) at rows "
                f"{missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}; a missing label matches "
                "nothing, so such a query would count as a miss: drop those rows or fill the labels."
            )
    q_kinds, g_kinds = _label_kinds(q_lab), _label_kinds(g_lab)
    if len(q_lab) and len(g_lab) and not q_kinds & g_kinds:
        raise ValueError(
            f"query labels ({'/'.join(sorted(q_kinds))}, dtype {q_lab.dtype}, e.g. {q_lab[0]!r}) can never equal "
            f"gallery labels ({'/'.join(sorted(g_kinds))}, dtype {g_lab.dtype}, e.g. {g_lab[0]!r}); "
            "convert both to the same type (e.g. .astype(str))."
        )
    return q_lab, g_lab


def _check_pair(query: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False) -> None:
    if len(gallery) == 0:
        raise ValueError("gallery is empty")
    if len(query) == 0:
        raise ValueError("query set is empty")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != gallery dim {gallery.shape[1]}")
    if exclude_self and len(query) != len(gallery):
        raise ValueError(
            f"exclude_self needs the queries to be the gallery row for row, got "
            f"{len(query)} queries and {len(gallery)} gallery rows"
        )
    available = len(gallery) - int(exclude_self)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > available:
        raise ValueError(
            f"k={k} is larger than the gallery ({available} items{' once self is excluded' if exclude_self else ''})"
        )


# ---------------------------------------------------------------- faiss indexes


def top_k_stable(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns per row of `scores` (Q, N): best first, equal scores by column ascending.

    Exactly the first k of a stable sort by descending score, in O(N) per row: the k-th largest value
    by np.partition, the columns at or above it, and in rows with more tied columns than room, the
    tied ones of lowest index. Returns (scores (Q, k), indices (Q, k) int64).
    """
    n_rows, n = scores.shape
    if k >= n:
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), top.astype(np.int64)
    kth = np.partition(scores, n - k, axis=1)[:, n - k : n - k + 1]  # k-th largest per row
    chosen = scores >= kth
    crowded = np.flatnonzero(chosen.sum(axis=1) > k)  # more columns tie at the k-th score than fit
    if len(crowded):
        sub, sub_kth = scores[crowded], kth[crowded]
        tied = sub == sub_kth
        room = k - (sub > sub_kth).sum(axis=1, keepdims=True)
        chosen[crowded] = (sub > sub_kth) | (tied & (np.cumsum(tied, axis=1) <= room))
    top = np.nonzero(chosen)[1].reshape(n_rows, k)  # row-major: ascending column within a row
    top_scores = np.take_along_axis(scores, top, 1)
    order = np.lexsort((top, -top_scores))  # best score first, ties by column (gallery row)
    return np.take_along_axis(top_scores, order, 1), np.take_along_axis(top, order, 1).astype(np.int64)


class ExactIP:
    """Exact inner-product search with the module's tie rule, in query blocks (numpy BLAS matmul).

    The "flat" index, used with or without faiss so that rankings never depend on what is installed.
    """

    def __init__(self, gallery: np.ndarray, block: int = 1024):
        self.gallery = gallery
        self.block = int(block)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, gallery indices (Q, k) int64) of the k best rows per query."""
        scores = np.empty((len(query), k), dtype=np.float32)
        indices = np.empty((len(query), k), dtype=np.int64)
        for start in range(0, len(query), self.block):
            rows = slice(start, start + self.block)
            scores[rows], indices[rows] = top_k_stable(query[rows] @ self.gallery.T, k)
        return scores, indices


class IncompleteSearchWarning(UserWarning):
    """An approximate index returned fewer than k gallery rows for some queries (ids -1)."""


def _require_faiss(what: str) -> None:
    if faiss is None:
        raise ImportError(f"the {what} index needs faiss: pip install faiss-cpu")


def _flat(gallery: np.ndarray, k: int) -> ExactIP:
    """Exact inner-product search with the module's tie rule (the same with and without faiss)."""
    return ExactIP(gallery)


def _ivf(gallery: np.ndarray, k: int, nlist: int | None = None, nprobe: int = 16) -> faiss.Index:
    """Inverted file over k-means cells (nlist cells, nprobe visited); default nlist ~ 4 sqrt(N)."""
    _require_faiss("IVF")
    n, d = gallery.shape
    if nlist is None:
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
    if nlist > n:
        raise ValueError(f"nlist={nlist} needs at least as many gallery items, got {n}")
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234
    index.train(gallery)
    index.add(gallery)
    index.nprobe = min(nprobe, nlist)
    return index


def _hnsw(gallery: np.ndarray, k: int, M: int = 32, efConstruction: int = 40, efSearch: int = 64) -> faiss.Index:
    """HNSW graph index on inner product; efSearch is raised to k when smaller."""
    _require_faiss("HNSW")
    index = faiss.IndexHNSWFlat(gallery.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = efConstruction
    index.add(gallery)
    index.hnsw.efSearch = max(efSearch, k)
    return index


INDEXES: dict[str, Callable[..., faiss.Index]] = {"flat": _flat, "ivf": _ivf, "hnsw": _hnsw}


def build_index(gallery: Any, index: str = "flat", k: int = 1, **index_options: Any) -> faiss.Index:
    """Build the faiss index ``index`` ("flat" | "ivf" | "hnsw") over gallery rows (inner product)."""
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; known: {sorted(INDEXES)}")
    return INDEXES[index](_as_matrix(gallery, "gallery"), k, **index_options)


def search(
    query: Any, gallery: Any, k: int, index: str = "flat", **index_options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows per query by inner product: (scores (Q, k) float32, indices (Q, k) int64).

    Exact search ("flat") follows the module's tie rule. Approximate indexes may reach fewer than k
    rows for a query; their slots hold index -1 (score -inf) and an IncompleteSearchWarning says how
    many queries are affected and how to widen the search. ValueError for non-finite embeddings.
    """
    query, gallery = _as_matrix(query, "query"), _as_matrix(gallery, "gallery")
    _check_pair(query, gallery, k)
    scores, indices = build_index(gallery, index, k=k, **index_options).search(query, k)
    short = (indices < 0).any(axis=1)
    if short.any():
        widen = {"ivf": "raise nprobe", "hnsw": "raise efSearch"}.get(index, "use index='flat'")
        warnings.warn(
            f"the {index!r} index returned fewer than k={k} gallery rows for {int(short.sum())} of "
            f"{len(query)} queries (ids -1, counted as misses); {widen} or use index='flat'",
            IncompleteSearchWarning,
            stacklevel=2,
        )
    return scores, indices


# ---------------------------------------------------------------- ranked lists


class Neighbours(NamedTuple):
    """Ranked retrieval lists: scores/indices (Q, k); matches (Q, k) bool or None without labels."""

    scores: np.ndarray
    indices: np.ndarray
    matches: np.ndarray | None


def neighbours(
    query_emb: Any,
    gallery_emb: Any,
    k: int = 10,
    query_labels: Any = None,
    gallery_labels: Any = None,
    exclude_self: bool = False,
    index: str = "flat",
    **index_options: Any,
) -> Neighbours:
    """The k best gallery rows for every query (self excluded on request), with label matches."""
    query, gallery = _as_matrix(query_emb, "query"), _as_matrix(gallery_emb, "gallery")
    _check_pair(query, gallery, k, exclude_self)
    scores, indices = search(query, gallery, k + int(exclude_self), index, **index_options)
    if exclude_self:
        is_self = indices == np.arange(len(query))[:, None]
        order = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # self moved last, then cut
        scores = np.take_along_axis(scores, order, 1)
        indices = np.take_along_axis(indices, order, 1)
    matches = None
    if query_labels is not None or gallery_labels is not None:
        if query_labels is None or gallery_labels is None:
            raise ValueError("give both query_labels and gallery_labels, or neither")
        q_lab, g_lab = _label_pair(query_labels, gallery_labels, len(query), len(gallery))
        matches = (indices >= 0) & (g_lab[np.maximum(indices, 0)] == q_lab[:, None])
    return Neighbours(scores, indices, matches)


# ---------------------------------------------------------------- metrics


def _check_ks(ks: Any) -> list[int]:
    """The distinct cut-offs of `ks` (one int or a sequence of ints >= 1), sorted.

    ValueError for anything else: a 0, negative or fractional K, or a string ("15" is not (1, 5))."""
    if isinstance(ks, (int, np.integer)) and not isinstance(ks, (bool, np.bool_)):
        ks = [ks]
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise ValueError(f"ks must be a sequence of integers >= 1, got {ks!r}")
    ks = list(ks)
    bad = [k for k in ks if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad or not ks:
        raise ValueError(
            f"ks must be a non-empty sequence of integers >= 1, got {ks!r}" + (f" ({bad[0]!r} is not)" if bad else "")
        )
    return sorted({int(k) for k in ks})


def recall_at_k(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any,
    gallery_labels: Any,
    ks: Sequence[int] = (1, 5, 10, 20, 50),
    exclude_self: bool = False,
    index: str = "flat",
    **index_options: Any,
) -> dict[int, float]:
    """DeepFashion top-k retrieval accuracy: share of queries with a same-label item in their top k.

    Every query counts in the denominator (one without any relevant gallery item is a miss).
    """
    ks = _check_ks(ks)
    nb = neighbours(query_emb, gallery_emb, max(ks), query_labels, gallery_labels, exclude_self, index, **index_options)
    found = np.logical_or.accumulate(nb.matches, axis=1)
    return {k: float(found[:, k - 1].mean()) for k in ks}


def _relevant_counts(q_lab: np.ndarray, g_lab: np.ndarray, exclude_self: bool) -> np.ndarray:
    """R per query: number of gallery items sharing its label (own row removed under exclude_self).

    Counted by hashing (Python equality, as ``==`` compares), so mixed label kinds need no ordering."""
    counts = Counter(g_lab.tolist())
    r = np.fromiter((counts.get(v, 0) for v in q_lab.tolist()), dtype=np.int64, count=len(q_lab))
    if exclude_self:
        r = r - (g_lab == q_lab)
    return r


def map_at_r(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any,
    gallery_labels: Any,
    exclude_self: bool = False,
    index: str = "flat",
    **index_options: Any,
) -> float:
    """MAP@R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020).

    Per query with R relevant gallery items: (1/R) sum_{i<=R} P@i * rel(i). Queries with R = 0 are left
    out and 0.0 is returned when none has R > 0 (as PML AccuracyCalculator does).
    """
    query, gallery = _as_matrix(query_emb, "query"), _as_matrix(gallery_emb, "gallery")
    q_lab, g_lab = _label_pair(query_labels, gallery_labels, len(query), len(gallery))
    _check_pair(query, gallery, 1, exclude_self)
    r = _relevant_counts(q_lab, g_lab, exclude_self)
    keep = r > 0
    if not keep.any():
        return 0.0
    query, q_lab, r = query[keep], q_lab[keep], r[keep]
    rows = np.flatnonzero(keep)
    r_max = int(r.max())
    if exclude_self:
        # the self row must stay "row i of the gallery" for the kept queries
        nb = _neighbours_with_rows(query, gallery, r_max, rows, index, index_options)
    else:
        nb = search(query, gallery, r_max, index, **index_options)[1]
    rel = (nb >= 0) & (g_lab[np.maximum(nb, 0)] == q_lab[:, None])
    rel &= np.arange(r_max)[None, :] < r[:, None]
    precision = np.cumsum(rel, axis=1) / np.arange(1, r_max + 1)[None, :]
    return float(((precision * rel).sum(1) / r).mean())


def _neighbours_with_rows(
    query: np.ndarray, gallery: np.ndarray, k: int, rows: np.ndarray, index: str, index_options: dict
) -> np.ndarray:
    """Top-k gallery indices for queries that are gallery rows ``rows``, their own row dropped."""
    _, indices = search(query, gallery, k + 1, index, **index_options)
    order = np.argsort(indices == rows[:, None], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(indices, order, 1)


def index_recall(query: Any, gallery: Any, k: int, index: str = "hnsw", **index_options: Any) -> float:
    """Recall of an approximate index against exact search: mean |approx top-k & exact top-k| / k."""
    exact = search(query, gallery, k, "flat")[1]
    approx = search(query, gallery, k, index, **index_options)[1]
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)

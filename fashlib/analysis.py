"""Dataset and embedding-space analysis for the book: per-split summaries, contributor leakage checks,
box statistics, 2-D projections and how well an embedding space groups images by category.

Functions take a contract table (and embeddings) and return numbers or DataFrames; the notebooks plot them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

SPLIT_ORDER = ("train", "val", "test", "query", "gallery")
PROJECTIONS = ("umap", "pca")


def _split_order(table: pd.DataFrame) -> list[str]:
    """The table's split names, known ones in protocol order first."""
    present = list(pd.unique(table["split"]))
    return [s for s in SPLIT_ORDER if s in present] + sorted(s for s in present if s not in SPLIT_ORDER)


# ------------------------------------------------------------------------------------------ splits
def split_summary(table: pd.DataFrame, group: str | None = None) -> pd.DataFrame:
    """One row per split: images, distinct labels/items/categories, images per label, and `group` count.

    `group` (e.g. "sender_id") adds the number of distinct contributors; columns missing from the
    table are simply left out.
    """
    domains = sorted(table["domain"].dropna().unique()) if "domain" in table else []
    rows = [_summary_row(table[table["split"] == split], split, domains, group) for split in _split_order(table)]
    rows.append(_summary_row(table, "all", domains, group))
    return pd.DataFrame(rows).set_index("split")


def _summary_row(part: pd.DataFrame, name: str, domains: list[str], group: str | None) -> dict[str, Any]:
    """The split_summary row of one part of the table (a split, or the whole table as "all")."""
    per_label = part["label"].value_counts()
    row: dict[str, Any] = {
        "split": name,
        "images": len(part),
        "labels": part["label"].nunique(),
        "items": part["item_id"].nunique(),
        "categories": part["category"].nunique(),
        "images/label (median)": float(per_label.median()),
        "images/label (max)": int(per_label.max()),
    }
    for domain in domains:
        row[f"{domain} images"] = int((part["domain"] == domain).sum())
    if group is not None and group in part:
        row[f"{group}s"] = part[group].nunique()
    return row


def count_table(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Images per value of `column` (rows, most frequent first) and split (columns), with a total column."""
    counts = pd.crosstab(table[column].astype(str), table["split"])
    counts = counts[[s for s in _split_order(table) if s in counts.columns]]
    counts["total"] = counts.sum(axis=1)
    return counts.sort_values("total", ascending=False)


def group_overlap(table: pd.DataFrame, group: str) -> pd.DataFrame:
    """Split x split matrix of how many distinct `group` values (contributors, items) both splits share.

    The diagonal holds each split's own count; an honest split has zeros off the diagonal.
    """
    splits = _split_order(table)
    members = {s: set(table.loc[table["split"] == s, group]) for s in splits}
    matrix = [[len(members[a] & members[b]) for b in splits] for a in splits]
    return pd.DataFrame(matrix, index=pd.Index(splits, name="split"), columns=splits)


def top_groups(table: pd.DataFrame, group: str, n: int = 10) -> pd.DataFrame:
    """The `n` largest groups: images, share of all images, cumulative share and the split(s) they sit in."""
    counts = table[group].value_counts()
    top = counts.head(n)
    splits = table.groupby(group)["split"].agg(lambda s: "+".join(sorted(set(s))))
    return pd.DataFrame(
        {
            "images": top.to_numpy(),
            "share": (top / len(table)).to_numpy(),
            "cumulative share": (top.cumsum() / len(table)).to_numpy(),
            "split": splits.loc[top.index].to_numpy(),
        },
        index=pd.Index(top.index, name=group),
    )


def random_split_leakage(
    groups: Sequence, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0, held_out: int = -1
) -> float:
    """Share of held-out images whose group also has images in the training part of a RANDOM image split.

    Parts are drawn per image with `fractions` (part 0 = training, `held_out` = the evaluated part), so
    this measures how often an image-level split would let the model see the same contributor in training.
    """
    groups = np.asarray(list(groups))
    fractions = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    rng = np.random.default_rng(seed)
    part = rng.choice(len(fractions), size=len(groups), p=fractions)
    held = part == (held_out % len(fractions))
    if not held.any():
        return 0.0
    in_train = np.isin(groups[held], groups[part == 0])
    return float(in_train.mean())


def split_leakage(
    table: pd.DataFrame, group: str, train: Sequence[str] = ("train",), held_out: Sequence[str] = ("query", "gallery")
) -> float:
    """Share of the table's held-out images whose `group` value also occurs in its training splits."""
    held = table["split"].isin(list(held_out)).to_numpy()
    if not held.any():
        return 0.0
    seen = set(table.loc[table["split"].isin(list(train)), group])
    return float(table.loc[held, group].isin(seen).mean())


# ------------------------------------------------------------------------------------------ images and boxes
def image_sizes(paths: Sequence[str]) -> pd.DataFrame:
    """Width and height of each image as displayed (EXIF orientation applied; headers only; NaN if unreadable).

    Same frame as fashlib.data.images.open_rgb, which the dataset and the plots use.
    """
    from .data.images import DECODE_ERRORS, oriented_size

    sizes = []
    for path in paths:
        try:
            sizes.append(oriented_size(path))
        except DECODE_ERRORS:
            sizes.append((np.nan, np.nan))
    return pd.DataFrame(sizes, columns=["width", "height"], dtype=np.float64)


def box_statistics(table: pd.DataFrame, sizes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per row with a box: box width, height, aspect (w/h) and area share of the image (needs `sizes`).

    `sizes` (aligned with the table rows, e.g. from image_sizes) adds the area share; rows without a box
    are dropped. Returns an empty frame when the table has no boxes.
    """
    boxes = table[["x1", "y1", "x2", "y2"]].to_numpy(dtype=np.float64)
    has_box = ~np.isnan(boxes).any(axis=1)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    out = pd.DataFrame(
        {
            "split": table["split"].to_numpy(),
            "category": table["category"].to_numpy(),
            "box width": w,
            "box height": h,
            "aspect": w / np.where(h > 0, h, np.nan),
        }
    )
    if sizes is not None:
        area = sizes["width"].to_numpy() * sizes["height"].to_numpy()
        out["area share"] = (w * h) / np.where(area > 0, area, np.nan)
    return out[has_box].reset_index(drop=True)


def examples_per_group(
    table: pd.DataFrame, column: str, per_group: int = 1, max_groups: int = 24, seed: int = 0
) -> pd.DataFrame:
    """A few seeded example rows of each of the most frequent values of `column` (for image grids)."""
    values = table[column].astype(str).value_counts().index[:max_groups]
    rng = np.random.default_rng(seed)
    picks = []
    for value in values:
        rows = np.flatnonzero(table[column].astype(str).to_numpy() == value)
        picks.extend(rng.choice(rows, size=min(per_group, len(rows)), replace=False).tolist())
    return table.iloc[picks]


# ------------------------------------------------------------------------------------------ embeddings
def project_2d(embeddings: np.ndarray, method: str = "umap", n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """2-D coordinates of the rows: UMAP (cosine metric, seeded) or PCA; n_neighbors shrinks for tiny inputs."""
    x = np.asarray(embeddings, dtype=np.float32)
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; choose one of {PROJECTIONS}")
    if len(x) < 3:
        raise ValueError(f"project_2d needs at least 3 rows, got {len(x)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x).astype(np.float32)
    import umap

    reducer = umap.UMAP(
        n_neighbors=max(2, min(n_neighbors, len(x) - 1)),
        n_components=2,
        metric="cosine",
        random_state=seed,
        init="spectral" if len(x) > 10 else "random",
    )
    return reducer.fit_transform(x).astype(np.float32)


def knn_purity(embeddings: np.ndarray, labels: Sequence, k: int = 10) -> float:
    """Mean share of each row's k nearest neighbours (cosine, itself excluded) that carry its label."""
    from . import metrics

    x = np.asarray(embeddings, dtype=np.float32)
    k = min(k, len(x) - 1)
    if k < 1:
        raise ValueError("knn_purity needs at least 2 rows")
    labels = np.asarray(labels).astype(str)
    nb = metrics.neighbours(x, x, k=k, query_labels=labels, gallery_labels=labels, exclude_self=True)
    return float(nb.matches.mean())


def category_separation(embeddings: np.ndarray, labels: Sequence, k: int = 10) -> dict[str, float]:
    """How well an embedding space groups rows by label: kNN purity and cosine silhouette score.

    The silhouette is NaN when there are fewer than 2 labels or every row is its own label.
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels).astype(str)
    n_labels = len(set(labels))
    silhouette = (
        float(silhouette_score(np.asarray(embeddings, dtype=np.float32), labels, metric="cosine"))
        if 2 <= n_labels < len(labels)
        else float("nan")
    )
    return {f"knn purity@{min(k, len(labels) - 1)}": knn_purity(embeddings, labels, k), "silhouette": silhouette}


def retrieval_examples(
    table: pd.DataFrame,
    embeddings: np.ndarray,
    query_rows: Sequence[int],
    k: int = 5,
    title_column: str = "category",
    retrieval: Any = None,
) -> dict[str, list]:
    """Top-k gallery results of chosen query rows, ready for plots.retrieval_grid.

    Returns dict with queries (paths), results (paths), correct (label matches), titles (per result
    `title_column`) and query_titles. With `retrieval` (an evaluation.Retrieval of this table and these
    embeddings, e.g. the one first_hit_ranks was read from) the lists are read from its search, so the
    grid shows exactly the ranking the ranks came from; query_rows must then be query rows.
    """
    from . import metrics
    from .data.protocols import eval_rows

    _, gallery = eval_rows(table)
    labels = table["label"].to_numpy().astype(str)
    query_rows = np.asarray(query_rows, dtype=np.int64)
    k = min(k, len(gallery))
    if retrieval is not None:
        hits, matches = retrieval.ranked(query_rows, k)
    else:
        nb = metrics.neighbours(
            embeddings[query_rows],
            embeddings[gallery],
            k=k,
            query_labels=labels[query_rows],
            gallery_labels=labels[gallery],
        )
        hits, matches = gallery[nb.indices], nb.matches
    paths, titles = table["path"].to_numpy(), table[title_column].astype(str).to_numpy()
    return {
        "queries": [paths[q] for q in query_rows],
        "results": [list(paths[h]) for h in hits],
        "correct": [list(map(bool, m)) for m in matches],
        "titles": [list(titles[h]) for h in hits],
        "query_titles": [f"query: {titles[q]}" for q in query_rows],
    }

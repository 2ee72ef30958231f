"""Plotting helpers for the book's notebooks: image grids, retrieval results, curves, UMAP scatter.

Every function returns a matplotlib Figure that pyplot no longer tracks (closed at once: no global figure
state, no double display): in a notebook make it the last expression of a cell or call display(fig); save
with fig.savefig.
Retrieval results are framed green when correct and red when wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

CORRECT = "#2ca02c"  # green frame: a relevant result
WRONG = "#d62728"  # red frame: an irrelevant result
QUERY = "#1f77b4"  # blue frame: the query
FRAME_WIDTH = 4.0


def load_image(image: Any, max_side: int | None = 256) -> np.ndarray:
    """Read an image path (or pass an array through) as an RGB uint8 array (H, W, 3), shrunk to max_side.

    Opened with fashlib.data.images.open_rgb, as the dataset does: EXIF orientation applied, every mode
    converted to RGB, transparency on white. Raises UndecodableImageError naming an undecodable file.
    """
    if isinstance(image, np.ndarray):
        return image
    from .data.images import open_rgb

    im = open_rgb(image, draft_size=(max_side, max_side) if max_side else None)
    if max_side:
        im.thumbnail((max_side, max_side))
    return np.asarray(im)


def _scale(max_side: int | None, image: Any) -> float:
    """Factor from original (oriented) pixel coordinates to the displayed (thumbnailed) image."""
    if isinstance(image, np.ndarray) or not max_side:
        return 1.0
    from .data.images import oriented_size

    w, h = oriented_size(image)
    return min(1.0, max_side / max(w, h))


def _frame(ax, color: str | None, width: float = FRAME_WIDTH) -> None:
    """Hide ticks; draw the axes spines as a coloured frame (or hide them when color is None)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        if color is None:
            spine.set_visible(False)
        else:
            spine.set_visible(True)
            spine.set_edgecolor(color)
            spine.set_linewidth(width)


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure created through pyplot (so a Jupyter kernel's inline backend is set up and shows it when it is
    the cell's result) and closed at once, so pyplot neither tracks it nor shows it a second time."""
    fig = plt.figure(figsize=figsize)
    plt.close(fig)
    return fig


def _single(width: float, height: float):
    """A pyplot-free figure with one axes."""
    fig = _new_figure(figsize=(width, height))
    return fig, fig.subplots()


def _grid(n: int, ncols: int, cell: float) -> tuple[Figure, list]:
    """A figure with n image axes laid out in rows of ncols (unused slots removed)."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _new_figure(figsize=(cell * ncols, cell * nrows * 1.1))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def image_grid(
    paths: Sequence[Any],
    titles: Sequence[str] | None = None,
    ncols: int = 6,
    boxes: Sequence[Sequence[float] | None] | None = None,
    cell: float = 2.2,
    max_side: int | None = 256,
    box_color: str = "yellow",
    suptitle: str | None = None,
) -> Figure:
    """Show images in a grid, with optional titles and boxes (x1, y1, x2, y2 in original pixels; NaN = none)."""
    if len(paths) == 0:
        raise ValueError("image_grid needs at least one image")
    fig, axes = _grid(len(paths), ncols, cell)
    for i, (ax, path) in enumerate(zip(axes, paths)):
        ax.imshow(load_image(path, max_side))
        _frame(ax, None)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
        box = boxes[i] if boxes is not None else None
        if box is not None and len(box) == 4 and not any(v is None or np.isnan(float(v)) for v in box):
            s = _scale(max_side, path)
            x1, y1, x2, y2 = (float(v) * s for v in box)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=box_color, linewidth=2))
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _strip_row(
    axes,
    query: Any,
    results: Sequence[Any],
    correct: Sequence[bool],
    titles: Sequence[str] | None,
    query_title: str,
    max_side: int | None,
) -> None:
    """Fill one row: the query (blue frame) then the results (green or red frames)."""
    axes[0].imshow(load_image(query, max_side))
    _frame(axes[0], QUERY)
    axes[0].set_title(query_title, fontsize=8)
    for j, (ax, path, ok) in enumerate(zip(axes[1:], results, correct)):
        ax.imshow(load_image(path, max_side))
        _frame(ax, CORRECT if ok else WRONG)
        ax.set_title(str(titles[j]) if titles is not None else f"#{j + 1}", fontsize=8)


def retrieval_strip(
    query_path: Any,
    result_paths: Sequence[Any],
    correct_flags: Sequence[bool],
    titles: Sequence[str] | None = None,
    query_title: str = "query",
    cell: float = 2.0,
    max_side: int | None = 256,
) -> Figure:
    """One query and its ranked results in a row; correct results framed green, wrong ones red."""
    if len(result_paths) != len(correct_flags):
        raise ValueError(f"{len(result_paths)} results but {len(correct_flags)} correct flags")
    n = 1 + len(result_paths)
    fig = _new_figure(figsize=(cell * n, cell * 1.2))
    axes = fig.subplots(1, n, squeeze=False)
    _strip_row(list(axes[0]), query_path, result_paths, correct_flags, titles, query_title, max_side)
    fig.tight_layout()
    return fig


def retrieval_grid(
    queries: Sequence[Any],
    results: Sequence[Sequence[Any]],
    correct: Sequence[Sequence[bool]],
    titles: Sequence[Sequence[str]] | None = None,
    query_titles: Sequence[str] | None = None,
    cell: float = 1.8,
    max_side: int | None = 192,
) -> Figure:
    """Several queries, one row each: the query then its top results framed green (correct) or red (wrong)."""
    if not (len(queries) == len(results) == len(correct)):
        raise ValueError("queries, results and correct must have the same length")
    if len(queries) == 0:
        raise ValueError("retrieval_grid needs at least one query")
    k = max(len(r) for r in results)
    fig = _new_figure(figsize=(cell * (1 + k), cell * 1.15 * len(queries)))
    axes = fig.subplots(len(queries), 1 + k, squeeze=False)
    for i, (q, res, ok) in enumerate(zip(queries, results, correct)):
        if len(res) != len(ok):
            raise ValueError(f"query {i}: {len(res)} results but {len(ok)} correct flags")
        row = list(axes[i])
        for ax in row[1 + len(res) :]:
            fig.delaxes(ax)
        _strip_row(
            row,
            q,
            res,
            ok,
            titles[i] if titles is not None else None,
            query_titles[i] if query_titles is not None else "query",
            max_side,
        )
    fig.tight_layout()
    return fig


def recall_curves(
    curves: Mapping[str, Mapping[int, float]], title: str = "Recall@K", ax=None, logx: bool = True
) -> Figure:
    """Recall@K against K, one line per model/loss (values in [0, 1] shown as percentages)."""
    fig, ax = (ax.figure, ax) if ax is not None else _single(6, 4)
    for name, recalls in curves.items():
        ks = sorted(int(k) for k in recalls)
        ax.plot(ks, [100 * float(recalls[k]) for k in ks], marker="o", label=str(name))
    if logx:
        ax.set_xscale("log")
        all_k = sorted({int(k) for r in curves.values() for k in r})
        ax.set_xticks(all_k)
        ax.set_xticklabels([str(k) for k in all_k])
        ax.minorticks_off()
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bar_with_cost(
    df,
    x: str = "backbone",
    y: str = "recall@1",
    cost: str = "gflops",
    cost_label: str | None = None,
    title: str | None = None,
) -> Figure:
    """Two panels: accuracy per backbone as bars (cost written on each), and accuracy against cost."""
    import seaborn as sns

    fig = _new_figure(figsize=(11, 4))
    ax_bar, ax_cost = fig.subplots(1, 2)
    data = df.reset_index(drop=True)
    scale = 100.0 if data[y].max() <= 1.0 else 1.0
    values = data[y] * scale
    sns.barplot(x=data[x].astype(str), y=values, ax=ax_bar, color="#4c72b0")
    for i, (v, c) in enumerate(zip(values, data[cost])):
        ax_bar.text(i, v, f"{c:.3g}", ha="center", va="bottom", fontsize=8)
    ax_bar.set_xlabel(x)
    ax_bar.set_ylabel(f"{y} (%)" if scale == 100.0 else y)
    ax_bar.set_title(f"{y} (numbers: {cost_label or cost})")
    ax_bar.tick_params(axis="x", rotation=30)
    ax_cost.scatter(data[cost], values, s=40)
    for name, c, v in zip(data[x], data[cost], values):
        ax_cost.annotate(str(name), (c, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_cost.set_xlabel(cost_label or cost)
    ax_cost.set_ylabel(ax_bar.get_ylabel())
    ax_cost.grid(True, alpha=0.3)
    ax_cost.set_title("accuracy vs cost")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curves(
    histories: Mapping[str, Any], x: str = "epoch", metrics: Sequence[str] | None = None, title: str | None = None
) -> Figure:
    """One panel per metric (loss, recall@1, ...), one line per run; histories: name -> DataFrame or list of dicts."""
    import pandas as pd

    frames = {name: (h if isinstance(h, pd.DataFrame) else pd.DataFrame(list(h))) for name, h in histories.items()}
    if metrics is None:
        seen: list[str] = []
        for f in frames.values():
            seen += [c for c in f.columns if c != x and c not in seen and pd.api.types.is_numeric_dtype(f[c])]
        metrics = seen
    if not metrics:
        raise ValueError("training_curves: no numeric columns to plot")
    fig = _new_figure(figsize=(4.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, f in frames.items():
            if metric in f:
                xs = f[x] if x in f else np.arange(1, len(f) + 1)
                ax.plot(xs, f[metric], marker=".", label=str(name))
        ax.set_xlabel(x)
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def embedding_scatter(
    xy: np.ndarray,
    hue: Sequence[Any] | None = None,
    title: str | None = None,
    max_legend: int = 20,
    point_size: float = 8,
    ax=None,
) -> Figure:
    """2-D scatter of an embedding projection (UMAP), coloured by label; legend only when few labels."""
    import seaborn as sns

    xy = np.asarray(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"embedding_scatter expects (N, 2) coordinates, got {xy.shape}")
    fig, ax = (ax.figure, ax) if ax is not None else _single(7, 6)
    hue_values = None if hue is None else np.asarray(hue).astype(str)
    n_labels = 0 if hue_values is None else len(set(hue_values))
    sns.scatterplot(
        x=xy[:, 0],
        y=xy[:, 1],
        hue=hue_values,
        s=point_size,
        linewidth=0,
        ax=ax,
        legend=bool(hue_values is not None and n_labels <= max_legend),
        palette="tab20" if n_labels > 10 else None,
    )
    if ax.get_legend() is not None:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "UMAP of the embeddings")
    fig.tight_layout()
    return fig

"""Reader for the CC0 clothing dataset (alexeygrigorev/clothing-dataset) as a category-retrieval table.

Protocol (see data/README.md): a match is the same garment category (the csv label); the non-garment
labels "Not sure", "Skip", "Other" are left out; contributors (sender_id) are split into disjoint
train / val / test groups, and the evaluation group is split again, by contributor, into query and
gallery, so no query meets a photo of its own sender's floor, bed or camera.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..paths import ENV_VAR, data_root
from ._annotations import DuplicateLinesWarning, read_text, require_unique
from ._common import BASE_COLUMNS, drop_missing_images

__all__ = ["read_clothing", "group_split", "NON_GARMENT_LABELS", "FOLDER"]

FOLDER = "clothing-dataset"  # folder name under the data root
NON_GARMENT_LABELS: tuple[str, ...] = ("Not sure", "Skip", "Other")
_SPLIT_NAMES = ("train", "val", "test")


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Clothing dataset (CC0): expected {what} not found: {path}\n"
        f'Fix: run fashlib.data.download("clothing", root) to fetch it into <root>/{FOLDER}, '
        f"or point the data root at a folder holding {FOLDER}/ with the environment variable {ENV_VAR} "
        f"(or pass the dataset folder itself)."
    )


def _greedy_cost(added: np.ndarray, current: np.ndarray, target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Increase of sum((current - target)^2 / scale) for each group if `added` joins it."""
    before = ((current - target) ** 2 / scale).sum(axis=1)
    after = ((current + added - target) ** 2 / scale).sum(axis=1)
    return after - before


def group_split(groups: Sequence, labels: Sequence, fractions: Sequence[float], seed: int = 0) -> np.ndarray:
    """Assign whole groups (e.g. contributors) to len(fractions) parts; return the part of each row.

    Greedy: groups in order of decreasing size (ties in a seeded random order) each join the part
    where it most reduces the squared deviation from the targets, both in image count and in
    per-label counts (chi-square weights), so parts are balanced and stratified. Deterministic per seed.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or len(fractions) < 1 or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions.tolist()}")
    fractions = fractions / fractions.sum()
    group_codes, group_index = pd.factorize(pd.Series(list(groups)), sort=True)
    label_codes, _ = pd.factorize(pd.Series(list(labels)), sort=True)
    n_groups = len(group_index)
    counts = np.zeros((n_groups, label_codes.max() + 1 if len(label_codes) else 0), dtype=np.float64)
    np.add.at(counts, (group_codes, label_codes), 1.0)
    # column 0: total images; then one column per label
    counts = np.concatenate([counts.sum(axis=1, keepdims=True), counts], axis=1)
    totals = counts.sum(axis=0)
    target = fractions[:, None] * totals[None, :]
    # image-count term weighted like one label holding everything; labels by 1/size (chi-square style)
    scale = np.maximum(totals, 1.0)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order, 0], kind="stable")]
    current = np.zeros_like(target)
    part_of_group = np.empty(n_groups, dtype=np.int64)
    for g in order:
        cost = _greedy_cost(counts[g][None, :], current, target, scale)
        cost[fractions == 0] = np.inf
        best = np.flatnonzero(cost == cost.min())
        if len(best) > 1:  # tie: the part furthest below its image target
            best = best[np.argsort(current[best, 0] - target[best, 0], kind="stable")]
        part_of_group[g] = best[0]
        current[best[0]] += counts[g]
    return part_of_group[group_codes]


def _query_gallery(eval_rows: pd.DataFrame, gallery_fraction: float, seed: int) -> np.ndarray:
    """True where an evaluation row goes to the gallery; whole contributors on one side.

    Every category of the evaluation rows is kept in the gallery: if the greedy split left one
    out, the query contributor with most photos of it (ties: smallest sender_id) moves to the gallery.
    """
    senders = eval_rows["sender_id"].to_numpy()
    labels = eval_rows["label"].to_numpy()
    part = group_split(senders, labels, (gallery_fraction, 1.0 - gallery_fraction), seed=seed)
    gallery = part == 0
    for label in sorted(set(labels)):
        if gallery[labels == label].any():
            continue
        per_sender = pd.Series(senders[labels == label]).value_counts()
        best = per_sender[per_sender == per_sender.max()].index.min()
        gallery[senders == best] = True
    return gallery


def read_images_csv(csv: Path) -> pd.DataFrame:
    """images.csv as a frame: UTF-8 (BOM allowed, else ValueError naming byte offset and line), CRLF or LF,
    blanks around fields and names stripped; exact duplicate rows dropped with one DuplicateLinesWarning;
    an image listed twice with other values is a ValueError naming both lines."""
    raw = pd.read_csv(io.StringIO(read_text(csv)), dtype=str, skipinitialspace=True)
    raw.columns = [str(c).strip() for c in raw.columns]
    expected = {"image", "sender_id", "label", "kids"}
    if not expected <= set(raw.columns):
        raise ValueError(f"{csv}: expected columns {sorted(expected)}, found {list(raw.columns)}")
    raw = raw.apply(lambda col: col.str.strip())
    raw["line"] = np.arange(len(raw)) + 2  # line 1 is the header
    exact = raw.drop(columns="line").duplicated()
    if exact.any():
        lines = raw.loc[exact, "line"].tolist()
        warnings.warn(
            f"{csv}: {len(lines)} exact duplicate row(s) dropped (lines {lines[:5]}{' ...' if len(lines) > 5 else ''})",
            DuplicateLinesWarning,
            stacklevel=3,
        )
        raw = raw.loc[~exact]
    require_unique(raw.dropna(subset=["image"]), "image", csv, "an image has one label and one sender")
    return raw.drop(columns="line").reset_index(drop=True)


def _clothing_csv(
    dataset_dir: str | os.PathLike | None, eval_split: str, fractions: Sequence[float], gallery_fraction: float
) -> tuple[Path, Path]:
    """(dataset folder, its images.csv) after checking read_clothing's arguments.

    ValueError for an `eval_split`, `fractions` or `gallery_fraction` out of range; FileNotFoundError (with
    the download hint) when the folder or its images.csv is missing."""
    if eval_split not in ("test", "val"):
        raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {tuple(fractions)}")
    if not 0.0 < gallery_fraction < 1.0:
        raise ValueError(f"gallery_fraction must be in (0, 1), got {gallery_fraction}")
    folder = Path(dataset_dir).expanduser().resolve() if dataset_dir is not None else data_root() / FOLDER
    if not folder.is_dir():
        raise _missing(folder, "dataset folder")
    csv = folder / "images.csv"
    if not csv.is_file():
        raise _missing(csv, "annotation file images.csv")
    return folder, csv


def _clothing_table(raw: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """The contract columns for images.csv rows that have an image, a label and a sender (split still empty)."""
    raw = raw.dropna(subset=["image", "label", "sender_id"])
    return pd.DataFrame(
        {
            "path": [str(folder / "images" / f"{image}.jpg") for image in raw["image"]],
            "item_id": raw["image"].astype(str).to_numpy(),
            "label": raw["label"].astype(str).to_numpy(),
            "category": raw["label"].astype(str).to_numpy(),
            "domain": "consumer",
            "split": "",
            "x1": np.nan,
            "y1": np.nan,
            "x2": np.nan,
            "y2": np.nan,
            "sender_id": raw["sender_id"].astype(np.int64).to_numpy(),
            "kids": raw["kids"].astype(str).str.lower().eq("true").to_numpy(),
        }
    )


def _assign_splits(
    table: pd.DataFrame, fractions: Sequence[float], seed: int, eval_split: str, gallery_fraction: float
) -> pd.DataFrame:
    """Fill ``split``: contributors to train/val/test by `fractions`, then the `eval_split` contributors into
    query and gallery (`gallery_fraction` of the images); columns in contract order."""
    part = group_split(table["sender_id"], table["label"], fractions, seed=seed)
    split = np.asarray(_SPLIT_NAMES, dtype=object)[part]
    in_eval = split == eval_split
    if in_eval.any():
        gallery = _query_gallery(table.loc[in_eval].reset_index(drop=True), gallery_fraction, seed)
        split[np.flatnonzero(in_eval)] = np.where(gallery, "gallery", "query")
    table["split"] = split
    for col in ("x1", "y1", "x2", "y2"):
        table[col] = table[col].astype(np.float64)
    rest = [c for c in table.columns if c not in BASE_COLUMNS]
    return table[BASE_COLUMNS + rest]


def read_clothing(
    dataset_dir: str | os.PathLike | None = None,
    seed: int = 0,
    eval_split: str = "test",
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    gallery_fraction: float = 0.5,
    exclude_labels: Sequence[str] = NON_GARMENT_LABELS,
    check_images: bool = True,
) -> pd.DataFrame:
    """Read the clothing dataset folder (images.csv + images/) into the contract table.

    `dataset_dir` is the clothing-dataset folder itself (None: <data root>/clothing-dataset).
    Contributors go to train/val/test by `fractions` of images; query and gallery come from the
    `eval_split` contributors, split by contributor with `gallery_fraction` of the images in the gallery.
    Rows whose image is missing are dropped with one warning; images without a csv row are ignored.
    """
    folder, csv = _clothing_csv(dataset_dir, eval_split, fractions, gallery_fraction)
    table = _clothing_table(read_images_csv(csv), folder)
    if check_images:
        table = drop_missing_images(table, "clothing")  # called here: its warning names our caller
    table = table.loc[~table["label"].isin(list(exclude_labels))].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"{csv}: no rows left after dropping missing images and labels {list(exclude_labels)}")
    return _assign_splits(table, fractions, seed, eval_split, gallery_fraction)

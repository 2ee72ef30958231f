"""Pieces every dataset reader shares: where a dataset lives, and dropping rows whose image is missing."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..paths import data_root
from ._annotations import missing_path_error

# dataset name -> folder under the data root
SUBFOLDERS: dict[str, str] = {
    "inshop": "inshop",
    "consumer2shop": "consumer2shop",
    "deepfashion2": "deepfashion2",
    "attributes": "attributes",
    "clothing": "clothing-dataset",
}

# the columns every reader returns first, in this order (contract)
BASE_COLUMNS: list[str] = ["path", "item_id", "label", "category", "domain", "split", "x1", "y1", "x2", "y2"]


class MissingImagesWarning(UserWarning):
    """Rows were dropped because their image file is not on disk."""


def dataset_dir(name: str, root: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> Path:
    """Folder of dataset `name`: `path` if given, else <data_root(root)>/<subfolder>; must exist."""
    folder = Path(path).expanduser().resolve() if path is not None else data_root(root) / SUBFOLDERS[name]
    if not folder.is_dir():
        raise missing_path_error(folder, name, "dataset folder")
    return folder


def image_base(folder: Path, dataset: str) -> Path:
    """Folder that image names ('img/...') are relative to: `folder`, or `folder/Img` for copies with Img/img/."""
    for base in (folder, folder / "Img"):
        if (base / "img").is_dir():
            return base
    raise missing_path_error(folder / "img", dataset, "image folder (img/ or Img/img/)")


def summarize_missing(paths: Sequence[str], dataset: str, total: int, limit: int = 5) -> str:
    """One-line summary of missing image files: count, share and up to `limit` example paths."""
    examples = ", ".join(str(p) for p in list(paths)[:limit])
    more = " ..." if len(paths) > limit else ""
    return (
        f"{dataset}: {len(paths)} of {total} listed images are missing on disk; "
        f"their rows were dropped (e.g. {examples}{more})"
    )


def drop_missing_images(table: pd.DataFrame, dataset: str, column: str = "path") -> pd.DataFrame:
    """Drop rows whose image file (table[column]) does not exist; warn ONCE with count and examples."""
    unique = pd.unique(table[column].astype(str))
    exists = {p: os.path.isfile(p) for p in unique}
    present = table[column].astype(str).map(exists).to_numpy(dtype=bool)
    if present.all():
        return table
    missing = [p for p in unique if not exists[p]]
    warnings.warn(summarize_missing(missing, dataset, total=len(unique)), MissingImagesWarning, stacklevel=3)
    return table.loc[present].reset_index(drop=True)


def finish_table(table: pd.DataFrame, dataset: str, check_images: bool = True) -> pd.DataFrame:
    """Order columns (contract columns first), coerce box columns to float, drop missing images."""
    for col in ("x1", "y1", "x2", "y2"):
        table[col] = table[col].astype(np.float64) if col in table else np.nan
    for col in ("path", "item_id", "label", "category", "domain", "split"):
        table[col] = table[col].astype(str)
    rest = [c for c in table.columns if c not in BASE_COLUMNS]
    table = table[BASE_COLUMNS + rest].reset_index(drop=True)
    if check_images:
        table = drop_missing_images(table, dataset)
    return table

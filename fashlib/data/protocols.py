"""Evaluation protocols of a contract table: which rows are training, query and gallery images.

`load_table` reads a dataset (undecodable rows dropped) and caps it for smoke runs (`cap_table`);
`load_protocols` gives a validation table and a test table with identical training rows (the dataset's own
validation protocol, or `holdout_validation` of its training rows); `eval_rows` / `train_rows` give the row
positions every evaluation and training step uses. No torch: reading a protocol never imports it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from .. import data
from ..paths import PROJECT_ROOT, data_root

EVAL_ROLES = ("query", "gallery")
DECODE_CACHE = PROJECT_ROOT / ".cache" / "decodable"  # per-file "does it decode" results (data.drop_undecodable)


VALIDATION_DATASETS: tuple[str, ...] = ("consumer2shop", "clothing")


def load_table(
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    eval_split: str = "test",
    max_images: int | None = None,
    seed: int = 0,
    download: bool = True,
    decode_cache: str | os.PathLike | None = DECODE_CACHE,
    **options: Any,
) -> pd.DataFrame:
    """Read `dataset` (downloading the CC0 default when it is absent) and cap it to `max_images` rows.

    Returns the contract table (ARCHITECTURE.md, "The table contract"; `split` holds train, query, gallery
    and the other held-out split's name). `eval_split` ("test" or "val") is passed to the readers that have a
    validation protocol (consumer2shop, clothing). Rows whose image cannot be decoded are dropped before
    capping (data.drop_undecodable: one warning, counts per split in table.attrs["undecodable"]; per-file
    results cached in `decode_cache`). Raises KeyError for an unknown dataset, FileNotFoundError naming the
    missing dataset folder or annotation file and where to download it (the CC0 set with `download=False`),
    and the download's errors for the CC0 set.
    """
    if dataset in VALIDATION_DATASETS:
        options.setdefault("eval_split", eval_split)
    if dataset == "clothing":
        options.setdefault("seed", seed)
        folder = data_root(root) / data.SUBFOLDERS["clothing"]
        if download and not (folder / "images.csv").exists():
            data.download("clothing", root)
    table = data.load(dataset, root, **options)
    table = data.drop_undecodable(table, dataset, cache_dir=decode_cache)
    return cap_table(table, max_images, seed=seed)


def cap_table(table: pd.DataFrame, max_images: int | None, seed: int = 0) -> pd.DataFrame:
    """Cut a table to about `max_images` rows for smoke runs, keeping retrieval possible.

    Category-level data (labels shared by train and evaluation rows, like CC0): a few rows of every
    label in every split, dropping the rarest labels only when the budget is smaller than twice the
    label count. Item-level data: whole items, chosen once for all evaluation splits so that queries
    keep their gallery matches. Deterministic for a seed; the result may exceed the cap slightly
    since every kept label keeps at least one row per split.
    """
    if max_images is None or len(table) <= max_images:
        return table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    is_train = table["split"].to_numpy() == "train"
    shared = set(table.loc[is_train, "label"]) & set(table.loc[~is_train, "label"])
    if shared:
        keep = _cap_rows_per_label(table, max_images, rng)
    else:
        keep = np.concatenate(
            [
                _cap_whole_labels(table[mask], max_images * mask.mean(), rng)
                for mask in (is_train, ~is_train)
                if mask.any()
            ]
        )
    return table.loc[np.sort(keep)].reset_index(drop=True)


def _cap_rows_per_label(table: pd.DataFrame, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Index of a few rows of each (label, split), for category-level tables."""
    counts = table["label"].value_counts()
    n_labels = int(max(2, min(len(counts), budget // 2)))
    labels = set(counts.index[:n_labels])  # the most frequent labels when some must go
    part = table[table["label"].isin(labels)]
    share = budget / len(part)
    keep = [
        rng.choice(group.index.to_numpy(), size=max(1, round(share * len(group))), replace=False)
        for _, group in part.groupby(["label", "split"], sort=True)
    ]
    return np.concatenate(keep)


def _cap_whole_labels(part: pd.DataFrame, budget: float, rng: np.random.Generator) -> np.ndarray:
    """Index of all rows of randomly chosen labels (items) until `budget` rows, for item-level tables."""
    keep, taken = [], 0
    for label in rng.permutation(part["label"].unique()):
        rows = part.index[part["label"] == label].to_numpy()
        keep.append(rows)
        taken += len(rows)
        if taken >= budget:
            break
    return np.concatenate(keep)


def check_embedding_rows(table: pd.DataFrame, embeddings: np.ndarray) -> None:
    """Raise ValueError unless `embeddings` is a 2-D array with one row per table row (table order is the
    caller's promise). Rows of another table, or a cut or padded array, would be scored against the wrong
    labels without any other error."""
    shape = np.shape(embeddings)
    if len(shape) != 2 or shape[0] != len(table):
        raise ValueError(
            f"embeddings of shape {shape} for a table of {len(table)} rows: pass one row per table row, "
            "in table order (N, D)"
        )


def eval_rows(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (int64 arrays, ascending) of the query and gallery images of a table (its `split`
    column). ValueError when it has no query or no gallery row."""
    split = table["split"].to_numpy()
    query, gallery = np.flatnonzero(split == "query"), np.flatnonzero(split == "gallery")
    if len(query) == 0 or len(gallery) == 0:
        raise ValueError(
            f"the table has {len(query)} query and {len(gallery)} gallery rows; both are needed to evaluate retrieval"
        )
    return query, gallery


def train_rows(table: pd.DataFrame) -> np.ndarray:
    """Row positions (int64 array, ascending; empty when there is none) of the `split == "train"` rows."""
    return np.flatnonzero(table["split"].to_numpy() == "train")


def same_training_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two tables hold the same training rows (paths and labels) in the same order."""
    ta, tb = a.iloc[train_rows(a)], b.iloc[train_rows(b)]
    return (
        len(ta) == len(tb)
        and (ta["path"].to_numpy() == tb["path"].to_numpy()).all()
        and (ta["label"].to_numpy() == tb["label"].to_numpy()).all()
    )


def protocol_note(dataset: str) -> str:
    """One sentence saying which protocol a development notebook evaluates on for `dataset`."""
    if dataset in VALIDATION_DATASETS:
        return f"{dataset}: evaluated on the validation protocol (the test protocol stays untouched for chapter 05)."
    return (
        f"{dataset}: this dataset has no validation protocol, so this notebook falls back to its TEST "
        "protocol; treat its numbers as development numbers, not final results."
    )


def holdout_validation(table: pd.DataFrame, fraction: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """A validation protocol carved out of the training rows, for datasets without one (inshop, deepfashion2).

    A `fraction` of the training labels with >= 2 images (at least 2 labels) is held out: per held-out label,
    consumer images become queries and shop images gallery when both domains are present, else one random
    image is the query and the rest the gallery. The remaining training rows stay "train"; every original
    query/gallery row is relabelled "test" so the test protocol is never used. Row order is unchanged.
    """
    split = table["split"].to_numpy().astype(object).copy()
    split[np.isin(split, EVAL_ROLES)] = "test"
    train = np.flatnonzero(table["split"].to_numpy() == "train")
    labels = table["label"].to_numpy().astype(str)
    counts = pd.Series(labels[train]).value_counts()
    eligible = np.sort(counts.index[counts >= 2].to_numpy())
    if len(eligible) < 2:
        raise ValueError(f"only {len(eligible)} training labels have >= 2 images; cannot hold out a validation set")
    rng = np.random.default_rng(seed)
    n_held = min(len(eligible) - 1, max(2, int(round(fraction * len(eligible)))))
    domains = table["domain"].to_numpy().astype(str) if "domain" in table.columns else np.full(len(table), "")
    for label in rng.choice(eligible, size=n_held, replace=False):
        rows = train[labels[train] == label]
        consumer, shop = rows[domains[rows] == "consumer"], rows[domains[rows] == "shop"]
        if len(consumer) and len(shop):
            split[consumer], split[shop] = "query", "gallery"
        else:
            query = rng.choice(rows)
            split[rows], split[query] = "gallery", "query"
    return table.assign(split=split)


def load_protocols(
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    max_images: int | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.25,
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(validation table, test table, note) with IDENTICAL training rows, for selecting on val, reporting on test.

    Datasets with a validation protocol (consumer2shop, clothing) use it; the others get holdout_validation of
    their training rows (the note says so, and the chosen model must then be retrained on all training rows).
    With `max_images`, the validation table is capped and the test table keeps its training rows and a
    capped share of its query/gallery rows (its rows held out of the test protocol are dropped).
    """
    if dataset not in VALIDATION_DATASETS:
        test = load_table(dataset, root, max_images=max_images, seed=seed)
        val = holdout_validation(test, holdout_fraction, seed=seed)
        note = (
            f"{dataset} has no validation protocol: the model is selected on a validation set held out of its "
            f"TRAINING rows ({int(round(100 * holdout_fraction))}% of the training labels), never on test; the "
            "chosen configuration is then retrained on all training rows before its single test evaluation."
        )
        return val, test, note
    val = load_table(dataset, root, eval_split="val", seed=seed)
    test = load_table(dataset, root, eval_split="test", seed=seed)
    if len(val) != len(test) or not (val["path"].to_numpy() == test["path"].to_numpy()).all():
        raise ValueError(f"{dataset}: the val and test protocols list different rows")
    if max_images is not None and len(val) > max_images:
        val = cap_table(val.assign(_row=np.arange(len(val))), max_images, seed=seed)
        train = val.loc[val["split"] == "train", "_row"].to_numpy()
        capped = cap_table(test.assign(_row=np.arange(len(test))), max_images, seed=seed)
        held = capped.loc[capped["split"].isin(EVAL_ROLES), "_row"].to_numpy()
        keep = np.sort(np.concatenate([train, held]))
        test = test.iloc[keep].reset_index(drop=True)
        val = val.drop(columns="_row")
    note = (
        f"{dataset}: the model is selected on the validation protocol; the test protocol is evaluated once, at the end."
    )
    return val, test, note

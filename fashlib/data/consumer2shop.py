"""DeepFashion Consumer-to-shop Clothes Retrieval reader: one row per (image, role), official protocol."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ._annotations import read_annotation, require_unique
from ._common import BASE_COLUMNS, finish_table, image_base

STATUSES = ("train", "val", "test")
SOURCE_TYPES = {1: "shop", 2: "consumer"}
# the table's columns in order
TABLE_COLUMNS = (
    *BASE_COLUMNS,
    "image_name",
    "group",
    "subcategory",
    "status",
    "n_pairs",
    "clothes_type",
    "source_type",
)


def assign_consumer2shop_splits(pairs: pd.DataFrame, eval_split: str = "test") -> pd.DataFrame:
    """Turn (consumer, shop, item_id, status) pairs into one row per (image, role) with the protocol split.

    train pairs -> both images 'train'; consumer images of `eval_split` -> 'query'; consumer images
    of the other held-out split -> 'val' (or 'test' when eval_split='val'); shop images of val+test
    -> 'gallery'. An image listed in several pairs appears once per role.
    """
    if eval_split not in ("val", "test"):
        raise ValueError(f"eval_split must be 'val' or 'test', got {eval_split!r}")
    other = "val" if eval_split == "test" else "test"
    consumer_split = {"train": "train", eval_split: "query", other: other}
    shop_split = {"train": "train", "val": "gallery", "test": "gallery"}
    consumer = pd.DataFrame(
        {
            "image_name": pairs["consumer"],
            "item_id": pairs["item_id"],
            "domain": "consumer",
            "split": pairs["evaluation_status"].map(consumer_split),
            "status": pairs["evaluation_status"],
        }
    )
    shop = pd.DataFrame(
        {
            "image_name": pairs["shop"],
            "item_id": pairs["item_id"],
            "domain": "shop",
            "split": pairs["evaluation_status"].map(shop_split),
            "status": pairs["evaluation_status"],
        }
    )
    rows = pd.concat([consumer, shop], ignore_index=True)
    n_pairs = rows.groupby(["image_name", "domain", "split"], sort=False)["item_id"].transform("size")
    rows = rows.assign(n_pairs=n_pairs).drop_duplicates(["image_name", "domain", "split"]).reset_index(drop=True)
    return rows


def check_pair_roles(pairs: pd.DataFrame, path: str | os.PathLike) -> None:
    """ValueError naming two lines of `path` when an image changes role, item or partition between pairs.

    A consumer photo listed as a shop photo would be its own gallery match (query also in gallery); an
    image, or an item, in pairs of two partitions would be both trained on and evaluated. `pairs` needs a
    "line" column.
    """
    both = sorted(set(pairs["consumer"]) & set(pairs["shop"]))
    if both:
        a = int(pairs.loc[pairs["consumer"] == both[0], "line"].iloc[0])
        b = int(pairs.loc[pairs["shop"] == both[0], "line"].iloc[0])
        raise ValueError(
            f"{path}: image {both[0]!r} is a consumer photo on line {a} and a shop photo on line {b} "
            f"({len(both)} such images); an image must keep one role. Fix the file."
        )
    for role in ("consumer", "shop"):
        per_image = pairs[[role, "item_id", "evaluation_status", "line"]].drop_duplicates(
            [role, "item_id", "evaluation_status"]
        )
        require_unique(per_image, role, path, f"a {role} image belongs to one item and one partition (train/val/test)")
    per_item = pairs[["item_id", "evaluation_status", "line"]].drop_duplicates(["item_id", "evaluation_status"])
    require_unique(
        per_item,
        "item_id",
        path,
        "an item belongs to one partition (train, val or test): trained on, "
        "it would be found by its own query photos (an inflated Recall@K)",
    )


def read_consumer2shop(
    dataset_dir: str | os.PathLike, eval_split: str = "test", check_images: bool = True
) -> pd.DataFrame:
    """Read Consumer-to-shop: Eval/list_eval_partition.txt pairs + Anno/list_bbox_consumer2shop.txt.

    label = item_id; domain shop/consumer; category 'CLOTHING/Blouse' (img/<CATEGORY>/<SUB>/id/...);
    extra columns image_name, group (<CATEGORY>), subcategory, status (the official partition of the
    image's pairs), n_pairs, clothes_type, source_type.
    Exact duplicate lines are dropped with a warning; an image that is both a consumer and a shop photo,
    or is in pairs of two items or partitions, or has two boxes, is a ValueError naming both lines.
    """
    folder = Path(dataset_dir)
    pair_file = folder / "Eval" / "list_eval_partition.txt"
    pairs = read_annotation(
        pair_file,
        ["consumer", "shop", "item_id", "evaluation_status"],
        choices={"evaluation_status": STATUSES},
        dataset="consumer2shop",
        line_column="line",
    )
    check_pair_roles(pairs, pair_file)
    box_file = folder / "Anno" / "list_bbox_consumer2shop.txt"
    box = read_annotation(
        box_file,
        ["image_name", "clothes_type", "source_type", "x1", "y1", "x2", "y2"],
        converters={"clothes_type": int, "source_type": int, "x1": float, "y1": float, "x2": float, "y2": float},
        dataset="consumer2shop",
        line_column="line",
    )
    require_unique(box, "image_name", box_file, "an image must have one box")
    base = image_base(folder, "consumer2shop")
    rows = assign_consumer2shop_splits(pairs.drop(columns="line"), eval_split)
    table = _image_table(rows, box.drop(columns="line"), base)
    return finish_table(table, "consumer2shop", check_images)


def _image_table(rows: pd.DataFrame, box: pd.DataFrame, base: Path) -> pd.DataFrame:
    """The (image, role) rows of assign_consumer2shop_splits joined with their boxes (NaN / <NA> when absent),
    with group, subcategory, category from img/<GROUP>/<SUB>/..., path under `base`, label = item_id; columns
    in TABLE_COLUMNS order."""
    table = rows.merge(box, on="image_name", how="left")
    parts = table["image_name"].str.split("/")
    table["group"] = parts.str[-4].fillna("")
    table["subcategory"] = parts.str[-3].fillna("")
    table["category"] = table["group"] + "/" + table["subcategory"]
    table["path"] = [str(base / n) for n in table["image_name"]]
    table["label"] = table["item_id"]
    table["clothes_type"] = table["clothes_type"].astype("Int64")
    table["source_type"] = table["source_type"].astype("Int64")
    return table[[*TABLE_COLUMNS]]

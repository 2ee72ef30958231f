"""DeepFashion In-shop Clothes Retrieval reader: one row per image, official train/query/gallery split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._annotations import conflicting_rows, read_annotation, require_unique
from ._common import BASE_COLUMNS, finish_table, image_base

SPLITS = ("train", "query", "gallery")
CLOTHES_TYPES = {1: "upper-body", 2: "lower-body", 3: "full-body"}
POSE_TYPES = {1: "frontal", 2: "side", 3: "back", 4: "zoom-out", 5: "zoom-in", 6: "stand-alone"}
# the table's columns in order
TABLE_COLUMNS = (
    *BASE_COLUMNS,
    "image_name",
    "gender",
    "subcategory",
    "clothes_type",
    "pose_type",
    "pose",
    "view",
)


def parse_inshop_name(image_name: str) -> dict[str, object]:
    """Split 'img/WOMEN/Dresses/id_00000002/02_1_front.jpg' into gender, category, view, pose."""
    parts = image_name.split("/")
    if len(parts) < 5:
        raise ValueError(f"In-shop image name does not look like img/<GENDER>/<CATEGORY>/<ITEM>/<file>: {image_name!r}")
    gender, sub = parts[-4], parts[-3]
    stem = parts[-1].rsplit(".", 1)[0].split("_")
    view = int(stem[0]) if stem and stem[0].isdigit() else np.nan
    pose = "_".join(stem[2:]) if len(stem) >= 3 else (stem[-1] if stem else "")
    return {"category": f"{gender}/{sub}", "gender": gender, "subcategory": sub, "view": view, "pose": pose}


def check_items_stay_in_their_split(part: pd.DataFrame, path: str | os.PathLike) -> None:
    """ValueError naming two lines of `path` when an item has training images AND query/gallery images.

    In-shop items never cross between training and evaluation (the released split: 3,997 training items,
    3,985 test items): a model trained on an item's photos would find its query photos by heart, an
    inflated Recall@K. Query and gallery images of one item are the protocol. `part` needs a "line" column.
    """
    role = np.where(part["evaluation_status"].to_numpy() == "train", "train", "query/gallery")
    per_item = part.assign(role=role).drop_duplicates(["item_id", "role"])
    clash = conflicting_rows(per_item, "item_id", "line")
    if clash is None:
        return
    first, second = (per_item.loc[per_item["line"] == n].iloc[0] for n in clash)
    raise ValueError(
        f"{path}: item {first['item_id']!r} is {first['role']} on line {clash[0]} and {second['role']} on line "
        f"{clash[1]}; an item is either trained on or evaluated, never both (the model would have seen the "
        "query's garment). Fix the file."
    )


def read_inshop(dataset_dir: str | os.PathLike, check_images: bool = True) -> pd.DataFrame:
    """Read In-shop: Eval/list_eval_partition.txt + Anno/list_bbox_inshop.txt into the contract table.

    label = item_id; domain 'shop'; category 'WOMEN/Dresses' (gender/category from the path);
    extra columns image_name, gender, subcategory, view, pose (from the file name), clothes_type,
    pose_type (from the bbox file, ints as documented in FORMATS.md).
    Exact duplicate lines are dropped with a warning; an image listed twice with different values (e.g.
    both as query and as gallery, which would make it its own top-1 match) is a ValueError naming both lines,
    and so is an item with both training and query/gallery images (check_items_stay_in_their_split).
    """
    folder = Path(dataset_dir)
    part_file = folder / "Eval" / "list_eval_partition.txt"
    part = read_annotation(
        part_file,
        ["image_name", "item_id", "evaluation_status"],
        choices={"evaluation_status": SPLITS},
        dataset="inshop",
        line_column="line",
    )
    require_unique(part, "image_name", part_file, "an image must have one item and one role (train, query or gallery)")
    check_items_stay_in_their_split(part, part_file)
    box_file = folder / "Anno" / "list_bbox_inshop.txt"
    box = read_annotation(
        box_file,
        ["image_name", "clothes_type", "pose_type", "x1", "y1", "x2", "y2"],
        converters={"clothes_type": int, "pose_type": int, "x1": float, "y1": float, "x2": float, "y2": float},
        dataset="inshop",
        line_column="line",
    )
    require_unique(box, "image_name", box_file, "an image must have one box")
    base = image_base(folder, "inshop")
    table = _image_table(part.drop(columns="line"), box.drop(columns="line"), base)
    return finish_table(table, "inshop", check_images)


def _image_table(part: pd.DataFrame, box: pd.DataFrame, base: Path) -> pd.DataFrame:
    """The partition's images joined with their boxes (NaN / <NA> when absent), with category, gender,
    subcategory, view, pose from the name (parse_inshop_name), path under `base`, label = item_id, domain 'shop'
    and split; columns in TABLE_COLUMNS order. ValueError from parse_inshop_name for a malformed name."""
    table = part.merge(box, on="image_name", how="left")
    names = pd.DataFrame([parse_inshop_name(n) for n in table["image_name"]], index=table.index)
    table = pd.concat([table, names], axis=1)
    table["path"] = [str(base / n) for n in table["image_name"]]
    table["label"] = table["item_id"]
    table["domain"] = "shop"
    table["split"] = table.pop("evaluation_status")
    table["clothes_type"] = table["clothes_type"].astype("Int64")
    table["pose_type"] = table["pose_type"].astype("Int64")
    return table[[*TABLE_COLUMNS]]

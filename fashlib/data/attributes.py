"""DeepFashion Category and Attribute Prediction reader: one row per image, 50 categories, 1,000 attributes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._annotations import read_annotation, read_annotation_matrix, require_path, require_unique
from ._common import BASE_COLUMNS, finish_table, image_base

STATUSES = ("train", "val", "test")
CATEGORY_TYPES = {1: "upper-body", 2: "lower-body", 3: "full-body"}
ATTRIBUTE_TYPES = {1: "texture", 2: "fabric", 3: "shape", 4: "part", 5: "style"}
# the table's columns in order (then `attributes` when read)
TABLE_COLUMNS = (
    *BASE_COLUMNS,
    "image_name",
    "category_label",
    "category_type",
)


def read_attribute_names(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Anno/list_attr_cloth.txt as a frame (attribute_name, attribute_type, group); names may hold spaces."""
    names = read_annotation(
        Path(dataset_dir) / "Anno" / "list_attr_cloth.txt",
        ["attribute_name", "attribute_type"],
        converters={"attribute_type": int},
        merge_extra_into="attribute_name",
        dataset="attributes",
    )
    names["group"] = names["attribute_type"].map(ATTRIBUTE_TYPES)
    return names


def attribute_tuples(
    wanted: pd.Series, images: np.ndarray, matrix: np.ndarray, names: np.ndarray, path: str | os.PathLike
) -> list[tuple[str, ...]]:
    """Per wanted image, the names of its attributes marked 1 in `matrix` (rows named by `images`).

    ValueError naming `path` when a wanted image has no row (it used to read as "no attribute at all") or
    when an image has two rows with different values; identical repeated rows are fine."""
    rows = pd.DataFrame(matrix).assign(image_name=images)
    repeated = rows[rows["image_name"].duplicated(keep=False)]
    if len(repeated) and len(repeated.drop_duplicates()) != repeated["image_name"].nunique():
        name = repeated["image_name"].iloc[0]
        raise ValueError(f"{path}: image {name!r} has two rows with different attribute values; keep the right one")
    missing = sorted(set(wanted) - set(images.tolist()))
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} image(s) of the partition have no attribute row (e.g. "
            f"{missing[0]!r}); an absent row is not 'no attributes': fix the file or pass "
            "attributes=False"
        )
    index = {n: i for i, n in enumerate(images.tolist())}
    return [tuple(names[np.flatnonzero(matrix[index[n]] == 1)]) for n in wanted]


def read_attributes(dataset_dir: str | os.PathLike, attributes: bool = True, check_images: bool = True) -> pd.DataFrame:
    """Read Category-Attribute: categories (1-based labels), train/val/test partition, attributes, boxes.

    label = category; domain 'shop'; item_id = the image's folder (a product title, e.g.
    'Sheer_Pleated-Front_Blouse'). attributes=True adds column `attributes`: a tuple of the names
    of the attributes marked 1 for that image (the full name list is read_attribute_names());
    attributes=False skips the 1,000-column file. Boxes come from Anno/list_bbox.txt when present.
    """
    folder = Path(dataset_dir)
    cats, labels = _read_category_files(folder / "Anno")
    part = _read_partition(folder)
    table = _join_categories(folder, part, labels, cats)
    table = _add_boxes(table, folder / "Anno" / "list_bbox.txt")
    if attributes:
        table["attributes"] = _image_attributes(folder, table["image_name"])
    table = table[[*TABLE_COLUMNS, "attributes"] if attributes else [*TABLE_COLUMNS]]
    return finish_table(table, "attributes", check_images)


def _read_category_files(anno: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(list_category_cloth.txt as category_name, category_type; list_category_img.txt as image_name,
    category_label), both under `anno`. ValueError naming both lines when an image is listed with two categories."""
    cats = read_annotation(
        anno / "list_category_cloth.txt",
        ["category_name", "category_type"],
        converters={"category_type": int},
        merge_extra_into="category_name",
        dataset="attributes",
    )
    labels = read_annotation(
        anno / "list_category_img.txt",
        ["image_name", "category_label"],
        converters={"category_label": int},
        dataset="attributes",
        line_column="line",
    )
    require_unique(labels, "image_name", anno / "list_category_img.txt", "an image must have one category")
    return cats, labels.drop(columns="line")


def _read_partition(folder: Path) -> pd.DataFrame:
    """Eval/list_eval_partition.txt as (image_name, evaluation_status in STATUSES); ValueError naming both lines
    when an image is listed in two splits."""
    part = read_annotation(
        folder / "Eval" / "list_eval_partition.txt",
        ["image_name", "evaluation_status"],
        choices={"evaluation_status": STATUSES},
        dataset="attributes",
        line_column="line",
    )
    require_unique(part, "image_name", folder / "Eval" / "list_eval_partition.txt", "an image must have one split")
    return part.drop(columns="line")


def _join_categories(folder: Path, part: pd.DataFrame, labels: pd.DataFrame, cats: pd.DataFrame) -> pd.DataFrame:
    """One row per image of the partition with its category and the contract's item_id, label, domain, split, path.

    ValueError for a category_label outside 1..len(cats), or when the partition and the category file do not
    list the same images; FileNotFoundError when the image folder is missing (image_base)."""
    anno = folder / "Anno"
    bad = labels.loc[(labels["category_label"] < 1) | (labels["category_label"] > len(cats))]
    if len(bad):
        raise ValueError(
            f"{anno / 'list_category_img.txt'}: category_label must be 1..{len(cats)} "
            f"(list_category_cloth.txt), got {int(bad['category_label'].iloc[0])} for {bad['image_name'].iloc[0]}"
        )
    base = image_base(folder, "attributes")
    table = part.merge(labels, on="image_name", how="inner", validate="one_to_one")
    if len(table) != len(part) or len(table) != len(labels):
        raise ValueError(
            f"{folder}: Eval/list_eval_partition.txt lists {len(part)} images and "
            f"Anno/list_category_img.txt {len(labels)}; {len(table)} in both"
        )
    index = table["category_label"].to_numpy() - 1
    table["category"] = cats["category_name"].to_numpy()[index]
    table["category_type"] = cats["category_type"].to_numpy()[index]
    table["split"] = table.pop("evaluation_status")
    table["label"] = table["category"]
    table["item_id"] = table["image_name"].str.split("/").str[-2].fillna(table["image_name"])
    table["domain"] = "shop"
    table["path"] = [str(base / n) for n in table["image_name"]]
    return table


def _add_boxes(table: pd.DataFrame, bbox_file: Path) -> pd.DataFrame:
    """`table` with x1, y1, x2, y2 (pixels, float64) from `bbox_file` (NaN for images it lacks), or all NaN when
    the file is absent. ValueError naming both lines when an image has two boxes."""
    if bbox_file.exists():
        box = read_annotation(
            bbox_file,
            ["image_name", "x1", "y1", "x2", "y2"],
            converters={c: float for c in ("x1", "y1", "x2", "y2")},
            dataset="attributes",
            line_column="line",
        )
        require_unique(box, "image_name", bbox_file, "an image must have one box")
        table = table.merge(box.drop(columns="line"), on="image_name", how="left")
    else:
        table[["x1", "y1", "x2", "y2"]] = np.nan
    return table


def _image_attributes(folder: Path, image_names: pd.Series) -> list[tuple[str, ...]]:
    """Per image name, the tuple of its attribute names marked 1 in Anno/list_attr_img.txt (attribute_tuples).

    FileNotFoundError when the file is missing; ValueError when its values per image differ from the number of
    names in list_attr_cloth.txt, or as attribute_tuples raises."""
    anno = folder / "Anno"
    names = read_attribute_names(folder)["attribute_name"].to_numpy()
    images, matrix = read_annotation_matrix(require_path(anno / "list_attr_img.txt", "attributes", "annotation file"))
    if matrix.shape[1] != len(names):
        raise ValueError(
            f"{anno / 'list_attr_img.txt'}: {matrix.shape[1]} values per image but "
            f"list_attr_cloth.txt names {len(names)} attributes"
        )
    return attribute_tuples(image_names, images, matrix, names, anno / "list_attr_img.txt")

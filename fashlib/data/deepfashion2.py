"""DeepFashion2 reader for commercial-consumer retrieval: one row per clothing ITEM.

Matching rule (FORMATS.md): a user item and a shop item match when they share pair_id and the same
style, and that style is > 0. So item_id = label = f"{pair_id}_{style}" for style > 0.
Style-0 items take part in no pair; this reader gives them a unique item_id
f"{pair_id}_0_{part}_{image_id}_{itemN}" so they can never match anything, and
  - keeps them in "train" (singleton labels; filter with table.style > 0 if a loss needs pairs),
  - drops style-0 USER items from the query set (they have no true match),
  - keeps style-0 SHOP items in the gallery as distractors (every shop item of the evaluation part
    is in the gallery).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ._annotations import missing_path_error, read_text
from ._common import BASE_COLUMNS, finish_table

# release folder -> its role; a flat <df2>/{image,annos} is read as the evaluation part
PARTS: dict[str, str] = {"train": "train", "validation": "eval"}
ITEM_FIELDS = ("category_id", "category_name", "style", "bounding_box", "scale", "occlusion", "zoom_in", "viewpoint")
# the columns of the items read from the json files (with the part's role), when there is none to read
ITEM_COLUMNS = (
    "path",
    "item",
    "source",
    "pair_id",
    "category_id",
    "category",
    "style",
    "x1",
    "y1",
    "x2",
    "y2",
    "scale",
    "occlusion",
    "zoom_in",
    "viewpoint",
    "image_id",
    "part",
    "role",
)
# the table's columns in order
TABLE_COLUMNS = (
    *BASE_COLUMNS,
    "category_id",
    "style",
    "pair_id",
    "source",
    "occlusion",
    "viewpoint",
    "zoom_in",
    "scale",
    "image_id",
    "item",
    "part",
)


def read_df2_annotation(json_path: Path) -> list[dict[str, object]]:
    """Read one DeepFashion2 json into one dict per item (item1, item2, ...); ValueError if malformed."""
    try:
        anno = json.loads(read_text(json_path))  # UTF-8, BOM allowed; ValueError naming byte offset if not
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(anno, dict) or "source" not in anno or "pair_id" not in anno:
        raise ValueError(f"{json_path}: expected a JSON object with 'source', 'pair_id' and item1, item2, ...")
    if anno["source"] not in ("shop", "user"):
        raise ValueError(f"{json_path}: source must be 'shop' or 'user', got {anno['source']!r}")
    items = []
    for key in sorted((k for k in anno if k.startswith("item")), key=lambda k: int(k[4:]) if k[4:].isdigit() else 0):
        item = anno[key]
        missing = [f for f in ITEM_FIELDS if f not in item]
        if missing:
            raise ValueError(f"{json_path}: {key} lacks {', '.join(missing)}")
        box = item["bounding_box"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4):
            raise ValueError(f"{json_path}: {key}.bounding_box must be [x1, y1, x2, y2], got {box!r}")
        items.append(
            {
                "item": key,
                "source": anno["source"],
                "pair_id": int(anno["pair_id"]),
                "category_id": int(item["category_id"]),
                "category": str(item["category_name"]),
                "style": int(item["style"]),
                "x1": float(box[0]),
                "y1": float(box[1]),
                "x2": float(box[2]),
                "y2": float(box[3]),
                "scale": item["scale"],
                "occlusion": item["occlusion"],
                "zoom_in": item["zoom_in"],
                "viewpoint": item["viewpoint"],
            }
        )
    return items


def _read_part(part_dir: Path, part: str) -> pd.DataFrame:
    """One row per item of the json files in <part_dir>/annos (file order) with image_id, part and image path."""
    annos = part_dir / "annos"
    images = part_dir / "image"
    rows = []
    for json_path in sorted(annos.glob("*.json")):
        image_id = json_path.stem
        for item in read_df2_annotation(json_path):
            item.update(image_id=image_id, part=part, path=str(images / f"{image_id}.jpg"))
            rows.append(item)
    return pd.DataFrame(rows)


def df2_splits(table: pd.DataFrame) -> pd.DataFrame:
    """Give item_id/label/domain/split to DF2 items by the matching rule and the style-0 choice above."""
    table = table.copy()
    styled = table["style"] > 0
    table["item_id"] = np.where(
        styled,
        table["pair_id"].astype(str) + "_" + table["style"].astype(str),
        table["pair_id"].astype(str) + "_0_" + table["part"] + "_" + table["image_id"] + "_" + table["item"],
    )
    table["label"] = table["item_id"]
    table["domain"] = table["source"].map({"user": "consumer", "shop": "shop"})
    is_eval = table["role"] == "eval"
    table["split"] = np.where(~is_eval, "train", np.where(table["source"] == "user", "query", "gallery"))
    keep = ~(is_eval & (table["source"] == "user") & ~styled)
    return table.loc[keep].reset_index(drop=True)


def read_deepfashion2(dataset_dir: str | os.PathLike, check_images: bool = True) -> pd.DataFrame:
    """Read DeepFashion2 annotations: <df2>/{train,validation}/{image,annos} or a flat <df2>/{image,annos}.

    train -> 'train'; validation (or flat) user items with style > 0 -> 'query', shop items ->
    'gallery'. Columns beyond the contract: category_id, style, pair_id, source, occlusion,
    viewpoint, zoom_in, scale, image_id, item ('item1'...), part ('train'/'validation'/'flat').
    """
    table = _read_items(_find_parts(Path(dataset_dir)))
    table = df2_splits(table).drop(columns="role")
    table = table[[*TABLE_COLUMNS]]
    return finish_table(table, "deepfashion2", check_images)


def _find_parts(folder: Path) -> list[tuple[Path, str, str]]:
    """(part folder, part name, role) of each part present: train/ and validation/ (PARTS), else a flat
    <df2>/annos as ('flat', 'eval'). FileNotFoundError naming the expected folders and the download page if none."""
    found = [(name, role) for name, role in PARTS.items() if (folder / name / "annos").is_dir()]
    parts = [(folder / name, name, role) for name, role in found]
    if not parts:
        if (folder / "annos").is_dir():
            parts = [(folder, "flat", "eval")]
        else:
            raise missing_path_error(
                folder / "validation" / "annos",
                "deepfashion2",
                "annotation folder (<df2>/validation/annos, <df2>/train/annos or <df2>/annos)",
            )
    return parts


def _read_items(parts: list[tuple[Path, str, str]]) -> pd.DataFrame:
    """One row per item of every part, in part then file order, with its `role`; an empty frame with
    ITEM_COLUMNS when no part holds an annotation. ValueError naming the json file for a malformed one."""
    frames = []
    for part_dir, part, role in parts:
        frame = _read_part(part_dir, part)
        if len(frame):
            frames.append(frame.assign(role=role))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ITEM_COLUMNS))

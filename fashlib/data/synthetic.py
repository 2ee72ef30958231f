"""Miniature DeepFashion trees in the exact published layouts, for tests and offline demos.

Each make_* writes <root>/<subfolder> (so load(name, root=root) reads it) with real-looking file
names, annotation files (line-1 count, line-2 header, space-padded aligned columns) and small JPEGs
drawn with PIL: a coloured shape whose colour and shape depend on the item, so retrieval is
learnable. A SYNTHETIC.json manifest records what was written (counts per split) for tests.
Deterministic for a given seed.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._common import SUBFOLDERS

SHAPES = ("ellipse", "rectangle", "triangle", "diamond")
MANIFEST = "SYNTHETIC.json"

INSHOP_CATEGORIES = (
    ("WOMEN", "Dresses", 3),
    ("WOMEN", "Blouses_Shirts", 1),
    ("MEN", "Denim", 2),
    ("MEN", "Tees_Tanks", 1),
)
INSHOP_POSES = ((1, "front", 1), (2, "side", 2), (3, "back", 3), (4, "full", 4), (7, "additional", 5), (6, "flat", 6))
C2S_CATEGORIES = (("CLOTHING", "Blouse", 1), ("DRESSES", "Dress", 3), ("TOPS", "T_Shirt", 1), ("TROUSERS", "Pants", 2))
DF2_CATEGORIES = (
    "short sleeve top",
    "long sleeve top",
    "short sleeve outwear",
    "long sleeve outwear",
    "vest",
    "sling",
    "shorts",
    "trousers",
    "skirt",
    "short sleeve dress",
    "long sleeve dress",
    "vest dress",
    "sling dress",
)
# the 50 categories of Category-Attribute Prediction, with type 1 upper, 2 lower, 3 full body
ATTRIBUTE_CATEGORIES = tuple(
    [
        (n, 1)
        for n in [
            "Anorak",
            "Blazer",
            "Blouse",
            "Bomber",
            "Button-Down",
            "Cardigan",
            "Flannel",
            "Halter",
            "Henley",
            "Hoodie",
            "Jacket",
            "Jersey",
            "Parka",
            "Peacoat",
            "Poncho",
            "Sweater",
            "Tank",
            "Tee",
            "Top",
            "Turtleneck",
        ]
    ]
    + [
        (n, 2)
        for n in [
            "Capris",
            "Chinos",
            "Culottes",
            "Cutoffs",
            "Gauchos",
            "Jeans",
            "Jeggings",
            "Jodhpurs",
            "Joggers",
            "Leggings",
            "Sarong",
            "Shorts",
            "Skirt",
            "Sweatpants",
            "Sweatshorts",
            "Trunks",
        ]
    ]
    + [
        (n, 3)
        for n in [
            "Caftan",
            "Cape",
            "Coat",
            "Coverup",
            "Dress",
            "Jumpsuit",
            "Kaftan",
            "Kimono",
            "Nightdress",
            "Onesie",
            "Robe",
            "Romper",
            "Shirtdress",
            "Sundress",
        ]
    ]
)
ATTRIBUTE_NAMES = (
    ("abstract print", 1),
    ("floral print", 1),
    ("striped", 1),
    ("denim", 2),
    ("lace", 2),
    ("cotton knit", 2),
    ("a-line", 3),
    ("maxi", 3),
    ("fit and flare", 3),
    ("pocket", 4),
    ("v-neck", 4),
    ("boho", 5),
    ("summer", 5),
)


def item_color(index: int) -> tuple[int, int, int]:
    """A saturated colour that differs between neighbouring item indices (golden-ratio hues)."""
    hue = (index * 0.618033988749895) % 1.0
    value = 0.95 if (index // 7) % 2 == 0 else 0.6
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_garment(
    size: tuple[int, int], color: tuple[int, int, int], shape: str, rng: np.random.Generator, clutter: bool = False
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draw one coloured shape (the 'garment') on a pale background; return the image and its box."""
    w, h = size
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    if clutter:  # consumer photos: busy backgrounds
        for _ in range(4):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            grey = int(rng.integers(90, 200))
            draw.rectangle([x, y, x + int(rng.integers(4, w // 3)), y + int(rng.integers(4, h // 3))], fill=(grey,) * 3)
    side = min(w, h)
    bw, bh = int(side * rng.uniform(0.4, 0.65)), int(side * rng.uniform(0.4, 0.65))
    x1, y1 = int(rng.integers(2, w - bw - 1)), int(rng.integers(2, h - bh - 1))
    x2, y2 = x1 + bw, y1 + bh
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in color)
    if shape == "ellipse":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
    elif shape == "rectangle":
        draw.rectangle([x1, y1, x2, y2], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill)
    else:
        draw.polygon(
            [((x1 + x2) // 2, y1), (x2, (y1 + y2) // 2), ((x1 + x2) // 2, y2), (x1, (y1 + y2) // 2)], fill=fill
        )
    return img, (x1, y1, x2, y2)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=85)


def write_annotation(
    path: Path, header: Sequence[str], rows: Sequence[Sequence[object]], count: int | None = None
) -> None:
    """Write a DeepFashion-style file: count, header, then rows with space-padded aligned columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    body = cells[1:] if rows and len(rows[0]) != len(header) else cells  # variadic rows: header sets no widths
    widths = [max([len(r[i]) for r in body if i < len(r)] or [0]) for i in range(max(len(r) for r in cells))]
    lines = [str(len(rows) if count is None else count)]
    lines += ["".join(c.ljust(widths[i] + 2) for i, c in enumerate(r)).rstrip() for r in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _folder(root: str | os.PathLike, name: str) -> Path:
    folder = Path(root) / SUBFOLDERS[name]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _manifest(folder: Path, data: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


def _item_ids(rng: np.random.Generator, n: int) -> list[str]:
    numbers = np.sort(rng.choice(np.arange(1, 100_000), size=n, replace=False))
    return [f"id_{k:08d}" for k in numbers]


def _split_items(rng: np.random.Generator, n: int, fractions: Sequence[float]) -> np.ndarray:
    """Part index per item: shuffled, sizes by fractions, every part non-empty when n allows."""
    sizes = np.floor(np.asarray(fractions) * n).astype(int)
    sizes = np.maximum(sizes, 1 if n >= len(fractions) else 0)
    sizes[0] = n - sizes[1:].sum()
    parts = np.repeat(np.arange(len(fractions)), sizes)
    return parts[rng.permutation(n)]


def make_inshop(
    root: str | os.PathLike, n_items: int = 12, images_per_item: int = 4, seed: int = 0, image_size: int = 64
) -> Path:
    """Write a miniature In-shop tree (img/, Anno/, Eval/) under <root>/inshop; return that folder.

    About half the items are train; each test item has images_per_item // 2 query images and the
    rest gallery. Needs images_per_item >= 2.
    """
    if images_per_item < 2 or images_per_item > len(INSHOP_POSES):
        raise ValueError(f"images_per_item must be in 2..{len(INSHOP_POSES)}, got {images_per_item}")
    rng = np.random.default_rng(seed)
    folder = _folder(root, "inshop")
    ids = _item_ids(rng, n_items)
    test = _split_items(rng, n_items, (0.5, 0.5)) == 1
    partition, boxes, counts = [], [], {"train": 0, "query": 0, "gallery": 0}
    for i, item_id in enumerate(ids):
        gender, sub, clothes_type = INSHOP_CATEGORIES[i % len(INSHOP_CATEGORIES)]
        for v in range(images_per_item):
            pose_index, pose_name, pose_type = INSHOP_POSES[v]
            name = f"img/{gender}/{sub}/{item_id}/{v + 1:02d}_{pose_index}_{pose_name}.jpg"
            img, box = draw_garment((image_size, image_size), item_color(i), SHAPES[i % len(SHAPES)], rng)
            _save(img, folder / name)
            split = "train" if not test[i] else ("query" if v < images_per_item // 2 else "gallery")
            counts[split] += 1
            partition.append((name, item_id, split))
            boxes.append((name, clothes_type, pose_type, *box))
    write_annotation(
        folder / "Eval" / "list_eval_partition.txt", ["image_name", "item_id", "evaluation_status"], partition
    )
    write_annotation(
        folder / "Anno" / "list_bbox_inshop.txt",
        ["image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2"],
        boxes,
    )
    (folder / "Anno" / "list_item_inshop.txt").write_text("\n".join([str(n_items), *ids]) + "\n", encoding="utf-8")
    _manifest(folder, {"images": counts, "items": {"train": int((~test).sum()), "test": int(test.sum())}})
    return folder


def make_consumer2shop(
    root: str | os.PathLike,
    n_items: int = 12,
    consumer_per_item: int = 2,
    shop_per_item: int = 2,
    seed: int = 0,
    image_size: int = 64,
) -> Path:
    """Write a miniature Consumer-to-shop tree under <root>/consumer2shop; return that folder.

    Items go to train/val/test (about 50/25/25); every consumer image of an item is paired with every
    shop image of it, so images appear in several pairs, as in the release.
    """
    rng = np.random.default_rng(seed)
    folder = _folder(root, "consumer2shop")
    ids = _item_ids(rng, n_items)
    status = np.asarray(["train", "val", "test"])[_split_items(rng, n_items, (0.5, 0.25, 0.25))]
    pairs, boxes = [], []
    size = (image_size, int(image_size * 1.25))  # portrait, like the 300 px long-side originals
    for i, item_id in enumerate(ids):
        group, sub, clothes_type = C2S_CATEGORIES[i % len(C2S_CATEGORIES)]
        consumer, shop = [], []
        for role, n, source_type, names in (
            ("comsumer", consumer_per_item, 2, consumer),
            ("shop", shop_per_item, 1, shop),
        ):
            for k in range(n):  # 'comsumer_01.jpg' is how the release spells it
                name = f"img/{group}/{sub}/{item_id}/{role}_{k + 1:02d}.jpg"
                img, box = draw_garment(size, item_color(i), SHAPES[i % len(SHAPES)], rng, clutter=source_type == 2)
                _save(img, folder / name)
                boxes.append((name, clothes_type, source_type, *box))
                names.append(name)
        pairs += [(c, s, item_id, status[i]) for c in consumer for s in shop]
    write_annotation(
        folder / "Eval" / "list_eval_partition.txt",
        ["image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status"],
        pairs,
    )
    write_annotation(
        folder / "Anno" / "list_bbox_consumer2shop.txt",
        ["image_name", "clothes_type", "source_type", "x_1", "y_1", "x_2", "y_2"],
        boxes,
    )
    items = {s: int((status == s).sum()) for s in ("train", "val", "test")}
    _manifest(
        folder,
        {"items": items, "consumer_per_item": consumer_per_item, "shop_per_item": shop_per_item, "pairs": len(pairs)},
    )
    return folder


def _df2_item(category_id: int, style: int, box: tuple[int, int, int, int], rng: np.random.Generator) -> dict:
    x1, y1, x2, y2 = box
    return {
        "category_id": category_id,
        "category_name": DF2_CATEGORIES[category_id - 1],
        "style": style,
        "bounding_box": [x1, y1, x2, y2],
        "landmarks": [int((x1 + x2) / 2), y1, 2],
        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
        "scale": int(rng.integers(1, 4)),
        "occlusion": int(rng.integers(1, 4)),
        "zoom_in": int(rng.integers(1, 4)),
        "viewpoint": int(rng.integers(1, 4)),
    }


def make_deepfashion2(
    root: str | os.PathLike, n_pairs: int = 4, seed: int = 0, layout: str = "release", image_size: int = 64
) -> Path:
    """Write miniature DeepFashion2 parts (image/ + annos/*.json) under <root>/deepfashion2; return it.

    layout 'release': train/ and validation/ parts; 'flat': one <df2>/{image,annos} evaluation part.
    Per pair_id: shop images [style 1 + a style-0 extra item], [style 2]; user images [style 1],
    [style 2 + a style-0 extra item]. So per pair: 6 items, 2 queries (user, style > 0), 3 gallery items.
    """
    if layout not in ("release", "flat"):
        raise ValueError(f"layout must be 'release' or 'flat', got {layout!r}")
    rng = np.random.default_rng(seed)
    folder = _folder(root, "deepfashion2")
    parts = (
        {"train": folder / "train", "validation": folder / "validation"} if layout == "release" else {"flat": folder}
    )
    plan = (("shop", (1, 0)), ("shop", (2,)), ("user", (1,)), ("user", (2, 0)))
    counts: dict[str, dict[str, int]] = {}
    for p, (part, part_dir) in enumerate(parts.items()):
        number, n_items = 0, 0
        for pair in range(n_pairs):
            pair_id = p * 1000 + pair + 1
            categories = {s: int(rng.integers(1, len(DF2_CATEGORIES) + 1)) for s in (0, 1, 2)}
            for source, styles in plan:
                number += 1
                anno: dict[str, object] = {"source": source, "pair_id": pair_id}
                canvas = None
                for k, style in enumerate(styles):
                    key = pair_id * 3 + style if style else int(rng.integers(0, 10_000))
                    img, box = draw_garment(
                        (image_size, image_size),
                        item_color(key),
                        SHAPES[key % len(SHAPES)],
                        rng,
                        clutter=source == "user",
                    )
                    if canvas is None:
                        canvas = img
                    else:  # second item: pasted into the lower-right corner, box scaled
                        small = img.crop(box)
                        small.thumbnail((image_size // 3, image_size // 3))
                        x, y = image_size - small.width - 1, image_size - small.height - 1
                        canvas.paste(small, (x, y))
                        box = (x, y, x + small.width, y + small.height)
                    anno[f"item{k + 1}"] = _df2_item(categories[style], style, box, rng)
                    n_items += 1
                stem = f"{number:06d}"
                _save(canvas, part_dir / "image" / f"{stem}.jpg")
                (part_dir / "annos").mkdir(parents=True, exist_ok=True)
                (part_dir / "annos" / f"{stem}.json").write_text(json.dumps(anno), encoding="utf-8")
        counts[part] = {"images": number, "items": n_items}
    eval_part = "validation" if layout == "release" else "flat"
    split_counts = {"query": 2 * n_pairs, "gallery": 3 * n_pairs}
    if layout == "release":
        split_counts["train"] = counts["train"]["items"]
    _manifest(folder, {"parts": counts, "eval_part": eval_part, "splits": split_counts, "n_pairs": n_pairs})
    return folder


def make_attributes(
    root: str | os.PathLike,
    n_products: int = 12,
    images_per_product: int = 3,
    n_categories: int = 6,
    seed: int = 0,
    image_size: int = 64,
) -> Path:
    """Write a miniature Category-Attribute tree (img/, Anno/, Eval/) under <root>/attributes; return it.

    All 50 category names are listed; products use n_categories of them spread over the list;
    list_attr_cloth.txt holds names with spaces ('floral print'); list_bbox.txt is included.
    """
    rng = np.random.default_rng(seed)
    folder = _folder(root, "attributes")
    used = np.linspace(0, len(ATTRIBUTE_CATEGORIES) - 1, n_categories).round().astype(int)
    status = np.asarray(["train", "val", "test"])[_split_items(rng, n_products, (0.6, 0.2, 0.2))]
    labels, partition, boxes, attrs, counts, number = [], [], [], [], {"train": 0, "val": 0, "test": 0}, 0
    for p in range(n_products):
        c = int(used[p % n_categories])
        cat_name = ATTRIBUTE_CATEGORIES[c][0]
        active = rng.random(len(ATTRIBUTE_NAMES)) < 0.25
        title = "_".join(
            [ATTRIBUTE_NAMES[a][0].title().replace(" ", "_") for a in np.flatnonzero(active)][:2] + [cat_name]
        )
        for _ in range(images_per_product):
            number += 1
            name = f"img/{title}/img_{number:08d}.jpg"
            img, box = draw_garment((image_size, image_size), item_color(c), SHAPES[c % len(SHAPES)], rng)
            _save(img, folder / name)
            labels.append((name, c + 1))
            partition.append((name, status[p]))
            counts[str(status[p])] += 1
            boxes.append((name, *box))
            attrs.append((name, *np.where(active, 1, -1)))
    write_annotation(
        folder / "Anno" / "list_category_cloth.txt", ["category_name", "category_type"], ATTRIBUTE_CATEGORIES
    )
    write_annotation(folder / "Anno" / "list_category_img.txt", ["image_name", "category_label"], labels)
    write_annotation(folder / "Anno" / "list_attr_cloth.txt", ["attribute_name", "attribute_type"], ATTRIBUTE_NAMES)
    write_annotation(folder / "Anno" / "list_attr_img.txt", ["image_name", "attribute_labels"], attrs)
    write_annotation(folder / "Anno" / "list_bbox.txt", ["image_name", "x_1", "y_1", "x_2", "y_2"], boxes)
    write_annotation(folder / "Eval" / "list_eval_partition.txt", ["image_name", "evaluation_status"], partition)
    _manifest(folder, {"images": counts, "categories": [ATTRIBUTE_CATEGORIES[int(c)][0] for c in used]})
    return folder


def make_all(root: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write all four miniature DeepFashion trees under `root`; return name -> dataset folder."""
    return {
        "inshop": make_inshop(root, seed=seed),
        "consumer2shop": make_consumer2shop(root, seed=seed),
        "deepfashion2": make_deepfashion2(root, seed=seed),
        "attributes": make_attributes(root, seed=seed),
    }

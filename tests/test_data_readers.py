"""DeepFashion readers on generated miniature trees: protocol splits, parsing, errors and warnings."""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashlib.data import (
    DATASETS,
    AnnotationCountWarning,
    MissingImagesWarning,
    load,
    read_annotation,
    read_annotation_matrix,
)
from fashlib.data._annotations import DEEPFASHION2_URL, DEEPFASHION_URL
from fashlib.data.synthetic import (
    MANIFEST,
    make_all,
    make_attributes,
    make_consumer2shop,
    make_deepfashion2,
    make_inshop,
)

BOX = ["x1", "y1", "x2", "y2"]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def plain_parse(path: Path) -> list[list[str]]:
    """Independent reading of a DeepFashion text file: skip count and header, split on whitespace."""
    return [line.split() for line in path.read_text().splitlines()[2:] if line.strip()]


def load_quiet(name: str, **kw) -> pd.DataFrame:
    """load() that fails the test on any warning (clean trees must read silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load(name, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_all(root, seed=0)
    return root


@pytest.fixture
def inshop_copy(tmp_path) -> Path:
    make_inshop(tmp_path, seed=1)
    return tmp_path


def assert_contract(table: pd.DataFrame) -> None:
    assert list(table.columns[:10]) == ["path", "item_id", "label", "category", "domain", "split", *BOX]
    for col in BOX:
        assert table[col].dtype == np.float64
    for col in ("path", "item_id", "label", "category", "domain", "split"):
        assert not table[col].isna().any()
        assert all(isinstance(v, str) for v in table[col])
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["path"])
    assert set(table["domain"]) <= {"shop", "consumer"}


# ---------------------------------------------------------------- In-shop
def test_inshop_counts_splits_boxes(root):
    folder = root / "inshop"
    table = load_quiet("inshop", root=root)
    assert_contract(table)
    expected = manifest(folder)
    assert table["split"].value_counts().to_dict() == expected["images"]
    assert (table["label"] == table["item_id"]).all() and (table["domain"] == "shop").all()
    # items never cross train / test, and every query item has gallery images
    train_items = set(table.loc[table.split == "train", "item_id"])
    query_items = set(table.loc[table.split == "query", "item_id"])
    gallery_items = set(table.loc[table.split == "gallery", "item_id"])
    assert not train_items & (query_items | gallery_items)
    assert query_items == gallery_items and len(train_items) == expected["items"]["train"]
    # boxes and types agree with an independent parse of the bbox file
    raw = {r[0]: r for r in plain_parse(folder / "Anno" / "list_bbox_inshop.txt")}
    for row in table.itertuples():
        r = raw[row.image_name]
        assert (row.clothes_type, row.pose_type) == (int(r[1]), int(r[2]))
        assert [row.x1, row.y1, row.x2, row.y2] == [float(v) for v in r[3:7]]
    first = table.iloc[0]
    gender, sub = first["image_name"].split("/")[1:3]
    assert first["category"] == f"{gender}/{sub}" and first["gender"] in {"MEN", "WOMEN"}
    assert set(table["pose"]) <= {"front", "side", "back", "full", "additional", "flat"}
    assert (table.loc[table.image_name.str.contains("/02_"), "view"] == 2).all()


def test_inshop_images_under_Img_img(inshop_copy):
    folder = inshop_copy / "inshop"
    (folder / "Img").mkdir()
    shutil.move(str(folder / "img"), str(folder / "Img" / "img"))
    table = load_quiet("inshop", root=inshop_copy)
    assert len(table) == sum(manifest(folder)["images"].values())
    assert all("/Img/img/" in p for p in table["path"])


# ---------------------------------------------------------------- Consumer-to-shop
@pytest.fixture(scope="module")
def c2s_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c2s")
    make_consumer2shop(root, n_items=12, consumer_per_item=3, shop_per_item=2, seed=3)
    return root


@pytest.mark.parametrize("eval_split", ["test", "val"])
def test_consumer2shop_protocol(c2s_root, eval_split):
    folder = c2s_root / "consumer2shop"
    m = manifest(folder)
    c, s, items = m["consumer_per_item"], m["shop_per_item"], m["items"]
    other = "val" if eval_split == "test" else "test"
    table = load_quiet("consumer2shop", root=c2s_root, eval_split=eval_split)
    assert_contract(table)
    assert table["split"].value_counts().to_dict() == {
        "train": (c + s) * items["train"],
        "query": c * items[eval_split],
        other: c * items[other],
        "gallery": s * (items["val"] + items["test"]),
    }
    # every image appears in c or s pairs, yet once per role
    assert m["pairs"] == c * s * 12 and len(table) == (c + s) * 12
    assert not table.duplicated(["image_name", "domain"]).any()
    assert set(table["n_pairs"]) == {c, s}
    assert (table.loc[table.split == "query", "domain"] == "consumer").all()
    assert (table.loc[table.split == "gallery", "domain"] == "shop").all()
    # gallery = shop images of val AND test; queries all have their item in the gallery
    assert set(table.loc[table.split == "gallery", "status"]) == {"val", "test"}
    assert set(table.loc[table.split == "query", "item_id"]) < set(table.loc[table.split == "gallery", "item_id"])
    assert not set(table.loc[table.split == "train", "item_id"]) & set(table.loc[table.split != "train", "item_id"])
    # domain agrees with the bbox file's source_type (1 shop, 2 consumer); boxes are floats from it
    raw = {r[0]: r for r in plain_parse(folder / "Anno" / "list_bbox_consumer2shop.txt")}
    for row in table.itertuples():
        assert {"1": "shop", "2": "consumer"}[raw[row.image_name][2]] == row.domain
        assert [row.x1, row.y1, row.x2, row.y2] == [float(v) for v in raw[row.image_name][3:7]]
    assert table["category"].str.fullmatch(r"[A-Z]+/\w+").all()


def test_consumer2shop_rejects_bad_eval_split(c2s_root):
    with pytest.raises(ValueError, match="eval_split"):
        load("consumer2shop", root=c2s_root, eval_split="train")


# ---------------------------------------------------------------- DeepFashion2
def df2_raw_items(part_dir: Path) -> list[dict]:
    rows = []
    for f in sorted((part_dir / "annos").glob("*.json")):
        anno = json.loads(f.read_text())
        for key, item in anno.items():
            if key.startswith("item"):
                rows.append(
                    {
                        "source": anno["source"],
                        "pair_id": anno["pair_id"],
                        "style": item["style"],
                        "box": item["bounding_box"],
                        "image": f.stem,
                    }
                )
    return rows


def test_deepfashion2_release_matching_rule(root):
    folder = root / "deepfashion2"
    m = manifest(folder)
    table = load_quiet("deepfashion2", root=root)
    assert_contract(table)
    assert table["split"].value_counts().to_dict() == m["splits"]
    assert (table.loc[table.split == "train", "part"] == "train").all()
    query, gallery = table[table.split == "query"], table[table.split == "gallery"]
    assert (query["source"] == "user").all() and (query["style"] > 0).all() and (query["domain"] == "consumer").all()
    assert (gallery["source"] == "shop").all()
    # matches by label == matches by the official rule, computed from the raw json files
    raw = df2_raw_items(folder / "validation")
    official = {
        (u["image"], s["image"])
        for u in raw
        for s in raw
        if u["source"] == "user"
        and s["source"] == "shop"
        and u["pair_id"] == s["pair_id"]
        and u["style"] == s["style"]
        and u["style"] > 0
    }
    ours = {(q.image_id, g.image_id) for q in query.itertuples() for g in gallery.itertuples() if q.label == g.label}
    assert ours == official and official
    assert (query["item_id"] == query["pair_id"].astype(str) + "_" + query["style"].astype(str)).all()
    # style-0 items match nothing: their labels are unique; they stay as gallery distractors
    zero = table[table["style"] == 0]
    assert (
        len(zero) and zero["label"].is_unique and not set(zero["label"]) & set(table.loc[table["style"] > 0, "label"])
    )
    assert (zero["split"] != "query").all() and (zero["split"] == "gallery").any()
    assert not set(table.loc[table.split == "train", "label"]) & set(table.loc[table.split != "train", "label"])
    # one row per item, boxes from bounding_box
    assert (
        len(table[table.part == "validation"]) == m["parts"]["validation"]["items"] - m["n_pairs"]
    )  # minus style-0 user items
    box = {(r["image"], r["style"], tuple(r["box"])) for r in raw}
    assert all((g.image_id, g.style, (g.x1, g.y1, g.x2, g.y2)) in box for g in gallery.itertuples())


def test_deepfashion2_flat_layout_is_evaluation(tmp_path):
    make_deepfashion2(tmp_path, n_pairs=3, layout="flat", seed=2)
    table = load_quiet("deepfashion2", root=tmp_path)
    assert table["split"].value_counts().to_dict() == {"query": 6, "gallery": 9}
    assert set(table["part"]) == {"flat"}


def test_deepfashion2_malformed_json_names_file(tmp_path):
    folder = make_deepfashion2(tmp_path, n_pairs=1, seed=0)
    bad = folder / "validation" / "annos" / "000002.json"
    bad.write_text('{"source": "shop", "pair_id": 1, "item1": {')
    with pytest.raises(ValueError, match="000002.json"):
        load("deepfashion2", root=tmp_path)
    bad.write_text(json.dumps({"source": "shop", "pair_id": 1, "item1": {"category_id": 1}}))
    with pytest.raises(ValueError, match=r"000002\.json: item1 lacks .*style"):
        load("deepfashion2", root=tmp_path)


# ---------------------------------------------------------------- Category and Attribute Prediction
def test_attributes_categories_partition_attributes(root):
    folder = root / "attributes"
    table = load_quiet("attributes", root=root)
    assert_contract(table)
    assert table["split"].value_counts().to_dict() == manifest(folder)["images"]
    assert set(table["category"]) == set(manifest(folder)["categories"])
    assert (table["label"] == table["category"]).all() and (table["domain"] == "shop").all()
    cats = plain_parse(folder / "Anno" / "list_category_cloth.txt")
    labels = dict(plain_parse(folder / "Anno" / "list_category_img.txt"))
    assert len(cats) == 50
    for row in table.itertuples():  # 1-based labels
        assert row.category == cats[int(labels[row.image_name]) - 1][0]
    # attribute names with spaces survive; active = value 1
    lines = (folder / "Anno" / "list_attr_cloth.txt").read_text().splitlines()[2:]
    names = [line.rsplit(None, 1)[0].strip() for line in lines]
    assert "floral print" in names
    values = {r[0]: r[1:] for r in plain_parse(folder / "Anno" / "list_attr_img.txt")}
    for row in table.itertuples():
        assert row.attributes == tuple(n for n, v in zip(names, values[row.image_name]) if v == "1")
    assert table["attributes"].map(len).sum() > 0
    boxes = {r[0]: [float(v) for v in r[1:]] for r in plain_parse(folder / "Anno" / "list_bbox.txt")}
    assert all([r.x1, r.y1, r.x2, r.y2] == boxes[r.image_name] for r in table.itertuples())


def test_attributes_optional_parts(tmp_path):
    folder = make_attributes(tmp_path, n_products=5, seed=4)
    (folder / "Anno" / "list_bbox.txt").unlink()
    (folder / "Anno" / "list_attr_img.txt").unlink()
    table = load_quiet("attributes", root=tmp_path, attributes=False)
    assert "attributes" not in table and table[BOX].isna().all().all() and len(table) == 15
    with pytest.raises(FileNotFoundError, match="list_attr_img.txt"):
        load("attributes", root=tmp_path)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "name, url",
    [
        ("inshop", DEEPFASHION_URL),
        ("consumer2shop", DEEPFASHION_URL),
        ("attributes", DEEPFASHION_URL),
        ("deepfashion2", DEEPFASHION2_URL),
    ],
)
def test_missing_root_names_path_url_and_env(tmp_path, name, url):
    with pytest.raises(FileNotFoundError) as err:
        load(name, root=tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / name) in message and url in message and "FASHLIB_DATA" in message


def test_missing_clothing_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="FASHLIB_DATA") as err:
        load("clothing", root=tmp_path)
    assert str(tmp_path / "clothing-dataset") in str(err.value)


@pytest.mark.parametrize(
    "name, relative",
    [
        ("inshop", "Anno/list_bbox_inshop.txt"),
        ("inshop", "Eval/list_eval_partition.txt"),
        ("consumer2shop", "Anno/list_bbox_consumer2shop.txt"),
        ("attributes", "Anno/list_category_img.txt"),
    ],
)
def test_missing_annotation_file(tmp_path, name, relative):
    {"inshop": make_inshop, "consumer2shop": make_consumer2shop, "attributes": make_attributes}[name](tmp_path)
    target = tmp_path / name / relative
    target.unlink()
    with pytest.raises(FileNotFoundError) as err:
        load(name, root=tmp_path)
    message = str(err.value)
    assert str(target) in message and DEEPFASHION_URL in message and "FASHLIB_DATA" in message


def test_missing_image_folder(inshop_copy):
    shutil.rmtree(inshop_copy / "inshop" / "img")
    with pytest.raises(FileNotFoundError, match="Img/img"):
        load("inshop", root=inshop_copy)


def test_malformed_line_names_file_and_line(inshop_copy):
    target = inshop_copy / "inshop" / "Eval" / "list_eval_partition.txt"
    lines = target.read_text().splitlines()
    lines[6] = lines[6] + "   extra_field"  # file line 7
    target.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"list_eval_partition\.txt, line 7: expected 3 fields.*extra_field"):
        load("inshop", root=inshop_copy)


def test_bad_values_name_line(inshop_copy):
    part = inshop_copy / "inshop" / "Eval" / "list_eval_partition.txt"
    part.write_text(part.read_text().replace("train\n", "training\n", 1))
    with pytest.raises(ValueError, match=r"line 3: evaluation_status must be one of"):
        load("inshop", root=inshop_copy)
    make_inshop(inshop_copy, seed=1)
    bbox = inshop_copy / "inshop" / "Anno" / "list_bbox_inshop.txt"
    lines = bbox.read_text().splitlines()
    fields = lines[4].split()
    lines[4] = "  ".join(fields[:3] + ["1O"] + fields[4:])
    bbox.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"list_bbox_inshop\.txt, line 5: cannot read x1 from '1O'"):
        load("inshop", root=inshop_copy)


def test_count_mismatch_warns_with_both_numbers(inshop_copy):
    target = inshop_copy / "inshop" / "Eval" / "list_eval_partition.txt"
    lines = target.read_text().splitlines()
    n = len(lines) - 2
    target.write_text("\n".join([str(n + 5), *lines[1:]]) + "\n")
    with pytest.warns(AnnotationCountWarning, match=rf"declares {n + 5} records but {n} were read"):
        table = load("inshop", root=inshop_copy)
    assert len(table) == n


def test_missing_images_dropped_with_one_summary_warning(inshop_copy):
    table = load_quiet("inshop", root=inshop_copy)
    gone = table["path"].iloc[[0, 5, 9, 11, 20, 30, 40]].tolist()
    for p in gone:
        Path(p).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reduced = load("inshop", root=inshop_copy)
    missing = [w for w in caught if issubclass(w.category, MissingImagesWarning)]
    assert len(caught) == len(missing) == 1
    message = str(missing[0].message)
    assert f"{len(gone)} of {len(table)}" in message
    assert sum(p in message for p in gone) == 5  # up to five examples
    assert len(reduced) == len(table) - len(gone) and not set(gone) & set(reduced["path"])
    assert len(load("inshop", root=inshop_copy, check_images=False)) == len(table)


def test_missing_images_consumer2shop_counts_unique_files(c2s_root, tmp_path):
    shutil.copytree(c2s_root / "consumer2shop", tmp_path / "consumer2shop")
    table = load_quiet("consumer2shop", root=tmp_path)
    victim = table.loc[table.split == "gallery", "path"].iloc[0]
    Path(victim).unlink()
    with pytest.warns(MissingImagesWarning, match=f"1 of {table['path'].nunique()} listed images"):
        reduced = load("consumer2shop", root=tmp_path)
    assert len(reduced) == len(table) - 1


# ---------------------------------------------------------------- parser units
def test_parser_merges_spaces_and_checks_header(tmp_path):
    f = tmp_path / "list_attr_cloth.txt"
    f.write_text("3\nattribute_name  attribute_type\nfloral print     1\na-line           3\nfit and flare    3\n")
    table = read_annotation(
        f, ["attribute_name", "attribute_type"], converters={"attribute_type": int}, merge_extra_into="attribute_name"
    )
    assert table["attribute_name"].tolist() == ["floral print", "a-line", "fit and flare"]
    assert table["attribute_type"].tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match=r"line 3: expected 2 fields"):
        read_annotation(f, ["attribute_name", "attribute_type"])
    g = tmp_path / "bad_header.txt"
    g.write_text("1\nimage_name\nimg/a.jpg 1\n")
    with pytest.raises(ValueError, match=r"line 2: header should name 2 columns"):
        read_annotation(g, ["image_name", "value"])
    g.write_text("one\nimage_name value\nimg/a.jpg 1\n")
    with pytest.raises(ValueError, match=r"line 1: line 1 must be the record count"):
        read_annotation(g, ["image_name", "value"])


def test_matrix_parser_reports_bad_line(tmp_path):
    f = tmp_path / "list_attr_img.txt"
    f.write_text("3\nimage_name attribute_labels\nimg/a.jpg  1 -1  1\nimg/b.jpg -1 -1\nimg/c.jpg  1  1  1\n")
    with pytest.raises(ValueError, match=r"list_attr_img\.txt, line 4: expected image_name and 3 values, got 2"):
        read_annotation_matrix(f)
    f.write_text("2\nimage_name attribute_labels\nimg/a.jpg  1 -1  1\nimg/c.jpg  1  1  1\n")
    names, matrix = read_annotation_matrix(f)
    assert names.tolist() == ["img/a.jpg", "img/c.jpg"] and matrix.tolist() == [[1, -1, 1], [1, 1, 1]]
    f.write_text("5\nimage_name attribute_labels\nimg/a.jpg  1 -1  1\n")
    with pytest.warns(AnnotationCountWarning, match="declares 5 records but 1"):
        read_annotation_matrix(f)


# ---------------------------------------------------------------- root resolution and registry
def test_env_var_and_explicit_root(root, tmp_path, monkeypatch):
    monkeypatch.setenv("FASHLIB_DATA", str(root))
    assert len(load_quiet("inshop")) == sum(manifest(root / "inshop")["images"].values())
    monkeypatch.setenv("FASHLIB_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="empty"):
        load("inshop")
    assert len(load_quiet("inshop", root=root)) > 0  # explicit root wins over the env var
    assert len(load_quiet("inshop", path=root / "inshop")) > 0  # path= points at the dataset folder
    monkeypatch.delenv("FASHLIB_DATA")
    monkeypatch.chdir(tmp_path)  # the default is <repository>/data whatever the working directory (README)
    from fashlib.paths import PROJECT_ROOT

    with pytest.raises(FileNotFoundError, match=re.escape(str(PROJECT_ROOT / "data" / "inshop"))):
        load("inshop")


def test_registry_and_exports():
    import fashlib.data as data

    assert set(DATASETS) == {"inshop", "consumer2shop", "deepfashion2", "attributes", "clothing"}
    from fashlib.data import download

    assert callable(download) and not isinstance(download, type(data))
    with pytest.raises(KeyError, match="unknown dataset"):
        load("imagenet")
    with pytest.raises(AttributeError):
        data.no_such_thing  # noqa: B018
    # torch-side names are re-exported lazily from their own modules
    from fashlib.data import ImageTableDataset, PKSampler, build_transforms
    from fashlib.data.dataset import ImageTableDataset as dataset_cls
    from fashlib.data.dataset import build_transforms as transforms_fn
    from fashlib.data.sampler import PKSampler as sampler_cls

    assert (ImageTableDataset, build_transforms, PKSampler) == (dataset_cls, transforms_fn, sampler_cls)


# ---------------------------------------------------------------- generators
def test_generators_are_deterministic_and_fast(tmp_path):
    for maker in (make_inshop, make_consumer2shop, make_deepfashion2, make_attributes):
        start = time.perf_counter()
        a = maker(tmp_path / "a", seed=7)
        assert time.perf_counter() - start < 2.0
        b = maker(tmp_path / "b", seed=7)
        c = maker(tmp_path / "c", seed=8)
        files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files_a)
        files_c = sorted(p.relative_to(c) for p in c.rglob("*") if p.is_file())
        assert files_a != files_c or any((a / p).read_bytes() != (c / p).read_bytes() for p in files_a)


def test_annotation_columns_are_aligned(root):
    lines = (root / "inshop" / "Anno" / "list_bbox_inshop.txt").read_text().splitlines()
    assert lines[0] == str(len(lines) - 2)
    starts = {tuple(i for i in range(1, len(line)) if line[i] != " " and line[i - 1] == " ") for line in lines[1:]}
    assert len(starts) == 1  # every column starts at the same offset on every line
    assert "  " in lines[2]

"""Annotation text from the wild (BOM, CRLF, tabs, other encodings) and duplicate / conflicting lines."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fashlib.data import load, read_annotation, read_annotation_matrix
from fashlib.data._annotations import DuplicateLinesWarning, check_utf8
from fashlib.data.clothing import read_clothing
from fashlib.data.synthetic import make_consumer2shop, make_deepfashion2, make_inshop

ROWS = [("img/A/x_1.jpg", "id_1", "train"), ("img/B/y 2.jpg", "id_2", "query"), ("img/C/z_3.jpg", "id_3", "gallery")]
COLUMNS = ["image_name", "item_id", "evaluation_status"]


def _write(path: Path, text: str, encoding: str = "utf-8", bom: bool = False, newline: str = "\n") -> Path:
    data = text.replace("\n", newline).encode(encoding)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def _plain() -> str:
    body = "\n".join(f"{a.replace(' ', '_')}  {b}  {c}" for a, b, c in ROWS)
    return f"{len(ROWS)}\nimage_name item_id evaluation_status\n{body}\n"


@pytest.mark.parametrize("variant", ["bom", "crlf", "bom+crlf", "tabs", "trailing"])
def test_bom_crlf_tabs_trailing_blanks_read_to_the_same_table(tmp_path, variant):
    want = read_annotation(_write(tmp_path / "plain.txt", _plain()), COLUMNS)
    text = _plain()
    if variant == "tabs":
        text = "\n".join(line.replace("  ", "\t") for line in text.split("\n"))
    if variant == "trailing":
        text = "\n".join(line + " \t " if line else line for line in text.split("\n"))
    path = _write(tmp_path / "v.txt", text, bom="bom" in variant, newline="\r\n" if "crlf" in variant else "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = read_annotation(path, COLUMNS)
    pd.testing.assert_frame_equal(got, want)
    assert got["image_name"].tolist() == ["img/A/x_1.jpg", "img/B/y_2.jpg", "img/C/z_3.jpg"]


def test_other_encoding_is_an_error_with_offset_and_line(tmp_path):
    text = _plain().replace("img/B/y_2.jpg", "img/B/robe_été.jpg")
    path = _write(tmp_path / "latin.txt", text, encoding="latin-1")
    offset = text.encode("latin-1").index("é".encode("latin-1"))
    with pytest.raises(
        ValueError, match=rf"latin\.txt: not UTF-8 text: byte\(s\) b'\\xe9' at byte offset {offset} \(line 4\)"
    ):
        read_annotation(path, COLUMNS)


def test_check_utf8_across_chunk_boundaries(tmp_path):
    good = ("ab\n" + "é" * 5 + "\n") * 4  # two-byte characters split by the 7-byte chunks
    check_utf8(_write(tmp_path / "ok.txt", good), chunk=7)
    raw = good.encode() + b"x\xffy\n"
    (tmp_path / "bad.txt").write_bytes(raw)
    with pytest.raises(ValueError, match=rf"byte offset {len(good.encode()) + 1} \(line 9\)"):
        check_utf8(tmp_path / "bad.txt", chunk=7)


def test_matrix_reader_bom_crlf_and_encoding(tmp_path):
    text = "2\nimage_name attr_labels\nimg/a.jpg  1 -1  1\nimg/b.jpg -1 -1  1\n"
    names, matrix = read_annotation_matrix(_write(tmp_path / "m.txt", text, bom=True, newline="\r\n"))
    assert names.tolist() == ["img/a.jpg", "img/b.jpg"] and matrix.tolist() == [[1, -1, 1], [-1, -1, 1]]
    with pytest.raises(ValueError, match=r"m2\.txt: not UTF-8 text.*\(line 4\)"):
        read_annotation_matrix(_write(tmp_path / "m2.txt", text.replace("img/b", "img/é"), encoding="latin-1"))


# ----------------------------------------------------------------------------- duplicates and roles


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _save(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_inshop_exact_duplicate_line_dropped_with_warning(tmp_path):
    make_inshop(tmp_path, seed=1)
    clean = load("inshop", root=tmp_path)
    part = tmp_path / "inshop" / "Eval" / "list_eval_partition.txt"
    lines = _lines(part)
    query_line = next(i for i, line in enumerate(lines) if line.endswith("query"))
    _save(part, [str(int(lines[0]) + 1), *lines[1:], lines[query_line]])
    with pytest.warns(
        DuplicateLinesWarning,
        match=rf"list_eval_partition\.txt: 1 exact duplicate.*line {len(lines) + 1} repeats line {query_line + 1}",
    ):
        table = load("inshop", root=tmp_path)
    pd.testing.assert_frame_equal(table, clean)


def test_inshop_image_in_query_and_gallery_is_an_error_naming_both_lines(tmp_path):
    make_inshop(tmp_path, seed=1)
    part = tmp_path / "inshop" / "Eval" / "list_eval_partition.txt"
    lines = _lines(part)
    q = next(i for i, line in enumerate(lines) if line.endswith("query"))
    _save(part, [str(int(lines[0]) + 1), *lines[1:], lines[q].replace("query", "gallery")])
    name = lines[q].split()[0]
    with pytest.raises(
        ValueError,
        match=rf"list_eval_partition\.txt: image_name '{name}' is listed on line {q + 1} "
        rf"and again.*line {len(lines) + 1}",
    ):
        load("inshop", root=tmp_path)


def test_inshop_two_boxes_for_one_image_is_an_error(tmp_path):
    make_inshop(tmp_path, seed=1)
    bbox = tmp_path / "inshop" / "Anno" / "list_bbox_inshop.txt"
    lines = _lines(bbox)
    fields = lines[3].split()
    _save(bbox, [str(int(lines[0]) + 1), *lines[1:], " ".join(fields[:3] + ["1"] + fields[4:])])
    with pytest.raises(
        ValueError,
        match=rf"list_bbox_inshop\.txt: .*line 4 and again.*line {len(lines) + 1}; an image must have one box",
    ):
        load("inshop", root=tmp_path)


def test_consumer2shop_consumer_photo_also_shop_photo_is_an_error(tmp_path):
    make_consumer2shop(tmp_path, seed=0)
    part = tmp_path / "consumer2shop" / "Eval" / "list_eval_partition.txt"
    lines = _lines(part)
    consumer, shop, item, status = lines[2].split()
    _save(part, [str(int(lines[0]) + 1), *lines[1:], f"{lines[3].split()[0]} {consumer} {item} {status}"])
    with pytest.raises(
        ValueError, match=rf"image '{consumer}' is a consumer photo on line 3 and a shop photo on line {len(lines) + 1}"
    ):
        load("consumer2shop", root=tmp_path)


def test_consumer2shop_image_in_two_partitions_is_an_error(tmp_path):
    make_consumer2shop(tmp_path, seed=0)
    part = tmp_path / "consumer2shop" / "Eval" / "list_eval_partition.txt"
    lines = _lines(part)
    test_line = next(i for i, line in enumerate(lines) if line.endswith(" test"))
    train = next(line for line in lines[2:] if line.endswith(" train")).split()
    consumer = lines[test_line].split()[0]
    _save(part, [str(int(lines[0]) + 1), *lines[1:], f"{consumer} {train[1]} {lines[test_line].split()[2]} train"])
    with pytest.raises(ValueError, match=rf"consumer '{consumer}' is listed on line {test_line + 1}.*one partition"):
        load("consumer2shop", root=tmp_path)


def test_deepfashion2_json_with_bom_reads(tmp_path):
    folder = make_deepfashion2(tmp_path, seed=0)
    want = load("deepfashion2", root=tmp_path)
    for anno in sorted(folder.glob("*/annos/*.json"))[:3]:
        anno.write_bytes(b"\xef\xbb\xbf" + anno.read_bytes())
    pd.testing.assert_frame_equal(load("deepfashion2", root=tmp_path), want)
    broken = sorted(folder.glob("*/annos/*.json"))[0]
    broken.write_bytes(json.dumps({"source": "shop", "pair_id": 1, "item1": "é"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{broken.name}: not UTF-8 text"):
        load("deepfashion2", root=tmp_path)


# ----------------------------------------------------------------------------- CC0 images.csv


def _clothing(folder: Path, rows: list[tuple[str, int, str]], text: str | None = None, **write) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image, _, _ in rows:
        Image.new("RGB", (8, 8)).save(folder / "images" / f"{image}.jpg")
    text = text or "image,sender_id,label,kids\n" + "".join(f"{i},{s},{lab},False\n" for i, s, lab in rows)
    _write(folder / "images.csv", text, **write)
    return folder


ROWS_CSV = [(f"img{i:02d}", i % 6, ["T-Shirt", "Pants", "Shoes"][i % 3]) for i in range(24)]


def test_clothing_csv_bom_crlf_and_blanks_read_to_the_same_table(tmp_path):
    want = read_clothing(_clothing(tmp_path / "a", ROWS_CSV))
    text = "image , sender_id,label ,kids\n" + "".join(f" {i} , {s},{lab} ,False \n" for i, s, lab in ROWS_CSV)
    got = read_clothing(_clothing(tmp_path / "b", ROWS_CSV, text, bom=True, newline="\r\n"))
    assert got["item_id"].tolist() == want["item_id"].tolist()
    assert (got["split"].to_numpy() == want["split"].to_numpy()).all() and got["label"].tolist() == want[
        "label"
    ].tolist()
    assert np.array_equal(got["sender_id"], want["sender_id"])


def test_clothing_csv_duplicates_conflicts_and_encoding(tmp_path):
    want = read_clothing(_clothing(tmp_path / "a", ROWS_CSV))
    text = "image,sender_id,label,kids\n" + "".join(f"{i},{s},{lab},False\n" for i, s, lab in ROWS_CSV)
    dup = text + f"{ROWS_CSV[3][0]},{ROWS_CSV[3][1]},{ROWS_CSV[3][2]},False\n"
    with pytest.warns(DuplicateLinesWarning, match=r"images\.csv: 1 exact duplicate row\(s\) dropped \(lines \[26\]\)"):
        got = read_clothing(_clothing(tmp_path / "b", ROWS_CSV, dup))
    assert got["item_id"].tolist() == want["item_id"].tolist()
    clash = text + f"{ROWS_CSV[3][0]},{ROWS_CSV[3][1]},Dress,False\n"
    with pytest.raises(ValueError, match=r"image 'img03' is listed on line 5 and again, with other values, on line 26"):
        read_clothing(_clothing(tmp_path / "c", ROWS_CSV, clash))
    with pytest.raises(ValueError, match=r"images\.csv: not UTF-8 text.*\(line 2\)"):
        read_clothing(_clothing(tmp_path / "d", ROWS_CSV, text.replace("T-Shirt", "Tée", 1), encoding="latin-1"))


def test_inshop_item_with_training_and_query_images_is_an_error_naming_both_lines(tmp_path):
    # In-shop items never cross splits; an item trained on and queried was read without a word (a leak)
    make_inshop(tmp_path, seed=1)
    part = tmp_path / "inshop" / "Eval" / "list_eval_partition.txt"
    lines = _lines(part)
    q = next(i for i, line in enumerate(lines) if line.endswith("query"))
    item = lines[q].split()[1]
    lines[q] = lines[q].replace("query", "train")
    _save(part, lines)
    first = next(i for i, line in enumerate(lines) if line.split()[1:2] == [item])
    other = next(
        i
        for i, line in enumerate(lines)
        if i > first and line.split()[1:2] == [item] and (line.endswith("train") != lines[first].endswith("train"))
    )
    with pytest.raises(
        ValueError,
        match=rf"list_eval_partition\.txt: item '{item}' is .* on line {first + 1} and "
        rf".* on line {other + 1}; an item is either trained on or evaluated",
    ):
        load("inshop", root=tmp_path)


def test_query_and_gallery_images_of_one_item_are_the_protocol(tmp_path):
    make_inshop(tmp_path, seed=1)
    table = load("inshop", root=tmp_path)
    shared = set(table.loc[table.split == "query", "item_id"]) & set(table.loc[table.split == "gallery", "item_id"])
    assert shared  # still read: only train against query/gallery is refused


def test_line_numbers_count_only_line_feeds_and_carriage_returns(tmp_path):
    # str.splitlines also breaks at \x0b, \x0c, \x1c-\x1e, U+0085, U+2028: a vertical tab inside line 4 shifted
    # every later line number by one (and split the record in two)
    rows = _plain().split("\n")
    rows[3] = rows[3].replace("  ", "\x0b", 1)  # record line 4, fields still separated by whitespace
    bad = [*rows[:5], "img/D/w.jpg id_4", *rows[5:]]  # line 6 has 2 fields
    path = tmp_path / "odd.txt"
    path.write_text("\n".join(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=r"odd\.txt, line 6: expected 3 fields"):
        read_annotation(path, COLUMNS)


def test_consumer2shop_item_in_two_partitions_is_an_error_naming_both_lines(tmp_path):
    # new photos of a test item listed as a training pair were read silently: the model trains on the query's item
    make_consumer2shop(tmp_path, seed=0)
    part = tmp_path / "consumer2shop" / "Eval" / "list_eval_partition.txt"
    lines = _lines(part)
    test_line = next(i for i, line in enumerate(lines) if line.endswith(" test"))
    consumer, shop, item, _ = lines[test_line].split()
    first = next(i for i, line in enumerate(lines) if i >= 2 and line.split()[2] == item)
    new = f"{consumer.replace('.jpg', '_new.jpg')} {shop.replace('.jpg', '_new.jpg')} {item} train"
    _save(part, [str(int(lines[0]) + 1), *lines[1:], new])
    with pytest.raises(
        ValueError,
        match=rf"item_id '{item}' is listed on line {first + 1} and again.* on line "
        rf"{len(lines) + 1}; an item belongs to one partition",
    ):
        load("consumer2shop", root=tmp_path)


def _attr_file(tmp_path: Path) -> tuple[Path, list[str]]:
    from fashlib.data.synthetic import make_attributes

    folder = make_attributes(tmp_path, n_products=5, seed=4)
    path = folder / "Anno" / "list_attr_img.txt"
    return path, _lines(path)


def test_attributes_an_image_without_attribute_row_is_an_error_not_no_attributes(tmp_path):
    # the image used to get attributes=() as if none was marked
    path, lines = _attr_file(tmp_path)
    name = lines[2].split()[0]
    _save(path, [str(int(lines[0]) - 1), lines[1], *lines[3:]])
    with pytest.raises(
        ValueError,
        match=rf"list_attr_img\.txt: 1 image\(s\) of the partition have no attribute row "
        rf"\(e\.g\. '{name}'\)",
    ):
        load("attributes", root=tmp_path)


def test_attributes_two_different_rows_for_one_image_are_an_error(tmp_path):
    # "first occurrence wins" chose silently
    path, lines = _attr_file(tmp_path)
    fields = lines[2].split()
    flipped = [fields[0], *("-1" if v == "1" else "1" for v in fields[1:])]
    _save(path, [str(int(lines[0]) + 1), *lines[1:], " ".join(flipped)])
    with pytest.raises(ValueError, match=rf"image '{fields[0]}' has two rows with different attribute values"):
        load("attributes", root=tmp_path)
    _save(path, [str(int(lines[0]) + 1), *lines[1:], lines[2]])  # an identical repeat is fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(load("attributes", root=tmp_path)) == 15

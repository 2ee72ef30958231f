"""One image-opening function (modes, EXIF orientation, transparency) and dropping undecodable rows."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms import ToTensor

from fashlib import analysis, features, metrics, plots
from fashlib.data import decodable, drop_undecodable, open_rgb, oriented_size, protocols
from fashlib.data.images import UndecodableImageError, to_rgb
from fashlib.data.synthetic import make_inshop

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def rgb(path) -> np.ndarray:
    return np.asarray(open_rgb(path)).astype(int)


# ----------------------------------------------------------------------------- modes


def test_palette_grey_and_bilevel(tmp_path):
    p = Image.new("P", (4, 2))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((3, 1), 1)
    p.save(tmp_path / "p.png")
    x = rgb(tmp_path / "p.png")
    assert x.shape == (2, 4, 3) and tuple(x[0, 0]) == (10, 20, 30) and tuple(x[1, 3]) == (200, 100, 50)
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert (rgb(tmp_path / "l.png") == 77).all()
    one = Image.new("1", (3, 3), 0)
    one.putpixel((1, 1), 1)
    one.save(tmp_path / "one.png")
    x = rgb(tmp_path / "one.png")
    assert tuple(x[1, 1]) == WHITE and tuple(x[0, 0]) == (0, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # 16-bit grey PNG
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = rgb(tmp_path / "g16.png")
    assert x[0, :, 0].tolist() == [0, 128, 255] and (x[..., 0] == x[..., 2]).all()
    wide = Image.fromarray(np.array([[1000, 30000]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(wide))[0, :, 1].tolist() == [4, 117]  # round(v / 257)
    assert np.asarray(wide.convert("RGB"))[0, 1, 0] == 255  # what PIL alone would show: white


def test_cmyk_converted(tmp_path):
    cmyk = Image.new("CMYK", (3, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    cmyk.putpixel((2, 0), (0, 0, 0, 255))
    cmyk.save(tmp_path / "c.tif")
    x = rgb(tmp_path / "c.tif")
    assert [tuple(v) for v in x[0]] == [WHITE, (0, 255, 255), (0, 0, 0)]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(tmp_path, mode):
    colour = (255, 0, 0) if mode == "RGBA" else (0,)
    img = Image.new(mode, (3, 1), (*colour, 0))  # fully transparent: must show white, not red/black
    img.putpixel((1, 0), (*colour, 255))
    img.putpixel((2, 0), (*colour, 128))
    img.save(tmp_path / "a.png")
    x = rgb(tmp_path / "a.png")
    opaque = RED if mode == "RGBA" else (0, 0, 0)
    assert tuple(x[0, 0]) == WHITE and tuple(x[0, 1]) == opaque
    half = np.array(opaque) * 128 / 255 + 255 * 127 / 255
    assert np.abs(x[0, 2] - half).max() <= 1


def test_palette_and_grey_transparency_on_white(tmp_path):
    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "pt.png", transparency=0)  # index 0 (black) transparent
    x = rgb(tmp_path / "pt.png")
    assert tuple(x[0, 0]) == WHITE and tuple(x[0, 1]) == (0, 200, 0)
    grey = Image.new("L", (2, 1), 0)
    grey.putpixel((1, 0), 90)
    grey.save(tmp_path / "lt.png", transparency=0)
    x = rgb(tmp_path / "lt.png")
    assert tuple(x[0, 0]) == WHITE and tuple(x[0, 1]) == (90, 90, 90)
    colour = Image.new("RGB", (2, 1), (5, 6, 7))
    colour.putpixel((1, 0), BLUE)
    colour.save(tmp_path / "rt.png", transparency=(5, 6, 7))
    x = rgb(tmp_path / "rt.png")
    assert tuple(x[0, 0]) == WHITE and tuple(x[0, 1]) == BLUE


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.fixture
def rotated_jpeg(tmp_path) -> Path:
    """Stored 40x20: left half red, right half blue; EXIF 6 = show rotated 90 degrees clockwise."""
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_applied_everywhere(rotated_jpeg):
    x = rgb(rotated_jpeg)
    assert x.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 tall
    assert np.abs(x[5, 10] - RED).max() < 30 and np.abs(x[34, 10] - BLUE).max() < 30  # left half went on top
    assert oriented_size(rotated_jpeg) == (20, 40)
    assert analysis.image_sizes([str(rotated_jpeg)]).iloc[0].tolist() == [20.0, 40.0]
    shown = plots.load_image(str(rotated_jpeg), max_side=None)
    assert shown.shape == (40, 20, 3) and np.abs(shown[5, 10].astype(int) - RED).max() < 30
    from fashlib.data.dataset import ImageTableDataset

    item = ImageTableDataset(pd.DataFrame({"path": [str(rotated_jpeg)], "label": ["a"]}))[0][0]
    assert item.shape == (3, 40, 20) and item[2, 34, 10] > 0.8 and item[0, 34, 10] < 0.2


# ----------------------------------------------------------------------------- undecodable files


def _photo(path: Path, colour: tuple[int, int, int], size: int = 48) -> None:
    rng = np.random.default_rng(sum(colour))
    noise = rng.integers(0, 40, (size, size, 3))
    Image.fromarray(np.clip(np.array(colour) + noise - 20, 0, 255).astype(np.uint8)).save(path, quality=90)


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_open_rgb_names_undecodable_file(tmp_path):
    _photo(tmp_path / "cut.jpg", RED)
    _truncate(tmp_path / "cut.jpg")
    with pytest.raises(UndecodableImageError, match="cut.jpg.*truncated.*drop_undecodable"):
        open_rgb(tmp_path / "cut.jpg")
    with pytest.raises(UndecodableImageError, match="gone.jpg"):
        open_rgb(tmp_path / "gone.jpg")


@pytest.fixture
def damaged_table(tmp_path) -> pd.DataFrame:
    """Two labels; the query of label 'a' and one training photo are truncated, one gallery file is text."""
    rows = [
        ("train", "a", RED),
        ("train", "a", RED),
        ("train", "b", BLUE),
        ("query", "a", RED),
        ("query", "b", BLUE),
        ("gallery", "a", RED),
        ("gallery", "b", BLUE),
        ("gallery", "b", BLUE),
    ]
    paths = []
    for i, (split, label, colour) in enumerate(rows):
        paths.append(tmp_path / f"{split}{i}_{label}.jpg")
        _photo(paths[-1], colour)
    _truncate(paths[1])
    _truncate(paths[3])
    paths[7].write_bytes(b"this is not a jpeg")
    return pd.DataFrame({"path": [str(p) for p in paths], "label": [r[1] for r in rows], "split": [r[0] for r in rows]})


def test_drop_undecodable_counts_per_split_and_warns_once(damaged_table, tmp_path):
    with pytest.warns(decodable.UndecodableImagesWarning) as record:
        clean = drop_undecodable(damaged_table, "toy")
    assert len(record) == 1
    message = str(record[0].message)
    assert "3 of 8 rows" in message and "gallery: 1, query: 1, train: 1" in message
    assert "query3_a.jpg" in message and "train1_a.jpg" in message and "gallery7_b.jpg" in message
    assert clean.attrs["undecodable"] == {"gallery": 1, "query": 1, "train": 1}
    assert [Path(p).name for p in clean["path"]] == [
        "train0_a.jpg",
        "train2_b.jpg",
        "query4_b.jpg",
        "gallery5_a.jpg",
        "gallery6_b.jpg",
    ]
    assert clean.index.tolist() == list(range(5))


def test_truncated_query_never_gets_a_gallery_photos_features(damaged_table):
    """Raw table: extraction stops at the damaged file. Cleaned table: each row has its own pixels' features."""
    mean_colour = lambda x: x.mean(dim=(2, 3))  # noqa: E731 - a 'model' whose features are the mean colour
    with pytest.raises(UndecodableImageError, match="train1_a.jpg"):
        features.extract(mean_colour, damaged_table, transform=ToTensor(), batch_size=2, progress=False)
    with pytest.warns(decodable.UndecodableImagesWarning):
        clean = drop_undecodable(damaged_table)
    feats = features.extract(mean_colour, clean, transform=ToTensor(), batch_size=2, progress=False)
    for row, path in enumerate(clean["path"]):
        own = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).mean((0, 1))
        assert np.allclose(feats[row], own.numpy(), atol=1e-5)
    query = clean["split"].to_numpy() == "query"
    gallery = clean["split"].to_numpy() == "gallery"
    assert query.sum() == 1  # the damaged query is gone, not answered with a gallery photo's features
    recall = metrics.recall_at_k(feats[query], clean["label"][query], feats[gallery], clean["label"][gallery], ks=(1,))
    assert recall == {1: 1.0}


def test_decode_cache_reused_and_invalidated(damaged_table, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.warns(decodable.UndecodableImagesWarning):
        first = drop_undecodable(damaged_table, cache_dir=cache)
    assert (cache / decodable.CACHE_FILE).is_file()
    calls = []
    real = decodable._decode_error
    monkeypatch.setattr(decodable, "_decode_error", lambda p: calls.append(p) or real(p))
    with pytest.warns(decodable.UndecodableImagesWarning):
        again = drop_undecodable(damaged_table, cache_dir=cache)
    assert calls == [] and again["path"].tolist() == first["path"].tolist()
    repaired = damaged_table["path"][3]
    _photo(Path(repaired), RED)  # file replaced: new size/mtime, decoded again
    os.utime(repaired, ns=(1, 1))
    with pytest.warns(decodable.UndecodableImagesWarning) as record:
        fixed = drop_undecodable(damaged_table, cache_dir=cache)
    assert calls == [repaired] and "2 of 8" in str(record[0].message)
    assert fixed.attrs["undecodable"] == {"gallery": 1, "train": 1}


def test_clean_table_is_silent(damaged_table):
    good = damaged_table.iloc[[0, 2, 4]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = drop_undecodable(good)
    assert len(out) == 3 and out.attrs["undecodable"] == {}


def test_load_table_drops_undecodable_rows(tmp_path):
    folder = make_inshop(tmp_path, seed=0)
    table = protocols.load_table("inshop", tmp_path, decode_cache=None)
    victim = table.loc[table["split"] == "query", "path"].iloc[0]
    Path(victim).write_bytes(Path(victim).read_bytes()[:100])
    with pytest.warns(decodable.UndecodableImagesWarning, match=r"inshop: 1 of \d+ rows .*query: 1"):
        after = protocols.load_table("inshop", tmp_path, decode_cache=tmp_path / "c")
    assert len(after) == len(table) - 1 and victim not in set(after["path"])
    assert after.attrs["undecodable"] == {"query": 1}
    with pytest.warns(decodable.UndecodableImagesWarning):
        capped = protocols.load_table("inshop", tmp_path, decode_cache=tmp_path / "c", max_images=20)
    assert capped.attrs["undecodable"] == {"query": 1} and victim not in set(capped["path"])
    assert folder.is_dir()


@pytest.mark.parametrize("value,want", [(0.5, 128), (1.0, 255), (200.0, 200), (30000.0, 117)])
def test_float_grey_is_scaled_by_its_range_not_truncated_to_black(tmp_path, value, want):
    # a 0..1 float TIFF (mode F) used to come out black (PIL truncates 0.5 to 0)
    path = tmp_path / "f.tif"
    Image.new("F", (4, 3), value).save(path)
    assert np.asarray(open_rgb(path)).tolist() == np.full((3, 4, 3), want).tolist()

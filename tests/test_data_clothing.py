"""Tests for the CC0 clothing reader, the pinned downloader, ImageTableDataset/transforms and PKSampler."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import os
import socket
import threading
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fashlib.data.clothing import NON_GARMENT_LABELS, read_clothing
from fashlib.data.dataset import ImageTableDataset, UndecodableImageError, build_transforms, crop_box
from fashlib.data.download import SOURCES, DownloadError, download, tree_digest
from fashlib.data.sampler import PKSampler

REAL = Path("/work/shared/data/clothing-dataset")
needs_real = pytest.mark.skipif(
    not (REAL / "images.csv").is_file(),
    reason=f"the real CC0 clothing copy is not at {REAL} on this machine",
)
TOP = SOURCES["clothing"].archive_top


# ----------------------------------------------------------------------------- real CC0 copy


@functools.cache
def _real(seed: int = 0, eval_split: str = "test") -> tuple[pd.DataFrame, tuple[str, ...]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_clothing(REAL, seed=seed, eval_split=eval_split)
    return table, tuple(str(w.message) for w in caught)


def _csv_rows() -> list[dict]:
    with open(REAL / "images.csv", newline="") as f:
        return list(csv.DictReader(f))


@needs_real
def test_real_rows_missing_and_excluded_labels():
    table, messages = _real()
    rows = _csv_rows()
    assert len(rows) == 5403
    missing = [r for r in rows if not (REAL / "images" / f"{r['image']}.jpg").is_file()]
    assert len(missing) == 5
    # exactly one warning, naming the 5 missing of 5,403 rows
    assert len(messages) == 1 and "5 of 5403" in messages[0]
    assert missing[0]["image"] in messages[0]
    expected = [r for r in rows if r not in missing and r["label"] not in NON_GARMENT_LABELS]
    assert len(table) == len(expected)
    assert set(table["item_id"]) == {r["image"] for r in expected}
    assert not set(table["label"]) & set(NON_GARMENT_LABELS)
    assert set(table["label"]) == {r["label"] for r in expected}
    assert len(set(table["label"])) == 17


@needs_real
def test_real_columns_follow_contract():
    table, _ = _real()
    assert list(table.columns[:10]) == [
        "path",
        "item_id",
        "label",
        "category",
        "domain",
        "split",
        "x1",
        "y1",
        "x2",
        "y2",
    ]
    assert {"sender_id", "kids"} <= set(table.columns)
    assert (table["label"] == table["category"]).all()
    assert (table["domain"] == "consumer").all()
    assert table[["x1", "y1", "x2", "y2"]].isna().all().all()
    assert set(table["split"]) == {"train", "val", "query", "gallery"}
    assert all(Path(p).is_absolute() and Path(p).name == f"{i}.jpg" for p, i in zip(table["path"], table["item_id"]))
    assert table["kids"].dtype == bool and table["kids"].sum() > 0


def _senders(table: pd.DataFrame, *splits: str) -> set:
    return set(table.loc[table["split"].isin(splits), "sender_id"])


@needs_real
def test_real_contributors_disjoint_and_balanced():
    table, _ = _real()
    train, val, test = _senders(table, "train"), _senders(table, "val"), _senders(table, "query", "gallery")
    assert not (train & val) and not (train & test) and not (val & test)
    assert not (_senders(table, "query") & _senders(table, "gallery"))
    assert len(train | val | test) == table["sender_id"].nunique()
    share = table["split"].replace({"query": "test", "gallery": "test"}).value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.6, abs=0.03)
    assert share["val"] == pytest.approx(0.2, abs=0.03)
    assert share["test"] == pytest.approx(0.2, abs=0.03)
    # stratified: every category in every part, gallery holds every test category
    for part in (["train"], ["val"], ["query", "gallery"], ["gallery"]):
        assert set(table.loc[table["split"].isin(part), "label"]) == set(table["label"]), part
    q, g = (table["split"] == "query").sum(), (table["split"] == "gallery").sum()
    assert 0.4 < q / (q + g) < 0.6


@needs_real
def test_real_eval_split_val_uses_val_contributors():
    test_table, _ = _real()
    val_table, _ = _real(eval_split="val")
    assert set(val_table["split"]) == {"train", "test", "query", "gallery"}
    # the contributor split does not depend on eval_split
    assert _senders(val_table, "query", "gallery") == _senders(test_table, "val")
    assert _senders(val_table, "test") == _senders(test_table, "query", "gallery")
    assert _senders(val_table, "train") == _senders(test_table, "train")
    assert set(val_table.loc[val_table["split"] == "query", "label"]) <= set(
        val_table.loc[val_table["split"] == "gallery", "label"]
    )


@needs_real
def test_real_deterministic_per_seed():
    a, _ = _real()
    b = read_clothing(REAL, seed=0, check_images=False)
    b = b[b["path"].map(os.path.isfile)].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    c, _ = _real(seed=1)
    assert (a["split"].to_numpy() != c["split"].to_numpy()).sum() > 100


@needs_real
def test_real_tree_digest_matches_pinned_constant():
    start = time.perf_counter()
    assert tree_digest(REAL) == SOURCES["clothing"].tree_sha256
    assert time.perf_counter() - start < 30


def test_tree_digest_independent_definition(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images.csv").write_text("image,sender_id,label,kids\n")
    (tmp_path / "images" / "b.jpg").write_bytes(b"bbb")
    (tmp_path / "images" / "a.jpg").write_bytes(b"aaa")
    (tmp_path / "README.md").write_text("not covered")
    lines = "".join(
        f"{rel}\t{hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()}\n"
        for rel in ["images.csv", "images/a.jpg", "images/b.jpg"]
    )
    assert tree_digest(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()


def test_missing_folder_and_csv_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        read_clothing(tmp_path / "nowhere")
    text = str(err.value)
    assert str(tmp_path / "nowhere") in text and "FASHLIB_DATA" in text and 'download("clothing", root)' in text
    (tmp_path / "clothing-dataset").mkdir()
    with pytest.raises(FileNotFoundError, match="images.csv"):
        read_clothing(tmp_path / "clothing-dataset")


# ----------------------------------------------------------------------------- download (local HTTP)

LABELS = ["T-Shirt", "Pants", "Shoes", "Skip"]


def _tiny_tree(folder: Path, senders: int = 12) -> None:
    """A small dataset folder in the real layout: images.csv + images/<id>.jpg (+ one orphan image)."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for s in range(senders):
        for j, label in enumerate(LABELS):
            image = f"img-{s:02d}-{j}"
            Image.new("RGB", (8, 10), (20 * s, 60 * j, 5)).save(folder / "images" / f"{image}.jpg")
            rows.append((image, 100 + s, label, "True" if s == 0 else "False"))
    Image.new("RGB", (8, 8)).save(folder / "images" / "orphan.jpg")
    rows.append(("gone", 100, "Pants", "False"))  # a row without an image
    with open(folder / "images.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "sender_id", "label", "kids"])
        writer.writerows(rows)
    (folder / "README.md").write_text("tiny")


def _zip_tree(folder: Path, archive: Path) -> bytes:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"{TOP}/{p.relative_to(folder).as_posix()}")
    return archive.read_bytes()


@pytest.fixture()
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 in a thread; yield (www folder, base url)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def tiny_zip(tmp_path, server):
    www, base = server
    src = tmp_path / "src"
    _tiny_tree(src)
    data = _zip_tree(src, www / "tiny.zip")
    return src, f"{base}/tiny.zip", hashlib.sha256(data).hexdigest()


def test_download_good_checksum_places_readable_folder(tmp_path, tiny_zip):
    src, url, sha = tiny_zip
    root = tmp_path / "root"
    out = download("clothing", root, url=url, sha256=sha, tree_sha256=tree_digest(src), progress=False)
    assert out == (root / "clothing-dataset").resolve()
    assert sorted(p.name for p in root.iterdir()) == ["clothing-dataset"]  # no temp file or folder left
    assert tree_digest(out) == tree_digest(src)
    with pytest.warns(UserWarning, match="1 of 49"):
        table = read_clothing(out, seed=0)
    assert len(table) == 12 * 3  # "Skip" rows left out, the missing image dropped, the orphan ignored
    assert set(table["split"]) == {"train", "val", "query", "gallery"}
    # a second call finds the folder and does not download (the URL is now unreachable)
    assert download("clothing", root, url="http://127.0.0.1:9/none.zip", progress=False) == out


def test_download_via_fashlib_data_env(tmp_path, tiny_zip, monkeypatch):
    _, url, sha = tiny_zip
    monkeypatch.setenv("FASHLIB_DATA", str(tmp_path / "envroot"))
    out = download("clothing", url=url, sha256=sha, progress=False)
    assert out == (tmp_path / "envroot" / "clothing-dataset").resolve() and (out / "images.csv").is_file()


def test_download_bad_checksum_leaves_nothing(tmp_path, tiny_zip):
    _, url, _ = tiny_zip
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download("clothing", root, url=url, sha256="0" * 64, progress=False)
    assert list(root.iterdir()) == []


def test_download_bad_content_digest_leaves_nothing(tmp_path, tiny_zip):
    _, url, sha = tiny_zip
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="content digest mismatch"):
        download("clothing", root, url=url, sha256=sha, tree_sha256=SOURCES["clothing"].tree_sha256, progress=False)
    assert list(root.iterdir()) == []


def test_download_bad_zip_leaves_nothing(tmp_path, server):
    www, base = server
    (www / "broken.zip").write_bytes(b"this is not a zip archive" * 100)
    sha = hashlib.sha256((www / "broken.zip").read_bytes()).hexdigest()
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="not a valid zip"):
        download("clothing", root, url=f"{base}/broken.zip", sha256=sha, progress=False)
    assert list(root.iterdir()) == []


def test_download_http_404_leaves_nothing(tmp_path, server):
    _, base = server
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="could not download"):
        download("clothing", root, url=f"{base}/absent.zip", sha256="0" * 64, progress=False)
    assert list(root.iterdir()) == []


def test_download_unreachable_server_says_what_to_do(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    url = f"http://127.0.0.1:{port}/clothing.zip"
    with pytest.raises(DownloadError) as err:
        download("clothing", root, url=url, sha256="0" * 64, progress=False, timeout=5)
    text = str(err.value)
    assert url in text and "by hand" in text and str(root.resolve() / "clothing-dataset") in text
    assert "FASHLIB_DATA" in text
    assert list(root.iterdir()) == []


def test_download_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        download("inshop", tmp_path)


def test_registry_pins_the_commit():
    src = SOURCES["clothing"]
    assert src.url.endswith("/archive/7ed86a9cc56763b6acb35e41cb35184e43a5d218.zip")
    assert src.archive_top == "clothing-dataset-7ed86a9cc56763b6acb35e41cb35184e43a5d218"
    assert src.folder == "clothing-dataset" and len(src.tree_sha256) == 64


# ----------------------------------------------------------------------------- Dataset + transforms


def _gradient(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 2 % 256, y * 2 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def test_dataset_crop_with_margin_and_clamp(tmp_path):
    arr = _gradient(100, 80)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "gray.png")  # mode L, must come back RGB
    table = pd.DataFrame(
        {
            "path": [str(tmp_path / "a.png")] * 3 + [str(tmp_path / "gray.png")],
            "label": ["x", "x", "y", "y"],
            "x1": [20.0, 0.0, np.nan, 10.0],
            "y1": [10.0, 0.0, np.nan, 10.0],
            "x2": [60.0, 100.0, np.nan, 30.0],
            "y2": [50.0, 80.0, np.nan, 30.0],
        }
    )
    ds = ImageTableDataset(table, crop_boxes=True, margin=0.1)
    x, label, i = ds[0]
    assert (label, i) == (0, 0)
    # box 40x40 grown by 4 px each side: [16, 64) x [6, 54)
    expected = torch.from_numpy(arr[6:54, 16:64]).permute(2, 0, 1).float() / 255
    assert x.shape == (3, 48, 48) and torch.allclose(x, expected)
    assert ds[1][0].shape == (3, 80, 100)  # clamped to the image
    assert ds[2][0].shape == (3, 80, 100)  # NaN box: whole image
    gray = ds[3][0]
    assert gray.shape == (3, 24, 24) and torch.equal(gray[0], gray[1])
    assert ImageTableDataset(table, crop_boxes=False)[0][0].shape == (3, 80, 100)
    assert crop_box((100, 80), (90, 70, 90, 70), 0.1) is None


def test_dataset_labels_and_classes(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    table = pd.DataFrame(
        {"path": [str(tmp_path / "a.jpg")] * 4, "label": ["b", "a", "b", "c"], "category": list("wxyz")}
    )
    ds = ImageTableDataset(table)
    assert ds.classes == ["a", "b", "c"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [1, 0, 1, 2]
    assert [ds[i][1] for i in range(4)] == [1, 0, 1, 2]
    assert ImageTableDataset(table, label_column="category").classes == list("wxyz")
    fixed = ImageTableDataset(table, classes=["c", "b", "a"])
    assert fixed.labels.tolist() == [1, 2, 1, 0]
    with pytest.raises(ValueError, match="not in classes"):
        ImageTableDataset(table, classes=["a"])


def _bad_table(tmp_path: Path) -> pd.DataFrame:
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "good.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    full = io.BytesIO()
    Image.fromarray(_gradient(64, 64)).save(full, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(full.getvalue()[:300])
    (tmp_path / "lonely.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return pd.DataFrame(
        {
            "path": [str(tmp_path / n) for n in ("good.jpg", "garbage.jpg", "truncated.jpg", "lonely.jpg")],
            "label": ["shirt", "shirt", "shirt", "alone"],
        }
    )


def test_dataset_bad_image_is_an_error_never_another_rows_image(tmp_path):
    """No substitution: the good row gives its own pixels, every undecodable row an error naming its file."""
    table = _bad_table(tmp_path)
    ds = ImageTableDataset(table)
    x, label, idx = ds[0]
    assert idx == 0 and x.shape == (3, 20, 30) and torch.allclose(x[0], torch.ones(20, 30), atol=0.02)
    for i in (1, 2, 3):
        name = Path(table["path"][i]).name
        with pytest.raises(UndecodableImageError, match=name) as err:
            ds[i]
        assert "drop_undecodable" in str(err.value)


def test_dataset_bad_image_error_reaches_through_workers(tmp_path):
    ds = ImageTableDataset(_bad_table(tmp_path), transform=build_transforms(False, image_size=16))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 2]), batch_size=1, num_workers=1)
    with pytest.raises(Exception, match="truncated.jpg"):
        list(loader)


def test_build_transforms_shapes_and_normalisation():
    img = Image.new("RGB", (400, 533), (255, 255, 255))
    ev = build_transforms(False, image_size=224)
    x = ev(img)
    assert x.shape == (3, 224, 224) and torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    resize = ev.transforms[1]  # after PILToTensor: the tensor resampler
    assert type(resize).__name__ == "Resize" and resize.size == [round(224 * 1.14)] and resize.antialias
    assert x.dtype == torch.float32
    torch.manual_seed(0)
    tr = build_transforms(True, image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert tr(img).shape == (3, 64, 64)
    assert type(tr.transforms[0]).__name__ == "RandomResizedCrop" and tr.transforms[0].scale == (0.6, 1.0)
    with pytest.raises(ValueError, match="interpolation"):
        build_transforms(False, interpolation="cubic-ish")
    with pytest.raises(ValueError, match="resampler must be one of"):
        build_transforms(False, resampler="opencv")


def _photo(size: tuple[int, int]) -> Image.Image:
    """A smooth photo-like image (gradients + a few blobs): resampling differences show as in real photos."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = [128 + 100 * np.sin(xx / (17 + 5 * c)) * np.cos(yy / (23 + 3 * c)) for c in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(400, 533), (533, 400), (1200, 900), (150, 120)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_tensor_resampler_matches_pil_within_two_grey_levels(size, interpolation):
    img = _photo(size)
    options = dict(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation=interpolation)
    fast, slow = (build_transforms(False, resampler=r, **options)(img) for r in ("tensor", "pil"))
    assert fast.shape == slow.shape == (3, 224, 224) and fast.dtype == slow.dtype == torch.float32
    # one grey level of 255 is 2/255 after (x - 0.5) / 0.5; downscaling and upscaling (150 x 120) alike
    assert float((fast - slow).abs().max()) <= 4 / 255 + 1e-6
    assert float((fast - slow).abs().mean()) < 2e-3


@pytest.mark.parametrize("interpolation", ["lanczos", "nearest"])
def test_lanczos_and_nearest_resize_in_pil(interpolation):
    # lanczos has no tensor kernel; the tensor "nearest" samples other pixels than PIL's (floor(i * scale)
    # instead of the pixel centres): on a CC0 photo 6 grey levels apart on average, up to 244
    img = _photo((300, 200))
    ev = build_transforms(False, image_size=64, interpolation=interpolation)
    assert type(ev.transforms[0]).__name__ == "Resize" and ev.transforms[0].__module__.startswith(
        "torchvision.transforms.transforms"
    )
    torch.testing.assert_close(
        ev(img), build_transforms(False, image_size=64, interpolation=interpolation, resampler="pil")(img)
    )


# ----------------------------------------------------------------------------- PKSampler


def _labels() -> np.ndarray:
    # 10 labels with 2..20 images, plus a singleton label "z"
    counts = {f"c{i}": 2 + 2 * i for i in range(10)}
    labels = [lab for lab, n in counts.items() for _ in range(n)] + ["z"]
    return np.random.default_rng(0).permutation(np.array(labels))


def _check_batch(batch, labels, p, k):
    assert len(batch) == p * k
    per = Counter(labels[batch])
    assert len(per) == p and set(per.values()) == {k}
    assert "z" not in per  # singleton labels are never sampled by default


def test_pk_sampler_batches():
    labels = _labels()
    sampler = PKSampler(labels, p=4, k=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 16
    for batch in batches:
        _check_batch(batch, labels, 4, 4)
        for lab in set(labels[batch]):  # no repeats within a label group when it has >= k images
            idx = [i for i in batch if labels[i] == lab]
            if (labels == lab).sum() >= 4:
                assert len(set(idx)) == 4
            else:
                assert set(idx) == set(np.flatnonzero(labels == lab))  # all its images, some twice


def test_pk_sampler_deterministic_and_epochs_differ():
    labels = _labels()
    a = PKSampler(labels, p=3, k=2, seed=5, batches_per_epoch=20)
    b = PKSampler(labels, p=3, k=2, seed=5, batches_per_epoch=20)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1 and len(e1) == 20
    a.set_epoch(0)
    assert list(a) == e0
    assert list(PKSampler(labels, p=3, k=2, seed=6, batches_per_epoch=20)) != e0
    # labels are visited evenly: over 20 batches of 3 labels, each of 10 labels 6 times
    visits = Counter(labels[[batch[j] for batch in e0 for j in range(0, 6, 2)]])
    assert len(visits) == 10 and min(visits.values()) >= 5 and max(visits.values()) <= 7


def test_pk_sampler_distributed_ranks_disjoint():
    labels = _labels()
    ranks = [list(PKSampler(labels, p=2, k=3, seed=1, rank=r, world_size=2, batches_per_epoch=15)) for r in (0, 1)]
    for b0, b1 in zip(*ranks):
        _check_batch(b0, labels, 2, 3)
        _check_batch(b1, labels, 2, 3)
        assert not set(labels[b0]) & set(labels[b1])
    assert len(PKSampler(labels, p=2, k=3, rank=1, world_size=2)) == len(labels) // 12


def test_pk_sampler_errors_and_singletons():
    labels = np.array(["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="at least"):
        PKSampler(labels, p=2, k=2)  # only "a" has >= 2 images
    batches = list(PKSampler(labels, p=3, k=2, min_per_label=1, batches_per_epoch=3))
    for batch in batches:
        assert len(batch) == 6 and Counter(labels[batch]) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError):
        PKSampler(labels, p=1, k=1, rank=2, world_size=2)


def test_pk_sampler_with_dataloader(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    labels = _labels()
    ds = ImageTableDataset(pd.DataFrame({"path": [str(tmp_path / "a.png")] * len(labels), "label": labels}))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PKSampler(ds.labels, p=4, k=2, seed=0))
    for x, y, idx in loader:
        assert x.shape == (8, 3, 4, 4) and len(set(y.tolist())) == 4
        assert torch.equal(y, torch.as_tensor(ds.labels[idx.numpy()]))

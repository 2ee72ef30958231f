"""Tests for fashlib.features: extraction order/values, the on-disk cache, and the head-only fast path."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fashlib import features
from fashlib.features import FeatureCacheWarning, cache_key, embed_features, extract, train_head
from fashlib.models import EmbeddingHead, create_embedder

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    """Seven small images of different sizes and colours in three labels."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(7):
        h, w = 40 + 4 * i, 56 - 2 * i
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        path = root / f"img_{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        rows.append({"path": str(path), "label": f"c{i % 3}", "x1": 2.0, "y1": 3.0, "x2": w - 5.0, "y2": h - 4.0})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def transform():
    return T.Compose([T.Resize((SIZE, SIZE)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


@pytest.fixture
def model():
    torch.manual_seed(0)
    # timm's tiny test network (0.1M parameters): the cache logic does not depend on the architecture
    return create_embedder("test_efficientnet", embedding_dim=16, pretrained=False)


def count_backbone_calls(model) -> list[int]:
    calls = [0]
    model.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def reference(model, table, transform, fn="pooled") -> np.ndarray:
    """Independent path: PIL open -> transform -> one batch through the model."""
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in table["path"]])
    model.eval()
    with torch.no_grad():
        out = model.pooled_features(x) if fn == "pooled" else model(x)
    return out.numpy()


def test_extract_matches_direct_forward_in_table_order(model, table, transform):
    model.train()
    got = extract(model, table, transform=transform, batch_size=3, progress=False)
    assert got.dtype == np.float32 and got.shape == (7, 256)
    assert model.training  # previous mode restored
    np.testing.assert_allclose(got, reference(model, table, transform), rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())  # channels_last undone afterwards
    nchw = extract(model, table, transform=transform, batch_size=7, progress=False, channels_last=False)
    np.testing.assert_allclose(nchw, got, rtol=1e-4, atol=1e-5)
    shuffled = table.iloc[[4, 0, 6, 2, 1, 5, 3]]
    again = extract(model, shuffled, transform=transform, batch_size=2, progress=False)
    np.testing.assert_allclose(again, got[[4, 0, 6, 2, 1, 5, 3]], rtol=1e-4, atol=1e-5)
    emb = extract(model, table, transform=transform, batch_size=4, progress=False, fn="embedding")
    assert emb.shape == (7, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, reference(model, table, transform, "embedding"), rtol=1e-4, atol=1e-5)


def test_cache_hit_skips_the_model(model, table, transform, tmp_path):
    calls = count_backbone_calls(model)
    first = extract(model, table, transform=transform, batch_size=4, cache_dir=tmp_path, progress=False)
    assert calls[0] == 2
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npy"]  # no temp files left over
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["shape"] == [7, 256] and len(meta["key"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = extract(model, table, transform=transform, batch_size=4, cache_dir=tmp_path, progress=False)
    assert calls[0] == 2  # served from disk
    np.testing.assert_array_equal(first, second)


def _corrupt_npy(npy, meta):
    data = npy.read_bytes()
    npy.write_bytes(data[: len(data) // 2])


def _alter_key(npy, meta):
    info = json.loads(meta.read_text())
    info["key"] = "0" * 64
    meta.write_text(json.dumps(info))


def _alter_shape(npy, meta):
    info = json.loads(meta.read_text())
    info["shape"] = [7, 1000]
    meta.write_text(json.dumps(info))


def _garble_json(npy, meta):
    meta.write_text("{not json")


def _flip_values(npy, meta):
    array = np.load(npy)
    array[0, 0] += 1.0
    np.save(npy, array)


def _drop_json(npy, meta):
    meta.unlink()


@pytest.mark.parametrize("damage", [_corrupt_npy, _alter_key, _alter_shape, _garble_json, _flip_values, _drop_json])
def test_broken_cache_entry_is_rebuilt_with_warning(damage, model, table, transform, tmp_path):
    first = extract(model, table, transform=transform, cache_dir=tmp_path, progress=False)
    (npy,) = tmp_path.glob("*.npy")
    damage(npy, npy.with_suffix(".json"))
    calls = count_backbone_calls(model)
    with pytest.warns(FeatureCacheWarning, match="rebuilding"):
        rebuilt = extract(model, table, transform=transform, cache_dir=tmp_path, progress=False)
    assert calls[0] == 1
    np.testing.assert_array_equal(rebuilt, first)
    with warnings.catch_warnings():  # and the rebuilt entry is good again
        warnings.simplefilter("error")
        extract(model, table, transform=transform, cache_dir=tmp_path, progress=False)
    assert calls[0] == 1


def test_cache_key_tracks_files_transform_weights_and_options(model, table, transform):
    def key(m=model, t=table, tf=transform, **kw):
        return cache_key(m, t, transform=tf, **kw)

    base = key()
    assert key() == base
    assert key(t=table.iloc[::-1]) != base  # order of files
    assert key(t=table.iloc[:-1]) != base  # list of files
    other = T.Compose([T.Resize((SIZE + 8, SIZE + 8)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    assert key(tf=other) != base
    assert key(fn="embedding") != base
    assert key(crop_boxes=True) != base
    assert key(crop_boxes=True, margin=0.2) != key(crop_boxes=True)
    moved = table.assign(x1=table["x1"] + 1)
    assert key(t=moved, crop_boxes=True) != key(crop_boxes=True) and key(t=moved) == base
    assert key(key_extra="v2") != base
    # the pooled output does not depend on the head, the embedding does
    pooled_emb = key(fn="embedding")
    with torch.no_grad():
        model.head.fc.weight.add_(1.0)
    assert key() == base and key(fn="embedding") != pooled_emb
    with torch.no_grad():
        model.pool.p.add_(0.5)  # GeM exponent changes pooled features
    assert key() != base
    with torch.no_grad():
        next(model.backbone.parameters()).mul_(1.01)
    assert key() != base
    # a file's content (size / mtime) changing changes the key
    before = key()
    path = table["path"].iloc[0]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert key() != before
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert key() == before


def test_crop_boxes_reach_the_dataset(model, table, transform):
    plain = extract(model, table, transform=transform, progress=False)
    cropped = extract(model, table, transform=transform, progress=False, crop_boxes=True, margin=0.0)
    assert not np.allclose(plain, cropped)


def toy_data(seed=0, classes=6, per_class=12, dim=32):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    x = np.concatenate([c + rng.normal(size=(per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat([f"class{i}" for i in range(classes)], per_class)
    return x, y


def test_train_head_is_deterministic_and_learns():
    x, y = toy_data()
    kwargs = dict(embedding_dim=8, epochs=15, p=4, k=4, seed=3, progress=False)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    head_a, hist_a = train_head(x, y, **kwargs)
    assert torch.equal(torch.rand(3), expected_draw)  # global RNG left as it was
    head_b, hist_b = train_head(x, y, **kwargs)
    assert hist_a == hist_b and len(hist_a) == 15
    for (ka, va), (kb, vb) in zip(head_a.state_dict().items(), head_b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    head_c, _ = train_head(x, y, **{**kwargs, "seed": 4})
    assert not torch.equal(head_a.fc.weight, head_c.fc.weight)
    assert np.mean(hist_a[-3:]) < 0.5 * np.mean(hist_a[:2])
    assert not head_a.training
    emb = embed_features(head_a, x)
    assert emb.dtype == np.float32 and emb.shape == (len(x), 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    assert np.mean(y[sims.argmax(1)] == y) > 0.95  # nearest neighbour shares the label


@pytest.mark.parametrize("loss", ["arcface", "proxy_anchor", "normalized_softmax", "triplet"])
def test_train_head_fills_in_loss_parameters(loss):
    x, y = toy_data(seed=1)
    head, history = train_head(x, y, loss=loss, embedding_dim=8, epochs=5, p=4, k=4, progress=False, bnneck=True)
    assert head.bnneck and all(np.isfinite(history))
    assert history[-1] < history[0]


def test_train_head_trains_given_head_in_place():
    x, y = toy_data(seed=2)
    head = EmbeddingHead(32, 4)
    before = head.fc.weight.detach().clone()
    trained, _ = train_head(x, y, head=head, epochs=2, p=4, k=4, progress=False,
                            loss="triplet", loss_options={"margin": 0.3})
    assert trained is head and not torch.equal(before, head.fc.weight)


def test_extract_uses_the_project_dataset(table, transform):
    from fashlib.data.dataset import ImageTableDataset

    ds = features._make_dataset(table, transform, False, 0.1)
    assert isinstance(ds, ImageTableDataset) and len(ds) == len(table)

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
    first = extract(model, table, transform=transform, batch_size=4, cache_dir=tmp_path, progress=False, engine="torch")
    assert calls[0] == 2
    # no temp files or shards left over (the engines folder holds exported models)
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.name != "engines") == [".json", ".npy"]
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["shape"] == [7, 256] and len(meta["key"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = extract(
            model, table, transform=transform, batch_size=4, cache_dir=tmp_path, progress=False, engine="torch"
        )
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
    options = dict(transform=transform, cache_dir=tmp_path, progress=False, engine="torch", batch_size=16)
    first = extract(model, table, **options)
    (npy,) = tmp_path.glob("*.npy")
    damage(npy, npy.with_suffix(".json"))
    calls = count_backbone_calls(model)
    with pytest.warns(FeatureCacheWarning, match="rebuilding"):
        rebuilt = extract(model, table, **options)
    assert calls[0] == 1
    np.testing.assert_array_equal(rebuilt, first)
    with warnings.catch_warnings():  # and the rebuilt entry is good again
        warnings.simplefilter("error")
        extract(model, table, **options)
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
    trained, _ = train_head(
        x, y, head=head, epochs=2, p=4, k=4, progress=False, loss="triplet", loss_options={"margin": 0.3}
    )
    assert trained is head and not torch.equal(before, head.fc.weight)


def test_extract_uses_the_project_dataset(table, transform):
    from fashlib.data.dataset import ImageTableDataset

    ds = features._make_dataset(table, transform, False, 0.1)
    assert isinstance(ds, ImageTableDataset) and len(ds) == len(table)


# --------------------------------------------------------------------------------------------
# Shards: interruption, resumption, corruption, torchrun
# --------------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fashlib_test_extract_script", os.path.join(HERE, "extract_script.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _script()


class _Stop(Exception):
    pass


@pytest.fixture
def loaded_rows(monkeypatch):
    """Row indices the dataset decodes (decoding threads run in this process)."""
    from fashlib.data.dataset import ImageTableDataset

    rows: list[int] = []
    original = ImageTableDataset.__getitem__

    def getitem(self, i):
        rows.append(int(i))
        return original(self, i)

    monkeypatch.setattr(ImageTableDataset, "__getitem__", getitem)
    return rows


def _interrupt_after(n: int):
    stored: list[int] = []

    def on_shard(index: int) -> None:
        stored.append(index)
        if len(stored) == n:
            raise _Stop(f"stopped after {n} shards")

    return on_shard, stored


def test_interrupted_extraction_resumes_at_the_missing_shards(table, tmp_path, loaded_rows):
    reference = script.run(table, tmp_path / "reference")  # uninterrupted (4 shards of 2 rows)
    on_shard, stored = _interrupt_after(2)
    with pytest.raises(_Stop):
        script.run(table, tmp_path / "cache", on_shard=on_shard)
    assert stored == [0, 1]
    (folder,) = (tmp_path / "cache").glob("*.shards")
    assert sorted(p.name for p in folder.glob("*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    assert not list((tmp_path / "cache").glob("*.npy"))  # no final entry yet
    loaded_rows.clear()
    resumed_shards: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        resumed = script.run(table, tmp_path / "cache", on_shard=resumed_shards.append)
    assert resumed_shards == [2, 3] and sorted(loaded_rows) == [4, 5, 6]  # finished shards not recomputed
    np.testing.assert_array_equal(resumed, reference)
    assert not folder.exists()  # assembled into the one cache entry
    loaded_rows.clear()
    np.testing.assert_array_equal(script.run(table, tmp_path / "cache"), reference)
    assert loaded_rows == []


def test_corrupted_shard_is_rebuilt_with_a_warning(table, tmp_path, loaded_rows):
    reference = script.run(table, tmp_path / "reference")
    on_shard, _ = _interrupt_after(2)
    with pytest.raises(_Stop):
        script.run(table, tmp_path / "cache", on_shard=on_shard)
    (folder,) = (tmp_path / "cache").glob("*.shards")
    shard = folder / "shard-00000.npy"
    array = np.load(shard)
    array[1, 3] += 0.5  # silent corruption: still a valid .npy, only the digest can tell
    np.save(shard, array)
    loaded_rows.clear()
    with pytest.warns(FeatureCacheWarning, match="shard-00000.npy.*digest"):
        resumed = script.run(table, tmp_path / "cache")
    assert sorted(loaded_rows) == [0, 1, 4, 5, 6]  # shard 0 rebuilt, shard 1 kept
    np.testing.assert_array_equal(resumed, reference)


def _subprocess(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    import signal
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{cmd} timed out:\n{output[-3000:]}")
    return proc.returncode, output


def test_sigkilled_extraction_resumes_to_the_same_array(table, tmp_path, loaded_rows):
    import signal

    csv = tmp_path / "table.csv"
    table.to_csv(csv, index=False)
    code, output = _subprocess(
        [os.path.join(HERE, "extract_script.py"), "kill", str(csv), str(tmp_path / "cache"), "3"]
    )
    assert code == -signal.SIGKILL, output[-3000:]
    (folder,) = (tmp_path / "cache").glob("*.shards")
    assert len(list(folder.glob("shard-*.json"))) == 3
    loaded_rows.clear()
    resumed = script.run(table, tmp_path / "cache")
    assert sorted(loaded_rows) == [6]  # only the last shard was missing
    np.testing.assert_array_equal(resumed, script.run(table, tmp_path / "reference"))


def test_two_process_sharded_extraction_equals_single_process(table, tmp_path):
    csv = tmp_path / "table.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "out"
    out.mkdir()
    code, output = _subprocess(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(HERE, "extract_script.py"),
            "ddp",
            str(csv),
            str(tmp_path / "ddp"),
            str(out),
        ]
    )
    assert code == 0, output[-6000:]
    single = script.run(table, tmp_path / "single")
    for rank in range(2):
        np.testing.assert_array_equal(np.load(out / f"features_rank{rank}.npy"), single)
        assert np.load(out / f"shards_rank{rank}.npy").tolist() == [rank, rank + 2]  # each rank its own shards
    (entry,) = (tmp_path / "ddp").glob("*.npy")  # rank 0 assembled one cache entry; shards removed
    assert not list((tmp_path / "ddp").glob("*.shards"))
    np.testing.assert_array_equal(np.load(entry), single)


def test_large_jpegs_decode_in_draft_mode_no_smaller_than_the_resize(tmp_path):
    from fashlib.features import draft_size

    transform = T.Compose([T.Resize(72), T.CenterCrop(64), T.ToTensor()])
    assert draft_size(transform) == (72, 72)
    assert draft_size(T.Compose([T.Resize((40, 90)), T.ToTensor()])) == (90, 90)
    assert draft_size(T.ToTensor()) is None
    from fashlib.data import build_transforms

    fast = build_transforms(False, image_size=64, crop_pct=64 / 72)  # torchvision.transforms.v2 Resize
    assert draft_size(fast) == (72, 72)
    assert draft_size(T.Compose([T.RandomHorizontalFlip(p=1.0), fast])) == (72, 72)  # the mirror view's
    path = tmp_path / "large.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 640, 3), dtype=np.uint8)).save(path)
    table = pd.DataFrame(
        {"path": [str(path)], "label": ["a"], "x1": [10.0], "y1": [10.0], "x2": [600.0], "y2": [390.0]}
    )
    # 640 x 400 -> the largest power-of-two reduction keeping both sides >= 72 is 1/4: 160 x 100
    assert features._make_dataset(table, transform, False, 0.1).load_image(0).size == (160, 100)
    cropped = features._make_dataset(table, transform, True, 0.0).load_image(0)
    assert cropped.size == (590, 380)  # box coordinates are in full-size pixels: no draft when cropping


# --------------------------------------------------------------------------------------------
# Keys that see the architecture; unwritable caches; a changed shard_size
# --------------------------------------------------------------------------------------------
class _MeanPool(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class _Scaled(torch.nn.Module):
    """Conv, then a scale held in a non-persistent buffer (not in the state_dict)."""

    def __init__(self, conv: torch.nn.Module, scale: float):
        super().__init__()
        self.conv = conv
        self.register_buffer("scale", torch.tensor(scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3)) * self.scale


def _direct(model, table, transform) -> np.ndarray:
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in table["path"]])
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_cache_never_reuses_features_of_another_architecture_with_equal_weights(table, transform, tmp_path, engine):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    relu, tanh = (torch.nn.Sequential(conv, act, _MeanPool()) for act in (torch.nn.ReLU(), torch.nn.Tanh()))
    assert features.weights_digest(relu) == features.weights_digest(tanh)  # same state_dict
    options = dict(transform=transform, cache_dir=tmp_path, engine=engine, progress=False)
    np.testing.assert_allclose(extract(relu, table, **options), _direct(relu, table, transform), atol=1e-5)
    np.testing.assert_allclose(extract(tanh, table, **options), _direct(tanh, table, transform), atol=1e-5)
    # a non-persistent buffer changes the output too
    twice = extract(_Scaled(conv, 2.0), table, **options)
    thrice = extract(_Scaled(conv, 3.0), table, **options)
    np.testing.assert_allclose(thrice, twice * 1.5, rtol=1e-5, atol=1e-6)


def test_unwritable_cache_dir_computes_the_features_and_warns(table, transform, tmp_path):
    model, _ = script.setup()
    (tmp_path / "file").write_text("not a folder")
    unwritable = tmp_path / "file" / "cache"  # cannot be created, whoever runs the test (even root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = extract(model, table, transform=transform, cache_dir=unwritable, shard_size=2, progress=False)
    messages = [str(w.message) for w in caught]
    assert [w.category for w in caught] == [FeatureCacheWarning] and "not writable" in messages[0], messages
    np.testing.assert_allclose(got, reference(model, table, transform), rtol=1e-4, atol=1e-5)


def test_changed_shard_size_resumes_with_the_stored_one(table, tmp_path, loaded_rows):
    model, transform = script.setup()
    options = dict(transform=transform, batch_size=2, progress=False)
    on_shard, stored = _interrupt_after(2)
    with pytest.raises(_Stop):
        extract(model, table, cache_dir=tmp_path / "a", shard_size=3, on_shard=on_shard, **options)  # rows 0-5
    assert stored == [0, 1]
    loaded_rows.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        got = extract(model, table, cache_dir=tmp_path / "a", shard_size=5, **options)
    assert sorted(loaded_rows) == [6]  # only the missing row decoded
    np.testing.assert_allclose(got, reference(model, table, transform), rtol=1e-4, atol=1e-5)
    # shard 0 missing (e.g. rank 0 of a torchrun was interrupted first): the layout comes from shard 1
    with pytest.raises(_Stop):
        extract(model, table, cache_dir=tmp_path / "b", shard_size=2, on_shard=_interrupt_after(2)[0], **options)
    (folder,) = (tmp_path / "b").glob("*.shards")
    for path in folder.glob("shard-00000.*"):
        path.unlink()
    loaded_rows.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeatureCacheWarning)
        again = extract(model, table, cache_dir=tmp_path / "b", shard_size=3, **options)
    assert sorted(loaded_rows) == [0, 1, 4, 5, 6]  # rows 2-3 (shard 1) reused
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-6)


def test_shard_write_survives_a_concurrent_finisher_removing_the_folder(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "entry.shards"
    real = features.atomic_write
    calls = []

    def racing(path, write, mode="wb"):
        calls.append(path.name)
        if len(calls) == 1:
            shutil.rmtree(folder)  # the other process assembled the entry and removed the folder
        return real(path, write, mode)

    monkeypatch.setattr(features, "atomic_write", racing)
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    features._write_shard(folder, 0, "k" * 64, (0, 2), array)
    monkeypatch.setattr(features, "atomic_write", real)
    np.testing.assert_array_equal(features._read_shard(folder, 0, "k" * 64, (0, 2)), array)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_extract_refuses_a_batch_size_below_one(model, table, transform, batch_size):
    # used to fail with "range() arg 3 must not be zero" (0) or a bare KeyError: 0 (negative)
    with pytest.raises(ValueError, match=rf"batch_size must be a positive number of images, got {batch_size}"):
        extract(model, table, transform=transform, batch_size=batch_size, progress=False)

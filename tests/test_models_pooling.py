"""Pooling of every timm output layout: NCHW maps (CNNs), NHWC maps (Swin), tokens with prefix tokens (ViT).

Random weights, shrunken depths and tiny images keep this fast on a CPU.
"""

from __future__ import annotations

import pytest
import timm
import torch

from fashlib import models
from fashlib.models import channels_first, create_embedder, feature_format

pytestmark = pytest.mark.usefixtures("one_thread")

# name, timm kwargs (small and fast), image size, layout, prefix tokens
BACKBONES = [
    ("resnet10t", {}, 64, "NCHW", 0),
    (
        "swin_tiny_patch4_window7_224",
        {"img_size": 64, "depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1), "window_size": 2},
        64,
        "NHWC",
        0,
    ),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 1}, 32, "NLC", 1),  # class token
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 1}, 28, "NLC", 5),  # class + 4 register tokens
]


def _reference(raw: torch.Tensor, fmt: str, prefix: int, pooling: str) -> torch.Tensor:
    """Hand-computed pooling: the spatial axes (or patch tokens) of each layout, written out per layout."""
    if fmt == "NCHW":
        values, axes = raw, (2, 3)
    elif fmt == "NHWC":
        values, axes = raw, (1, 2)
    else:
        values, axes = raw[:, prefix:, :], (1,)
    if pooling == "avg":
        return values.mean(dim=axes)
    return values.clamp(min=1e-6).pow(3).mean(dim=axes).pow(1 / 3)


@pytest.mark.parametrize("pooling", ["avg", "gem"])
@pytest.mark.parametrize("name,kwargs,size,fmt,prefix", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_pooling_matches_hand_reference_for_every_layout(name, kwargs, size, fmt, prefix, pooling):
    torch.manual_seed(0)
    emb = create_embedder(name, embedding_dim=16, pooling=pooling, pretrained=False, **kwargs).eval()
    assert (emb.feature_format, emb.num_prefix_tokens) == (fmt, prefix)
    assert feature_format(emb.backbone) == fmt
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        raw = emb.backbone(x)
        pooled = emb.pooled_features(x)
        out = emb(x)
    assert raw.ndim == (3 if fmt == "NLC" else 4)
    assert pooled.shape == (2, emb.backbone.num_features) == (2, emb.feature_dim)
    assert torch.allclose(pooled, _reference(raw, fmt, prefix, pooling), atol=1e-5)
    assert out.shape == (2, 16) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name,kwargs,size", [(b[0], b[1], b[2]) for b in BACKBONES[:2]], ids=["NCHW", "NHWC"])
def test_average_pooling_equals_timms_own_global_pool(name, kwargs, size):
    """Maps: our average equals timm's forward_head(pre_logits=True) with global_pool='avg' (same weights)."""
    torch.manual_seed(0)
    emb = create_embedder(name, embedding_dim=None, pooling="avg", pretrained=False, **kwargs).eval()
    pooled_model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg", **kwargs).eval()
    pooled_model.load_state_dict(emb.backbone.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = pooled_model.forward_head(pooled_model.forward_features(x), pre_logits=True)
        assert torch.allclose(emb.pooled_features(x), want, atol=1e-5)


def test_class_and_register_tokens_are_left_out():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # (N, L=6, C=3)
    maps = channels_first(tokens, "NLC", num_prefix_tokens=2)
    assert maps.shape == (2, 3, 4, 1)
    assert torch.equal(models.AvgPool()(maps), tokens[:, 2:].mean(1))
    assert not torch.equal(models.AvgPool()(maps), tokens.mean(1))


def test_channels_first_layouts_and_errors():
    nhwc = torch.randn(2, 3, 5, 7)  # H=3, W=5, C=7
    assert torch.equal(channels_first(nhwc, "NHWC"), nhwc.permute(0, 3, 1, 2))
    assert channels_first(nhwc, "NCHW") is nhwc
    with pytest.raises(ValueError, match="no patch tokens"):
        channels_first(torch.randn(2, 1, 4), "NLC", num_prefix_tokens=1)
    with pytest.raises(ValueError, match="neither maps"):
        channels_first(torch.randn(2, 4), "NCHW")
    with pytest.raises(ValueError, match="feature_format must be one of"):
        models.Embedder(
            torch.nn.Identity(),
            models.AvgPool(),
            models.EmbeddingHead(4, None),
            {},
            "x",
            "random",
            feature_format="NWHC",
        )


class _ChannelsLast(torch.nn.Module):
    """A backbone that returns NHWC maps without declaring it (no output_fmt)."""

    num_features = 8

    def forward(self, x):
        return torch.ones(x.shape[0], 3, 5, self.num_features)


def test_a_layout_that_does_not_fit_the_feature_size_is_an_error_not_wrong_vectors():
    # read as NCHW, these NHWC maps pooled to 3 values; with no projection (embedding_dim=None) nothing
    # caught it and the "features" were averages over the wrong axes
    head = models.EmbeddingHead(8, None)
    wrong = models.Embedder(_ChannelsLast(), models.AvgPool(), head, {}, "fake", "random")
    with pytest.raises(ValueError, match=r"gives 3 channels once read as NCHW .* but 8 are expected"):
        wrong.pooled_features(torch.zeros(2, 3, 4, 4))
    right = models.Embedder(_ChannelsLast(), models.AvgPool(), head, {}, "fake", "random", feature_format="NHWC")
    assert right.pooled_features(torch.zeros(2, 3, 4, 4)).tolist() == [[1.0] * 8] * 2

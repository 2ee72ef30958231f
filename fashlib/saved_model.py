"""A model you can keep: one self-describing folder per trained embedder, rebuilt offline by `load_embedder`.

Folder layout (format "fashlib-embedder", version 1):
    model.safetensors  every tensor (backbones, poolings, head), safetensors format
    config.json        kind, backbones (timm name, pooling, feature size, preprocessing), head, embedding size,
                       flip averaging, the metrics reached and on which protocol, library versions, the sha256
                       of model.safetensors and the model digest (what an index records to refuse another model)

Three kinds of model, one class (`SavedEmbedder`):
    "features+head"  frozen pooled features of one or several backbones (each L2-normalised, concatenated and
                     normalised again, as embeddings.ensemble_features), then an optional head trained on them
                     (features.train_head); `flip_average` averages each backbone's features of the image and
                     its mirror image first (embeddings.backbone_features).
    "network"        a whole models.Embedder (e.g. fine-tuned end to end: GeM, BNNeck, projection).
Both give float32 (N, D) L2-normalised embeddings for images or image paths (`SavedEmbedder.embed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

FORMAT, FORMAT_VERSION = "fashlib-embedder", 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
KINDS = ("features+head", "network")
# The course's evaluation transform (data.build_transforms(train=False)): resize the shorter side to
# round(size / crop_pct) with this interpolation, centre-crop size x size, scale to [0, 1], normalise.
EVAL_INTERPOLATION, EVAL_CROP_PCT, EVAL_RESAMPLER = "bicubic", 1 / 1.14, "tensor"
CROP_POLICY = "resize shorter side to round(size / crop_pct), centre crop size x size"
# what load_embedder needs from config.json (an edited file lacking one is refused with a message)
REQUIRED_KEYS = ("kind", "backbones", "head", "flip_average", "weights_sha256", "digest")


class SavedModelError(RuntimeError):
    """A saved model folder is missing, corrupt or of an unknown format."""


def preprocessing(embedder: nn.Module, image_size: int | None = None) -> dict:
    """The evaluation preprocessing of a models.Embedder (as embeddings.eval_transform) as plain data."""
    config = embedder.data_config
    return {
        "size": int(image_size or config["input_size"][-1]),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": EVAL_INTERPOLATION,
        "crop_pct": EVAL_CROP_PCT,
        "crop": CROP_POLICY,
        "colour": "RGB",
        "resampler": EVAL_RESAMPLER,
    }


def build_transform(prep: dict):
    """torchvision transform of a preprocessing dict (identical to embeddings.eval_transform)."""
    from .data import build_transforms

    return build_transforms(
        False,
        image_size=prep["size"],
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
        interpolation=prep["interpolation"],
        crop_pct=prep["crop_pct"],
        resampler=prep.get("resampler", "pil"),  # models saved before the tensor resampler resized in PIL
    )


def open_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a path, a binary file object or a PIL image, seen as the course sees its photos.

    The rules of fashlib.data.images (the one opener of the training and evaluation pipelines): EXIF
    orientation applied, transparency composited on white, 16-bit grey scaled to 8 bits, any mode to RGB.
    So a saved model embeds a catalogue or query photo exactly as the features its head was trained on.
    Raises data.images.UndecodableImageError (an OSError) for an undecodable file.
    """
    from PIL import ImageOps

    from .data.images import open_rgb as open_oriented_rgb
    from .data.images import to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    return open_oriented_rgb(image)


HEAD_TYPES = {"EmbeddingHead": "linear", "MLPHead": "mlp"}  # config.json "type" -> features.build_head kind


def _head_config(head: nn.Module) -> dict:
    """JSON description of a head on pooled features (EmbeddingHead or features.MLPHead); TypeError otherwise."""
    kind = type(head).__name__
    if kind not in HEAD_TYPES:
        raise TypeError(f"cannot save a head of type {kind}: save_embedder knows {sorted(HEAD_TYPES)}")
    config = {
        "type": kind,
        "in_dim": int(head.in_dim),
        "embedding_dim": int(head.embedding_dim),
        "bnneck": bool(head.bnneck),
    }
    if kind == "MLPHead":
        config["hidden_dim"] = int(head.hidden_dim)
    return config


def _build_head(config: dict) -> nn.Module:
    """The head `_head_config` described (weights still to load); KeyError for an unknown type."""
    from .features import build_head

    return build_head(
        HEAD_TYPES[config["type"]],
        config["in_dim"],
        config["embedding_dim"],
        bnneck=config["bnneck"],
        hidden_dim=config.get("hidden_dim", 512),
    )


class SavedEmbedder(nn.Module):
    """Images -> L2-normalised embeddings (N, D) float32, from one or several models.Embedder branches.

    kind "features+head": each branch's pooled features (flip-averaged when asked) are L2-normalised,
    concatenated, re-normalised and passed through `head` (an EmbeddingHead or features.MLPHead, or None =
    the features).
    kind "network": the single branch's own forward (pool, BNNeck, projection, normalisation).
    `preps` holds one preprocessing dict (see `preprocessing`) per branch.
    """

    def __init__(
        self,
        branches: Sequence[nn.Module],
        head: nn.Module | None,
        preps: Sequence[dict],
        *,
        kind: str = "features+head",
        flip_average: bool = False,
        info: dict | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "network" and (len(branches) != 1 or head is not None or flip_average):
            raise ValueError("a 'network' model is one Embedder without an extra head or flip averaging")
        if len(preps) != len(branches):
            raise ValueError(f"{len(branches)} backbones but {len(preps)} preprocessing entries")
        self.branches = nn.ModuleList(branches)
        self.head = head
        self.preps = [dict(p) for p in preps]
        self.kind, self.flip_average = kind, bool(flip_average)
        self.info = dict(info or {})  # weights origin etc., written to config.json
        self.transforms = [build_transform(p) for p in self.preps]
        self._engines: dict | None = None  # set inside `with model.engines(...)`
        self.to(memory_format=torch.channels_last)  # NHWC: ~2x faster EfficientNet on CPU, as features.extract
        self.eval()

    @property
    def embedding_dim(self) -> int:
        if self.kind == "network":
            return int(self.branches[0].embedding_dim)
        if self.head is not None:
            return int(self.head.embedding_dim)
        return int(sum(b.feature_dim for b in self.branches))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One preprocessed batch per branch (from `preprocess`) -> (N, D) unit-norm embeddings.

        With flip_average each branch's batch holds 2N images: the N images, then their mirror images.
        """
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        if self.kind == "network":
            return self._branch(0, inputs[0], "embedding")
        parts = []
        for i, x in enumerate(inputs):
            feats = self._branch(i, x, "pooled").float()
            if self.flip_average:
                feats = (feats[: len(x) // 2] + feats[len(x) // 2 :]) / 2
            parts.append(F.normalize(feats, dim=1))
        joined = F.normalize(torch.cat(parts, dim=1), dim=1) if len(parts) > 1 else parts[0]
        return joined if self.head is None else self.head(joined)

    def _branch(self, i: int, x: torch.Tensor, fn: str) -> torch.Tensor:
        """Branch i's pooled features (fn="pooled") or embedding ("embedding") of a preprocessed batch: in
        PyTorch, or inside `engines()` through the engine made (exported, parity-checked) at its first batch."""
        branch = self.branches[i]
        if self._engines is None:
            return branch.pooled_features(x) if fn == "pooled" else branch(x)
        from .engine import create_engine

        made = self._engines["made"]
        if i not in made:
            made[i] = create_engine(branch, self._engines["engine"], sample=x, fn=fn, **self._engines["options"])
        return torch.from_numpy(made[i](x))

    @contextmanager
    def engines(
        self, engine: str = "auto", *, threads: int | None = None, cache_dir: str | os.PathLike | None = None
    ) -> Iterator[SavedEmbedder]:
        """Within the block, every branch runs through fashlib.engine.create_engine(engine): "auto" = ONNX
        Runtime on the CPU, exported at the branch's first batch and parity-checked against PyTorch (max
        |difference| of unit-norm outputs <= 1e-4, same top-10), with a warning and PyTorch if that fails.
        The export costs a few seconds per branch (kept in `cache_dir` when given): worth it for a catalogue,
        not for one query. Engines are closed on exit; the model is unchanged."""
        options = {"threads": threads, "cache_dir": cache_dir}
        self._engines = {"engine": engine, "options": options, "made": {}}
        try:
            yield self
        finally:
            made, self._engines = self._engines["made"], None
            for runner in made.values():
                runner.close()

    def prepare(self, image: Image.Image) -> list[torch.Tensor]:
        """One PIL RGB image -> per branch a float32 (V, 3, H, W) tensor of its views (each branch's own size
        and normalisation; V = 2 with flip_average: the image, then its mirror, flipped before resizing as
        embeddings.eval_transform(flip=True) does). Safe to call from several threads."""
        views = [image] + ([image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if self.flip_average else [])
        return [torch.stack([t(view) for view in views]) for t in self.transforms]

    def collate(self, prepared: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
        """`prepare` outputs of N images -> one batch per branch for forward: the N images, then their N mirrors."""
        n_views = 2 if self.flip_average else 1
        return [
            torch.cat([views[b][v : v + 1] for v in range(n_views) for views in prepared])
            for b in range(len(self.transforms))
        ]

    def preprocess(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """PIL RGB images -> one batch tensor per branch (collate of `prepare`)."""
        return self.collate([self.prepare(img) for img in images])

    def embed(self, images: Iterable[Any], batch_size: int = 16, progress: bool = False) -> np.ndarray:
        """Images (PIL or paths) -> float32 (N, D) L2-normalised embeddings, in eval mode, no gradients.

        Raises OSError / PIL.UnidentifiedImageError for a path that is not a decodable image, ValueError for a
        batch_size below 1.
        """
        from tqdm.auto import tqdm

        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")

        items = list(images)
        out = np.empty((len(items), self.embedding_dim), dtype=np.float32)
        self.eval()
        with torch.inference_mode():
            for start in tqdm(range(0, len(items), batch_size), disable=not progress, desc="embed", unit="batch"):
                batch = [open_rgb(x) for x in items[start : start + batch_size]]
                out[start : start + len(batch)] = self(self.preprocess(batch)).float().numpy()
        return out

    def architecture(self) -> dict:
        """Everything besides the weights that determines the embeddings (JSON-able)."""
        branches = [
            {
                "backbone": b.backbone_name,
                "pooling": _pooling_name(b.pool),
                "feature_dim": int(b.feature_dim),
                "embedding_dim": None if isinstance(b.head.fc, nn.Identity) else int(b.embedding_dim),
                "bnneck": bool(b.head.bnneck),
                "preprocessing": p,
            }
            for b, p in zip(self.branches, self.preps)
        ]
        head = None if self.head is None else _head_config(self.head)
        return {
            "kind": self.kind,
            "backbones": branches,
            "flip_average": self.flip_average,
            "head": head,
            "feature_normalisation": (
                "each backbone's pooled features L2-normalised, concatenated, re-normalised"
                if self.kind == "features+head"
                else "none"
            ),
            "embedding_dim": self.embedding_dim,
        }

    def digest(self) -> str:
        """sha256 over the architecture and every weight: equal digests give equal embeddings."""
        from .features import weights_digest

        text = json.dumps(self.architecture(), sort_keys=True) + weights_digest(self)
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        names = "+".join(b.backbone_name for b in self.branches)
        head = "" if self.head is None else f" + head {self.head.in_dim}->{self.head.embedding_dim}"
        return f"{self.kind}: {names}{head} ({self.embedding_dim}-d)"


def _pooling_name(pool: nn.Module) -> str:
    from .models import POOLINGS

    for name, factory in POOLINGS.items():
        if isinstance(factory, type) and isinstance(pool, factory):
            return name
    raise ValueError(f"cannot save pooling {type(pool).__name__}: not in models.POOLINGS")


# ------------------------------------------------------------------------------------------ assembling
def features_embedder(
    backbones: str | Sequence[str],
    head: nn.Module | None = None,
    *,
    pooling: str = "avg",
    image_size: int | None = None,
    flip_average: bool = False,
    pretrained: bool = True,
    seed: int = 0,
) -> SavedEmbedder:
    """The course's "frozen features + head" model, assembled from the parts the notebooks use.

    Matches embeddings.backbone_features (per backbone: `pooling`, `image_size`, `flip_average`, seed before
    creating each backbone so random-weight controls are reproduced), embeddings.ensemble_features when several
    backbones are given, and a head from features.train_head / embeddings.train_head_on_features (or None).
    Raises models.PretrainedWeightsError when a backbone has no offline weights and `pretrained` is True.
    """
    from .models import create_embedder

    names = [backbones] if isinstance(backbones, str) else list(backbones)
    branches = []
    for name in names:
        torch.manual_seed(seed)
        branches.append(
            create_embedder(
                name,
                embedding_dim=None,
                pooling=pooling,
                pretrained=pretrained,
                allow_random=not pretrained,
                freeze=True,
            )
        )
    if head is not None:
        total = sum(b.feature_dim for b in branches)
        if head.in_dim != total:
            raise ValueError(f"the head takes {head.in_dim}-d features but {'+'.join(names)} give {total}")
        head = head.cpu().eval()
    info = {"weights_origin": [b.weights for b in branches]}
    return SavedEmbedder(
        branches,
        head,
        [preprocessing(b, image_size) for b in branches],
        kind="features+head",
        flip_average=flip_average,
        info=info,
    )


def network_embedder(model: nn.Module, image_size: int | None = None) -> SavedEmbedder:
    """Wrap a whole models.Embedder (fine-tuned end to end, or frozen) evaluated at `image_size`."""
    model = model.cpu().eval()
    return SavedEmbedder(
        [model],
        None,
        [preprocessing(model, image_size)],
        kind="network",
        info={"weights_origin": [f"trained from {model.weights}"]},
    )


def as_saved_embedder(model: Any, image_size: int | None = None) -> SavedEmbedder:
    """A SavedEmbedder from a SavedEmbedder (unchanged) or a models.Embedder (kind "network")."""
    from .models import Embedder

    if isinstance(model, SavedEmbedder):
        return model
    if isinstance(model, Embedder):
        return network_embedder(model, image_size)
    raise TypeError(
        f"cannot save a {type(model).__name__}: pass a models.Embedder or a SavedEmbedder "
        "(saved_model.features_embedder(backbones, head) for a head trained on cached features)"
    )


# ------------------------------------------------------------------------------------------ save / load
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict:
    import timm

    from . import __version__

    return {"fashlib": __version__, "torch": torch.__version__, "timm": timm.__version__}


def save_embedder(
    model: Any,
    folder: str | os.PathLike,
    *,
    metrics: dict | None = None,
    protocol: str | None = None,
    image_size: int | None = None,
) -> Path:
    """Save a trained embedder as one self-describing folder (model.safetensors + config.json); returns it.

    `model`: a SavedEmbedder (features_embedder / network_embedder) or a models.Embedder (then evaluated at
    `image_size`, default its own input size). `metrics` (e.g. {"recall@1": 0.71}) and `protocol` (the words
    saying where they were measured) are recorded as given. Both files are written to a temporary folder
    next to `folder` which then replaces it, so a reader never sees half a model.
    """
    saved = as_saved_embedder(model, image_size)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in saved.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **saved.architecture(),
            "weights_origin": saved.info.get("weights_origin"),
            "metrics": metrics or {},
            "protocol": protocol,
            "versions": _versions(),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256_file(tmp / WEIGHTS_FILE),
            "digest": saved.digest(),
            "description": saved.describe(),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=float))
        _swap_in(tmp, folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the finished `tmp` (the old one, if any, is removed after the rename)."""
    import shutil

    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a saved model folder; SavedModelError naming the file when absent or not ours."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise SavedModelError(
            f"{path} not found: {folder} is not a saved model folder (save one with fashlib.saved_model.save_embedder)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SavedModelError(f"{path} is not valid JSON ({err}); save the model again") from err
    if not isinstance(config, dict):
        raise SavedModelError(
            f"{path} holds a JSON {type(config).__name__}, not a fashlib model config; save the model again"
        )
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise SavedModelError(
            f"{path}: format {config.get('format')!r} v{config.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise SavedModelError(f"{path} lacks {', '.join(missing)}: it was edited or cut short; save the model again")
    weights = config.get("weights_file", WEIGHTS_FILE)
    if not isinstance(weights, str) or Path(weights).name != weights or weights in ("", ".", ".."):
        raise SavedModelError(
            f"{path}: weights_file {weights!r} is not a file name inside {folder}; save the model again"
        )
    return config


def load_embedder(folder: str | os.PathLike, verify: bool = True) -> SavedEmbedder:
    """Rebuild a saved embedder offline (random-init timm backbones, then the saved weights), in eval mode.

    With `verify`, the weights file's sha256 and the rebuilt model's digest must equal those in config.json;
    SavedModelError says which file is corrupt and how to recreate it.
    """
    from safetensors.torch import load_file

    from .models import create_embedder

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / config.get("weights_file", WEIGHTS_FILE)
    if verify and (not weights.is_file() or _sha256_file(weights) != config["weights_sha256"]):
        raise SavedModelError(
            f"{weights} is missing or its sha256 differs from {folder / CONFIG_FILE}: the file is "
            "corrupt or was replaced; save the model again (rerun chapter 05 or fashlib.finetune)"
        )
    try:
        branches = [
            create_embedder(
                b["backbone"],
                embedding_dim=b["embedding_dim"],
                pooling=b["pooling"],
                pretrained=False,
                bnneck=b["bnneck"],
                freeze=config["kind"] == "features+head",
            )
            for b in config["backbones"]
        ]
        head = None if config["head"] is None else _build_head(config["head"])
        model = SavedEmbedder(
            branches,
            head,
            [b["preprocessing"] for b in config["backbones"]],
            kind=config["kind"],
            flip_average=config["flip_average"],
            info={"weights_origin": config.get("weights_origin")},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise SavedModelError(
            f"{folder / CONFIG_FILE} does not describe a model this library can rebuild "
            f"({type(err).__name__}: {err}): it was edited; save the model again"
        ) from err
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as err:
        raise SavedModelError(f"{weights} does not fit the architecture in {folder / CONFIG_FILE}: {err}") from err
    model.eval()
    if verify and model.digest() != config["digest"]:
        raise SavedModelError(
            f"{folder}: the rebuilt model's digest differs from the one in config.json: the "
            f"file was edited, or the model was saved with other library versions "
            f"({config.get('versions')}); save the model again"
        )
    return model

"""Embeddings of a table's rows: frozen backbone features (cached on disk), an ensemble of several
backbones' features, a head trained on cached features, and a whole network's embeddings.

The embeddings returned are (N, D) float32 arrays in table order (one row per table row), rows
L2-normalised; images go through the backbone's evaluation transform (`eval_transform`). Feature
extraction and head training are fashlib.features' (extract, train_head); this module only chooses what
to extract and how to combine it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import data
from .data.protocols import train_rows
from .pool import intra_op_threads
from .postprocess import l2_normalize


def eval_transform(embedder: Any, image_size: int | None = None, flip: bool = False):
    """The evaluation transform of a backbone (data.build_transforms with its mean and std), at its own input
    size unless `image_size` (pixels) is given; `flip` mirrors every image first. The transform takes a PIL
    image and returns a (3, size, size) float32 tensor. `embedder`: anything with timm's `data_config`
    (a models.Embedder); KeyError when its data_config lacks input_size, mean or std."""
    from torchvision import transforms as T

    config = embedder.data_config
    size = image_size or int(config["input_size"][-1])
    transform = data.build_transforms(False, image_size=size, mean=tuple(config["mean"]), std=tuple(config["std"]))
    if flip:
        transform = T.Compose([T.RandomHorizontalFlip(p=1.0), transform])
    return transform


def backbone_features(
    backbone: str,
    table: pd.DataFrame,
    *,
    pretrained: bool = True,
    image_size: int | None = None,
    pooling: str = "avg",
    flip_average: bool = False,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    engine: str = "auto",
) -> np.ndarray:
    """Pooled backbone features of every row (cached on disk), L2-normalised.

    backbone: a timm name; table: a contract table of N rows (its `path` column is read, boxes when the
    extraction crops). Returns (N, F) float32, rows in table order, F the backbone's pooled feature size.
    `pretrained=False` gives the random-weights control (seeded, so its cache is reused);
    `flip_average` averages the features of the image and its mirror image; `image_size` in pixels (None: the
    backbone's own). `cache_dir`: features.extract's cache (None: nothing stored). `engine`: see
    fashlib.engine.create_engine ("auto": ONNX Runtime on the CPU, PyTorch on a GPU).
    Raises ValueError for an unknown timm name or pooling, models.PretrainedWeightsError when pretrained weights
    cannot be loaded offline, and data.UndecodableImageError naming a file that does not decode.
    """
    from .features import extract
    from .models import create_embedder

    torch.manual_seed(seed)
    embedder = create_embedder(
        backbone, embedding_dim=None, pooling=pooling, pretrained=pretrained, allow_random=not pretrained
    )
    views = [False, True] if flip_average else [False]
    feats = [
        extract(
            embedder,
            table,
            transform=eval_transform(embedder, image_size, flip),
            cache_dir=cache_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            key_extra={"pretrained": pretrained, "image_size": image_size},
            engine=engine,
        )
        for flip in views
    ]
    return l2_normalize(np.mean(feats, axis=0))


def ensemble_features(features: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate several backbones' features of the same rows, each L2-normalised, then re-normalise.

    features: arrays (N, D_i) of the same N rows. Returns (N, sum D_i) float32. Normalising each part first
    gives every backbone the same weight in the cosine similarity, whatever its feature size or scale.
    ValueError for no array, arrays of different row counts, or an array that is not 2-D.
    """
    if len(features) == 0:
        raise ValueError("ensemble_features needs at least one feature array")
    rows = {len(f) for f in features}
    if len(rows) != 1:
        raise ValueError(f"feature arrays cover different numbers of rows: {sorted(rows)}")
    return l2_normalize(np.concatenate([l2_normalize(np.asarray(f, dtype=np.float32)) for f in features], axis=1))


def train_head_on_features(
    features: np.ndarray,
    table: pd.DataFrame,
    *,
    loss: str,
    embedding_dim: int = 256,
    epochs: int = 30,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = 1,
    **options: Any,
) -> tuple[np.ndarray, list[float], torch.nn.Module]:
    """Train an embedding head on the training rows' cached features; embed every row with it.

    features: (N, F) float32, one row per table row (table: contract table of N rows; its `split == "train"`
    rows and their `label` train the head); loss: a fashlib.losses name (variants: losses.loss_spec).
    Returns ((N, embedding_dim) float32 L2-normalised embeddings of all rows, per-epoch mean losses (floats),
    the head in eval mode). ValueError as features.train_head raises it (mismatched rows, unknown head,
    sampler or loss, P x K batches a pair loss cannot learn from). Options go to features.train_head:
    head_type ("linear" | "mlp"), hidden_dim, bnneck, sampler ("pk" | "m_per_class"), p, k, lr,
    weight_decay, loss_options... To refit a chosen configuration on train + validation rows, pass
    study.train_val_table(val_table, test_table) as `table` (or call study.refit_on_train_val).
    threads: torch intra-op threads while training and embedding; 1 (the default, as in pool.map_jobs) makes
    the result independent of the machine's core count (BatchNorm's reductions change with it); None keeps
    torch's current setting.
    """
    from .features import embed_features, train_head

    rows = train_rows(table)
    with intra_op_threads(threads or torch.get_num_threads()):
        head, history = train_head(
            features[rows],
            table["label"].to_numpy()[rows],
            loss=loss,
            embedding_dim=embedding_dim,
            epochs=epochs,
            seed=seed,
            device=device,
            progress=progress,
            **options,
        )
        return embed_features(head, features, device=device), history, head


def embed_images(
    model: Any,
    table: pd.DataFrame,
    *,
    image_size: int | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of every row of `table` through a whole embedder (no cache: the weights are changing).

    model: a models.Embedder (or anything features.extract embeds with fn="embedding"); table: contract table
    of N rows. Returns (N, D) float32 in table order, D the model's embedding size (rows L2-normalised by
    the model). image_size in pixels (None: the model's own). data.UndecodableImageError naming a file that
    does not decode."""
    from .features import extract

    return extract(
        model,
        table,
        transform=eval_transform(model, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
        fn="embedding",
    )

"""Dataset readers behind one call, load(name, root), each returning the contract table
(see ARCHITECTURE.md, "The table contract").

Readers are registered in DATASETS (name -> function(dataset_dir, **options) -> DataFrame). The torch
side (ImageTableDataset, build_transforms, PKSampler) is re-exported lazily so that reading a table
never imports torch.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import pandas as pd

from ._annotations import DOWNLOAD_PAGES, AnnotationCountWarning, read_annotation, read_annotation_matrix
from ._common import BASE_COLUMNS, SUBFOLDERS, MissingImagesWarning, dataset_dir, drop_missing_images, summarize_missing
from .attributes import read_attribute_names, read_attributes
from .consumer2shop import read_consumer2shop
from .decodable import UndecodableImagesWarning, decode_errors, drop_undecodable
from .deepfashion2 import read_deepfashion2
from .download import download  # eager: binds the name `download` to the function, not the submodule
from .images import UndecodableImageError, open_rgb, oriented_size
from .inshop import read_inshop


def read_clothing(dataset_dir: str | os.PathLike, **options: Any) -> pd.DataFrame:
    """Read the CC0 clothing dataset (implemented in fashlib.data.clothing; imported on first use)."""
    from .clothing import read_clothing as reader

    return reader(dataset_dir, **options)


DATASETS: dict[str, Callable[..., pd.DataFrame]] = {
    "inshop": read_inshop,
    "consumer2shop": read_consumer2shop,
    "deepfashion2": read_deepfashion2,
    "attributes": read_attributes,
    "clothing": read_clothing,
}


def load(
    name: str, root: str | os.PathLike | None = None, path: str | os.PathLike | None = None, **options: Any
) -> pd.DataFrame:
    """Read dataset `name` from <data root>/<subfolder> (or straight from `path`) into the contract table.

    root: data root (else $FASHLIB_DATA, else ./data); options go to the reader, e.g.
    eval_split="val" (consumer2shop, clothing), check_images=False, attributes=False (attributes).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](dataset_dir(name, root, path), **options)


# name -> module that defines it, imported on first access (these pull in torch / network code)
_LAZY: dict[str, str] = {
    "ImageTableDataset": ".dataset",
    "build_transforms": ".dataset",
    "PKSampler": ".sampler",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "load",
    "DATASETS",
    "SUBFOLDERS",
    "DOWNLOAD_PAGES",
    "BASE_COLUMNS",
    "dataset_dir",
    "read_inshop",
    "read_consumer2shop",
    "read_deepfashion2",
    "read_attributes",
    "read_attribute_names",
    "read_clothing",
    "read_annotation",
    "read_annotation_matrix",
    "drop_missing_images",
    "summarize_missing",
    "MissingImagesWarning",
    "AnnotationCountWarning",
    "download",
    "drop_undecodable",
    "decode_errors",
    "UndecodableImagesWarning",
    "UndecodableImageError",
    "open_rgb",
    "oriented_size",
    *_LAZY,
]

"""Torch Dataset over a fashlib table (path, label, optional box) and the standard image transforms.

Undecodable images never stop an epoch: the item is replaced by another image of the same label
(or a blank one), flagged in a shared-memory mask that DataLoader workers write to as well, and
summarised by `ImageTableDataset.report_bad()` (one warning; call it after each pass).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = ["ImageTableDataset", "BadImagesWarning", "build_transforms", "crop_box", "INTERPOLATIONS"]

INTERPOLATIONS: dict[str, T.InterpolationMode] = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
    "lanczos": T.InterpolationMode.LANCZOS,
}

_BLANK_SIZE = (256, 256)
_SUBSTITUTE_TRIES = 8


class BadImagesWarning(UserWarning):
    """Some images could not be decoded and were replaced during loading."""


def crop_box(size: tuple[int, int], box: Sequence[float], margin: float = 0.1) -> tuple[int, int, int, int] | None:
    """Pixel crop (left, top, right, bottom) of `box` grown by `margin` x its width/height, clamped.

    Returns None when the box is unknown (NaN) or empty after clamping to the image `size` (w, h).
    """
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.isfinite([x1, y1, x2, y2]).all():
        return None
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    left, top = max(0, int(np.floor(x1 - dx))), max(0, int(np.floor(y1 - dy)))
    right, bottom = min(width, int(np.ceil(x2 + dx))), min(height, int(np.ceil(y2 + dy)))
    if right - left < 1 or bottom - top < 1:
        return None
    return left, top, right, bottom


class ImageTableDataset(Dataset):
    """Images of a fashlib table as (tensor, label index, row index); labels from `label_column`.

    `classes` fixes the label -> index mapping (default: sorted labels of the table). With
    transform=None items are float tensors in [0, 1] (C, H, W). With crop_boxes=True rows with a
    box x1..y2 are cropped to it, grown by `margin` of its size and clamped to the image.
    `draft_size` (w, h), set by fashlib.features.extract: JPEGs decode at 1/2, 1/4 or 1/8 scale when
    the result stays at least that large (PIL draft mode); not applied when cropping to boxes.
    """

    draft_size: tuple[int, int] | None = None

    def __init__(
        self,
        table: pd.DataFrame,
        transform=None,
        crop_boxes: bool = False,
        margin: float = 0.1,
        label_column: str = "label",
        classes: Sequence[str] | None = None,
    ) -> None:
        missing = {"path", label_column} - set(table.columns)
        if missing:
            raise KeyError(f"table lacks columns {sorted(missing)}")
        self.paths: list[str] = table["path"].astype(str).tolist()
        label_strings = table[label_column].astype(str).to_numpy()
        self.classes: list[str] = sorted(set(label_strings)) if classes is None else [str(c) for c in classes]
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(label_strings) - index.keys())
        if unknown:
            raise ValueError(f"labels not in classes: {unknown[:5]}")
        self.labels: np.ndarray = np.fromiter((index[s] for s in label_strings), dtype=np.int64, count=len(label_strings))
        box_cols = ["x1", "y1", "x2", "y2"]
        if crop_boxes and set(box_cols) <= set(table.columns):
            self.boxes: np.ndarray | None = table[box_cols].to_numpy(dtype=np.float64)
        else:
            self.boxes = None
        self.transform = transform
        self.margin = float(margin)
        # 1 where an image failed to decode; shared memory so DataLoader workers' flags reach report_bad()
        self._bad = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        self._reported = 0
        by_label = pd.Series(np.arange(len(self.labels))).groupby(self.labels)
        self._same_label: dict[int, np.ndarray] = {int(k): v.to_numpy() for k, v in by_label}

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as img:
            if self.draft_size is not None and self.boxes is None:  # fast JPEG decode at reduced scale
                img.draft("RGB", self.draft_size)
            img.load()
            img = img.convert("RGB")
        if self.boxes is not None:
            box = crop_box(img.size, self.boxes[i], self.margin)
            if box is not None:
                img = img.crop(box)
        return img

    def _substitutes(self, i: int) -> list[int]:
        """Other rows with the same label, in a fixed order starting after i."""
        same = self._same_label[int(self.labels[i])]
        start = int(np.searchsorted(same, i))
        order = np.concatenate([same[start:], same[:start]])
        return [int(j) for j in order if j != i][:_SUBSTITUTE_TRIES]

    def load_image(self, i: int) -> Image.Image:
        """RGB image of row i (cropped if asked); a same-label substitute or blank if it won't decode."""
        for j in [i, *self._substitutes(i)]:
            if self._bad[j]:
                continue
            try:
                return self._open(j)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                self._bad[j] = 1
        return Image.new("RGB", _BLANK_SIZE)

    def __getitem__(self, i: int):
        img = self.load_image(i)
        x = self.transform(img) if self.transform is not None else TF.to_tensor(img)
        return x, int(self.labels[i]), i

    @property
    def bad_paths(self) -> list[str]:
        """Paths found undecodable so far (in this process and its DataLoader workers)."""
        return [self.paths[j] for j in torch.nonzero(self._bad).flatten().tolist()]

    def report_bad(self, limit: int = 5) -> list[str]:
        """Warn once (per new finding) how many images were undecodable and replaced; return their paths."""
        bad = self.bad_paths
        if len(bad) > self._reported:
            more = " ..." if len(bad) > limit else ""
            warnings.warn(
                f"{len(bad)} of {len(self)} images could not be decoded and were replaced by another image "
                f"of the same label (or a blank one): {', '.join(os.path.basename(p) for p in bad[:limit])}{more}",
                BadImagesWarning,
                stacklevel=2,
            )
            self._reported = len(bad)
        return bad


def build_transforms(
    train: bool,
    image_size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    crop_pct: float = 1 / 1.14,
) -> T.Compose:
    """Train: RandomResizedCrop(scale 0.6-1), flip, light colour jitter; eval: resize to size/crop_pct, centre crop.

    Defaults suit EfficientNet-Lite (mean = std = 0.5); pass a model's data_config values otherwise.
    """
    try:
        mode = INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}") from None
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if train:
        head = [
            T.RandomResizedCrop(image_size, scale=(0.6, 1.0), interpolation=mode),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ]
    else:
        head = [T.Resize(int(round(image_size / crop_pct)), interpolation=mode), T.CenterCrop(image_size)]
    return T.Compose(head + tail)

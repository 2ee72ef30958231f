"""Torch Dataset over a fashlib table (path, label, optional box) and the standard image transforms.

Images are opened with fashlib.data.images.open_rgb (EXIF orientation applied, every mode to RGB,
transparency on white). An undecodable image is an error naming the file: never is another row's
image substituted (that would give a query a gallery photo's features). Clean tables first with
fashlib.data.drop_undecodable (fashlib.data.protocols.load_table does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms import v2

from .images import UndecodableImageError, open_rgb

__all__ = ["ImageTableDataset", "UndecodableImageError", "build_transforms", "crop_box", "INTERPOLATIONS", "RESAMPLERS"]

INTERPOLATIONS: dict[str, T.InterpolationMode] = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
    "lanczos": T.InterpolationMode.LANCZOS,
}
RESAMPLERS = ("tensor", "pil")  # how the evaluation transform resizes (build_transforms)
# resized in PIL even with resampler="tensor": lanczos has no tensor kernel; the tensor "nearest" samples
# floor(i * scale) instead of PIL's pixel centres (on a CC0 photo 6 grey levels apart on average, up to 244)
PIL_ONLY_INTERPOLATIONS = ("lanczos", "nearest")


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
        self.labels: np.ndarray = np.fromiter(
            (index[s] for s in label_strings), dtype=np.int64, count=len(label_strings)
        )
        box_cols = ["x1", "y1", "x2", "y2"]
        if crop_boxes and set(box_cols) <= set(table.columns):
            self.boxes: np.ndarray | None = table[box_cols].to_numpy(dtype=np.float64)
        else:
            self.boxes = None
        self.transform = transform
        self.margin = float(margin)

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> Image.Image:
        """Oriented RGB image of row i (cropped to its box if asked); UndecodableImageError if it won't decode.

        With draft_size set and no boxes, JPEGs decode at a reduced scale no smaller than draft_size (fast)."""
        draft = self.draft_size if self.boxes is None else None
        img = open_rgb(self.paths[i], draft_size=draft)
        if self.boxes is not None:
            box = crop_box(img.size, self.boxes[i], self.margin)
            if box is not None:
                img = img.crop(box)
        return img

    def __getitem__(self, i: int):
        img = self.load_image(i)
        x = self.transform(img) if self.transform is not None else TF.to_tensor(img)
        return x, int(self.labels[i]), i


def build_transforms(
    train: bool,
    image_size: int = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bicubic",
    crop_pct: float = 1 / 1.14,
    resampler: str = "tensor",
):
    """Train: RandomResizedCrop(scale 0.6-1), flip, light colour jitter; eval: resize to size/crop_pct, centre crop.

    Both take a PIL RGB image and give a float32 (3, image_size, image_size) tensor normalised by mean/std.
    Defaults suit EfficientNet-Lite (mean = std = 0.5); pass a model's data_config values otherwise.
    `resampler` (eval only): "tensor" resizes the uint8 image as a tensor with torchvision.transforms.v2
    (antialiased, within two grey levels of PIL's result, mean |difference| 4e-5 of the normalised range on
    CC0 photos) in 1.2 ms instead of 3.1 ms for a 400x533 photo on one core; "pil" is the PIL pipeline of
    fashlib < 0.2 (saved models that recorded no resampler use it). Lanczos (no tensor kernel) and nearest (the
    tensor kernel samples other pixels than PIL's) always resize in PIL (PIL_ONLY_INTERPOLATIONS). Raises
    ValueError for an unknown interpolation or resampler.
    """
    try:
        mode = INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}") from None
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    resize = int(round(image_size / crop_pct))
    if not train and resampler == "tensor" and interpolation not in PIL_ONLY_INTERPOLATIONS:
        return v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(resize, interpolation=mode, antialias=True),
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )
    tail = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if train:
        head = [
            T.RandomResizedCrop(image_size, scale=(0.6, 1.0), interpolation=mode),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ]
    else:
        head = [T.Resize(resize, interpolation=mode), T.CenterCrop(image_size)]
    return T.Compose(head + tail)

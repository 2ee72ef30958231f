"""Embedding throughput (images/s) of tf_efficientnet_lite0: fashlib.features.extract vs plain PyTorch loops.

Usage: python3 benchmarks/bench_embedding.py [--n 256] [--image-size 224] [--batch-size 32]
       [--workers 2] [--threads N] [--data DATA_ROOT]
Images: the first N (sorted) of <data root>/clothing-dataset/images (data root: --data, else
$FASHLIB_DATA, else /work/shared/data if present, else ./data). Every path includes JPEG decode +
resize + forward except "forward only", which times the network alone on pre-decoded tensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fashlib.data.dataset import build_transforms
from fashlib.features import extract
from fashlib.models import create_embedder
from fashlib.paths import data_root


def image_table(root: Path, n: int) -> pd.DataFrame:
    """Table (path, label) of the first n images of the clothing dataset."""
    folder = root / "clothing-dataset" / "images"
    paths = sorted(folder.glob("*.jpg"))[:n]
    if len(paths) < n:
        raise SystemExit(f"need {n} images in {folder}, found {len(paths)} (set --data or $FASHLIB_DATA)")
    return pd.DataFrame({"path": [str(p) for p in paths], "label": "x"})


def load_plain(path: str, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """PIL open, RGB, resize to size x size (bilinear), to tensor, normalise."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return (TF.to_tensor(img) - mean) / std


def plain_loop(model, paths: list[str], size: int, batch_size: int, mean, std) -> np.ndarray:
    """The baseline: decode and forward batch after batch in the main process."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([load_plain(p, size, mean, std) for p in paths[i : i + batch_size]])
            out.append(model.pooled_features(x))
    return torch.cat(out).numpy()


def forward_only(model, tensors: torch.Tensor, batch_size: int) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model.pooled_features(tensors[i : i + batch_size])
                          for i in range(0, len(tensors), batch_size)]).numpy()


def idle_cores() -> int:
    """CPUs not already busy (CPU count minus the 1-minute load average), at least 1."""
    cpus = os.cpu_count() or 1
    return max(1, min(cpus, round(cpus - os.getloadavg()[0])))


def timed(fn) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=idle_cores(),
                        help="torch intra-op threads (default: idle cores = CPUs minus load average, >= 1; "
                             "oversubscribed threads spin and can run several times slower)")
    parser.add_argument("--data", default=None, help="data root holding clothing-dataset/")
    args = parser.parse_args()

    root = args.data or os.environ.get("FASHLIB_DATA")
    if root is None and Path("/work/shared/data/clothing-dataset").is_dir():
        root = "/work/shared/data"
    table = image_table(data_root(root), args.n)
    torch.set_num_threads(args.threads)  # main-process compute; DataLoader workers use 1 thread each
    torch.manual_seed(0)

    model = create_embedder("tf_efficientnet_lite0", pretrained=True).eval()
    cfg = model.data_config
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    size, bs = args.image_size, args.batch_size
    transform = build_transforms(False, image_size=size, mean=cfg["mean"], std=cfg["std"],
                                 interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
    paths = table["path"].tolist()

    with torch.inference_mode():  # warm-up (allocator, kernels)
        model.pooled_features(torch.zeros(bs, 3, size, size))
    decoded = torch.stack([load_plain(p, size, mean, std) for p in paths])

    runs = [
        ("forward only (pre-decoded tensors)", bs, 0, lambda: forward_only(model, decoded, bs)),
        ("plain loop, one image at a time", 1, 0, lambda: plain_loop(model, paths, size, 1, mean, std)),
        ("plain loop, batches", bs, 0, lambda: plain_loop(model, paths, size, bs, mean, std)),
        ("fashlib extract, workers=0", bs, 0,
         lambda: extract(model, table, transform=transform, batch_size=bs, num_workers=0, progress=False)),
        (f"fashlib extract, workers={args.workers}", bs, args.workers,
         lambda: extract(model, table, transform=transform, batch_size=bs, num_workers=args.workers,
                         progress=False)),
        ("  same, channels_last=False", bs, args.workers,
         lambda: extract(model, table, transform=transform, batch_size=bs, num_workers=args.workers,
                         progress=False, channels_last=False)),
    ]
    print(f"tf_efficientnet_lite0 pooled features (1280-d), {args.n} images at {size} px, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':40s} {'batch':>5s} {'workers':>7s} {'seconds':>8s} {'images/s':>9s}")
    results = {}
    for name, batch, workers, fn in runs:
        seconds, feats = timed(fn)
        results[name] = feats
        print(f"{name:40s} {batch:5d} {workers:7d} {seconds:8.2f} {args.n / seconds:9.1f}", flush=True)
    plain, single = results["plain loop, batches"], results["plain loop, one image at a time"]
    print(f"check: batch-1 vs batched plain features max |diff| = {np.abs(plain - single).max():.2e}; "
          "extract uses resize+center-crop (build_transforms), so its features differ from the plain loop's")


if __name__ == "__main__":
    main()

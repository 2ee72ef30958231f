"""Embedding throughput (images/s) of tf_efficientnet_lite0 in one process on the same images: forward only
per engine, plain PyTorch loops, and fashlib.features.extract with each engine (issue 9).

Usage: python3 benchmarks/bench_embedding.py [--n 256] [--image-size 224] [--threads N] [--data DATA_ROOT] [--repeat 3]
Images: the first N (sorted) of <data root>/clothing-dataset/images (data root: --data, else $FASHLIB_DATA,
else /work/shared/data if present, else ./data). Every row includes JPEG decode + resize + forward except
"forward only", which times the network alone on pre-decoded tensors. fashlib extract is timed with its
exported ONNX model already cached (as in the book, where cache_dir keeps it) but features not cached;
the one-off export + parity time is printed separately. Ratios are against the fastest plain PyTorch loop.
The load average is printed before and after: other processes on the machine lower every figure. Every row runs
`--repeat` times and prints the median with the range: on this shared virtual machine the same row has varied
by up to 40% between runs minutes apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fashlib.data.dataset import build_transforms
from fashlib.engine import DEFAULT_BATCH_SIZE, ONNX_BATCH_SIZE, available_engines, create_engine
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
    """The baseline: decode and forward batch after batch in the main process (NCHW, eval mode)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([load_plain(p, size, mean, std) for p in paths[i : i + batch_size]])
            out.append(model.pooled_features(x))
    return torch.cat(out).numpy()


def forward_batch(requested: int, n: int, engine: str = "-", extract: bool = False) -> int:
    """Images per forward pass a row really runs, for the batch column: fashlib extract on the CPU runs each
    engine's own batch size (ONNX_BATCH_SIZE, DEFAULT_BATCH_SIZE), whatever it decodes at once; no batch
    holds more than the n images."""
    if extract:
        requested = ONNX_BATCH_SIZE if engine == "onnx" else DEFAULT_BATCH_SIZE
    return min(requested, n)


def forward_only(engine, tensors: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([engine(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)])


def timed(fn) -> tuple[float, np.ndarray]:
    """(seconds, result) of fn(); a fn returning (seconds, result) times itself (set-up excluded)."""
    start = time.perf_counter()
    result = fn()
    return result if isinstance(result, tuple) else (time.perf_counter() - start, result)


def versions() -> str:
    import PIL
    import timm

    parts = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"timm {timm.__version__}",
        f"pillow {PIL.__version__}",
        f"numpy {np.__version__}",
    ]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        parts.append("onnxruntime absent")
    return ", ".join(parts)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the option and the value when it is not)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number; give 1 or more")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=256, help="number of images")
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument(
        "--threads", type=positive_int, default=os.cpu_count() or 1, help="intra-op threads of every engine"
    )
    parser.add_argument("--data", default=None, help="data root holding clothing-dataset/")
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        help="runs of every row; the median is printed (this host's speed varies)",
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    root = args.data or os.environ.get("FASHLIB_DATA")
    if root is None and Path("/work/shared/data/clothing-dataset").is_dir():
        root = "/work/shared/data"
    table = image_table(data_root(root), args.n)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    model = create_embedder("tf_efficientnet_lite0", pretrained=True).eval()
    cfg = model.data_config
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    size, paths = args.image_size, table["path"].tolist()
    transform = build_transforms(
        False,
        image_size=size,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
    )
    decoded = torch.stack([load_plain(p, size, mean, std) for p in paths])
    cache = Path(tempfile.mkdtemp(prefix="bench_embedding_"))
    engines = available_engines()

    def fashlib_extract(engine: str) -> np.ndarray:
        for entry in cache.glob("*.*"):  # features not cached; the exported model (cache/engines) is kept
            entry.unlink() if entry.is_file() else shutil.rmtree(entry)
        return extract(model, table, transform=transform, cache_dir=cache, engine=engine, progress=False)

    start = time.perf_counter()
    with (
        create_engine(model, "onnx", sample=decoded[:32], cache_dir=cache / "engines")
        if "onnx" in engines
        else create_engine(model, "torch") as warm
    ):
        export_s = time.perf_counter() - start
        warm(decoded[:16])
    runs = []
    for name in engines:
        for bs in (4, 16, 32):
            runs.append(
                (
                    f"forward only, {name} engine, batch {bs}",
                    bs,
                    name,
                    lambda name=name, bs=bs: _forward(model, name, decoded, bs, cache),
                )
            )
    runs += [
        ("plain PyTorch loop, one image at a time", 1, "-", lambda: plain_loop(model, paths, size, 1, mean, std)),
        ("plain PyTorch loop, batches of 32", 32, "-", lambda: plain_loop(model, paths, size, 32, mean, std)),
    ]
    runs += [(f"fashlib extract, engine={name}", 32, name, lambda name=name: fashlib_extract(name)) for name in engines]

    print(f"tf_efficientnet_lite0 pooled features (1280-d), {args.n} CC0 images at {size} px")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; {versions()}")
    print(
        f"threads: {args.threads} intra-op per engine; fashlib decodes in min(4, CPUs) threads; "
        f"load average before: {' '.join(f'{v:.2f}' for v in load_before)}"
    )
    if "onnx" in engines:
        print(f"ONNX export + parity check (one-off, cached afterwards): {export_s:.1f} s")
    header = f"{'method':42s} {'batch':>5s} {'engine':>6s} {'seconds':>8s} {'images/s':>9s}"
    print(f"{header}  (median of {args.repeat}; range)")
    results, speeds = {}, {}
    for name, batch, engine, fn in runs:
        times = []
        for _ in range(args.repeat):
            seconds, feats = timed(fn)
            times.append(seconds)
        seconds = float(np.median(times))
        results[name], speeds[name] = feats, args.n / seconds
        spread = f"{args.n / max(times):.1f}-{args.n / min(times):.1f}"
        batch = forward_batch(batch, args.n, engine, extract=name.startswith("fashlib extract"))
        print(f"{name:42s} {batch:5d} {engine:>6s} {seconds:8.2f} {speeds[name]:9.1f}  ({spread})", flush=True)
    plain = max((s, n) for n, s in speeds.items() if n.startswith("plain"))
    print(f"ratios to the fastest plain loop ({plain[1]}, {plain[0]:.1f} img/s):")
    for name, speed in speeds.items():
        print(f"  {name:42s} {speed / plain[0]:5.2f}x")
    if len(engines) > 1:
        a, b = (results[f"fashlib extract, engine={n}"] for n in ("torch", "onnx"))
        print(f"check: extract onnx vs torch features max |diff| = {np.abs(a - b).max():.2e}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    shutil.rmtree(cache, ignore_errors=True)


def _forward(model, engine: str, decoded: torch.Tensor, batch_size: int, cache: Path) -> tuple[float, np.ndarray]:
    """(seconds, features) of the forward passes alone: engine set-up and one warm-up batch not timed."""
    with create_engine(model, engine, sample=decoded[:32], cache_dir=cache / "engines", batch_size=batch_size) as run:
        run(decoded[:batch_size])
        return timed(lambda: forward_only(run, decoded, batch_size))


if __name__ == "__main__":
    main()

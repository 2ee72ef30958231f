"""Feature extraction with an on-disk cache, and the fast path: training only the head on cached features.

Backbone forward passes dominate the cost of every experiment on a CPU, so pooled backbone vectors
are computed once (`extract`, cached under a key that changes whenever weights, preprocessing or the
image files change) and the EmbeddingHead is then trained on them in seconds (`train_head`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .models import EmbeddingHead

__all__ = [
    "FeatureCacheWarning",
    "OUTPUTS",
    "weights_digest",
    "files_digest",
    "cache_key",
    "cache_paths",
    "extract",
    "create_loss",
    "HEADS",
    "SAMPLERS",
    "MLPHead",
    "build_head",
    "MPerClassBatches",
    "train_head",
    "embed_features",
]

CACHE_VERSION = 1


class FeatureCacheWarning(UserWarning):
    """A cache entry was unusable (truncated, unreadable, mismatched) and is being rebuilt."""


# Registry of outputs: name -> (forward on a batch, modules whose weights determine the output).
OUTPUTS: dict[str, tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], Callable[[nn.Module], list[nn.Module]]]] = {
    "pooled": (lambda m, x: m.pooled_features(x), lambda m: [m.backbone, m.pool]),
    "embedding": (lambda m, x: m(x), lambda m: [m]),
}


# --------------------------------------------------------------------------------------------
# Cache key
# --------------------------------------------------------------------------------------------
def weights_digest(modules: nn.Module | Sequence[nn.Module]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every state_dict tensor (buffers included)."""
    h = hashlib.sha256()
    for i, module in enumerate([modules] if isinstance(modules, nn.Module) else modules):
        for name, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{i}:{name}:{t.dtype}:{tuple(tensor.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_digest(paths: Sequence[str]) -> str:
    """sha256 over the ordered list of paths with their sizes and modification times (ns)."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{path}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _model_name(model: Any) -> str:
    return str(getattr(model, "backbone_name", type(model).__name__))


def cache_key(
    model: Any,
    table: pd.DataFrame,
    *,
    transform: Any,
    crop_boxes: bool = False,
    margin: float = 0.1,
    fn: str = "pooled",
    key_extra: Any = None,
) -> str:
    """sha256 identifying one feature array: backbone, weights, transform, files, crops, output.

    For a plain callable (not an nn.Module) the weights cannot be digested, so `key_extra` must
    identify it.
    """
    if isinstance(model, nn.Module):
        modules = OUTPUTS[fn][1](model) if hasattr(model, "pooled_features") else [model]
        weights = weights_digest(modules)
    elif key_extra is None:
        raise ValueError("caching features of a plain function needs key_extra to identify it")
    else:
        weights = "function"
    parts = {
        "version": CACHE_VERSION,
        "backbone": _model_name(model),
        "weights": weights,
        "transform": repr(transform),
        "files": files_digest(table["path"].astype(str).tolist()),
        "n": len(table),
        "crop_boxes": bool(crop_boxes),
        "margin": float(margin) if crop_boxes else None,
        "fn": fn,
        "key_extra": repr(key_extra),
    }
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    if crop_boxes and {"x1", "y1", "x2", "y2"} <= set(table.columns):
        h.update(np.ascontiguousarray(table[["x1", "y1", "x2", "y2"]].to_numpy(dtype=np.float64)).tobytes())
    return h.hexdigest()


def cache_paths(cache_dir: str | os.PathLike, model: Any, fn: str, key: str) -> tuple[Path, Path]:
    """(features .npy, key .json) paths of one cache entry."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in _model_name(model))
    stem = Path(cache_dir) / f"{safe}-{fn}-{key[:20]}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temporary file in the same folder, then os.replace: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(npy: Path, meta: Path, key: str, n_rows: int) -> np.ndarray | None:
    """The cached array if it is complete and matches `key`; None (with a warning if broken) otherwise."""
    if not npy.exists() and not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        if info.get("key") != key:
            raise ValueError(f"stored key {str(info.get('key'))[:12]}... differs from {key[:12]}...")
        array = np.load(npy, allow_pickle=False)
        shape = tuple(info["shape"])
        if array.shape != shape or shape[0] != n_rows:
            raise ValueError(f"shape {array.shape} vs stored {shape} for {n_rows} rows")
        if array.dtype != np.float32:
            raise ValueError(f"dtype {array.dtype}, expected float32")
        if _array_digest(array) != info.get("sha256"):
            raise ValueError("content digest differs from the stored one")
        return array
    except Exception as err:  # noqa: BLE001 - any broken entry is rebuilt, never used
        warnings.warn(f"feature cache {npy.name} unusable ({type(err).__name__}: {err}); rebuilding it",
                      FeatureCacheWarning, stacklevel=3)
        return None


def _write_cache(npy: Path, meta: Path, key: str, array: np.ndarray, model: Any, fn: str) -> None:
    npy.parent.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)  # the json is the commit marker: written last
    _atomic_write(npy, lambda f: np.save(f, array, allow_pickle=False))
    info = {"key": key, "shape": list(array.shape), "dtype": str(array.dtype), "sha256": _array_digest(array),
            "backbone": _model_name(model), "fn": fn}
    _atomic_write(meta, lambda f: f.write(json.dumps(info, indent=1)), mode="w")


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
def _make_dataset(table: pd.DataFrame, transform: Any, crop_boxes: bool, margin: float):
    from .data.dataset import ImageTableDataset

    if "label" not in table.columns:
        table = table.assign(label="")
    return ImageTableDataset(table, transform=transform, crop_boxes=crop_boxes, margin=margin)


def extract(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    table: pd.DataFrame,
    *,
    transform: Any,
    batch_size: int = 64,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    key_extra: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    fn: str = "pooled",
    crop_boxes: bool = False,
    margin: float = 0.1,
    channels_last: bool = True,
) -> np.ndarray:
    """Features (len(table), D) float32 in table order: pooled backbone vectors or embeddings.

    `channels_last` runs an nn.Module in NHWC memory format (about 2x faster for EfficientNet on
    CPU; the model is put back to the default format afterwards).
    `fn="pooled"` calls model.pooled_features, `fn="embedding"` calls model(x); a plain nn.Module
    or function is simply called. Runs in eval mode under inference_mode (the model's previous mode is
    restored). With `cache_dir` the array is cached on disk; see cache_key for what invalidates it.
    """
    if fn not in OUTPUTS:
        raise ValueError(f"unknown output {fn!r}; choose one of {sorted(OUTPUTS)}")
    if cache_dir is not None:
        key = cache_key(model, table, transform=transform, crop_boxes=crop_boxes, margin=margin, fn=fn,
                        key_extra=key_extra)
        npy, meta = cache_paths(cache_dir, model, fn, key)
        cached = _read_cache(npy, meta, key, len(table))
        if cached is not None:
            return cached

    dataset = _make_dataset(table, transform, crop_boxes, margin)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    is_module = isinstance(model, nn.Module)
    forward = OUTPUTS[fn][0] if hasattr(model, "pooled_features") else (lambda m, x: m(x))
    was_training = model.training if is_module else False
    memory_format = torch.channels_last if channels_last and is_module else torch.contiguous_format
    if is_module:
        model.to(device, memory_format=memory_format).eval()
    out: np.ndarray | None = None
    try:
        with torch.inference_mode():
            for images, _, rows in tqdm(loader, disable=not progress, desc=f"extract {fn}", unit="batch"):
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                feats = forward(model, images).float().cpu().numpy()
                if out is None:
                    out = np.empty((len(table), feats.shape[1]), dtype=np.float32)
                out[rows.numpy()] = feats
    finally:
        if is_module:
            model.train(was_training)
            if memory_format is torch.channels_last:
                model.to(memory_format=torch.contiguous_format)
    if out is None:
        out = np.empty((0, 0), dtype=np.float32)
    if hasattr(dataset, "report_bad"):
        dataset.report_bad()
    if cache_dir is not None:
        _write_cache(npy, meta, key, out, model, fn)
    return out


# --------------------------------------------------------------------------------------------
# Fast path: head only
# --------------------------------------------------------------------------------------------
def create_loss(name: str, options: dict | None, num_classes: int, embedding_dim: int) -> nn.Module:
    """fashlib.losses.create with num_classes / embedding_dim filled in for losses that take them."""
    from . import losses

    options = dict(options or {})
    if name in losses.LOSSES:
        accepted = inspect.signature(losses.LOSSES[name]).parameters
        if "num_classes" in accepted:
            options.setdefault("num_classes", num_classes)
        if "embedding_dim" in accepted:
            options.setdefault("embedding_dim", embedding_dim)
    return losses.create(name, **options)




class MLPHead(nn.Module):
    """Pooled vector -> [BNNeck] -> Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, dim) -> L2 norm.

    The two-layer head of the pytorch-metric-learning examples (e.g. 1280-512-256 on EfficientNet-Lite0);
    BNNeck (Luo et al. 2019) is the same frozen-bias BatchNorm as EmbeddingHead's.
    """

    def __init__(self, in_dim: int, embedding_dim: int = 256, hidden_dim: int = 512, bnneck: bool = False):
        super().__init__()
        self.in_dim, self.embedding_dim, self.hidden_dim = int(in_dim), int(embedding_dim), int(hidden_dim)
        self.bnneck = bool(bnneck)
        self.bn = nn.BatchNorm1d(in_dim) if bnneck else nn.Identity()
        if bnneck:
            self.bn.bias.requires_grad_(False)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.mlp(self.bn(x)), p=2, dim=1)


HEADS = ("linear", "mlp")
SAMPLERS = ("pk", "m_per_class")


def build_head(kind: str, in_dim: int, embedding_dim: int = 256, *, bnneck: bool = False,
               hidden_dim: int = 512) -> nn.Module:
    """A head for cached pooled features: "linear" (EmbeddingHead) or "mlp" (MLPHead), with or without BNNeck.

    Raises ValueError for an unknown kind. Both return L2-normalised (N, embedding_dim) float32 embeddings.
    """
    if kind == "linear":
        return EmbeddingHead(in_dim, embedding_dim, bnneck=bnneck)
    if kind == "mlp":
        return MLPHead(in_dim, embedding_dim, hidden_dim=hidden_dim, bnneck=bnneck)
    raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")


class MPerClassBatches:
    """m-per-class batches as pytorch-metric-learning's MPerClassSampler draws them, but seeded per epoch.

    Every batch takes p labels uniformly at random (without replacement) and k = m rows of each (without
    replacement when the label has >= k rows, else with); labels with < 2 rows are never drawn. Unlike
    PKSampler, labels are not visited in rounds: frequent and rare labels are equally likely in each batch.
    `batches_per_epoch` defaults to len(labels) // (p * k). Deterministic for (seed, epoch).
    """

    def __init__(self, codes: np.ndarray, p: int, k: int, seed: int = 0, batches_per_epoch: int | None = None):
        groups = pd.Series(np.arange(len(codes))).groupby(np.asarray(codes))
        self._pools = [v.to_numpy() for _, v in groups if len(v) >= 2]
        if len(self._pools) < p:
            raise ValueError(f"m-per-class sampling needs p={p} labels with >= 2 rows, found {len(self._pools)}")
        self.p, self.k, self.seed, self.epoch = int(p), int(k), int(seed), 0
        self.batches_per_epoch = int(batches_per_epoch or max(1, len(codes) // (p * k)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.batches_per_epoch):
            labels = rng.choice(len(self._pools), self.p, replace=False)
            yield [int(i) for lab in labels for i in rng.choice(self._pools[lab], self.k,
                                                                 replace=len(self._pools[lab]) < self.k)]


def _make_sampler(kind: str, codes: np.ndarray, p: int, k: int, seed: int, batches_per_epoch: int | None):
    from .data.sampler import PKSampler

    if kind == "pk":
        return PKSampler(codes, p, k, seed=seed, batches_per_epoch=batches_per_epoch)
    if kind == "m_per_class":
        return MPerClassBatches(codes, p, k, seed=seed, batches_per_epoch=batches_per_epoch)
    raise ValueError(f"unknown sampler {kind!r}; choose one of {SAMPLERS}")


def train_head(
    features: np.ndarray,
    labels: Sequence | np.ndarray,
    *,
    head: nn.Module | None = None,
    head_type: str = "linear",
    hidden_dim: int = 512,
    embedding_dim: int = 256,
    loss: str = "multi_similarity",
    loss_options: dict | None = None,
    epochs: int = 30,
    p: int = 16,
    k: int = 4,
    sampler: str = "pk",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    bnneck: bool = False,
    batches_per_epoch: int | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train only an embedding head (plus the loss's own parameters) on cached pooled features.

    features: (N, D) float32; labels: N labels. The head is `build_head(head_type, D, embedding_dim,
    bnneck=bnneck, hidden_dim=hidden_dim)` unless `head` is given (then trained in place). Batches hold p
    labels x k rows from `sampler`: "pk" (PKSampler, labels visited in rounds) or "m_per_class"
    (MPerClassBatches, pytorch-metric-learning's m-per-class with m = k); the optimiser is AdamW. Everything is
    seeded (the global RNG state is restored afterwards), so equal arguments give equal weights.
    Returns (head in eval mode, per-epoch mean losses). Raises ValueError for mismatched rows, unknown
    head or sampler.
    """
    x_all = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    codes, classes = pd.factorize(pd.Series(np.asarray(labels)), sort=True)
    if len(codes) != len(x_all):
        raise ValueError(f"{len(x_all)} feature rows but {len(codes)} labels")
    y_all = torch.as_tensor(codes, dtype=torch.long)
    eligible = int((np.bincount(codes) >= 2).sum())
    if p > eligible:
        warnings.warn(f"p={p} exceeds the {eligible} labels with >= 2 rows; using p={eligible}", stacklevel=2)
        p = eligible
    history: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if head is None:
            head = build_head(head_type, x_all.shape[1], embedding_dim, bnneck=bnneck, hidden_dim=hidden_dim)
        head.to(device)
        loss_fn = create_loss(loss, loss_options, len(classes), head.embedding_dim).to(device)
        params = [q for module in (head, loss_fn) for q in module.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        batches = _make_sampler(sampler, codes, p, k, seed, batches_per_epoch)
        head.train()
        loss_fn.train()
        for epoch in tqdm(range(epochs), disable=not progress, desc=f"train head ({loss})", unit="epoch"):
            batches.set_epoch(epoch)
            total, count = 0.0, 0
            for batch in batches:
                index = torch.as_tensor(batch)
                value = loss_fn(head(x_all[index].to(device)), y_all[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                total, count = total + float(value.detach()), count + 1
            history.append(total / max(count, 1))
    head.eval()
    return head, history


def embed_features(
    head: nn.Module, features: np.ndarray, batch_size: int = 8192, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Apply a (trained) head to cached pooled features -> float32 embeddings, in eval mode."""
    was_training = head.training
    head.to(device).eval()
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    try:
        with torch.inference_mode():
            parts = [head(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    finally:
        head.train(was_training)
    if not parts:
        return np.empty((0, getattr(head, "embedding_dim", 0)), dtype=np.float32)
    return torch.cat(parts).numpy()

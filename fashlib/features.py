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
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .models import EmbeddingHead
from .paths import atomic_write
from .train import check_batch_shape

__all__ = [
    "FeatureCacheWarning",
    "OUTPUTS",
    "weights_digest",
    "files_digest",
    "structure_digest",
    "cache_key",
    "cache_paths",
    "extract",
    "shard_folder",
    "draft_size",
    "create_loss",
    "HEADS",
    "SAMPLERS",
    "MLPHead",
    "build_head",
    "MPerClassBatches",
    "train_head",
    "embed_features",
]

CACHE_VERSION = 3  # 2: JPEG draft decoding (extract), shards; 3: structure_digest in the key
DEFAULT_SHARD_SIZE = 2048  # rows per shard of a cache entry being extracted


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


def structure_digest(model: Any, modules: Sequence[nn.Module]) -> str:
    """sha256 over what shapes the output besides the state_dict: each module's repr (layer types and
    hyper-parameters, e.g. ReLU vs Tanh, GeM's eps), its non-persistent buffers, and the model's
    feature layout (`feature_format`, `num_prefix_tokens`). Memory addresses in reprs are ignored."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        h.update(f"{i}:{re.sub(r' at 0x[0-9a-fA-F]+', '', repr(module))}\n".encode())
        persistent = set(module.state_dict().keys())
        for name, buffer in module.named_buffers():
            if name not in persistent:
                t = buffer.detach().cpu().contiguous().reshape(-1)
                h.update(f"{i}:{name}:{t.dtype}:{tuple(buffer.shape)}\n".encode())
                h.update(t.view(torch.uint8).numpy().tobytes())
    h.update(f"{getattr(model, 'feature_format', None)}:{getattr(model, 'num_prefix_tokens', None)}".encode())
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
    """sha256 identifying one feature array: backbone, weights, structure, transform, files, crops, output.

    For a plain callable (not an nn.Module) the weights cannot be digested, so `key_extra` must
    identify it.
    """
    if isinstance(model, nn.Module):
        modules = OUTPUTS[fn][1](model) if hasattr(model, "pooled_features") else [model]
        weights = weights_digest(modules) + structure_digest(model, modules)
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


def _load_verified(npy: Path, meta: Path, check: Callable[[dict, np.ndarray | None], None]) -> np.ndarray:
    """The float32 array in `npy` after `check(info, None)` on its json record and `check(info, array)` on
    the loaded array, with its sha256 equal to the recorded one; raises (ValueError, OSError, ...) otherwise."""
    info = json.loads(meta.read_text())
    check(info, None)
    array = np.load(npy, allow_pickle=False)
    if array.dtype != np.float32:
        raise ValueError(f"dtype {array.dtype}, expected float32")
    check(info, array)
    if _array_digest(array) != info.get("sha256"):
        raise ValueError("content digest differs from the stored one")
    return array


def _read_verified(
    npy: Path, meta: Path, check: Callable[[dict, np.ndarray | None], None], what: str, stacklevel: int
) -> np.ndarray | None:
    """_load_verified, or None with a FeatureCacheWarning naming `what` when the entry is broken."""
    try:
        return _load_verified(npy, meta, check)
    except Exception as err:  # noqa: BLE001 - any broken entry is rebuilt, never used
        warnings.warn(
            f"{what} unusable ({type(err).__name__}: {err}); rebuilding it",
            FeatureCacheWarning,
            stacklevel=stacklevel + 1,
        )
        return None


def _read_cache(npy: Path, meta: Path, key: str, n_rows: int) -> np.ndarray | None:
    """The cached array if it is complete and matches `key`; None (with a warning if broken) otherwise."""
    if not npy.exists() and not meta.exists():
        return None

    def check(info: dict, array: np.ndarray | None) -> None:
        if info.get("key") != key:
            raise ValueError(f"stored key {str(info.get('key'))[:12]}... differs from {key[:12]}...")
        shape = tuple(info["shape"])
        if array is not None and (array.shape != shape or shape[0] != n_rows):
            raise ValueError(f"shape {array.shape} vs stored {shape} for {n_rows} rows")

    return _read_verified(npy, meta, check, f"feature cache {npy.name}", stacklevel=3)


def _write_cache(npy: Path, meta: Path, key: str, array: np.ndarray, model: Any, fn: str) -> None:
    npy.parent.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)  # the json is the commit marker: written last
    atomic_write(npy, lambda f: np.save(f, array, allow_pickle=False))
    info = {
        "key": key,
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "sha256": _array_digest(array),
        "backbone": _model_name(model),
        "fn": fn,
    }
    atomic_write(meta, lambda f: f.write(json.dumps(info, indent=1)), mode="w")


# --------------------------------------------------------------------------------------------
# Shards: the resumable part of a cache entry
# --------------------------------------------------------------------------------------------
def shard_folder(npy: Path) -> Path:
    """Folder holding the finished shards of a cache entry while it is being extracted."""
    return npy.with_suffix(".shards")


def _shard_files(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"shard-{index:05d}.npy", folder / f"shard-{index:05d}.json"


def _read_shard(folder: Path, index: int, key: str, rows: tuple[int, int]) -> np.ndarray | None:
    """A finished shard (rows[0]:rows[1] of the entry) if present and intact; None, with a warning if broken."""
    npy, meta = _shard_files(folder, index)
    if not meta.exists():
        return None

    def check(info: dict, array: np.ndarray | None) -> None:
        if info.get("key") != key or tuple(info.get("rows", ())) != tuple(rows):
            raise ValueError(f"stored key/rows {str(info.get('key'))[:12]}... {info.get('rows')} differ")
        if array is not None and array.shape[0] != rows[1] - rows[0]:
            raise ValueError(f"array {array.dtype} {array.shape} for rows {rows}")

    return _read_verified(npy, meta, check, f"feature shard {folder.name}/{npy.name}", stacklevel=4)


def _write_shard(folder: Path, index: int, key: str, rows: tuple[int, int], array: np.ndarray) -> None:
    npy, meta = _shard_files(folder, index)
    info = {"key": key, "rows": list(rows), "shape": list(array.shape), "sha256": _array_digest(array)}
    for attempt in (0, 1):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            meta.unlink(missing_ok=True)  # the json is the commit marker: written last
            atomic_write(npy, lambda f: np.save(f, array, allow_pickle=False))
            atomic_write(meta, lambda f: f.write(json.dumps(info)), mode="w")
            return
        except FileNotFoundError:  # another process finishing the same entry removed the folder: once more
            if attempt:
                raise


def _stored_step(folder: Path, key: str, step: int) -> int:
    """Rows per shard of an entry already begun in `folder` (from any finished shard's rows), else `step`:
    a changed shard_size never discards finished shards."""
    for meta in sorted(folder.glob("shard-*.json")):
        try:
            index, info = int(meta.stem.split("-")[1]), json.loads(meta.read_text())
            start, stop = info["rows"]
            if info["key"] != key or not (isinstance(start, int) and isinstance(stop, int)):
                continue
            if index == 0 and start == 0 and stop > 0:
                return stop
            if index > 0 and start > 0 and start % index == 0:
                return start // index
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            continue
    return step


def _writable(cache_dir: Path, world: int, n_rows: int) -> bool:
    """Whether a file can be created in cache_dir (made if missing); if not, warn (one process) or raise (several)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=cache_dir, prefix=".write-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError as err:
        if world > 1:
            raise OSError(
                f"feature cache {cache_dir} is not writable ({err}): ranks exchange shards through it; "
                "pass a cache_dir every rank can write"
            ) from err
        warnings.warn(
            f"feature cache {cache_dir} is not writable ({err}): the features of {n_rows} rows are "
            "computed but not cached; pass a writable cache_dir (or cache_dir=None)",
            FeatureCacheWarning,
            stacklevel=3,
        )
        return False


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------------------------
# Loading: decoding in threads (or DataLoader workers) ahead of the engine
# --------------------------------------------------------------------------------------------
def draft_size(transform: Any) -> tuple[int, int] | None:
    """(w, h) no smaller than the first torchvision Resize of `transform`: the JPEG draft target; None if none."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, (T.Resize, v2.Resize)):
            size = step.size if isinstance(step.size, int) else max(step.size)
            return int(size), int(size)
        if hasattr(step, "transforms"):  # a Compose inside a Compose (e.g. the mirror view's)
            found = draft_size(step)
            if found is not None:
                return found
    return None


def _make_dataset(table: pd.DataFrame, transform: Any, crop_boxes: bool, margin: float):
    from .data.dataset import ImageTableDataset

    if "label" not in table.columns:
        table = table.assign(label="")
    dataset = ImageTableDataset(table, transform=transform, crop_boxes=crop_boxes, margin=margin)
    dataset.draft_size = draft_size(transform)  # large JPEGs decode at 1/2..1/8 scale, never below the resize
    return dataset


def _threaded_batches(dataset: Any, batches: Sequence[list[int]], threads: int, ahead: int = 2):
    """Collated batches of `dataset` in order, decoded by a thread pool `ahead` batches before they are used.

    PIL decoding/resizing and the tensor transforms release the GIL, so threads overlap with the engine
    without the start-up cost of worker processes.
    """
    from collections import deque

    from torch.utils.data import default_collate

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fashlib-decode")
    pending: deque = deque()
    todo = iter(batches)
    try:
        for batch in todo:
            pending.append([pool.submit(dataset.__getitem__, i) for i in batch])
            if len(pending) > ahead:
                yield default_collate([f.result() for f in pending.popleft()])
        while pending:
            yield default_collate([f.result() for f in pending.popleft()])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _loader(dataset: Any, batches: list[list[int]], num_workers: int, decode_threads: int | None, pin: bool):
    if num_workers > 0:
        return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin)
    threads = decode_threads if decode_threads is not None else min(4, os.cpu_count() or 1)
    return _threaded_batches(dataset, batches, threads)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
def _compute_shards(
    model: Any,
    dataset: Any,
    shards: list[tuple[int, int, int]],
    *,
    batch_size: int,
    engine_options: dict,
    loader_options: dict,
    store: Callable[[int, np.ndarray], None],
    progress: bool,
    desc: str,
) -> None:
    """Run the engine over the rows of `shards` [(index, start, stop)], calling store(index, array) per shard."""
    from .engine import create_engine

    batches, owner = [], []
    for index, start, stop in shards:
        for b in range(start, stop, batch_size):
            batches.append(list(range(b, min(b + batch_size, stop))))
            owner.append(index)
    left = {index: -(-(stop - start) // batch_size) for index, start, stop in shards}
    span = {index: (start, stop) for index, start, stop in shards}
    buffers: dict[int, np.ndarray] = {}
    engine = None
    bar = tqdm(total=sum(len(b) for b in batches), disable=not progress, desc=desc, unit="img")
    try:
        for (images, _, rows), index in zip(_loader(dataset, batches, **loader_options), owner):
            if engine is None:
                engine = create_engine(model, sample=images, **engine_options)
                bar.set_description(f"{desc} ({engine.name})")
            feats = engine(images)
            start, stop = span[index]
            buffer = buffers.setdefault(index, np.empty((stop - start, feats.shape[1]), dtype=np.float32))
            buffer[rows.numpy() - start] = feats
            bar.update(len(rows))
            left[index] -= 1
            if left[index] == 0:
                store(index, buffers.pop(index))
    finally:
        bar.close()
        if engine is not None:
            engine.close()


def extract(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    table: pd.DataFrame,
    *,
    transform: Any,
    batch_size: int = 32,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    key_extra: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    fn: str = "pooled",
    crop_boxes: bool = False,
    margin: float = 0.1,
    channels_last: bool = True,
    engine: str = "auto",
    threads: int | None = None,
    decode_threads: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    on_shard: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features (len(table), D) float32 in table order: pooled backbone vectors or embeddings.

    `fn="pooled"`: model.pooled_features; `fn="embedding"`: model(x); a plain module or function is called.
    Engine (fashlib.engine.create_engine): "auto" = ONNX Runtime on the CPU (exported once, parity-checked),
    PyTorch on a GPU or as the fallback; `threads`: its intra-op threads (default torch.get_num_threads()).
    Decoding runs ahead of it in `decode_threads` threads (default min(4, CPUs)) or `num_workers` DataLoader
    processes; JPEGs larger than the transform's Resize decode in PIL draft mode unless boxes are cropped.
    With `cache_dir` the array is cached under cache_key in shards of `shard_size` rows as they finish: a
    rerun resumes at the missing shards (finished ones are digest-checked, a corrupted one is rebuilt with a
    FeatureCacheWarning; an entry begun with another shard_size keeps it); an unwritable cache_dir is read,
    and what is missing computed but not stored (warned). `on_shard(index)` runs after each shard is stored.
    Under torch.distributed (torchrun) rank r extracts the shards index % world == r and rank 0 assembles
    the entry (every rank calls extract with a shared cache_dir); every rank returns the whole array. The
    model's mode and memory format are left as they were. Raises ValueError for an unknown `fn` or a
    `batch_size` below 1.
    """
    if fn not in OUTPUTS:
        raise ValueError(f"unknown output {fn!r}; choose one of {sorted(OUTPUTS)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive number of images, got {batch_size}")
    plan = _plan_cache(model, table, cache_dir, shard_size, transform, crop_boxes, margin, fn, key_extra)
    if plan.cached is not None:
        return plan.cached
    arrays = _finished_shards(plan)
    cpu = torch.device(device).type == "cpu"
    _compute_shards(
        model,
        _make_dataset(table, transform, crop_boxes, margin),
        [s for s in plan.mine if s[0] not in arrays],
        batch_size=batch_size,
        engine_options=_engine_options(engine, fn, device, threads, channels_last, batch_size, plan),
        loader_options=dict(num_workers=num_workers, decode_threads=decode_threads, pin=not cpu),
        store=_storer(plan, arrays, on_shard),
        progress=progress,
        desc=f"extract {fn}",
    )
    return _finish(plan, arrays, model, fn)


@dataclass
class _CachePlan:
    """Where one extraction's cache entry lives and how its rows are cut into shards (see extract)."""

    shards: list[tuple[int, int, int]]  # (index, start, stop) of every shard
    rank: int = 0
    world: int = 1
    key: str = ""
    npy: Path | None = None
    meta: Path | None = None
    folder: Path | None = None
    writable: bool = False
    cached: np.ndarray | None = None

    @property
    def mine(self) -> list[tuple[int, int, int]]:
        """The shards this rank extracts (index % world == rank)."""
        return [s for s in self.shards if s[0] % self.world == self.rank]


def _cut(n: int, step: int) -> list[tuple[int, int, int]]:
    return [(i, start, min(start + step, n)) for i, start in enumerate(range(0, n, step))]


def _plan_cache(
    model: Any, table: pd.DataFrame, cache_dir: Any, shard_size: int, transform: Any, *key_args: Any
) -> _CachePlan:
    """The cache plan of an extraction: the finished entry if cached, else its shards (a run already begun
    keeps its own shard size), this process's rank, and whether the cache can be written."""
    if cache_dir is None:
        return _CachePlan(shards=_cut(len(table), max(1, len(table))))
    crop_boxes, margin, fn, key_extra = key_args
    key = cache_key(model, table, transform=transform, crop_boxes=crop_boxes, margin=margin, fn=fn, key_extra=key_extra)
    npy, meta = cache_paths(cache_dir, model, fn, key)
    cached = _read_cache(npy, meta, key, len(table))
    if cached is not None:
        return _CachePlan(shards=[], key=key, cached=cached)
    rank, world = _distributed()
    folder = shard_folder(npy)
    step = _stored_step(folder, key, max(1, int(shard_size)))
    writable = _writable(Path(cache_dir), world, len(table))
    return _CachePlan(_cut(len(table), step), rank, world, key, npy, meta, folder, writable)


def _finished_shards(plan: _CachePlan) -> dict[int, np.ndarray]:
    """This rank's shards already stored and intact (a broken one is warned about and left to recompute)."""
    if plan.folder is None:
        return {}
    found = {index: _read_shard(plan.folder, index, plan.key, (start, stop)) for index, start, stop in plan.mine}
    return {index: array for index, array in found.items() if array is not None}


def _storer(
    plan: _CachePlan, arrays: dict[int, np.ndarray], on_shard: Callable[[int], None] | None
) -> Callable[[int, np.ndarray], None]:
    """store(index, array): keep a computed shard in `arrays`, write it (when the cache is writable), then
    call on_shard(index)."""

    def store(index: int, array: np.ndarray) -> None:
        arrays[index] = array
        if plan.writable:
            _write_shard(plan.folder, index, plan.key, plan.shards[index][1:], array)
        if on_shard is not None:
            on_shard(index)

    return store


def _engine_options(
    engine: str, fn: str, device: Any, threads: int | None, channels_last: bool, batch_size: int, plan: _CachePlan
) -> dict:
    """create_engine options of an extraction: on the CPU each engine runs its own measured best batch size
    (fashlib.engine: ONNX_BATCH_SIZE, DEFAULT_BATCH_SIZE), on a GPU `batch_size`; its export is cached beside
    the features when they are."""
    cpu = torch.device(device).type == "cpu"
    return dict(
        engine=engine,
        fn=fn,
        device=device,
        threads=threads,
        channels_last=channels_last,
        cache_dir=Path(plan.npy.parent) / "engines" if plan.writable else None,
        batch_size=None if cpu else batch_size,
    )


def _finish(plan: _CachePlan, arrays: dict[int, np.ndarray], model: Any, fn: str) -> np.ndarray:
    """The whole array: assembled across ranks, or concatenated here and stored as the entry (shards removed)."""
    if plan.world > 1:
        return _assemble_distributed(plan.npy, plan.meta, plan.key, plan.folder, plan.shards, plan.rank, model, fn)
    if not plan.shards:
        return np.empty((0, 0), dtype=np.float32)
    out = np.concatenate([arrays[i] for i, _, _ in plan.shards])
    if plan.writable:
        _write_cache(plan.npy, plan.meta, plan.key, out, model, fn)
        shutil.rmtree(plan.folder, ignore_errors=True)
    return out


def _assemble_distributed(
    npy: Path, meta: Path, key: str, folder: Path, shards: list[tuple[int, int, int]], rank: int, model: Any, fn: str
) -> np.ndarray:
    """After every rank stored its shards: rank 0 concatenates them into the cache entry; all ranks read it."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        parts = []
        for index, start, stop in shards:
            part = _read_shard(folder, index, key, (start, stop))
            if part is None:
                raise RuntimeError(f"shard {index} of {folder} missing after every rank finished; rerun extract")
            parts.append(part)
        _write_cache(npy, meta, key, np.concatenate(parts), model, fn)
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    out = _read_cache(npy, meta, key, shards[-1][2] if shards else 0)
    if out is None:
        raise RuntimeError(f"feature cache {npy} unreadable after rank 0 assembled it (is cache_dir shared?)")
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
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.mlp(self.bn(x)), p=2, dim=1)


HEADS = ("linear", "mlp")
SAMPLERS = ("pk", "m_per_class")


def build_head(
    kind: str, in_dim: int, embedding_dim: int = 256, *, bnneck: bool = False, hidden_dim: int = 512
) -> nn.Module:
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
            yield [
                int(i)
                for lab in labels
                for i in rng.choice(self._pools[lab], self.k, replace=len(self._pools[lab]) < self.k)
            ]


def _make_sampler(kind: str, codes: np.ndarray, p: int, k: int, seed: int, batches_per_epoch: int | None):
    from .data.sampler import PKSampler

    if kind == "pk":
        return PKSampler(codes, p, k, seed=seed, batches_per_epoch=batches_per_epoch)
    if kind == "m_per_class":
        return MPerClassBatches(codes, p, k, seed=seed, batches_per_epoch=batches_per_epoch)
    raise ValueError(f"unknown sampler {kind!r}; choose one of {SAMPLERS}")


def _fused_adamw(device: str | torch.device) -> bool:
    """Whether AdamW's fused kernel runs on `device` (CPU and CUDA): one kernel per step instead of a dozen
    elementwise passes, about 1.25x faster head training on one CPU thread (2026-11-29)."""
    return torch.device(device).type in ("cpu", "cuda")


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
    (MPerClassBatches, pytorch-metric-learning's m-per-class with m = k); the optimiser is AdamW (its fused
    kernel on CPU and CUDA). Everything is
    seeded (the global RNG state is restored afterwards), so equal arguments give equal weights.
    Returns (head in eval mode, per-epoch mean losses). Raises ValueError for mismatched rows, unknown
    head or sampler, and for batches a pair loss cannot learn from (k < 2 or p < 2; train.check_batch_shape).
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
        check_batch_shape(loss_fn, p, k)
        params = [q for module in (head, loss_fn) for q in module.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=_fused_adamw(device))
        batches = _make_sampler(sampler, codes, p, k, seed, batches_per_epoch)
        head.train()
        loss_fn.train()
        for epoch in tqdm(range(epochs), disable=not progress, desc=f"train head ({loss})", unit="epoch"):
            batches.set_epoch(epoch)
            history.append(_head_epoch(head, loss_fn, optimizer, batches, x_all, y_all, device))
    head.eval()
    return head, history


def _head_epoch(
    head: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    x_all: torch.Tensor,
    y_all: torch.Tensor,
    device: str | torch.device,
) -> float:
    """One epoch of head training over the sampler's batches of row indices; returns the mean batch loss."""
    total, count = 0.0, 0
    for batch in batches:
        index = torch.as_tensor(batch)
        value = loss_fn(head(x_all[index].to(device)), y_all[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        total, count = total + float(value.detach()), count + 1
    return total / max(count, 1)


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

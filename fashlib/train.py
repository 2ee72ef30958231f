"""Training engine: an embedder and a metric-learning loss over P x K batches, resumable and exact.

``fit`` runs AdamW with a per-step linear warm-up then cosine decay, mixed precision on CUDA, a tqdm bar,
periodic evaluation, an atomic checkpoint per epoch (``out_dir/last.pt``) and exact resumption.

Determinism. The data order is a pure function of ``(seed, epoch)``: the P x K sampler is told
``set_epoch(epoch)`` and a fresh DataLoader is built every epoch with a ``torch.Generator`` seeded from
``(seed, epoch, rank)`` (this seeds the DataLoader workers, hence their augmentations). The python, numpy,
torch and CUDA RNG states are saved in every checkpoint and restored on resume, and the learning-rate
schedule is a pure function of the global step and the configured total number of epochs. A run stopped
after epoch ``e`` and resumed therefore ends with the same weights, bit for bit, and the same history as an
uninterrupted run (on CUDA also pass ``deterministic=True`` so kernels are deterministic).

Distributed. Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) ``fit`` initialises the
process group (nccl on CUDA, gloo on CPU) and wraps the model in DistributedDataParallel. Every rank builds
the same sampler, so every rank sees the same GLOBAL batch of ``p * k`` indices; rank ``r`` takes the
contiguous slice ``[r * n, (r + 1) * n)`` with ``n = p * k / world_size``. After the forward pass the
embeddings and labels of all ranks are all-gathered (in rank order, which restores the global batch order),
the local slice keeping its autograd graph, so the loss is computed on the whole global batch on every rank.
The gather's backward sums the embedding gradients over ranks (world_size times the local share, as every
rank computes the same loss) and DDP then averages parameter gradients, which gives exactly the gradient of
the single-process run. The loss module's own parameters (proxies) get the full gradient on every rank and
are averaged across ranks to stay in sync. Only rank 0 writes checkpoints, shows the bar and runs
``eval_fn``; its metrics are broadcast so every rank returns the same history. BatchNorm layers see only the
local slice (convert them with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on CUDA if that matters).
``out_dir`` must be on a filesystem every rank sees (resume reads it on every rank). ``p * k`` must be
divisible by the number of ranks; with ``p`` divisible too, each rank's share is exactly
``PKSampler(labels, p // world_size, k, seed, rank=rank, world_size=world_size)``.

Usage::

    from fashlib.train import TrainConfig, fit
    history = fit(model, loss, dataset, dataset.labels, TrainConfig(epochs=20, p=16, k=4), "runs/x",
                  eval_fn=lambda m: {"recall@1": ...}, resume="auto")
    # same script on 4 GPUs:  torchrun --nproc_per_node=4 train_script.py  (no code change)
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .paths import atomic_write

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "fit",
    "load_checkpoint",
    "lr_factor",
    "all_gather_with_grad",
    "batch_loss",
    "average_loss_grads",
    "CHECKPOINT_NAME",
    "CheckpointMismatchError",
    "check_resumable",
    "check_batch_shape",
]

CHECKPOINT_NAME = "last.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of ``fit``; ``epochs`` is the TOTAL number of epochs and defines the lr schedule."""

    epochs: int = 10
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    p: int = 16  # labels per batch
    k: int = 4  # images per label
    seed: int = 0
    amp: bool | None = None  # None: on for CUDA only (float16 autocast + GradScaler)
    eval_every: int = 1  # evaluate every N epochs (and always after the last); 0: only after the last
    num_workers: int = 0
    device: str | None = None  # None: cuda if available else cpu (cuda:LOCAL_RANK under torchrun)
    grad_clip: float | None = None  # max global grad norm, None: no clipping
    loss_lr: float = 1.0  # lr multiplier for the loss module's parameters (proxies, class weights)
    deterministic: bool = False  # torch.use_deterministic_algorithms for exact resume on GPU


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss becomes NaN/inf; the message names the epoch and the step."""


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warm-up to 1, then cosine decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients over ranks and returns the local rank's share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order; gradients flow back to the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(_AllGatherWithGrad.apply(x), dim=0)


def _all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (equal shapes) from all ranks in rank order, without gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def batch_loss(
    train_model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, amp: bool = False
) -> torch.Tensor:
    """Loss of the GLOBAL batch: embed the local images, all-gather embeddings and labels, apply the loss.

    Single process: plain ``loss_fn(model(images), targets)``. Distributed: backward sums the embedding
    gradients over ranks, so after DDP's averaging the parameters get the single-process gradient.
    """
    with torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext():
        embeddings = train_model(images)
    embeddings = embeddings.float()  # the loss runs in float32, outside autocast
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        embeddings = all_gather_with_grad(embeddings)
        targets = _all_gather_no_grad(targets)
    return loss_fn(embeddings, targets)


def average_loss_grads(params: Sequence[torch.Tensor]) -> None:
    """Average the loss module's parameter gradients over ranks (they are the full gradient on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:  # identical on every rank in exact arithmetic; keep the replicas in sync
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


class _RankSlice:
    """Batch sampler that hands this rank its contiguous slice of every global batch."""

    def __init__(self, batch_sampler: Any, rank: int, world_size: int):
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) % self.world_size:
                raise ValueError(f"global batch of {len(batch)} indices cannot be split over {self.world_size} ranks")
            n = len(batch) // self.world_size
            yield batch[self.rank * n : (self.rank + 1) * n]

    def __len__(self) -> int:
        return len(self.batch_sampler)


@dataclass
class _Dist:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str | None) -> tuple[_Dist, torch.device]:
    """Initialise the process group when launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if dist.is_available() and dist.is_initialized():  # a group set up by the caller
        world_size, launched = dist.get_world_size(), True
    if not launched or world_size == 1:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return _Dist(), torch.device(device)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), dev


def _rng_state() -> dict[str, Any]:
    """Snapshot of every RNG that training consumes (tensors only, so weights_only loading works)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot made by ``_rng_state``."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed that depends only on (seed, epoch, rank): DataLoader worker seeds for that epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save through paths.atomic_write (temporary file, fsync, os.replace: never a torn checkpoint)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``fit`` (plain tensors and python values: safe weights_only load)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# TrainConfig fields that may change between a run and its resumption: where and how fast it runs, how
# often it is evaluated, and the total number of epochs (extending a run re-derives the lr schedule).
RESUME_MAY_CHANGE = ("epochs", "device", "num_workers", "eval_every", "deterministic", "amp")


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another model, loss or training configuration than the run resuming it."""


def _state_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two state dicts: missing/unexpected keys and shape changes."""
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        f"{k}: {tuple(saved[k].shape)} -> {tuple(current[k].shape)}"
        for k in current
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(current[k].shape)
    ]
    out = []
    for what, items in (
        ("missing from the checkpoint", missing),
        ("only in the checkpoint", unexpected),
        ("with another shape", shapes),
    ):
        if items:
            more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
            out.append(f"{len(items)} tensor(s) {what}: {', '.join(items[:3])}{more}")
    return out


def check_resumable(
    state: dict[str, Any], model: nn.Module, loss_fn: nn.Module, config: TrainConfig, path: str | os.PathLike
) -> None:
    """Raise CheckpointMismatchError unless checkpoint ``state`` was written by this model, loss and config.

    The model and loss must have the same tensor names and shapes; every TrainConfig field except those in
    RESUME_MAY_CHANGE must be equal. The message names the checkpoint, at most three examples per kind of
    difference, and the two ways out (the same settings to resume, or another out_dir / resume=False)."""
    problems = [f"model: {d}" for d in _state_differences(state.get("model", {}), model.state_dict())]
    problems += [f"loss: {d}" for d in _state_differences(state.get("loss", {}), loss_fn.state_dict())]
    saved = state.get("config", {})
    current = dataclasses.asdict(config)
    problems += [
        f"config {k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in RESUME_MAY_CHANGE and saved.get(k) != current.get(k)
    ]
    if problems:
        raise CheckpointMismatchError(
            f"cannot resume from {path}: it was written by another run ({len(problems)} difference(s)):\n  "
            + "\n  ".join(problems)
            + "\nResume with the same model, loss and settings, or start a fresh run in another out_dir "
            "(resume=False)."
        )


def check_batch_shape(loss_fn: nn.Module, p: int, k: int) -> None:
    """ValueError when P x K batches can give `loss_fn` nothing to learn from.

    A loss without parameters of its own (contrastive, triplet, multi-similarity, centroid triplet) compares
    the embeddings of one batch: with k < 2 there is no positive pair, with p < 2 no negative, and the loss is
    0 with zero gradient at every step (the model would not change, and its metrics would look like a run).
    Proxy and classification losses (proxy anchor, ArcFace, normalised softmax) learn from k = 1 batches."""
    if any(True for _ in loss_fn.parameters()) or (p >= 2 and k >= 2):
        return
    raise ValueError(
        f"p={p}, k={k}: {type(loss_fn).__name__} compares the embeddings inside a batch and needs at least 2 labels "
        "(p >= 2) with at least 2 images each (k >= 2) per batch; with fewer its loss is 0 and nothing is learnt. "
        "Raise p and k, or use a proxy loss (proxy_anchor, arcface, normalized_softmax)."
    )


def _all_finite(modules: Sequence[nn.Module]) -> bool:
    """True when every parameter of every module is finite."""
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _param_groups(model: nn.Module, loss_fn: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: model weights (decayed), model biases/norm scales (not decayed), loss parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
        {"params": loss_params, "weight_decay": 0.0, "lr": config.lr * config.loss_lr},
    ]
    return [g for g in groups if g["params"]]


def _resolve_resume(resume: bool | str | os.PathLike, out_dir: Path) -> Path | None:
    """Which checkpoint to resume from: None (fresh), out_dir/last.pt, or an explicit path."""
    if resume is False or resume is None:
        return None
    last = out_dir / CHECKPOINT_NAME
    if resume is True or resume == "auto":
        if last.exists():
            return last
        if resume is True:
            raise FileNotFoundError(f"resume=True but no checkpoint at {last}")
        return None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    return path


def _new_history() -> dict[str, list[Any]]:
    return {"epoch": [], "loss": [], "lr": []}


def _record(history: dict[str, list[Any]], row: dict[str, Any]) -> None:
    """Append one epoch; metric columns absent in an epoch hold None (pandas.DataFrame(history) works)."""
    n = len(history["epoch"])
    for key in row:
        history.setdefault(key, [None] * n)
    for key, column in history.items():
        column.append(row.get(key))


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    train_dataset: Dataset,
    labels: Sequence[int] | np.ndarray | None,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool | str | os.PathLike = False,
    progress: bool = True,
    batch_sampler: Any | None = None,
    on_epoch_end: Callable[[int, dict[str, list[Any]]], None] | None = None,
) -> dict[str, list[Any]]:
    """Train ``model`` with ``loss_fn(embeddings, labels)`` on P x K batches; return the per-epoch history.

    ``train_dataset[i]`` -> (image, label_index, row_index). ``labels`` (default: ``train_dataset.labels``)
    feed the PKSampler unless ``batch_sampler`` (anything with ``__iter__``, ``__len__`` and
    ``set_epoch``) is given. ``eval_fn(model) -> dict`` runs every ``config.eval_every`` epochs and after
    the last one. ``resume``: False (fresh start), "auto" (continue ``out_dir/last.pt`` if present), True
    (must exist) or a checkpoint path. ``on_epoch_end(epoch, history)`` runs after each checkpoint.
    History: {"epoch", "loss" (mean over the epoch), "lr" (last step), <metric>: value or None}.
    ValueError (check_batch_shape) when p x k batches leave a parameter-free loss nothing to learn from.
    """
    out_dir = Path(out_dir)
    if batch_sampler is None:
        check_batch_shape(loss_fn, config.p, config.k)
    dist_info, device = _setup_distributed(config.device)
    try:
        return _fit(
            model,
            loss_fn,
            train_dataset,
            labels,
            config,
            out_dir,
            dist_info,
            device,
            eval_fn=eval_fn,
            resume=resume,
            progress=progress,
            batch_sampler=batch_sampler,
            on_epoch_end=on_epoch_end,
        )
    finally:
        if dist_info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What one training run carries from step to step: modules, optimiser state, schedule, counters, history.

    ``model`` is the bare module (checkpointed, evaluated); ``train_model`` the one the forward pass goes
    through (``model`` itself, or its DistributedDataParallel wrapper under torchrun)."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    device: torch.device
    dist_info: _Dist
    amp: bool
    ckpt_path: Path
    steps_per_epoch: int
    total_steps: int
    warmup: int
    history: dict[str, list[Any]] = dataclasses.field(default_factory=_new_history)
    start_epoch: int = 0
    global_step: int = 0
    train_model: nn.Module | None = None


def _fit(
    model: nn.Module,
    loss_fn: nn.Module,
    train_dataset: Dataset,
    labels: Sequence[int] | np.ndarray | None,
    config: TrainConfig,
    out_dir: Path,
    dist_info: _Dist,
    device: torch.device,
    *,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None,
    resume: bool | str | os.PathLike,
    progress: bool,
    batch_sampler: Any | None,
    on_epoch_end: Callable[[int, dict[str, list[Any]]], None] | None,
) -> dict[str, list[Any]]:
    """The body of ``fit`` once this process knows its rank and device; arguments and history as in ``fit``.

    Steps: set up the run (``_new_run``: sampler, optimiser, lr schedule), restore a checkpoint or seed every
    RNG (``_restore``), then per epoch: train (``_train_epoch``), evaluate (``_evaluate_epoch``), record,
    checkpoint (``_save_checkpoint``) and call ``on_epoch_end``. Raises what those steps raise (ValueError,
    FileNotFoundError, CheckpointMismatchError, NonFiniteLossError)."""
    from tqdm.auto import tqdm

    _prepare_out_dir(config, out_dir, dist_info)
    batch_sampler = _default_batch_sampler(batch_sampler, train_dataset, labels, config)
    run = _new_run(model, loss_fn, batch_sampler, config, out_dir, dist_info, device)
    _restore(run, _resolve_resume(resume, out_dir), config)
    run.train_model = _wrap_distributed(model, dist_info, device)
    sampler = _RankSlice(batch_sampler, dist_info.rank, dist_info.world_size)

    for epoch in range(run.start_epoch, config.epochs):
        loader = _epoch_loader(train_dataset, batch_sampler, sampler, config, epoch, run)
        model.train()
        loss_fn.train()
        bar = tqdm(
            total=run.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not (progress and dist_info.main),
            leave=True,
            dynamic_ncols=True,
        )
        row = _train_epoch(run, loader, bar, epoch, config)
        _evaluate_epoch(row, eval_fn, run, bar, epoch, config)
        bar.close()
        _record(run.history, row)
        _save_checkpoint(run, config, epoch)
        if dist_info.enabled:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, run.history)
    return run.history


def _prepare_out_dir(config: TrainConfig, out_dir: Path, dist_info: _Dist) -> None:
    """Switch to deterministic kernels when ``config.deterministic``; create ``out_dir`` on rank 0."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)


def _default_batch_sampler(
    batch_sampler: Any | None,
    train_dataset: Dataset,
    labels: Sequence[int] | np.ndarray | None,
    config: TrainConfig,
) -> Any:
    """``batch_sampler`` if given, else a P x K sampler over ``labels`` (default ``train_dataset.labels``)."""
    if batch_sampler is not None:
        return batch_sampler
    from fashlib.data.sampler import PKSampler

    if labels is None:
        labels = train_dataset.labels
    return PKSampler(np.asarray(labels), config.p, config.k, seed=config.seed)


def _new_run(
    model: nn.Module,
    loss_fn: nn.Module,
    batch_sampler: Any,
    config: TrainConfig,
    out_dir: Path,
    dist_info: _Dist,
    device: torch.device,
) -> _Run:
    """Move the modules to ``device`` and build AdamW, the warm-up + cosine schedule and the AMP scaler.

    ValueError when ``batch_sampler`` yields no batch (too few labels with enough images for p x k)."""
    amp = (device.type == "cuda") if config.amp is None else bool(config.amp and device.type == "cuda")
    steps_per_epoch = len(batch_sampler)
    if steps_per_epoch == 0:
        raise ValueError("the batch sampler yields no batch: too few labels with enough images for p x k")
    total_steps = config.epochs * steps_per_epoch
    warmup = config.warmup_steps
    if warmup is None:
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
    warmup = max(0, min(warmup, total_steps))

    model.to(device)
    loss_fn.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, loss_fn, config), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    return _Run(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        dist_info=dist_info,
        amp=amp,
        ckpt_path=out_dir / CHECKPOINT_NAME,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=warmup,
    )


def _restore(run: _Run, ckpt_file: Path | None, config: TrainConfig) -> None:
    """Continue from checkpoint ``ckpt_file`` (weights, optimiser, schedule, counters, history, RNG states),
    or seed every RNG from ``config.seed + rank`` when it is None (a fresh run).

    CheckpointMismatchError (check_resumable) when the checkpoint belongs to another model, loss or config; a
    UserWarning when it was configured for another number of epochs (the lr schedule follows the new one)."""
    dist_info = run.dist_info
    if ckpt_file is None:
        _seed_everything(config.seed + dist_info.rank)
        return
    state = load_checkpoint(ckpt_file)  # on CPU: RNG states must stay CPU tensors
    check_resumable(state, run.model, run.loss_fn, config, ckpt_file)
    run.model.load_state_dict(state["model"])
    run.loss_fn.load_state_dict(state["loss"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch, run.global_step, run.history = state["epoch"], state["step"], state["history"]
    if state["config"].get("epochs") != config.epochs and dist_info.main:
        warnings.warn(
            f"resuming a run configured for {state['config'].get('epochs')} epochs with epochs="
            f"{config.epochs}: the lr schedule now follows {config.epochs} epochs",
            stacklevel=4,  # the caller of fit (_restore <- _fit <- fit <- caller)
        )
    # the schedule is a function of the CURRENT total: re-derive the lr of the next step from it
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base * lr_factor(run.global_step, run.total_steps, run.warmup)
    rngs = state["rng"]
    _set_rng_state(rngs[dist_info.rank] if dist_info.rank < len(rngs) else rngs[0])


def _wrap_distributed(model: nn.Module, dist_info: _Dist, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun, ``model`` itself in one process."""
    if not dist_info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _epoch_loader(
    train_dataset: Dataset, batch_sampler: Any, sampler: _RankSlice, config: TrainConfig, epoch: int, run: _Run
) -> DataLoader:
    """The DataLoader of one epoch: sampler told ``set_epoch(epoch)``, workers seeded from (seed, epoch, rank)."""
    if hasattr(batch_sampler, "set_epoch"):
        batch_sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, run.dist_info.rank))
    return DataLoader(
        train_dataset,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        generator=generator,
        pin_memory=run.device.type == "cuda",
    )


def _train_epoch(run: _Run, loader: DataLoader, bar: Any, epoch: int, config: TrainConfig) -> dict[str, Any]:
    """One epoch of optimiser steps over ``loader``; returns the history row {"epoch", "loss" (mean), "lr"}.

    ``lr`` is the learning rate of the epoch's last step. NonFiniteLossError (bar closed) at the first step
    whose loss is NaN or infinite, naming the epoch, the step and the last good checkpoint."""
    loss_params = [p for p in run.loss_fn.parameters() if p.requires_grad]
    all_params = [p for g in run.optimizer.param_groups for p in g["params"]]
    loss_sum, n_steps = 0.0, 0
    for step, (images, targets, _rows) in enumerate(loader):
        images = images.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        loss = batch_loss(run.train_model, run.loss_fn, images, targets, amp=run.amp)
        value = loss.detach().float()
        if not _loss_is_finite(value, run.dist_info):
            bar.close()
            good = f"{run.ckpt_path} (after epoch {epoch})" if epoch > 0 else "none (failed in the first epoch)"
            raise NonFiniteLossError(
                f"non-finite loss ({value.item()}) at epoch {epoch + 1}, step {step + 1}/{run.steps_per_epoch}"
                f" (global step {run.global_step + 1}); last good checkpoint: {good}"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        average_loss_grads(loss_params)
        if config.grad_clip is not None:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(all_params, config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        run.global_step += 1
        loss_sum += value.item()
        n_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / n_steps:.4f}", lr=f"{lr:.2e}")
    return {"epoch": epoch + 1, "loss": loss_sum / max(1, n_steps), "lr": lr}


def _loss_is_finite(value: torch.Tensor, dist_info: _Dist) -> bool:
    """Whether the step's loss is finite; under torchrun every rank agrees (all-reduce) before deciding."""
    if dist_info.enabled:  # every rank computes the same loss; agree anyway before deciding
        flag = (~torch.isfinite(value)).float()
        dist.all_reduce(flag)
        return flag.item() == 0
    return bool(torch.isfinite(value))


def _evaluate_epoch(
    row: dict[str, Any],
    eval_fn: Callable[[nn.Module], dict[str, float]] | None,
    run: _Run,
    bar: Any,
    epoch: int,
    config: TrainConfig,
) -> None:
    """Add ``eval_fn``'s metrics to ``row`` every ``config.eval_every`` epochs and after the last epoch."""
    is_last = epoch + 1 == config.epochs
    due = config.eval_every > 0 and (epoch + 1) % config.eval_every == 0
    if eval_fn is not None and (due or is_last):
        metrics = _evaluate(eval_fn, run.model, run.dist_info)
        row.update(metrics)
        bar.set_postfix(loss=f"{row['loss']:.4f}", **{k: _short(v) for k, v in metrics.items()})


def _save_checkpoint(run: _Run, config: TrainConfig, epoch: int) -> None:
    """Write ``run.ckpt_path`` after ``epoch`` (0-based) on rank 0, atomically, with every rank's RNG state.

    NonFiniteLossError, writing nothing, when a weight of the model or the loss is NaN or infinite (the last
    good checkpoint is kept)."""
    if not _all_finite([run.model, run.loss_fn]):
        raise NonFiniteLossError(
            f"non-finite weights after epoch {epoch + 1}; last good checkpoint {run.ckpt_path} kept"
        )
    rngs = [_rng_state()]
    if run.dist_info.enabled:
        gathered: list[Any] = [None] * run.dist_info.world_size
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if run.dist_info.main:
        _atomic_save(
            {
                "model": run.model.state_dict(),
                "loss": run.loss_fn.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(),
                "epoch": epoch + 1,
                "step": run.global_step,
                "sampler_epoch": epoch,
                "history": run.history,
                "rng": rngs,
                "config": dataclasses.asdict(config),
                "world_size": run.dist_info.world_size,
            },
            run.ckpt_path,
        )


def _short(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


def _evaluate(eval_fn: Callable[[nn.Module], dict[str, float]], model: nn.Module, dist_info: _Dist) -> dict:
    """Run eval_fn on rank 0 (model in eval mode, no grad) and share its metrics with every rank."""
    metrics: dict[str, Any] = {}
    if dist_info.main:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            raw = eval_fn(model) or {}
        model.train(was_training)
        metrics = {
            str(k): (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in raw.items()
        }
    if dist_info.enabled:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics

"""Tiny training run shared by tests/test_train.py: in-process, or under `torchrun --nproc_per_node=2`.

Usage: python3 -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_script.py OUT_DIR
Each rank saves its final model and loss state to OUT_DIR/final_rank{rank}.pt and its history as json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fashlib import losses
from fashlib.data.sampler import PKSampler
from fashlib.train import TrainConfig, average_loss_grads, batch_loss, fit

N_CLASSES, PER_CLASS, SIDE, DIM = 8, 8, 8, 16


class TinyImages(Dataset):
    """Synthetic 1x8x8 'images': a fixed random pattern per class plus noise; optional random jitter."""

    def __init__(self, n_classes: int = N_CLASSES, per_class: int = PER_CLASS, seed: int = 0, jitter: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(n_classes, 1, SIDE, SIDE, generator=g)
        self.labels = torch.arange(n_classes).repeat_interleave(per_class).numpy()
        self.images = patterns[self.labels] + 1.5 * torch.randn(len(self.labels), 1, SIDE, SIDE, generator=g)
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.jitter:  # an "augmentation" drawing from the global torch RNG (worker-seeded under workers)
            image = image + self.jitter * torch.randn_like(image)
        return image, int(self.labels[i]), i


class TinyEmbedder(nn.Module):
    """Flatten -> Linear -> ReLU -> (Dropout) -> Linear -> L2 normalisation."""

    def __init__(self, dim: int = DIM, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(SIDE * SIDE, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class TripletPlusProxies(nn.Module):
    """Batch-hard triplet (depends on the whole batch) + normalised softmax (has parameters)."""

    def __init__(self, n_classes: int = N_CLASSES, dim: int = DIM):
        super().__init__()
        self.triplet = losses.create("triplet", mining="batch_hard", reducer="mean")
        self.proxy = losses.create("normalized_softmax", num_classes=n_classes, embedding_dim=dim, temperature=0.1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.triplet(embeddings, labels) + 0.5 * self.proxy(embeddings, labels)


def build(seed: int = 0, dropout: float = 0.0) -> tuple[nn.Module, nn.Module, TinyImages]:
    """Model, loss and data, all seeded: the same on every rank and in every process."""
    torch.manual_seed(seed)
    return TinyEmbedder(dropout=dropout), TripletPlusProxies(), TinyImages(seed=seed)


DDP_CONFIG = dict(epochs=3, lr=1e-2, p=4, k=4, seed=3, warmup_steps=2, loss_lr=2.0, eval_every=0, device="cpu")


def global_batch(data: TinyImages, epoch: int = 0) -> list[int]:
    """The first global P x K batch of an epoch under DDP_CONFIG (what every rank slices)."""
    sampler = PKSampler(data.labels, DDP_CONFIG["p"], DDP_CONFIG["k"], seed=DDP_CONFIG["seed"])
    sampler.set_epoch(epoch)
    return next(iter(sampler))


def gradients(model: nn.Module, loss_fn: nn.Module, data: TinyImages, rows: list[int]) -> dict[str, torch.Tensor]:
    """Gradients of the loss of the global batch, computed by fit's own step (local slice under DDP)."""
    loss = batch_loss(model, loss_fn, data.images[rows], torch.as_tensor(data.labels[rows]))
    loss.backward()
    average_loss_grads([p for p in loss_fn.parameters()])
    named = [("m." + n, p) for n, p in model.named_parameters()]
    named += [("l." + n, p) for n, p in loss_fn.named_parameters()]
    return {n.replace("module.", ""): p.grad.detach().clone() for n, p in named}


def main(out_dir: str) -> None:
    out = Path(out_dir)
    rank = int(os.environ.get("RANK", "0"))

    def check_gradients(epoch: int, history: dict) -> None:
        """While fit's process group is up: one gradient of the first global batch through DDP + all-gather."""
        if epoch != 1:
            return
        with torch.random.fork_rng():  # leave the training run's RNG streams untouched
            model, loss_fn, data = build()
        rows = global_batch(data)
        n = len(rows) // dist.get_world_size()
        ddp = nn.parallel.DistributedDataParallel(model)
        grads = gradients(ddp, loss_fn, data, rows[rank * n : (rank + 1) * n])
        torch.save(grads, out / f"grads_rank{rank}.pt")

    # fit sets the process group up itself from torchrun's environment (and tears it down)
    model, loss_fn, data = build()
    history = fit(
        model,
        loss_fn,
        data,
        data.labels,
        TrainConfig(**DDP_CONFIG),
        out_dir,
        progress=False,
        on_epoch_end=check_gradients,
    )
    torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict()}, out / f"final_rank{rank}.pt")
    (out / f"history_rank{rank}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main(sys.argv[1])

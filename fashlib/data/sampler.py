"""P x K batch sampler for metric learning: each batch holds p distinct labels with k images each.

Deterministic for (seed, epoch). Under DistributedDataParallel every rank builds the same global
batch of p * world_size labels and takes its own p labels, so ranks never share an image's label
slot in a step and together cover p * world_size distinct labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

__all__ = ["PKSampler"]


class PKSampler:
    """Batch sampler yielding lists of p*k row indices: p distinct labels x k images of each.

    Labels are visited in shuffled rounds (every eligible label once per round) and images of a label
    in shuffled cycles without repeats inside a batch, so coverage is even; a label with fewer than k
    images repeats some (all its images first). Labels with fewer than `min_per_label` images (default 2:
    a single image gives no positive pair, only k copies of itself) are never sampled. `batches_per_epoch` defaults to
    len(labels) // (p * k * world_size). Call set_epoch(e) before each epoch for a new, reproducible order.
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray,
        p: int,
        k: int,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        min_per_label: int = 2,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        codes, _ = pd.factorize(pd.Series(np.asarray(labels)), sort=True)
        groups = pd.Series(np.arange(len(codes))).groupby(codes)
        self._pools: list[np.ndarray] = [v.to_numpy() for _, v in groups if len(v) >= max(1, min_per_label)]
        needed = p * world_size
        if len(self._pools) < needed:
            raise ValueError(
                f"PKSampler needs at least p*world_size={needed} labels with >= {min_per_label} images, "
                f"found {len(self._pools)}"
            )
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        if batches_per_epoch is None:
            batches_per_epoch = max(1, len(codes) // (self.p * self.k * self.world_size))
        self.batches_per_epoch = int(batches_per_epoch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (reproducible) order the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _global_batches(self) -> Iterator[list[list[int]]]:
        """Global batches (identical on every rank) as lists of p*world_size label groups of k indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n_labels = len(self._pools)
        cycles = [rng.permutation(pool) for pool in self._pools]
        cursor = np.zeros(n_labels, dtype=np.int64)
        label_queue: list[int] = []
        width = self.p * self.world_size
        for _ in range(self.batches_per_epoch):
            chosen: list[int] = []
            while len(chosen) < width:
                # the next queued label not yet in this batch (a round boundary may repeat one)
                pos = next((j for j, lab in enumerate(label_queue) if lab not in chosen), None)
                if pos is None:
                    label_queue.extend(rng.permutation(n_labels).tolist())
                    continue
                chosen.append(label_queue.pop(pos))
            groups = []
            for lab in chosen:
                pool = self._pools[lab]
                if len(pool) < self.k:  # all images once, the rest drawn with replacement
                    extra = rng.choice(pool, self.k - len(pool), replace=True)
                    groups.append(np.concatenate([rng.permutation(pool), extra]).tolist())
                    continue
                if cursor[lab] + self.k > len(pool):  # too few left in this cycle: start a new one
                    cycles[lab], cursor[lab] = rng.permutation(pool), 0
                take = cycles[lab][cursor[lab] : cursor[lab] + self.k].tolist()
                cursor[lab] += self.k
                groups.append(take)
            yield groups

    def __iter__(self) -> Iterator[list[int]]:
        for groups in self._global_batches():
            mine = groups[self.rank * self.p : (self.rank + 1) * self.p]
            yield [int(i) for group in mine for i in group]

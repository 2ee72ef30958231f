"""Feature extraction in a separate process, for tests/test_features.py.

Usage:
  python3 tests/extract_script.py kill TABLE_CSV CACHE_DIR N    # SIGKILLs itself after storing N shards
  python3 -m torch.distributed.run --standalone --nproc_per_node=2 tests/extract_script.py ddp TABLE_CSV CACHE_DIR OUT
The model, transform and shard size come from `setup()`, shared with the tests so cache keys agree.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pandas as pd
import torch
from torchvision import transforms as T

from fashlib.features import extract
from fashlib.models import create_embedder

SIZE, SHARD_SIZE, BATCH_SIZE = 64, 2, 2


def setup():
    """(model, transform): timm's tiny test network with seeded random weights, and a fixed transform."""
    torch.manual_seed(0)
    model = create_embedder("test_efficientnet", embedding_dim=16, pretrained=False)
    transform = T.Compose([T.Resize((SIZE, SIZE)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return model, transform


def run(table: pd.DataFrame, cache_dir: str, on_shard=None, **options) -> np.ndarray:
    model, transform = setup()
    return extract(
        model,
        table,
        transform=transform,
        cache_dir=cache_dir,
        batch_size=BATCH_SIZE,
        shard_size=SHARD_SIZE,
        progress=False,
        on_shard=on_shard,
        **options,
    )


def main(mode: str, table_csv: str, cache_dir: str, arg: str) -> None:
    torch.set_num_threads(1)
    table = pd.read_csv(table_csv)
    if mode == "kill":
        stored = []

        def on_shard(index: int) -> None:
            stored.append(index)
            if len(stored) == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)  # a real, uncatchable interruption

        run(table, cache_dir, on_shard=on_shard)
    elif mode == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        done: list[int] = []
        out = run(table, cache_dir, on_shard=done.append)
        np.save(os.path.join(arg, f"features_rank{rank}.npy"), out)
        np.save(os.path.join(arg, f"shards_rank{rank}.npy"), np.array(done, dtype=np.int64))
        dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""Command line: fine-tune a backbone end to end on a dataset and evaluate it once, e.g. on a GPU.

    python3 -m fashlib.finetune --dataset clothing --backbone tf_efficientnet_lite2 --device cuda --epochs 20

Training is monitored on the validation protocol (eval_split="val"); the final model is then evaluated
once on each protocol named by --final (default: val and test). The training rows are the same in both
protocols. Writes checkpoints, the query/gallery embeddings and metrics.json of each final evaluation
under --out (see fashlib.experiments.save_run) and the model as <out>/model (fashlib.models.save_embedder: reload
it with load_embedder, or index a folder with it: `python3 -m fashlib.index build FOLDER --model <out>/model`);
rerunning the same command resumes a stopped run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from . import experiments
from .models import save_embedder


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python3 -m fashlib.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--final", nargs="+", default=["val", "test"], choices=["val", "test"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--loss", default="multi_similarity")
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/finetune")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tables = {split: experiments.load_table(args.dataset, args.data_root, eval_split=split,
                                            max_images=args.max_images, seed=args.seed)
              for split in dict.fromkeys(["val", *args.final])}
    history, model = experiments.finetune(
        args.backbone, tables["val"], args.out, loss=args.loss, embedding_dim=args.embedding_dim,
        image_size=args.image_size, epochs=args.epochs, p=args.p, k=args.k, lr=args.lr,
        device=args.device, num_workers=args.num_workers, seed=args.seed)
    config = {**vars(args), "train_seconds": round(time.perf_counter() - start, 1)}
    results = {}
    for split in args.final:
        table = tables[split]
        embeddings = experiments.embed_images(model, table, image_size=args.image_size, device=args.device,
                                              num_workers=args.num_workers)
        results[split] = experiments.evaluate(table, embeddings)
        experiments.save_run(args.out, f"final_{split}", table, embeddings, results[split], config)
    saved = save_embedder(model, Path(args.out) / "model", image_size=args.image_size, metrics=results,
                          protocol=f"{args.dataset}: " + ", ".join(f"{s} protocol" for s in args.final))
    print(json.dumps({"results": results, "history": history, "config": config, "model": str(saved)}, indent=2,
                     default=str))
    return results


if __name__ == "__main__":
    main()

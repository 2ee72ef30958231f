"""Fine-tune a backbone end to end (`finetune`), and its command line, e.g. on a GPU:

    python3 -m fashlib.finetune --dataset clothing --backbone tf_efficientnet_lite2 --device cuda --epochs 20

Training is monitored on the validation protocol (eval_split="val"; for datasets without one, In-shop and
DeepFashion2, a validation set held out of the training rows, never the test protocol); the final model is
then evaluated once on each protocol named by --final (default: val and test); see
fashlib.data.protocols.load_protocols. Writes checkpoints, the query/gallery embeddings and metrics.json of each
final evaluation under --out (see fashlib.runs.save_run) and the model as <out>/model
(fashlib.saved_model.save_embedder: reload it with load_embedder, or index a folder with it:
`python3 -m fashlib.index build FOLDER --model <out>/model`); rerunning the same command resumes a stopped run.

The default --out names the run: runs/finetune/<backbone>-<loss>-<hash of the settings>, so two different
runs never share a folder. A folder that holds a run with other settings is refused before anything is
loaded or written (exit 2), with the settings that differ (old -> new).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data.protocols import eval_rows, load_protocols, train_rows
from .embeddings import embed_images
from .evaluation import evaluate
from .paths import data_root
from .runs import RunConfigMismatch, claim_run_folder, run_folder, save_run, table_digest
from .saved_model import save_embedder

DEFAULT_BASE = Path("runs") / "finetune"
# Arguments that say where and how fast a run goes, not what it computes: they may change on resume.
OPERATIONAL = ("device", "num_workers", "out")


# ------------------------------------------------------------------------------------------ the library function
def finetune(
    backbone: str,
    table: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    loss: str = "multi_similarity",
    loss_options: dict | None = None,
    embedding_dim: int = 256,
    image_size: int | None = None,
    epochs: int = 10,
    p: int = 16,
    k: int = 4,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    warmup_epochs: float = 1.0,
    pooling: str = "gem",
    bnneck: bool = True,
    eval_every: int = 1,
    device: str = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    resume: bool | str = "auto",
    progress: bool = True,
    run_config: dict[str, Any] | None = None,
) -> tuple[dict[str, list], torch.nn.Module]:
    """Fine-tune a pretrained backbone and its head end to end on the table's training rows.

    Evaluates query against gallery every `eval_every` epochs, checkpoints every epoch under
    `out_dir` (a stopped run resumes with resume="auto"), and returns (history, model); embed any
    table with fashlib.embeddings.embed_images. The loss's own parameters (proxies, class weights) train with the model.
    `out_dir` is claimed for this run first (claim_run_folder: every setting that changes the result, the
    table's rows and `run_config`); a folder holding another run raises RunConfigMismatch before anything
    is built or written. With resume=False an existing folder is refused as well.
    """
    settings = dict(backbone=backbone, loss=loss, loss_options=loss_options or {}, embedding_dim=embedding_dim)
    settings.update(image_size=image_size, epochs=epochs, p=p, k=k, lr=lr, weight_decay=weight_decay)
    settings.update(warmup_epochs=warmup_epochs, pooling=pooling, bnneck=bnneck, seed=seed)
    _claim(out_dir, {**settings, "rows": table_digest(table), **(run_config or {})}, resume)
    from .features import create_loss
    from .models import create_embedder
    from .train import TrainConfig, fit

    torch.manual_seed(seed)
    model = create_embedder(backbone, embedding_dim=embedding_dim, pooling=pooling, bnneck=bnneck)
    size = image_size or int(model.data_config["input_size"][-1])
    dataset = _training_dataset(table, model.data_config, size)
    loss_fn = create_loss(loss, loss_options, len(dataset.classes), embedding_dim)
    eval_fn = _monitor(table, size, device, num_workers)
    schedule = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, p=p, k=k)
    config = TrainConfig(**schedule, seed=seed, eval_every=eval_every, num_workers=num_workers, device=device)
    history = fit(
        model, loss_fn, dataset, dataset.labels, config, out_dir, eval_fn=eval_fn, resume=resume, progress=progress
    )
    return history, model


def _claim(out_dir: str | os.PathLike, identity: dict[str, Any], resume: bool | str) -> None:
    """claim_run_folder(out_dir, identity); a folder that already holds this run is refused when resume=False."""
    resuming = claim_run_folder(out_dir, identity)
    if resuming and resume is False:
        raise RunConfigMismatch(f"{out_dir} already holds this run and resume=False: choose another folder")


def _training_dataset(table: pd.DataFrame, data_config: dict[str, Any], size: int) -> Any:
    """ImageTableDataset of the table's training rows with the backbone's training transform at `size` px."""
    from .data import ImageTableDataset, build_transforms

    train_table = table.iloc[train_rows(table)].reset_index(drop=True)
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    return ImageTableDataset(train_table, transform=build_transforms(True, image_size=size, mean=mean, std=std))


def _monitor(
    table: pd.DataFrame, size: int, device: str, num_workers: int
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The evaluation `fit` runs every eval_every epochs: Recall@1/5/10 and mAP@R of the table's queries."""
    query, gallery = eval_rows(table)
    eval_table = table.iloc[np.concatenate([query, gallery])].reset_index(drop=True)

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        emb = embed_images(m, eval_table, image_size=size, device=device, num_workers=num_workers, progress=False)
        return evaluate(eval_table, emb, ks=(1, 5, 10))

    return eval_fn


# ------------------------------------------------------------------------------------------ the command line
def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define a run (everything but OPERATIONAL), the data root made absolute."""
    settings = {k: v for k, v in vars(args).items() if k not in OPERATIONAL}
    settings["data_root"] = str(data_root(args.data_root))
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with --out filled in (default: DEFAULT_BASE/<backbone>-<loss>-<settings hash>)."""
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
    parser.add_argument(
        "--out", default=None, help=f"output folder (default: {DEFAULT_BASE}/<backbone>-<loss>-<settings hash>)"
    )
    args = parser.parse_args(argv)
    args.final = [s for s in ("val", "test") if s in args.final]  # one order, no repeats: the same run
    for problem in _bad_values(args):
        parser.error(problem)  # exit 2 before a folder is claimed or anything is loaded
    if args.out is None:
        args.out = str(run_folder(DEFAULT_BASE, run_settings(args)))
    return args


def _bad_values(args: argparse.Namespace) -> list[str]:
    """Messages for values that cannot make a run (each names the option, the value and what is allowed)."""
    minimum = {"epochs": 1, "p": 2, "k": 2, "embedding_dim": 1, "image_size": 1, "max_images": 1}
    out = [
        f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}"
        + (
            " (P x K batches need 2 labels with 2 images each, or the loss has nothing to compare)"
            if name in ("p", "k")
            else ""
        )
        for name, low in minimum.items()
        if getattr(args, name) is not None and getattr(args, name) < low
    ]
    if not args.lr > 0:  # also catches nan
        out.append(f"--lr {args.lr}: must be > 0")
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the command line; a folder holding another run exits with status 2 and the differences."""
    args = parse_args(argv)
    try:
        return _run(args, run_settings(args))
    except RunConfigMismatch as err:
        print(f"ERROR: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def protocol_tables(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """({"val": table, "test": table}, note) from fashlib.data.protocols.load_protocols; the note says which validation.

    A dataset without a validation protocol (inshop, deepfashion2, attributes) gets one held out of its
    TRAINING rows: training is never monitored on, and "val" never reports, the test protocol."""
    val, test, note = load_protocols(args.dataset, args.data_root, max_images=args.max_images, seed=args.seed)
    return {"val": val, "test": test}, note


def _run(args: argparse.Namespace, settings: dict[str, Any]) -> dict:
    """Load the tables, fine-tune into args.out (claimed first), evaluate once per --final protocol."""
    start = time.perf_counter()
    tables, note = protocol_tables(args)
    print(note, file=sys.stderr)
    history, model = finetune(
        args.backbone,
        tables["val"],
        args.out,
        loss=args.loss,
        embedding_dim=args.embedding_dim,
        image_size=args.image_size,
        epochs=args.epochs,
        p=args.p,
        k=args.k,
        lr=args.lr,
        device=args.device,
        num_workers=args.num_workers,
        seed=args.seed,
        run_config={k: settings[k] for k in ("dataset", "data_root", "max_images", "final")},
    )
    config = {**vars(args), "protocol": note, "train_seconds": round(time.perf_counter() - start, 1)}
    results = {}
    for split in args.final:
        table = tables[split]
        embeddings = embed_images(
            model, table, image_size=args.image_size, device=args.device, num_workers=args.num_workers
        )
        results[split] = evaluate(table, embeddings)
        save_run(args.out, f"final_{split}", table, embeddings, results[split], config)
    saved = save_embedder(
        model,
        Path(args.out) / "model",
        image_size=args.image_size,
        metrics=results,
        protocol=f"{args.dataset}: " + ", ".join(f"{s} protocol" for s in args.final),
    )
    print(
        json.dumps(
            {"results": results, "history": history, "config": config, "out": args.out, "model": str(saved)},
            indent=2,
            default=str,
        )
    )
    return results


if __name__ == "__main__":
    main()

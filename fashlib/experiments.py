"""Experiment steps the notebooks share: load a (capped) table, cache backbone features, train a head,
evaluate query against gallery, and save embeddings in a documented format.

The notebooks narrate and plot; every computation they report goes through these functions so that a
rerun with the same parameters gives the same numbers.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import data, metrics
from .paths import PROJECT_ROOT, data_root

KS: tuple[int, ...] = (1, 5, 10, 20, 50)
EVAL_ROLES = ("query", "gallery")
DECODE_CACHE = PROJECT_ROOT / ".cache" / "decodable"  # per-file "does it decode" results (data.drop_undecodable)


# ------------------------------------------------------------------------------------------ tables
def load_table(
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    eval_split: str = "test",
    max_images: int | None = None,
    seed: int = 0,
    download: bool = True,
    decode_cache: str | os.PathLike | None = DECODE_CACHE,
    **options: Any,
) -> pd.DataFrame:
    """Read `dataset` (downloading the CC0 default when it is absent) and cap it to `max_images` rows.

    `eval_split` is passed to the readers that have a validation protocol (consumer2shop, clothing).
    Rows whose image cannot be decoded are dropped before capping (data.drop_undecodable: one warning,
    counts per split in table.attrs["undecodable"]; per-file results cached in `decode_cache`).
    """
    if dataset in ("consumer2shop", "clothing"):
        options.setdefault("eval_split", eval_split)
    if dataset == "clothing":
        options.setdefault("seed", seed)
        folder = data_root(root) / data.SUBFOLDERS["clothing"]
        if download and not (folder / "images.csv").exists():
            data.download("clothing", root)
    table = data.load(dataset, root, **options)
    table = data.drop_undecodable(table, dataset, cache_dir=decode_cache)
    return cap_table(table, max_images, seed=seed)


def cap_table(table: pd.DataFrame, max_images: int | None, seed: int = 0) -> pd.DataFrame:
    """Cut a table to about `max_images` rows for smoke runs, keeping retrieval possible.

    Category-level data (labels shared by train and evaluation rows, like CC0): a few rows of every
    label in every split, dropping the rarest labels only when the budget is smaller than twice the
    label count. Item-level data: whole items, chosen once for all evaluation splits so that queries
    keep their gallery matches. Deterministic for a seed; the result may exceed the cap slightly
    since every kept label keeps at least one row per split.
    """
    if max_images is None or len(table) <= max_images:
        return table.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    is_train = table["split"].to_numpy() == "train"
    shared = set(table.loc[is_train, "label"]) & set(table.loc[~is_train, "label"])
    if shared:
        keep = _cap_rows_per_label(table, max_images, rng)
    else:
        keep = np.concatenate(
            [
                _cap_whole_labels(table[mask], max_images * mask.mean(), rng)
                for mask in (is_train, ~is_train)
                if mask.any()
            ]
        )
    return table.loc[np.sort(keep)].reset_index(drop=True)


def _cap_rows_per_label(table: pd.DataFrame, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Index of a few rows of each (label, split), for category-level tables."""
    counts = table["label"].value_counts()
    n_labels = int(max(2, min(len(counts), budget // 2)))
    labels = set(counts.index[:n_labels])  # the most frequent labels when some must go
    part = table[table["label"].isin(labels)]
    share = budget / len(part)
    keep = [
        rng.choice(group.index.to_numpy(), size=max(1, round(share * len(group))), replace=False)
        for _, group in part.groupby(["label", "split"], sort=True)
    ]
    return np.concatenate(keep)


def _cap_whole_labels(part: pd.DataFrame, budget: float, rng: np.random.Generator) -> np.ndarray:
    """Index of all rows of randomly chosen labels (items) until `budget` rows, for item-level tables."""
    keep, taken = [], 0
    for label in rng.permutation(part["label"].unique()):
        rows = part.index[part["label"] == label].to_numpy()
        keep.append(rows)
        taken += len(rows)
        if taken >= budget:
            break
    return np.concatenate(keep)


def eval_rows(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the query and gallery images of a table."""
    split = table["split"].to_numpy()
    query, gallery = np.flatnonzero(split == "query"), np.flatnonzero(split == "gallery")
    if len(query) == 0 or len(gallery) == 0:
        raise ValueError(
            f"the table has {len(query)} query and {len(gallery)} gallery rows; both are needed to evaluate retrieval"
        )
    return query, gallery


def train_rows(table: pd.DataFrame) -> np.ndarray:
    """Row positions of the training images."""
    return np.flatnonzero(table["split"].to_numpy() == "train")


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(table: pd.DataFrame, embeddings: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K (DeepFashion top-k accuracy) and mAP@R of the table's queries against its gallery."""
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy()
    dropped = [k for k in ks if k > len(gallery)]
    if dropped:
        warnings.warn(f"Recall@K for K = {dropped} left out: the gallery has only {len(gallery)} images", stacklevel=2)
    ks = [k for k in ks if k <= len(gallery)]
    recall = metrics.recall_at_k(embeddings[query], labels[query], embeddings[gallery], labels[gallery], ks=ks)
    result = {f"recall@{k}": value for k, value in recall.items()}
    result["map@r"] = metrics.map_at_r(embeddings[query], labels[query], embeddings[gallery], labels[gallery])
    return result


def recall_curve(table: pd.DataFrame, embeddings: np.ndarray, max_k: int = 50) -> dict[int, float]:
    """Recall@K for every K from 1 to max_k (or the gallery size)."""
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy()
    ks = range(1, min(max_k, len(gallery)) + 1)
    return metrics.recall_at_k(embeddings[query], labels[query], embeddings[gallery], labels[gallery], ks=ks)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------------------------ features
def eval_transform(embedder: Any, image_size: int | None = None, flip: bool = False):
    """The evaluation transform of a backbone, at its own input size unless `image_size` is given."""
    from torchvision import transforms as T

    config = embedder.data_config
    size = image_size or int(config["input_size"][-1])
    transform = data.build_transforms(False, image_size=size, mean=tuple(config["mean"]), std=tuple(config["std"]))
    if flip:
        transform = T.Compose([T.RandomHorizontalFlip(p=1.0), transform])
    return transform


def backbone_features(
    backbone: str,
    table: pd.DataFrame,
    *,
    pretrained: bool = True,
    image_size: int | None = None,
    pooling: str = "avg",
    flip_average: bool = False,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    engine: str = "auto",
) -> np.ndarray:
    """Pooled backbone features of every row (cached on disk), L2-normalised.

    `pretrained=False` gives the random-weights control (seeded, so its cache is reused);
    `flip_average` averages the features of the image and its mirror image. `engine`: see
    fashlib.engine.create_engine ("auto": ONNX Runtime on the CPU, PyTorch on a GPU).
    """
    from .features import extract
    from .models import create_embedder

    torch.manual_seed(seed)
    embedder = create_embedder(
        backbone, embedding_dim=None, pooling=pooling, pretrained=pretrained, allow_random=not pretrained
    )
    views = [False, True] if flip_average else [False]
    feats = [
        extract(
            embedder,
            table,
            transform=eval_transform(embedder, image_size, flip),
            cache_dir=cache_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            progress=progress,
            key_extra={"pretrained": pretrained, "image_size": image_size},
            engine=engine,
        )
        for flip in views
    ]
    return l2_normalize(np.mean(feats, axis=0))


def forward_throughput(
    backbone: str,
    image_size: int | None = None,
    *,
    batch_size: int = 16,
    batches: int = 3,
    device: str = "cpu",
    seed: int = 0,
    engine: str = "torch",
) -> float:
    """Images per second of the backbone's forward pass to pooled features through `engine` (fashlib.engine).

    Random weights and inputs; one warm-up call first (the ONNX export and its parity check are not timed).
    """
    from .engine import create_engine
    from .models import create_embedder

    torch.manual_seed(seed)
    embedder = create_embedder(backbone, embedding_dim=None, pretrained=False, allow_random=True)
    size = image_size or int(embedder.data_config["input_size"][-1])
    x = torch.randn(batch_size, 3, size, size)
    with create_engine(embedder, engine, sample=x, device=device, batch_size=batch_size) as runner:
        runner(x)
        start = time.perf_counter()
        for _ in range(batches):
            runner(x)  # returns numpy: the device work is finished when it returns
        return batch_size * batches / (time.perf_counter() - start)


def engine_throughputs(
    backbone: str,
    image_size: int | None = None,
    *,
    batch_size: int = 16,
    batches: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """forward_throughput of every engine usable on `device` ({"torch": img/s, "onnx": img/s}), measured in turn."""
    from .engine import available_engines

    names = [n for n in available_engines() if n == "torch" or torch.device(device).type == "cpu"]
    return {
        name: forward_throughput(
            backbone, image_size, batch_size=batch_size, batches=batches, device=device, seed=seed, engine=name
        )
        for name in names
    }


# ------------------------------------------------------------------------------------------ heads
def train_head_on_features(
    features: np.ndarray,
    table: pd.DataFrame,
    *,
    loss: str,
    embedding_dim: int = 256,
    epochs: int = 30,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    **options: Any,
) -> tuple[np.ndarray, list[float], torch.nn.Module]:
    """Train an embedding head on the training rows' cached features; embed every row with it.

    Returns (embeddings of all rows, per-epoch losses, the head). Options go to features.train_head:
    head_type ("linear" | "mlp"), hidden_dim, bnneck, sampler ("pk" | "m_per_class"), p, k, lr,
    weight_decay, loss_options... To refit a chosen configuration on train + validation rows, pass
    study.train_val_table(val_table, test_table) as `table` (or call study.refit_on_train_val).
    """
    from .features import embed_features, train_head

    rows = train_rows(table)
    head, history = train_head(
        features[rows],
        table["label"].to_numpy()[rows],
        loss=loss,
        embedding_dim=embedding_dim,
        epochs=epochs,
        seed=seed,
        device=device,
        progress=progress,
        **options,
    )
    return embed_features(head, features, device=device), history, head


# ------------------------------------------------------------------------------------------ saving
EMBEDDINGS_FILE = "embeddings.npz"
METRICS_FILE = "metrics.json"


def save_run(
    out_dir: str | os.PathLike,
    name: str,
    table: pd.DataFrame,
    embeddings: np.ndarray,
    results: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a run's query/gallery embeddings and metrics so anyone can recheck the numbers.

    Layout: <out_dir>/<name>/embeddings.npz with arrays query_embeddings, gallery_embeddings (float32,
    L2-normalised rows), query_labels, gallery_labels, query_paths, gallery_paths (str); and
    <out_dir>/<name>/metrics.json with the metrics and the configuration that produced them.
    Both files are written atomically.
    """
    query, gallery = eval_rows(table)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "query_embeddings": embeddings[query].astype(np.float32),
        "gallery_embeddings": embeddings[gallery].astype(np.float32),
        "query_labels": table["label"].to_numpy()[query].astype(str),
        "gallery_labels": table["label"].to_numpy()[gallery].astype(str),
        "query_paths": table["path"].to_numpy()[query].astype(str),
        "gallery_paths": table["path"].to_numpy()[gallery].astype(str),
    }
    tmp = folder / f".{EMBEDDINGS_FILE}.tmp"
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, folder / EMBEDDINGS_FILE)
    payload = {"metrics": results, "config": config or {}}
    tmp = folder / f".{METRICS_FILE}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, folder / METRICS_FILE)
    return folder


def check_run(folder: str | os.PathLike, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recompute Recall@K and mAP@R from a saved run's embeddings alone (an independent check)."""
    with np.load(Path(folder) / EMBEDDINGS_FILE) as saved:
        q, g = saved["query_embeddings"], saved["gallery_embeddings"]
        ql, gl = saved["query_labels"], saved["gallery_labels"]
    ks = [k for k in ks if k <= len(g)]
    result = {f"recall@{k}": v for k, v in metrics.recall_at_k(q, ql, g, gl, ks=ks).items()}
    result["map@r"] = metrics.map_at_r(q, ql, g, gl)
    return result


# ------------------------------------------------------------------------------------------ comparisons (02, 03)
VALIDATION_DATASETS: tuple[str, ...] = ("consumer2shop", "clothing")


def protocol_note(dataset: str) -> str:
    """One sentence saying which protocol a development notebook evaluates on for `dataset`."""
    if dataset in VALIDATION_DATASETS:
        return f"{dataset}: evaluated on the validation protocol (the test protocol stays untouched for chapter 05)."
    return (
        f"{dataset}: this dataset has no validation protocol, so this notebook falls back to its TEST "
        "protocol; treat its numbers as development numbers, not final results."
    )


def loss_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every loss of fashlib.losses as name -> (loss, options); triplet once per mining (triplet_batch_hard, ...)."""
    from . import losses
    from .miners import TRIPLET_MINERS

    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in losses.LOSSES:
        if name == "triplet":
            variants.update({f"triplet_{mining}": ("triplet", {"mining": mining}) for mining in TRIPLET_MINERS})
        else:
            variants[name] = (name, {})
    return variants


def loss_spec(name: str) -> tuple[str, dict[str, Any]]:
    """(loss name, loss options) of a variant name from loss_variants() or a plain fashlib.losses name."""
    from . import losses

    variants = loss_variants()
    if name in variants:
        loss, options = variants[name]
        return loss, dict(options)
    if name in losses.LOSSES:
        return name, {}
    raise ValueError(f"unknown loss {name!r}; known: {sorted(set(variants) | set(losses.LOSSES))}")


def try_call(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """(fn(*args, **kwargs), None), or (None, "ErrorType: message") when it raises.

    Lets a comparison report a failing entry (weights that cannot be loaded, say) as a table row and go on.
    """
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - the message is the result
        return None, f"{type(err).__name__}: {err}"


def relative_history(history: Sequence[float]) -> pd.DataFrame:
    """Per-epoch losses as a DataFrame (epoch, loss, relative loss = loss / first epoch's loss).

    Losses live on different scales; dividing by the first epoch lets their curves share one axis.
    """
    values = np.asarray(history, dtype=float)
    first = values[0] if len(values) and values[0] != 0 else 1.0
    return pd.DataFrame({"epoch": np.arange(1, len(values) + 1), "loss": values, "relative loss": values / first})


def run_name(*parts: Any) -> str:
    """A folder-safe run name from parts: letters, digits, '-', '_' and '.' kept, the rest become '_'."""
    text = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# ------------------------------------------------------------------------------------------ fine-tuning
RUN_CONFIG_FILE = "run.json"


class RunConfigMismatch(ValueError):
    """An output folder already holds a run with another configuration; the message lists old -> new."""


def config_hash(config: dict[str, Any], length: int = 8) -> str:
    """Short sha256 of a JSON-serialisable configuration (key order does not matter)."""
    import hashlib

    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_folder(base: str | os.PathLike, config: dict[str, Any]) -> Path:
    """The folder that names a run: <base>/<backbone>-<loss>-<config_hash(config)>."""
    return Path(base) / run_name(config.get("backbone"), config.get("loss"), config_hash(config))


def table_digest(table: pd.DataFrame) -> str:
    """Short digest of a table's rows (path, label, split): two runs on other rows never share a folder."""
    cols = [c for c in ("path", "label", "split") if c in table.columns]
    text = "\n".join("\t".join(map(str, row)) for row in table[cols].itertuples(index=False))
    return config_hash({"rows": text}, 12)


def claim_run_folder(out_dir: str | os.PathLike, config: dict[str, Any]) -> bool:
    """Reserve `out_dir` for the run described by `config`; return True when it resumes an earlier run.

    A folder without <out_dir>/run.json but with a checkpoint (or run.json with another configuration)
    raises RunConfigMismatch, before anything in it is changed: the message lists every key that differs
    (old -> new) and the two ways out. A new folder gets run.json (written atomically)."""
    out_dir = Path(out_dir)
    stored_file = out_dir / RUN_CONFIG_FILE
    config = json.loads(json.dumps(config, default=str))  # the form it is stored in (tuples -> lists)
    if stored_file.exists():
        stored = json.loads(stored_file.read_text())
        diff = [
            f"{k}: {stored.get(k, '<absent>')!r} -> {config.get(k, '<absent>')!r}"
            for k in sorted(set(stored) | set(config))
            if stored.get(k) != config.get(k)
        ]
        if not diff:
            return True
        raise RunConfigMismatch(
            f"{out_dir} holds another run ({stored_file}); these settings differ (old -> new):\n  "
            + "\n  ".join(diff)
            + f"\nTo resume that run, repeat its settings; to start this one, choose another folder "
            f"(e.g. {run_folder(out_dir.parent, config)}) or leave the output folder at its default."
        )
    if any(out_dir.glob("*.pt")):
        raise RunConfigMismatch(
            f"{out_dir} holds a checkpoint but no {RUN_CONFIG_FILE}, so it cannot be told whether it is this "
            f"run: choose another folder (e.g. {run_folder(out_dir.parent, config)}) or delete {out_dir}."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{RUN_CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, stored_file)
    return False


def embed_images(
    model: Any,
    table: pd.DataFrame,
    *,
    image_size: int | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of every row of `table` through a whole embedder (no cache: the weights are changing)."""
    from .features import extract

    return extract(
        model,
        table,
        transform=eval_transform(model, image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
        fn="embedding",
    )


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
    table with `embed_images`. The loss's own parameters (proxies, class weights) train with the model.
    `out_dir` is claimed for this run first (claim_run_folder: every setting that changes the result, the
    table's rows and `run_config`); a folder holding another run raises RunConfigMismatch before anything
    is built or written. With resume=False an existing folder is refused as well.
    """
    identity = {
        "backbone": backbone,
        "loss": loss,
        "loss_options": loss_options or {},
        "embedding_dim": embedding_dim,
        "image_size": image_size,
        "epochs": epochs,
        "p": p,
        "k": k,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "pooling": pooling,
        "bnneck": bnneck,
        "seed": seed,
        "rows": table_digest(table),
        **(run_config or {}),
    }
    resuming = claim_run_folder(out_dir, identity)
    if resuming and resume is False:
        raise RunConfigMismatch(f"{out_dir} already holds this run and resume=False: choose another folder")
    from .data import ImageTableDataset, build_transforms
    from .features import create_loss
    from .models import create_embedder
    from .train import TrainConfig, fit

    torch.manual_seed(seed)
    model = create_embedder(backbone, embedding_dim=embedding_dim, pooling=pooling, bnneck=bnneck)
    config = model.data_config
    size = image_size or int(config["input_size"][-1])
    rows = train_rows(table)
    train_table = table.iloc[rows].reset_index(drop=True)
    dataset = ImageTableDataset(
        train_table,
        transform=build_transforms(True, image_size=size, mean=tuple(config["mean"]), std=tuple(config["std"])),
    )
    loss_fn = create_loss(loss, loss_options, len(dataset.classes), embedding_dim)
    query, gallery = eval_rows(table)
    eval_table = table.iloc[np.concatenate([query, gallery])].reset_index(drop=True)

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        emb = embed_images(m, eval_table, image_size=size, device=device, num_workers=num_workers, progress=False)
        return evaluate(eval_table, emb, ks=(1, 5, 10))

    history = fit(
        model,
        loss_fn,
        dataset,
        dataset.labels,
        TrainConfig(
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            p=p,
            k=k,
            seed=seed,
            eval_every=eval_every,
            num_workers=num_workers,
            device=device,
        ),
        out_dir,
        eval_fn=eval_fn,
        resume=resume,
        progress=progress,
    )
    return history, model


# ------------------------------------------------------------------------------------------ final results (05)
def ensemble_features(features: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate several backbones' features of the same rows, each L2-normalised, then re-normalise.

    Normalising each part first gives every backbone the same weight in the cosine similarity, whatever
    its feature size or scale.
    """
    if len(features) == 0:
        raise ValueError("ensemble_features needs at least one feature array")
    rows = {len(f) for f in features}
    if len(rows) != 1:
        raise ValueError(f"feature arrays cover different numbers of rows: {sorted(rows)}")
    return l2_normalize(np.concatenate([l2_normalize(np.asarray(f, dtype=np.float32)) for f in features], axis=1))


def pick_best(results: pd.DataFrame, by: Sequence[str] = ("recall@1", "map@r")) -> Any:
    """Index label of the best row: highest by[0], ties broken by by[1], ... (rows with NaN lose)."""
    if len(results) == 0:
        raise ValueError("pick_best needs at least one row")
    ranked = results.sort_values(list(by), ascending=False, na_position="last", kind="mergesort")
    return ranked.index[0]


def first_hit_ranks(table: pd.DataFrame, embeddings: np.ndarray, max_k: int = 50) -> pd.DataFrame:
    """Per query: the rank (1-based) of its first correct gallery result within the top max_k, 0 if none.

    Rows: one per query, with `row` (position in the table), `label` and `rank`; the largest ranks and
    the zeros are the hardest failures.
    """
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy().astype(str)
    k = min(max_k, len(gallery))
    nb = metrics.neighbours(
        embeddings[query], embeddings[gallery], k=k, query_labels=labels[query], gallery_labels=labels[gallery]
    )
    hit = nb.matches.any(axis=1)
    rank = np.where(hit, nb.matches.argmax(axis=1) + 1, 0)
    return pd.DataFrame({"row": query, "label": labels[query], "rank": rank})


def hardest_queries(ranks: pd.DataFrame, n: int) -> pd.DataFrame:
    """The n queries whose first correct result comes last: those with none in the top K first, then by rank."""
    order = ranks.assign(missing=ranks["rank"] == 0).sort_values(
        ["missing", "rank", "row"], ascending=[False, False, True], kind="mergesort"
    )
    return order.drop(columns="missing").head(n)


def load_recorded_runs(folder: str | os.PathLike) -> pd.DataFrame:
    """One row per recorded fine-tuning run (the JSON printed by `python3 -m fashlib.finetune`) in `folder`.

    Columns: run, backbone, loss, epochs, val_/test_ metrics (recall@k, map@r), train_seconds, device,
    command, data_note, history (dict of per-epoch lists). Files that are not such JSON raise ValueError.
    """
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            results, config = record["results"], record["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a recorded fine-tuning run ({type(err).__name__}: {err})") from err
        row = {
            "run": path.stem,
            "backbone": config.get("backbone"),
            "loss": config.get("loss"),
            "epochs": config.get("epochs"),
        }
        for split, values in results.items():
            row.update({f"{split}_{metric}": value for metric, value in values.items()})
        row.update(
            train_seconds=config.get("train_seconds"),
            device=record.get("device"),
            command=record.get("command"),
            data_note=record.get("data_note"),
            history=record.get("history", {}),
        )
        rows.append(row)
    columns = ["run", "backbone", "loss", "epochs", "train_seconds", "device", "command", "data_note", "history"]
    return pd.DataFrame(rows, columns=None if rows else columns)


def holdout_validation(table: pd.DataFrame, fraction: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """A validation protocol carved out of the training rows, for datasets without one (inshop, deepfashion2).

    A `fraction` of the training labels with >= 2 images (at least 2 labels) is held out: per held-out label,
    consumer images become queries and shop images gallery when both domains are present, else one random
    image is the query and the rest the gallery. The remaining training rows stay "train"; every original
    query/gallery row is relabelled "test" so the test protocol is never used. Row order is unchanged.
    """
    split = table["split"].to_numpy().astype(object).copy()
    split[np.isin(split, EVAL_ROLES)] = "test"
    train = np.flatnonzero(table["split"].to_numpy() == "train")
    labels = table["label"].to_numpy().astype(str)
    counts = pd.Series(labels[train]).value_counts()
    eligible = np.sort(counts.index[counts >= 2].to_numpy())
    if len(eligible) < 2:
        raise ValueError(f"only {len(eligible)} training labels have >= 2 images; cannot hold out a validation set")
    rng = np.random.default_rng(seed)
    n_held = min(len(eligible) - 1, max(2, int(round(fraction * len(eligible)))))
    domains = table["domain"].to_numpy().astype(str) if "domain" in table.columns else np.full(len(table), "")
    for label in rng.choice(eligible, size=n_held, replace=False):
        rows = train[labels[train] == label]
        consumer, shop = rows[domains[rows] == "consumer"], rows[domains[rows] == "shop"]
        if len(consumer) and len(shop):
            split[consumer], split[shop] = "query", "gallery"
        else:
            query = rng.choice(rows)
            split[rows], split[query] = "gallery", "query"
    return table.assign(split=split)


def load_protocols(
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    max_images: int | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.25,
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(validation table, test table, note) with IDENTICAL training rows, for selecting on val, reporting on test.

    Datasets with a validation protocol (consumer2shop, clothing) use it; the others get holdout_validation of
    their training rows (the note says so, and the chosen model must then be retrained on all training rows).
    With `max_images`, the validation table is capped and the test table keeps its training rows and a
    capped share of its query/gallery rows (its rows held out of the test protocol are dropped).
    """
    if dataset not in VALIDATION_DATASETS:
        test = load_table(dataset, root, max_images=max_images, seed=seed)
        val = holdout_validation(test, holdout_fraction, seed=seed)
        note = (
            f"{dataset} has no validation protocol: the model is selected on a validation set held out of its "
            f"TRAINING rows ({int(round(100 * holdout_fraction))}% of the training labels), never on test; the "
            "chosen configuration is then retrained on all training rows before its single test evaluation."
        )
        return val, test, note
    val = load_table(dataset, root, eval_split="val", seed=seed)
    test = load_table(dataset, root, eval_split="test", seed=seed)
    if len(val) != len(test) or not (val["path"].to_numpy() == test["path"].to_numpy()).all():
        raise ValueError(f"{dataset}: the val and test protocols list different rows")
    if max_images is not None and len(val) > max_images:
        val = cap_table(val.assign(_row=np.arange(len(val))), max_images, seed=seed)
        train = val.loc[val["split"] == "train", "_row"].to_numpy()
        capped = cap_table(test.assign(_row=np.arange(len(test))), max_images, seed=seed)
        held = capped.loc[capped["split"].isin(EVAL_ROLES), "_row"].to_numpy()
        keep = np.sort(np.concatenate([train, held]))
        test = test.iloc[keep].reset_index(drop=True)
        val = val.drop(columns="_row")
    note = (
        f"{dataset}: the model is selected on the validation protocol; the test protocol is evaluated once, at the end."
    )
    return val, test, note


def same_training_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two tables hold the same training rows (paths and labels) in the same order."""
    ta, tb = a.iloc[train_rows(a)], b.iloc[train_rows(b)]
    return (
        len(ta) == len(tb)
        and (ta["path"].to_numpy() == tb["path"].to_numpy()).all()
        and (ta["label"].to_numpy() == tb["label"].to_numpy()).all()
    )

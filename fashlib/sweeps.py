"""The sweeps chapters 02 and 03 run, one call each: backbones (with their cost) and losses, on cached features.

Both train one head per configuration with one seed, evaluate it on the table's queries (evaluation.evaluate:
Recall@K, mAP@R as fractions), save every run folder (runs.save_run) so it can be rechecked from its
files alone (runs.check_run), and turn a configuration that fails into a row carrying its error
message instead of stopping the sweep. Seeds and intervals are study.seed_comparison's job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .embeddings import backbone_features, train_head_on_features
from .evaluation import KS, evaluate, retrieve
from .losses import loss_spec
from .pool import default_workers, map_jobs
from .runs import run_name, save_run
from .study import try_call
from .throughput import engine_throughputs

__all__ = ["backbone_sweep", "loss_run", "loss_sweep"]


def _backbone_runs(
    backbone: str,
    pretrained: bool,
    table: pd.DataFrame,
    head: dict,
    extract: dict,
    out_dir: str | Path,
    prefix: str,
    config: dict,
) -> dict:
    """Features -> frozen metrics -> trained head -> head metrics for one backbone; saves both runs."""
    start = time.perf_counter()
    features = backbone_features(backbone, table, pretrained=pretrained, progress=True, **extract)
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    embeddings, history, _ = train_head_on_features(features, table, progress=False, **head)
    head_s = time.perf_counter() - start
    weights = "imagenet" if pretrained else "random"
    config = {**config, "backbone": backbone, "weights": weights}
    out = dict(features_s=features_s, head_s=head_s, runs={})
    for stage, emb, extra in (("frozen", features, {}), ("head", embeddings, {**head, "losses": history})):
        out[stage] = evaluate(table, emb)
        extra = {k: v for k, v in extra.items() if k != "device"}
        out["runs"][stage] = save_run(
            out_dir,
            f"{prefix}/{run_name(backbone, weights, stage)}",
            table,
            emb,
            out[stage],
            {**config, **extra},
        )
    return out


def _cost(backbone: str, weights: str, info: dict | None, speed: dict | None, image_size: int | None) -> dict:
    return dict(
        backbone=backbone,
        weights=weights,
        params_M=info["params"] / 1e6 if info else np.nan,
        gflops=info["gflops"] if info else np.nan,
        image_size=info["image_size"] if info else image_size,
        images_per_s=max(speed.values()) if speed else np.nan,
        images_per_s_torch=speed.get("torch", np.nan) if speed else np.nan,
        images_per_s_onnx=speed.get("onnx", np.nan) if speed else np.nan,
    )


def _backbone_results(backbone, controls, table, development, head, extract, throughput, out_dir, prefix, config):
    """Yield (pretrained, weights, cost, result, error) for a backbone and, with controls, its random weights."""
    from .models import backbone_info

    image_size = extract.get("image_size")
    info, info_error = try_call(backbone_info, backbone, image_size)
    speed = None
    if not info_error:
        speed, _ = try_call(engine_throughputs, backbone, image_size, **throughput)
    for pretrained in [True, False] if controls else [True]:
        weights = "imagenet" if pretrained else "random"
        cost = _cost(backbone, weights, info, speed, image_size)
        if info_error:
            yield pretrained, weights, cost, None, info_error
            continue
        rows = table if pretrained else development
        result, error = try_call(_backbone_runs, backbone, pretrained, rows, head, extract, out_dir, prefix, config)
        yield pretrained, weights, cost, result, error


def backbone_sweep(
    table: pd.DataFrame,
    backbones: Sequence[str],
    random_controls: bool | Sequence[str],
    *,
    head: dict,
    extract: dict,
    throughput: dict,
    out_dir: str | Path,
    prefix: str,
    config: dict,
) -> tuple[pd.DataFrame, dict]:
    """Chapter 02: every backbone (and its random-weights control) frozen and with a trained head, with its cost.

    head: embeddings.train_head_on_features options (loss, embedding_dim, epochs, seed, device, p, k);
    extract: embeddings.backbone_features options (image_size, flip_average, device, cache_dir, seed);
    throughput: throughput.engine_throughputs options (batch_size, batches, device, seed); config: recorded in
    each saved run. Random controls run on the train/query/gallery rows only (the pretrained features cover the
    whole table, so chapters 04 and 05 find them in the cache). Returns (one row per backbone, weights and stage
    with metrics, cost (params_M, gflops, images_per_s*), seconds and error; {(backbone, weights): {stage:
    run folder}}). Raises RuntimeError when no backbone could be evaluated.
    """
    development = table[table["split"].isin(["train", "query", "gallery"])].reset_index(drop=True)
    rows, saved = [], {}
    for backbone in backbones:
        controls = random_controls is True or (
            isinstance(random_controls, (list, tuple)) and backbone in random_controls
        )
        for _pretrained, weights, cost, result, error in _backbone_results(
            backbone, controls, table, development, head, extract, throughput, out_dir, prefix, config
        ):
            if error:
                rows.append({**cost, "stage": "-", "error": error})
                continue
            saved[(backbone, weights)] = result["runs"]
            for stage in ("frozen", "head"):
                seconds = result["features_s"] if stage == "frozen" else result["head_s"]
                rows.append({**cost, "stage": stage, **result[stage], "error": "", "seconds": seconds})
    results = pd.DataFrame(rows)
    if "map@r" not in results:
        raise RuntimeError("no backbone could be evaluated:\n" + "\n".join(results["error"]))
    return results, saved


def loss_run(
    features: np.ndarray,
    table: pd.DataFrame,
    variant: str,
    dim: int,
    *,
    head: dict,
    out_dir: str | Path,
    prefix: str,
    config: dict,
    max_k: int = 50,
) -> dict:
    """Chapter 03: train a head with one loss variant (losses.loss_spec) at one embedding size; evaluate
    and save it. Returns {result, history, seconds, folder, curve (Recall@K for K = 1..max_k)}."""
    loss, loss_options = loss_spec(variant)
    start = time.perf_counter()
    embeddings, history, _ = train_head_on_features(
        features, table, loss=loss, loss_options=loss_options, embedding_dim=dim, progress=False, **head
    )
    seconds = time.perf_counter() - start
    found = retrieve(table, embeddings, max_k=max(max_k, *KS))  # one search: the metrics and the curve
    result = found.metrics(KS)
    folder = save_run(
        out_dir,
        f"{prefix}/{run_name(variant, dim)}",
        table,
        embeddings,
        result,
        {**config, "loss": loss, "loss_options": loss_options, "embedding_dim": dim, "losses": history},
    )
    return dict(
        result=result,
        history=history,
        seconds=seconds,
        folder=folder,
        curve=found.curve(max_k),
    )


def _loss_job(shared: dict, variant: str) -> tuple[dict | None, str | None]:
    """loss_sweep's job: loss_run for one variant, a failure kept as its message (map_jobs)."""
    options = {k: shared[k] for k in ("head", "out_dir", "prefix", "config", "max_k")}
    return try_call(loss_run, shared["features"], shared["table"], variant, shared["dim"], **options)


def loss_sweep(
    features: np.ndarray,
    table: pd.DataFrame,
    variants: Sequence[str],
    dim: int,
    *,
    head: dict,
    out_dir: str | Path,
    prefix: str,
    config: dict,
    max_k: int = 50,
    workers: int | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Chapter 03: the frozen features and one head per loss variant (loss_run), seed head["seed"].

    The heads train side by side in `workers` processes, one intra-op thread each (pool.map_jobs; None = one
    per CPU, 1 on a GPU): the results do not depend on `workers`.

    Returns (one row per loss with metrics, embedding_dim, seconds and error; {name: loss_run result} with
    the frozen features under "frozen (no head)"). Raises RuntimeError when no loss could be trained."""
    found = retrieve(table, features, max_k=max(max_k, *KS))  # one search: the metrics and the curve
    frozen = found.metrics(KS)
    name = "frozen (no head)"
    folder = save_run(out_dir, f"{prefix}/{run_name('frozen', features.shape[1])}", table, features, frozen, config)
    runs = {
        name: dict(
            result=frozen,
            history=[],
            seconds=0.0,
            folder=folder,
            curve=found.curve(max_k),
        )
    }
    rows = [dict(loss=name, embedding_dim=features.shape[1], **frozen, seconds=0.0, error="")]
    shared = dict(features=features, table=table, dim=dim, head=head, out_dir=out_dir, prefix=prefix, config=config)
    shared["max_k"] = max_k
    workers = default_workers(len(variants), head.get("device", "cpu")) if workers is None else workers
    for variant, (run, error) in zip(variants, map_jobs(_loss_job, variants, shared=shared, workers=workers)):
        if error:
            rows.append(dict(loss=variant, embedding_dim=dim, seconds=float("nan"), error=error))
            continue
        runs[variant] = run
        rows.append(dict(loss=variant, embedding_dim=dim, **run["result"], seconds=run["seconds"], error=""))
    results = pd.DataFrame(rows)
    if len(runs) == 1:
        raise RuntimeError("no loss could be trained:\n" + "\n".join(results["error"]))
    return results, runs

"""Choosing a model on validation only, refitting it on train + validation, and its single test evaluation.

Chapter 05's protocol as library functions (the notebook calls each once):

1. ``candidate_scores``: every candidate (features of a backbone or an ensemble) x loss x head type
   ("none" = the features themselves) x search-time post-processing (none, or average query expansion
   with k in ``qe_ks``, Chum et al. ICCV 2007), scored on the VALIDATION protocol.
2. ``evaluation.pick_best`` on that table (highest Recall@1, then mAP@R).
3. ``refit``: the chosen head configuration retrained on train + validation rows (study.train_val_table)
   and applied to every row of the test table.
4. ``test_report``: Recall@K and mAP@R on test with 95% bootstrap intervals over queries, and the paired
   comparison with the frozen baseline on the same queries (stats.compare_scores).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import stats, study
from .data.protocols import eval_rows, same_training_rows, train_rows
from .embeddings import embed_images, train_head_on_features
from .evaluation import KS, pick_best
from .losses import loss_spec
from .study import try_call

__all__ = ["NONE", "post_settings", "parse_post", "candidate_scores", "refit", "test_report", "paired_report"]

NONE = "none"
INDEX = ["candidate", "loss", "head", "post"]


def post_settings(qe_ks: Sequence[int]) -> list[str]:
    """The post-processing names swept on validation: "none" and "qe k=<k>" for each k of qe_ks."""
    return [NONE] + [f"qe k={int(k)}" for k in qe_ks]


def parse_post(name: str) -> tuple[str, dict[str, int]]:
    """ "qe k=2" -> ("qe", {"k": 2}); "none" -> ("none", {}). Raises ValueError for another name."""
    if name == NONE:
        return NONE, {}
    method, _, setting = name.partition(" k=")
    if method != "qe" or not setting.isdigit():
        raise ValueError(f"unknown post-processing {name!r}; expected 'none' or 'qe k=<int>'")
    return method, {"k": int(setting)}


def _mean_scores(scores: pd.DataFrame) -> dict[str, float]:
    return {("map@r" if c == "ap@r" else c): float(np.nanmean(scores[c])) for c in scores}


def post_scores(table: pd.DataFrame, embeddings: np.ndarray, post: str, ks: Sequence[int] = KS) -> pd.DataFrame:
    """Per-query scores (study.postprocessed_scores) of the table's queries after post-processing `post`."""
    method, params = parse_post(post)
    return study.postprocessed_scores(table, embeddings, method, ks=ks, **params)


def candidate_scores(
    features: Mapping[str, np.ndarray],
    table: pd.DataFrame,
    losses: Sequence[str],
    head_types: Sequence[str] = ("linear",),
    qe_ks: Sequence[int] = (),
    ks: Sequence[int] = KS,
    **head_options: Any,
) -> pd.DataFrame:
    """Score every candidate configuration on `table`'s queries (the validation protocol).

    features: name -> (N, D) cached features in table order; losses: fashlib loss variant names
    (losses.loss_spec); head_options go to embeddings.train_head_on_features (embedding_dim, epochs,
    seed, sampler, p, k, lr, ...). Returns a frame indexed by (candidate, loss, head, post) with Recall@K and
    mAP@R (fractions), `seconds` (head training) and `error` ("" or the message of a head that failed to
    train; such a row has no metrics). Loss and head "none" rows are the frozen features.
    """
    rows = []
    for candidate, feats in features.items():
        rows += _post_rows(table, feats, dict(candidate=candidate, loss=NONE, head=NONE, seconds=0.0), qe_ks, ks)
        for variant in losses:
            loss, loss_options = loss_spec(variant)
            for head in head_types:
                base = dict(candidate=candidate, loss=variant, head=head)
                start = time.perf_counter()
                trained, error = try_call(
                    train_head_on_features,
                    feats,
                    table,
                    loss=loss,
                    loss_options=loss_options,
                    head_type=head,
                    progress=False,
                    **head_options,
                )
                base["seconds"] = time.perf_counter() - start
                if error:
                    rows.append({**base, "post": NONE, "error": error})
                    continue
                rows += _post_rows(table, trained[0], base, qe_ks, ks)
    return pd.DataFrame(rows).set_index(INDEX)


def usable_qe_ks(table: pd.DataFrame, qe_ks: Sequence[int]) -> list[int]:
    """The k of qe_ks that the table's gallery can serve (k <= gallery size); warns naming the others."""
    gallery = len(eval_rows(table)[1])
    dropped = [int(k) for k in qe_ks if int(k) > gallery]
    if dropped:
        warnings.warn(
            f"query expansion with k = {dropped} left out: the gallery has only {gallery} images", stacklevel=2
        )
    return [int(k) for k in qe_ks if int(k) <= gallery]


def _post_rows(
    table: pd.DataFrame, embeddings: np.ndarray, base: dict, qe_ks: Sequence[int], ks: Sequence[int]
) -> list[dict]:
    qe_ks = usable_qe_ks(table, qe_ks)
    return [
        {**base, "post": post, **_mean_scores(post_scores(table, embeddings, post, ks)), "error": ""}
        for post in post_settings(qe_ks)
    ]


def refit(
    features: Mapping[str, np.ndarray],
    val_table: pd.DataFrame,
    test_table: pd.DataFrame,
    chosen: tuple[str, str, str, str],
    val_features: Mapping[str, np.ndarray] | None = None,
    **head_options: Any,
) -> tuple[np.ndarray, Any]:
    """The chosen (candidate, loss, head, post) refitted on train + validation rows.

    features: name -> (N, D) features of the TEST table's rows. When both tables list the same images
    (data.protocols.load_protocols without a cap) this is study.refit_on_train_val. Otherwise (capped smoke
    tables) the test table's rows that are validation query/gallery rows become training rows, and the
    validation query/gallery rows missing from the test table are appended as training rows with their
    features from `val_features` (required then; ValueError without it). A validation row that is also a test
    query/gallery row is never trained on (warned). Returns (embeddings
    of every test-table row before post-processing, the head or None for loss "none"). Post-processing is a
    search-time step applied by post_scores, not part of the embeddings.
    """
    candidate, variant, head, _ = chosen
    if variant == NONE:
        return features[candidate], None
    loss, loss_options = loss_spec(variant)
    options = dict(loss=loss, loss_options=loss_options, head_type=head, progress=False, **head_options)
    same = len(val_table) == len(test_table) and (val_table["path"].to_numpy() == test_table["path"].to_numpy()).all()
    if same:
        embeddings, _, trained = study.refit_on_train_val(features[candidate], val_table, test_table, **options)
        return embeddings, trained
    if val_features is None:
        raise ValueError("the validation and test tables list different images: pass val_features to refit")
    evaluated = ("query", "gallery")
    val_eval = val_table["split"].isin(evaluated).to_numpy()
    test_split = test_table["split"].to_numpy().astype(object).copy()
    in_val = test_table["path"].isin(val_table.loc[val_eval, "path"]).to_numpy()
    shared = in_val & np.isin(test_split, evaluated)
    if shared.any():  # e.g. shop photos in both galleries: they stay test rows and are never trained on
        warnings.warn(
            f"{int(shared.sum())} validation query/gallery images are also test query/gallery images: "
            "left out of the refit's training rows",
            stacklevel=2,
        )
    test_split[in_val & ~shared] = "train"
    extra = val_eval & ~val_table["path"].isin(test_table["path"]).to_numpy()
    table = pd.concat([test_table.assign(split=test_split), val_table[extra].assign(split="train")], ignore_index=True)
    feats = np.concatenate([features[candidate], val_features[candidate][extra]])
    embeddings, _, trained = train_head_on_features(feats, table, **options)
    return embeddings[: len(test_table)], trained


def test_report(scores: Mapping[str, pd.DataFrame], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per system: mean Recall@K and mAP@R, and the 95% bootstrap interval over queries of Recall@1 and
    mAP@R (`recall@1 low`, ..., fractions). scores: name -> per-query scores of the same queries."""
    rows = {}
    for name, frame in scores.items():
        ci = study.intervals_row(frame, n_boot=n_boot, seed=seed)
        rows[name] = {
            **_mean_scores(frame),
            "recall@1 low": ci["recall@1_low"],
            "recall@1 high": ci["recall@1_high"],
            "map@r low": ci["map@r_low"],
            "map@r high": ci["map@r_high"],
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def paired_report(chosen: pd.DataFrame, baseline: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """chosen - baseline on the same queries for Recall@1 and mAP@R: difference, paired 95% bootstrap interval
    (percentage points) and the sign-flip p-value (stats.compare_scores)."""
    diff = stats.compare_scores(
        chosen[["recall@1", "ap@r"]], baseline[["recall@1", "ap@r"]], n_boot=n_boot, seed=seed
    ).rename(index={"ap@r": "map@r"})
    diff[["diff", "low", "high"]] *= 100
    return diff.rename(columns={"diff": "points", "low": "low (points)", "high": "high (points)"})


def finetune_chosen(
    validation: pd.DataFrame,
    val_table: pd.DataFrame,
    test_table: pd.DataFrame,
    candidate_backbones: Sequence[str],
    folder: Any,
    *,
    embedding_dim: int = 256,
    image_size: int | None = None,
    epochs: int = 15,
    p: int = 16,
    k: int = 4,
    device: str = "cuda",
    seed: int = 0,
) -> tuple[np.ndarray, Any, str, str]:
    """Fine-tune end to end the best single-backbone candidate with a head (by validation Recall@1, then mAP@R).

    Trains on the training rows (finetune.finetune, meant for a GPU), monitored on the validation protocol;
    embeds every row of test_table. Returns (test embeddings, the trained network, backbone, loss label).
    When no such candidate trained, Lite0 with multi-similarity is used and a note is printed.
    """
    from .finetune import finetune

    ok = validation[(validation["error"] == "") & (validation.index.get_level_values("loss") != NONE)]
    ok = ok[ok.index.get_level_values("candidate").isin(candidate_backbones)]
    if len(ok):
        backbone, variant = pick_best(ok)[:2]
    else:
        backbone, variant = candidate_backbones[0], "multi_similarity"
        print(f"no single-backbone head candidate trained: fine-tuning {backbone} / {variant}")
    loss, loss_options = loss_spec(variant)
    train_view = val_table if same_training_rows(val_table, test_table) else test_table
    counts = train_view["label"].iloc[train_rows(train_view)].value_counts()
    p = max(2, min(p, int((counts >= 2).sum())))  # P x K batches need P labels with >= 2 images
    _, model = finetune(
        backbone,
        train_view,
        folder,
        loss=loss,
        loss_options=loss_options,
        embedding_dim=embedding_dim,
        image_size=image_size,
        epochs=epochs,
        p=p,
        k=k,
        device=device,
        seed=seed,
        progress=True,
    )
    return (
        embed_images(model, test_table, image_size=image_size, device=device),
        model,
        backbone,
        f"{variant} (fine-tuned end to end)",
    )

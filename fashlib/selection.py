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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import report, stats, study
from .data.protocols import eval_rows, same_training_rows, train_rows
from .embeddings import backbone_features, embed_images, ensemble_features, train_head_on_features
from .evaluation import KS, pick_best
from .losses import loss_spec
from .pool import default_workers, map_jobs
from .study import try_call

__all__ = [
    "NONE",
    "post_settings",
    "parse_post",
    "post_retrieval",
    "ensemble_name",
    "frozen_features",
    "candidate_scores",
    "validation_table",
    "protocol_sizes",
    "choose",
    "refit",
    "TestOutcome",
    "evaluate_on_test",
    "test_report",
    "paired_report",
    "answer_values",
    "save_test_runs",
    "recorded_gpu_runs",
    "keep_model",
]

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
    """Per-query scores (study.postprocessed_scores) of the table's queries after post-processing `post`.

    embeddings: (N, D) float in table order; post: a post_settings name. Returns one row per query: `recall@K`
    (0/1 float) for each K of ks within the search depth and `ap@r` (float, NaN where R = 0). ValueError for an
    unknown post-processing name and when the table has no query or gallery row."""
    method, params = parse_post(post)
    return study.postprocessed_scores(table, embeddings, method, ks=ks, **params)


def post_retrieval(table: pd.DataFrame, embeddings: np.ndarray, post: str, max_k: int = 50) -> Any:
    """The one search of the table's queries after post-processing `post` (a post_settings name): an
    evaluation Retrieval (study.postprocessed_retrieval) whose curve, first-hit ranks and rankings are those
    the chosen configuration's scores come from. embeddings: (N, D) float in table order. ValueError for an
    unknown post-processing name and as evaluation.retrieve raises it."""
    method, params = parse_post(post)
    return study.postprocessed_retrieval(table, embeddings, method, max_k, **params)


def ensemble_name(backbones: Sequence[str]) -> str:
    """The candidate name of the backbones' concatenated features: "ensemble(lite0+lite1+lite2)"."""
    return "ensemble(" + "+".join(b.replace("tf_efficientnet_", "") for b in backbones) + ")"


def frozen_features(
    table: pd.DataFrame, backbones: Sequence[str], ensemble: bool = True, **feature_options: Any
) -> dict[str, np.ndarray]:
    """Cached frozen features of every candidate: name -> (N, D) float32 in table order, one per backbone and,
    with ensemble and more than one backbone, their ensemble (embeddings.ensemble_features) under
    ensemble_name(backbones). feature_options go to embeddings.backbone_features (image_size, flip_average,
    device, cache_dir, seed); extraction shows its progress in the terminal. Errors as
    embeddings.backbone_features (unknown timm name, weights not available offline, an undecodable image)."""
    out = {b: backbone_features(b, table, progress=True, **feature_options) for b in backbones}
    if ensemble and len(backbones) > 1:
        out[ensemble_name(backbones)] = ensemble_features([out[b] for b in backbones])
    return out


def candidate_scores(
    features: Mapping[str, np.ndarray],
    table: pd.DataFrame,
    losses: Sequence[str],
    head_types: Sequence[str] = ("linear",),
    qe_ks: Sequence[int] = (),
    ks: Sequence[int] = KS,
    workers: int | None = None,
    progress: bool = False,
    **head_options: Any,
) -> pd.DataFrame:
    """Score every candidate configuration on `table`'s queries (the validation protocol).

    features: name -> (N, D) cached features in table order; losses: fashlib loss variant names
    (losses.loss_spec); head_options go to embeddings.train_head_on_features (embedding_dim, epochs,
    seed, sampler, p, k, lr, ...). The heads train side by side in `workers` processes, one intra-op
    thread each (pool.map_jobs; None = one per CPU, 1 on a GPU): the table does not depend on `workers`;
    `progress` shows a bar over the heads.
    Returns a frame indexed by (candidate, loss, head, post) with Recall@K and mAP@R (fractions),
    `seconds` (head training, one thread) and `error` ("" or the message of a head that failed to train;
    such a row has no metrics). Loss and head "none" rows are the frozen features.
    """
    qe_ks = usable_qe_ks(table, qe_ks)
    rows = []
    for candidate, feats in features.items():
        rows += _post_rows(table, feats, dict(candidate=candidate, loss=NONE, head=NONE, seconds=0.0), qe_ks, ks)
    jobs = [(candidate, variant, head) for candidate in features for variant in losses for head in head_types]
    device = head_options.get("device", "cpu")
    shared = dict(features=features, table=table, qe_ks=qe_ks, ks=ks, head_options=head_options)
    workers = default_workers(len(jobs), device) if workers is None else workers
    widths = {name: feats.shape[1] for name, feats in features.items()}
    for job_rows in map_jobs(
        _candidate_rows, jobs, shared=shared, workers=workers, progress=progress, desc="heads",
        cost=lambda job: widths[job[0]] * (2 if job[2] == "mlp" else 1),  # wide features and MLPs first
    ):  # fmt: skip
        rows += job_rows
    order = {name: i for i, name in enumerate(features)}
    return pd.DataFrame(rows).sort_values("candidate", key=lambda c: c.map(order), kind="stable").set_index(INDEX)


def _candidate_rows(shared: dict, job: tuple[str, str, str]) -> list[dict]:
    """candidate_scores' job: one candidate x loss variant x head type trained and scored (map_jobs)."""
    candidate, variant, head = job
    loss, loss_options = loss_spec(variant)
    base = dict(candidate=candidate, loss=variant, head=head)
    start = time.perf_counter()
    trained, error = try_call(
        train_head_on_features,
        shared["features"][candidate],
        shared["table"],
        loss=loss,
        loss_options=loss_options,
        head_type=head,
        progress=False,
        **shared["head_options"],
    )
    base["seconds"] = time.perf_counter() - start
    if error:
        return [{**base, "post": NONE, "error": error}]
    return _post_rows(shared["table"], trained[0], base, shared["qe_ks"], shared["ks"])


def validation_table(validation: pd.DataFrame, dataset: str, n_queries: int, n: int = 20):
    """The n best candidates of candidate_scores by Recall@1 then mAP@R, as a percent table (report.percent_table)
    captioned with the validation split, the dataset and its number of queries. The error column is shown only
    when a head failed to train."""
    shown = validation.sort_values(["recall@1", "map@r"], ascending=False).round({"seconds": 1})
    if not shown["error"].astype(bool).any():
        shown = shown.drop(columns="error")
    title = report.caption(
        f"Recall@K and mAP@R of the {min(n, len(validation))} best of {len(validation)} candidates",
        "validation",
        dataset,
        queries=n_queries,
    )
    columns = [c for c in shown if c.startswith("recall@") or c == "map@r"]
    styler = report.percent_table(shown.head(n), title, columns=columns)
    return styler.format("{:.1f}", subset=["seconds"]) if "seconds" in shown else styler


def protocol_sizes(val_table: pd.DataFrame, test_table: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Images and labels per split of the validation and the test protocol, side by side (counts, 0 where a
    protocol has no such split). Raises ValueError when a dataset with a validation protocol
    (data.protocols.VALIDATION_DATASETS) gives the two protocols different training rows."""
    from .data.protocols import VALIDATION_DATASETS

    if dataset in VALIDATION_DATASETS and not same_training_rows(val_table, test_table):
        raise ValueError(f"{dataset}: the validation and test protocols must train on identical rows; they do not")
    sizes = {
        name: table.groupby("split").agg(images=("path", "size"), labels=("label", "nunique"))
        for name, table in (("validation protocol", val_table), ("test protocol", test_table))
    }
    return pd.concat(sizes, axis=1).fillna(0).astype(int)


def choose(validation: pd.DataFrame) -> tuple[str, str, str, str]:
    """The (candidate, loss, head, post) of the best candidate that trained: highest validation Recall@1, ties
    broken by mAP@R (evaluation.pick_best). Raises ValueError when no candidate trained."""
    return pick_best(validation[validation["error"] == ""], by=("recall@1", "map@r"))


def usable_qe_ks(table: pd.DataFrame, qe_ks: Sequence[int]) -> list[int]:
    """The k of qe_ks (as ints, in the given order) that the table's gallery can serve (k <= gallery size); one
    UserWarning names the others. ValueError when the table has no query or gallery row."""
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


@dataclass
class TestOutcome:
    """Chapter 05's single evaluation on the test protocol: the chosen configuration and its frozen baseline.

    chosen: (candidate, loss, head, post) as evaluated (fine-tuning replaces the loss label and post "none");
    embeddings / baseline_embeddings: (N, D) float32 of every test-table row, before post-processing; model:
    the refitted head (None for loss "none") or the fine-tuned network; scores / baseline_scores: per-query
    Recall@K and AP@R on the same queries (post-processing applied to the chosen one); results /
    baseline_results: their means (fractions); report: selection.test_report of both; paired:
    selection.paired_report (chosen - baseline, points)."""

    chosen: tuple[str, str, str, str]
    name: str
    baseline_name: str
    embeddings: np.ndarray
    baseline_embeddings: np.ndarray
    model: Any
    scores: pd.DataFrame
    baseline_scores: pd.DataFrame
    results: dict[str, float]
    baseline_results: dict[str, float]
    report: pd.DataFrame
    paired: pd.DataFrame


def evaluate_on_test(
    chosen: tuple[str, str, str, str],
    features: Mapping[str, np.ndarray],
    val_table: pd.DataFrame,
    test_table: pd.DataFrame,
    val_features: Mapping[str, np.ndarray] | None = None,
    ks: Sequence[int] = KS,
    tuned: tuple[np.ndarray, Any, str, str] | None = None,
    **head_options: Any,
) -> TestOutcome:
    """Evaluate the chosen configuration once on the test protocol, against the frozen features of its candidate.

    features: name -> (N, D) test-table features. Without tuned the chosen head is refitted on train +
    validation (refit, with head_options); tuned is finetune_chosen's (embeddings, network, backbone, loss)
    and replaces the refit. The chosen post-processing is applied at search time; the baseline has none.
    Intervals: 95% bootstrap over queries (test_report), paired difference (paired_report), seed 0.
    Returns a TestOutcome (embeddings (N, D) float32 of every test-table row; metrics as fractions, the paired
    difference in points). KeyError when `features` lacks the chosen candidate; ValueError as refit raises it."""
    candidate, loss, head, post = chosen
    if tuned is None:
        embeddings, model = refit(features, val_table, test_table, chosen, val_features, **head_options)
    else:
        embeddings, model, candidate, loss = tuned
        post = NONE
    baseline_embeddings = features[candidate]
    scores = post_scores(test_table, embeddings, post, ks=ks)
    baseline_scores = post_scores(test_table, baseline_embeddings, NONE, ks=ks)
    name = f"{candidate} + {head} head, {loss}, post-processing {post}"
    baseline_name = f"{candidate} frozen features (baseline)"
    return TestOutcome(
        chosen=(candidate, loss, head, post),
        name=name,
        baseline_name=baseline_name,
        embeddings=embeddings,
        baseline_embeddings=baseline_embeddings,
        model=model,
        scores=scores,
        baseline_scores=baseline_scores,
        results=_mean_scores(scores),
        baseline_results=_mean_scores(baseline_scores),
        report=test_report({name: scores, baseline_name: baseline_scores}),
        paired=paired_report(scores, baseline_scores),
    )


PERCENT_ANSWER = ("val_r1", "r1", "r1_low", "r1_high", "map", "map_low", "map_high", "base_r1", "target")


def answer_values(outcome: TestOutcome, validation: pd.DataFrame, target_recall_at_1: float) -> dict[str, float]:
    """The numbers of chapter 05's answer: validation and test Recall@1 / mAP@R with their 95% intervals, the
    baseline's Recall@1 and the target (fractions; the keys in PERCENT_ANSWER), the number of candidates and
    test queries, and the paired Recall@1 difference in points (one decimal) with its interval and p-value."""
    row = outcome.report.loc[outcome.name]
    paired = outcome.paired.loc["recall@1"]
    chosen_candidate = validation.loc[choose(validation)]
    return {
        "val_r1": chosen_candidate["recall@1"],
        "r1": row["recall@1"],
        "r1_low": row["recall@1 low"],
        "r1_high": row["recall@1 high"],
        "map": row["map@r"],
        "map_low": row["map@r low"],
        "map_high": row["map@r high"],
        "base_r1": outcome.baseline_results["recall@1"],
        "target": target_recall_at_1,
        "candidates": len(validation),
        "diff": round(paired["points"], 1),
        "diff_low": round(paired["low (points)"], 1),
        "diff_high": round(paired["high (points)"], 1),
        "p": round(paired["p_value"], 4),
        "queries": len(outcome.scores),
    }


def save_test_runs(
    out_dir: Any, prefix: str, test_table: pd.DataFrame, outcome: TestOutcome, config: dict, ks: Sequence[int] = KS
) -> tuple[dict[str, float], Any, float]:
    """Save the chosen and the baseline test embeddings as run folders <out_dir>/<prefix>/best_test and
    .../frozen_baseline_test (runs.save_run) and recheck the first from its saved files alone
    (runs.check_run). The saved metrics are those before post-processing; config records the ones with it.

    Returns (metrics before post-processing, the chosen run's folder, the largest |difference| of the recheck).
    Raises AssertionError when the recheck differs by 1e-6 or more."""
    from .evaluation import evaluate
    from .runs import check_run, save_run

    plain = evaluate(test_table, outcome.embeddings, ks=ks)
    folder = save_run(
        out_dir, f"{prefix}/best_test", test_table, outcome.embeddings, plain,
        {**config, "metrics_with_postprocessing": outcome.results},
    )  # fmt: skip
    save_run(
        out_dir, f"{prefix}/frozen_baseline_test", test_table, outcome.baseline_embeddings, outcome.baseline_results,
        {**config, "loss": NONE, "postprocessing": NONE},
    )  # fmt: skip
    rechecked = check_run(folder, ks=ks)
    gap = max(abs(rechecked[m] - plain[m]) for m in rechecked)
    assert gap < 1e-6, f"{folder}: check_run gives {rechecked}, the run measured {plain}"
    return plain, folder, gap


def recorded_gpu_runs(folder: Any = None) -> pd.DataFrame:
    """The recorded GPU fine-tuning runs (runs.load_recorded_runs) of folder, by default the
    repository's book/gpu-runs; an empty frame when the folder does not exist."""
    from pathlib import Path

    from .paths import GPU_RUNS_DIR
    from .runs import load_recorded_runs

    folder = Path(folder) if folder else GPU_RUNS_DIR
    return load_recorded_runs(folder) if folder.is_dir() else pd.DataFrame()


def keep_model(
    outcome: TestOutcome,
    backbones: Sequence[str],
    model_dir: Any,
    test_table: pd.DataFrame,
    metrics: Mapping[str, float],
    protocol: str,
    *,
    finetuned: bool = False,
    image_size: int | None = None,
    flip_average: bool = False,
    seed: int = 0,
) -> str:
    """Save the chosen model as one folder (saved_model.save_embedder: safetensors weights + config.json), load it back
    and check that it reproduces outcome.embeddings on 8 test queries (max |difference| < 1e-4, AssertionError
    otherwise). backbones: the candidate's backbones (all of them for the ensemble); metrics: the test metrics
    before post-processing; protocol: the note saved with them (the chosen post-processing's metrics are added).

    Returns one sentence for the reader. A model that cannot be saved (e.g. no head for the candidate) leaves no
    folder behind, so chapter 07 falls back to its backbone; the sentence says so."""
    import shutil
    from pathlib import Path

    from . import saved_model

    if finetuned:
        keep, problem = saved_model.network_embedder(outcome.model, image_size=image_size), None
    else:
        keep, problem = try_call(
            saved_model.features_embedder, list(backbones), outcome.model, image_size=image_size,
            flip_average=flip_average, seed=seed,
        )  # fmt: skip
    post = outcome.chosen[3]
    post_note = (
        "none" if post == NONE else f"{post} at search time (fashlib.postprocess.query_expansion); with it test "
        f"recall@1 {outcome.results['recall@1']:.4f}, map@r {outcome.results['map@r']:.4f}"
    )  # fmt: skip
    note = f"{protocol}; post-processing: {post_note}"
    saved, problem = (
        (None, problem)
        if problem
        else try_call(
            lambda: saved_model.load_embedder(
                saved_model.save_embedder(keep, model_dir, metrics=metrics, protocol=note)
            )
        )
    )
    if problem:
        shutil.rmtree(model_dir, ignore_errors=True)  # never leave a folder chapter 07 cannot load
        reason = report.warning_prose([problem.splitlines()[0]])
        return f"The chosen model is not saved: {reason} Chapter 07 uses its fallback backbone."
    rows = eval_rows(test_table)[0][:8]
    gap = float(np.abs(saved.embed(test_table["path"].iloc[rows]) - outcome.embeddings[rows]).max())
    assert gap < 1e-4, f"the saved model does not reproduce this chapter's embeddings (max difference {gap})"
    return (
        f"Saved {saved.describe()} to {report.relative_path(Path(model_dir))}; max |difference| from this chapter's "
        f"embeddings on {len(rows)} test queries: {gap:.1e}."
    )


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
    embeds every row of test_table. Returns ((N, embedding_dim) float32 L2-normalised embeddings of the N
    test-table rows, the trained network, backbone, loss label). When no such candidate trained, the first of
    `candidate_backbones` with multi-similarity is used and a note is printed. Errors as finetune.finetune
    (runs.RunConfigMismatch for a `folder` holding another run).
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

"""Studies on cached features that return tables: seeds, intervals, post-processing, train+validation refit.

Each function is one notebook cell's computation: it takes a table (fashlib.data.protocols layout: a `split`
column with train / query / gallery rows), feature or embedding arrays in table order, and returns a
DataFrame. Intervals are percentile bootstraps over queries (fashlib.stats); seeds vary the head's
initialisation and batch order only (the cached backbone features are fixed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import postprocess, stats
from .data.protocols import check_embedding_rows, eval_rows
from .embeddings import train_head_on_features
from .evaluation import KS, retrieve
from .pool import default_workers, map_jobs
from .retrieval import Retrieval

__all__ = [
    "train_val_table",
    "refit_on_train_val",
    "query_scores",
    "intervals_row",
    "POSTPROCESSING",
    "postprocessed_scores",
    "postprocessed_retrieval",
    "postprocessing_sweep",
    "postprocessing_test",
    "seed_comparison",
    "noise_verdicts",
    "noise_prose",
    "try_call",
    "relative_history",
]


# ------------------------------------------------------------------------------------------ final model
def train_val_table(val_table: pd.DataFrame, test_table: pd.DataFrame) -> pd.DataFrame:
    """The test table with every validation query/gallery row turned into a training row.

    For refitting the configuration chosen on validation on train + validation before the single test
    evaluation. Both tables must list the same images in the same order (data.protocols.load_protocols).
    Datasets whose validation set was held out of the training rows already train on them in the test
    table, so nothing changes there. Raises ValueError when the tables differ in rows, or when a
    validation row is a test query/gallery row (that would train on the test protocol).
    """
    if len(val_table) != len(test_table) or not (val_table["path"].to_numpy() == test_table["path"].to_numpy()).all():
        raise ValueError(
            "train_val_table: the validation and test tables list different images; "
            "build both with data.protocols.load_protocols"
        )
    val_rows = np.isin(val_table["split"].to_numpy(), ("query", "gallery"))
    test_split = test_table["split"].to_numpy().astype(object).copy()
    clash = val_rows & np.isin(test_split, ("query", "gallery"))
    if clash.any():
        raise ValueError(f"{int(clash.sum())} validation rows are test query/gallery rows; refusing to train on them")
    test_split[val_rows] = "train"
    return test_table.assign(split=test_split)


def refit_on_train_val(
    features: np.ndarray, val_table: pd.DataFrame, test_table: pd.DataFrame, **config: Any
) -> tuple[np.ndarray, list[float], Any]:
    """Train the chosen head configuration on train + validation rows; embed every row for the test evaluation.

    `config` goes to embeddings.train_head_on_features (loss, head_type, sampler, epochs, seed, ...).
    Returns (embeddings of all rows, per-epoch losses, head).
    """
    return train_head_on_features(features, train_val_table(val_table, test_table), **config)


# ------------------------------------------------------------------------------------------ intervals
def query_scores(table: pd.DataFrame, embeddings: np.ndarray, ks: Sequence[int] = KS) -> pd.DataFrame:
    """Per-query hit@K and AP@R of the table's queries against its gallery (evaluation.Retrieval.per_query)."""
    return retrieve(table, embeddings, max_k=max(max(ks), 1)).per_query(ks)


def _metric_column(metric: str) -> str:
    """The per-query score column behind an aggregate metric (mAP@R is the mean of per-query AP@R)."""
    return "ap@r" if metric == "map@r" else metric


def intervals_row(
    scores: pd.DataFrame, metrics: Sequence[str] = ("recall@1", "map@r"), n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """{metric: mean, metric_low: ..., metric_high: ...} (95% bootstrap) for a per-query table."""
    row: dict[str, float] = {}
    for metric in metrics:
        ci = stats.bootstrap_ci(scores[_metric_column(metric)].to_numpy(), n_boot=n_boot, seed=seed)
        row.update({metric: ci.value, f"{metric}_low": ci.low, f"{metric}_high": ci.high})
    return row


# ------------------------------------------------------------------------------------------ post-processing
def _qe(q, g, k=2, alpha=0.0):
    return postprocess.query_expansion(q, g, k, alpha), g


def _dba(q, g, k=2, alpha=0.0):
    return q, postprocess.database_augmentation(g, k, alpha)


def _dba_qe(q, g, k=2, alpha=0.0):
    g = postprocess.database_augmentation(g, k, alpha)
    return postprocess.query_expansion(q, g, k, alpha), g


POSTPROCESSING: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "none": lambda q, g: (q, g),
    "qe": _qe,
    "aqe": _qe,  # alpha-weighted: pass alpha > 0
    "dba": _dba,
    "dba+qe": _dba_qe,
}


def postprocessed_scores(
    table: pd.DataFrame, embeddings: np.ndarray, method: str = "none", ks: Sequence[int] = KS, **params: Any
) -> pd.DataFrame:
    """Per-query scores after a post-processing method: one of POSTPROCESSING or "rerank"
    (postprocess.k_reciprocal_rerank with params k1, k2, lambda_value)."""
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy()
    q, g = postprocess.l2_normalize(embeddings[query]), postprocess.l2_normalize(embeddings[gallery])
    depth = int(min(len(gallery), max(max(ks), stats.relevant_counts(labels[query], labels[gallery]).max())))
    if method == "rerank":
        _, ranking = postprocess.k_reciprocal_rerank(q, g, top=depth, **params)
    elif method in POSTPROCESSING:
        q, g = POSTPROCESSING[method](q, g, **params)
        ranking = postprocess.rank(q, g, depth)
    else:
        raise ValueError(f"unknown post-processing {method!r}; choose one of {sorted(POSTPROCESSING) + ['rerank']}")
    return stats.scores_from_ranking(ranking, labels[query], labels[gallery], [k for k in ks if k <= depth])


def postprocessed_retrieval(
    table: pd.DataFrame, embeddings: np.ndarray, method: str = "none", max_k: int = 50, **params: Any
) -> Retrieval:
    """The table's one search after a post-processing method of POSTPROCESSING (not "rerank", which returns
    a ranking, not embeddings): query and gallery embeddings (L2-normalised, then post-processed) searched
    once, read many ways (curve, first_hit_ranks, ranked for retrieval_examples). Its Recall@K and mAP@R
    are postprocessed_scores' for the same method. embeddings: (N, D) float in table order. ValueError for
    another method and as evaluation.retrieve raises it."""
    if method not in POSTPROCESSING:
        raise ValueError(f"unknown post-processing {method!r} for a search; choose one of {sorted(POSTPROCESSING)}")
    check_embedding_rows(table, embeddings)
    query, gallery = eval_rows(table)
    labels = table["label"].to_numpy()
    q, g = postprocess.l2_normalize(embeddings[query]), postprocess.l2_normalize(embeddings[gallery])
    q, g = POSTPROCESSING[method](q, g, **params)
    return Retrieval.from_arrays(q, labels[query], g, labels[gallery], max_k, query, gallery)


def postprocessing_sweep(
    table: pd.DataFrame, embeddings: np.ndarray, grid: Sequence[tuple[str, Mapping[str, Any]]] | None = None
) -> pd.DataFrame:
    """Recall@1 and mAP@R with 95% intervals for each (method, params) of `grid` (default: k in 1, 2, 3, 5, 10
    for QE, alphaQE (alpha 3), DBA, DBA+QE, and k-reciprocal re-ranking with k1 in 10, 20)."""
    if grid is None:
        grid = [("none", {})]
        for k in (1, 2, 3, 5, 10):
            grid += [("qe", {"k": k}), ("aqe", {"k": k, "alpha": 3.0}), ("dba", {"k": k}), ("dba+qe", {"k": k})]
        grid += [("rerank", {"k1": k1, "k2": 6, "lambda_value": 0.3}) for k1 in (10, 20)]
    rows = []
    for method, params in grid:
        scores = postprocessed_scores(table, embeddings, method, **params)
        rows.append(
            {"method": method, "params": ", ".join(f"{k}={v}" for k, v in params.items()), **intervals_row(scores)}
        )
    return pd.DataFrame(rows)


def _parse_params(text: str) -> dict[str, Any]:
    """Inverse of the `params` column of postprocessing_sweep ("k=2, alpha=3.0" -> {"k": 2, "alpha": 3.0})."""
    if not text:
        return {}
    pairs = (item.split("=") for item in text.split(", "))
    return {key: float(value) if "." in value else int(value) for key, value in pairs}


def postprocessing_test(
    val_sweep: pd.DataFrame, table: pd.DataFrame, embeddings: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Each method's best setting ON VALIDATION (`val_sweep` rows, highest Recall@1, then mAP@R), scored once
    on `table`'s queries: Recall@1 and mAP@R with 95% intervals, and the paired difference to no
    post-processing (bootstrap interval, sign-flip p-value). One row per method."""
    ranked = val_sweep.sort_values(["recall@1", "map@r"], ascending=False, kind="mergesort")
    chosen = ranked.drop_duplicates("method").set_index("method")
    plain = postprocessed_scores(table, embeddings, "none")
    rows = []
    for method, row in chosen.iterrows():
        scores = postprocessed_scores(table, embeddings, method, **_parse_params(row["params"]))
        diff = stats.compare_scores(scores, plain, n_boot=n_boot, seed=seed)
        rows.append(
            {
                "method": method,
                "params (chosen on val)": row["params"],
                "val recall@1": row["recall@1"],
                **intervals_row(scores, n_boot=n_boot, seed=seed),
                "Δ recall@1": diff.loc["recall@1", "diff"],
                "Δ recall@1 p": diff.loc["recall@1", "p_value"],
                "Δ map@r": diff.loc["ap@r", "diff"],
                "Δ map@r p": diff.loc["ap@r", "p_value"],
            }
        )
    return pd.DataFrame(rows).set_index("method")


# ------------------------------------------------------------------------------------------ seeds vs noise
def seed_comparison(
    features: Mapping[str, np.ndarray],
    table: pd.DataFrame,
    configs: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int] = (0, 1, 2),
    metrics: Sequence[str] = ("recall@1", "map@r"),
    n_boot: int = 2000,
    progress: bool = False,
    workers: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """Every configuration trained with every seed; mean ± std over seeds and a bootstrap interval over queries.

    features: name -> (N, D) float array in table order; configs: name -> {"features": a features name, plus
    embeddings.train_head_on_features options (loss is required); {"features": name, "loss": None} scores
    the features themselves (no head, the same for every seed)}. The heads train side by side in `workers`
    processes, one intra-op thread each (pool.map_jobs; None = one per CPU, 1 on a GPU): the results do not
    depend on `workers`. Returns (runs: one row per configuration and seed, metrics as fractions; summary:
    one row per configuration with `<metric>` (mean over seeds), `<metric> std` (over seeds, ddof=1) and
    `<metric> low` / `<metric> high`, the 95% percentile bootstrap over queries of the seed-averaged
    per-query scores; per_query: name -> (Q, metrics) seed-averaged scores, the input of noise_verdicts).
    Raises KeyError for a configuration naming unknown features.
    """
    for name, config in configs.items():
        if config["features"] not in features:
            raise KeyError(f"configuration {name!r} names features {config['features']!r}; known: {sorted(features)}")
    jobs = [(name, seed) for name in configs for seed in seeds]
    device = next((c.get("device", "cpu") for c in configs.values() if c.get("loss") is not None), "cpu")
    workers = default_workers(len(jobs), device) if workers is None else workers
    shared = dict(features=features, table=table, configs=configs)
    scores = dict(zip(jobs, map_jobs(_seed_scores, jobs, shared=shared, workers=workers, progress=progress)))
    rows, summary, per_query = [], [], {}
    for name in configs:
        means = [{m: float(np.nanmean(scores[name, seed][_metric_column(m)])) for m in metrics} for seed in seeds]
        runs = pd.DataFrame([{"config": name, "seed": seed, **mean} for seed, mean in zip(seeds, means)])
        rows += runs.to_dict("records")
        per_query[name] = sum((scores[name, seed] for seed in seeds[1:]), scores[name, seeds[0]].copy()) / len(seeds)
        summary.append(_seed_summary(name, runs, per_query[name], metrics, n_boot))
    return pd.DataFrame(rows), pd.DataFrame(summary).set_index("config"), per_query


def _seed_scores(shared: dict, job: tuple[str, int]) -> pd.DataFrame:
    """seed_comparison's job: per-query scores of one configuration trained with one seed (map_jobs)."""
    name, seed = job
    config = shared["configs"][name]
    features = shared["features"][config["features"]]
    options = {k: v for k, v in config.items() if k != "features"}
    if options.get("loss") is None:
        return query_scores(shared["table"], features)
    embeddings = train_head_on_features(features, shared["table"], seed=seed, progress=False, **options)[0]
    return query_scores(shared["table"], embeddings)


def _seed_summary(
    name: str, runs: pd.DataFrame, per_query: pd.DataFrame, metrics: Sequence[str], n_boot: int
) -> dict[str, Any]:
    """One summary row of seed_comparison: mean and std over seeds, bootstrap interval over queries."""
    entry: dict[str, Any] = {"config": name}
    for m in metrics:
        ci = stats.bootstrap_ci(per_query[_metric_column(m)].to_numpy(), n_boot=n_boot)
        entry.update(
            {
                m: runs[m].mean(),
                f"{m} std": runs[m].std(ddof=1) if len(runs) > 1 else 0.0,
                f"{m} low": ci.low,
                f"{m} high": ci.high,
            }
        )
    return entry


def noise_verdicts(
    summary: pd.DataFrame,
    per_query: Mapping[str, pd.DataFrame],
    metric: str = "recall@1",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Each configuration against the best one (highest `metric` mean in seed_comparison's summary).

    A difference is called larger than the noise when BOTH hold: the 95% paired bootstrap interval over
    queries of the seed-averaged per-query differences excludes 0 (stats.paired_comparison), and the
    difference of the seed means exceeds the seed spread sqrt(std_best² + std_other²). Otherwise it is
    within the noise (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020). Returns one row per
    other configuration, sorted by `metric`: `points` (other - best, in percentage points), `low` / `high`
    (its paired interval, points), `p_value` (sign-flip test), `seed spread` (points) and `separated` (bool).
    Raises KeyError when `metric` is not in the summary.
    """
    if metric not in summary:
        raise KeyError(f"metric {metric!r} is not in the seed summary (columns: {', '.join(summary.columns)})")
    best = summary[metric].idxmax()
    column = _metric_column(metric)
    rows = []
    for name in summary.sort_values(metric, ascending=False).index.drop(best):
        pair = stats.paired_comparison(
            per_query[name][column].to_numpy(), per_query[best][column].to_numpy(), n_boot=n_boot, seed=seed
        )
        diff = summary.at[name, metric] - summary.at[best, metric]
        spread = float(np.hypot(summary.at[name, f"{metric} std"], summary.at[best, f"{metric} std"]))
        separated = bool((pair.high < 0 or pair.low > 0) and abs(diff) > spread)
        rows.append(
            {
                "config": name,
                "versus": best,
                "points": 100 * diff,
                "low": 100 * pair.low,
                "high": 100 * pair.high,
                "p_value": pair.p_value,
                "seed spread": 100 * spread,
                "separated": separated,
            }
        )
    columns = ["config", "versus", "points", "low", "high", "p_value", "seed spread", "separated"]
    return pd.DataFrame(rows, columns=columns).set_index("config")


def noise_prose(verdicts: pd.DataFrame, metric: str = "recall@1") -> str:
    """noise_verdicts as Markdown sentences: which gaps to the best configuration are larger than the noise and
    which are not, each with its size in points and its paired 95% interval. "" for an empty table."""
    if verdicts.empty:
        return ""
    best = verdicts["versus"].iloc[0]

    def listed(frame: pd.DataFrame) -> str:
        return "; ".join(
            f"{name} {row.points:+.1f} points (paired 95% interval {row.low:+.1f} to {row.high:+.1f}, "
            f"seed spread {row['seed spread']:.1f})"
            for name, row in frame.iterrows()
        )

    out = []
    above, within = verdicts[verdicts["separated"]], verdicts[~verdicts["separated"]]
    if len(above):
        out.append(f"Larger than the noise, {metric} below **{best}**: {listed(above)}.")
    if len(within):
        out.append(f"Within the noise of **{best}** (not separated by these seeds and queries): {listed(within)}.")
    return " ".join(out)


# ------------------------------------------------------------------------------------------ helpers
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

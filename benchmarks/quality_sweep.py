"""How far do heads, losses, ensembles and post-processing go on the CC0 protocol? One command, honest protocol.

    FASHLIB_DATA=/work/shared/data nice -n 10 python3 benchmarks/quality_sweep.py \
        --cache-dir /work/wt/featcache --out runs/quality_sweep

1. Cached pooled features of each backbone (embeddings.backbone_features; extracted once, then read back),
   plus their ensemble (embeddings.ensemble_features) and, with --flip, flip-averaged features.
2. Every head configuration is trained with --seeds seeds on the TRAINING rows and scored on the VALIDATION
   protocol (mean and std over seeds, 95% bootstrap interval over queries); a "seed ensemble" candidate
   concatenates the embeddings of the seeds' heads.
3. Post-processing (QE, alphaQE, DBA, DBA+QE, k-reciprocal re-ranking) is swept on validation for the best
   configuration.
4. Selection by validation Recall@1 only. Then, once: the chosen configuration refit on train + validation
   (study.refit_on_train_val) and the frozen book baseline (ensemble, linear head, triplet, P x K 16 x 4) are
   scored on TEST, with intervals and a paired comparison (bootstrap interval, sign-flip p-value).

Writes <out>/validation.csv, <out>/postprocessing_val.csv, <out>/test.csv, <out>/summary.json and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fashlib import postprocess, stats, study
from fashlib.data.protocols import load_protocols
from fashlib.embeddings import backbone_features, ensemble_features, train_head_on_features

BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
BASELINE = {"loss": "triplet", "head_type": "linear", "sampler": "pk", "p": 16, "k": 4, "epochs": 30}
PML = {"head_type": "mlp", "hidden_dim": 512, "sampler": "m_per_class", "p": 16, "k": 8, "epochs": 30, "lr": 1e-3}


def load_features(args, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """name -> (N, D) L2-normalised pooled features in table order ("ens" = all backbones concatenated)."""
    feats = {}
    for name in args.backbones:
        short = name.replace("tf_efficientnet_", "")
        feats[short] = backbone_features(
            name, table, cache_dir=args.cache_dir, batch_size=16, flip_average=args.flip, progress=True
        )
    if len(args.backbones) > 1:
        feats["ens"] = ensemble_features([feats[n.replace("tf_efficientnet_", "")] for n in args.backbones])
    return feats


def candidates(feature_names: list[str]) -> dict[str, dict]:
    """Head configurations: the book baseline, the PML recipe with three losses, linear heads with m-per-class."""
    out = {}
    for f in feature_names:
        out[f"{f}/baseline-linear-triplet-pk16x4"] = {"features": f, **BASELINE}
        for loss in ("multi_similarity", "triplet", "arcface"):
            out[f"{f}/mlp-{loss}-m8x16"] = {"features": f, **PML, "loss": loss}
        out[f"{f}/mlp-bnneck-multi_similarity-m8x16"] = {
            "features": f,
            **PML,
            "loss": "multi_similarity",
            "bnneck": True,
        }
        out[f"{f}/linear-arcface-m8x16"] = {"features": f, **PML, "head_type": "linear", "loss": "arcface"}
    return out


def train_embed(features: dict, table: pd.DataFrame, config: dict, seeds, refit_from: pd.DataFrame | None = None):
    """Embeddings of all rows for each seed (trained on the table's training rows, or on train + val)."""
    options = {k: v for k, v in config.items() if k != "features"}
    out = []
    for seed in seeds:
        if refit_from is None:
            emb, _, _ = train_head_on_features(
                features[config["features"]], table, seed=seed, progress=False, **options
            )
        else:
            emb, _, _ = study.refit_on_train_val(
                features[config["features"]], refit_from, table, seed=seed, progress=False, **options
            )
        out.append(emb)
    return out


def validation_stage(features, val, configs, seeds) -> tuple[pd.DataFrame, dict]:
    rows, embeddings = [], {}
    for name, config in configs.items():
        start = time.time()
        embs = train_embed(features, val, config, seeds)
        per_seed = [study.query_scores(val, e) for e in embs]
        r1 = [s["recall@1"].mean() for s in per_seed]
        mapr = [s["ap@r"].mean() for s in per_seed]
        ens = postprocess.l2_normalize(np.concatenate(embs, axis=1))
        ens_scores = study.query_scores(val, ens)
        embeddings[name] = embs
        row = {
            "config": name,
            "val recall@1 mean": np.mean(r1),
            "val recall@1 std": np.std(r1, ddof=1),
            "val map@r mean": np.mean(mapr),
            "val map@r std": np.std(mapr, ddof=1),
            **{f"seed-ens {k}": v for k, v in study.intervals_row(ens_scores).items()},
            "seconds": round(time.time() - start, 1),
        }
        rows.append(row)
        print(
            f"{name:45s} R@1 {row['val recall@1 mean']:.3f}±{row['val recall@1 std']:.3f}  mAP@R "
            f"{row['val map@r mean']:.3f}  seed-ens R@1 {row['seed-ens recall@1']:.3f}  ({row['seconds']} s)",
            flush=True,
        )
    return pd.DataFrame(rows).set_index("config"), embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--out", default="runs/quality_sweep")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="keep only configurations whose name contains one of these (the test baseline always stays)",
    )
    parser.add_argument("--flip", action="store_true", help="flip-averaged features (twice the extraction)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    val, test, note = load_protocols("clothing")
    print(note, flush=True)
    features = load_features(args, val)
    configs = candidates(list(features))
    base_name = f"{'ens' if 'ens' in features else next(iter(features))}/baseline-linear-triplet-pk16x4"
    if args.only:
        configs = {n: c for n, c in configs.items() if n == base_name or any(t in n for t in args.only)}
    table, embeddings = validation_stage(features, val, configs, args.seeds)
    table.to_csv(out / "validation.csv")

    # ---- choice on validation: single-seed mean vs seed ensemble, whichever is higher on val Recall@1
    best = table["val recall@1 mean"].idxmax()
    use_seed_ens = table.loc[best, "seed-ens recall@1"] > table.loc[best, "val recall@1 mean"]
    best_emb = (
        postprocess.l2_normalize(np.concatenate(embeddings[best], axis=1)) if use_seed_ens else embeddings[best][0]
    )
    post = study.postprocessing_sweep(val, best_emb)
    post.to_csv(out / "postprocessing_val.csv", index=False)
    print(post.round(3).to_string(), flush=True)
    chosen_post = post.loc[post["recall@1"].idxmax()]
    params = study._parse_params(chosen_post["params"])
    print(
        f"chosen on validation: {best} (seed ensemble: {use_seed_ens}), post-processing "
        f"{chosen_post['method']} {params}",
        flush=True,
    )

    # ---- test, once: the frozen baseline and the chosen configuration refit on train + validation
    test_rows = []
    base_emb = train_embed(features, test, configs[base_name], [args.seeds[0]])[0]
    base_scores = study.query_scores(test, base_emb)
    test_rows.append(
        {
            "system": f"baseline (book): {base_name}, train only, seed {args.seeds[0]}",
            **study.intervals_row(base_scores),
        }
    )
    seeds = args.seeds if use_seed_ens else [args.seeds[0]]
    refit = train_embed(features, test, configs[best], seeds, refit_from=val)
    chosen_emb = postprocess.l2_normalize(np.concatenate(refit, axis=1))
    plain = study.query_scores(test, chosen_emb)
    test_rows.append({"system": f"chosen: {best}, refit train+val, seeds {seeds}", **study.intervals_row(plain)})
    final = study.postprocessed_scores(test, chosen_emb, chosen_post["method"], **params)
    test_rows.append({"system": f"chosen + {chosen_post['method']} {params}", **study.intervals_row(final)})
    test_table = pd.DataFrame(test_rows)
    test_table.to_csv(out / "test.csv", index=False)
    paired = stats.compare_scores(final, base_scores)
    print(test_table.round(3).to_string(), "\npaired (final - baseline):\n", paired.round(4).to_string(), flush=True)
    summary = {
        "chosen": best,
        "seed_ensemble": bool(use_seed_ens),
        "postprocessing": chosen_post["method"],
        "postprocessing_params": params,
        "test": test_rows,
        "paired_vs_baseline": paired.to_dict("index"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()

"""fashlib.evaluation: best row of a results table, per-query first-hit ranks and the hardest queries."""

import numpy as np
import pandas as pd
import pytest

from fashlib import evaluation, postprocess


def test_pick_best_uses_recall_then_map_as_tie_break():
    frame = pd.DataFrame(
        {"recall@1": [0.5, 0.7, 0.7, np.nan], "map@r": [0.9, 0.2, 0.3, 0.99]}, index=["a", "b", "c", "d"]
    )
    assert evaluation.pick_best(frame) == "c"
    assert evaluation.pick_best(frame, by=("map@r",)) == "d"
    with pytest.raises(ValueError):
        evaluation.pick_best(frame.iloc[:0])


def _rows(labels, splits):
    return pd.DataFrame({"path": [f"/img/{i}.jpg" for i in range(len(labels))], "label": labels, "split": splits})


def test_first_hit_ranks_and_hardest_queries_match_a_brute_force_ranking():
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "a", "b", "c", "z"] + list("abcabc")
    splits = ["query"] * 7 + ["gallery"] * 6
    table = _rows(labels, splits)
    emb = postprocess.l2_normalize(rng.normal(size=(13, 4)))
    ranks = evaluation.first_hit_ranks(table, emb, max_k=50)
    assert ranks["row"].tolist() == list(range(7))
    gallery = np.arange(7, 13)
    for row, rank in zip(ranks["row"], ranks["rank"]):
        order = gallery[np.argsort(-(emb[gallery] @ emb[row]), kind="stable")]
        hits = [i + 1 for i, g in enumerate(order) if labels[g] == labels[row]]
        assert rank == (hits[0] if hits else 0)
    assert ranks.loc[ranks["row"] == 6, "rank"].item() == 0  # label "z" has no gallery image
    # recall@1 agrees with the share of rank-1 hits
    assert np.isclose((ranks["rank"] == 1).mean(), evaluation.evaluate(table, emb, ks=(1,))["recall@1"])
    hardest = evaluation.hardest_queries(ranks, 3)
    assert hardest["row"].iloc[0] == 6  # missing from the top K comes first
    assert hardest["rank"].iloc[1:].tolist() == sorted(ranks.loc[ranks["rank"] > 0, "rank"], reverse=True)[:2]

"""fashlib.evaluation: the one-search Retrieval against brute force, its users, pick_best, first-hit ranks."""

import numpy as np
import pandas as pd
import pytest

from fashlib import evaluation, metrics, postprocess, runs, stats, study


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


# ------------------------------------------------------------------------------------------ Retrieval
def _brute_force(q, q_lab, g, g_lab):
    """Plain numpy: every gallery item ranked per query (score descending, ties by gallery position), label
    matches and R. Integer embeddings keep every inner product exact, so ties are exact too."""
    order = np.argsort(-(q.astype(np.float64) @ g.astype(np.float64).T), axis=1, kind="stable")
    match = g_lab[order] == q_lab[:, None]
    return order, match, (g_lab[None, :] == q_lab[:, None]).sum(axis=1)


def _brute_ap(match_row, r):
    hits = np.flatnonzero(match_row[:r])
    return sum((j + 1) / (i + 1) for j, i in enumerate(hits)) / r


def _integer_case(seed, n_query, n_gallery, n_labels, query_labels_extra=0, dim=3):
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, size=(n_query, dim)).astype(np.float32)  # {-1, 0, 1}: many exact ties
    g = rng.integers(-1, 2, size=(n_gallery, dim)).astype(np.float32)
    q_lab = np.array([f"l{i}" for i in rng.integers(0, n_labels + query_labels_extra, n_query)])
    g_lab = np.array([f"l{i}" for i in rng.integers(0, n_labels, n_gallery)])
    return q, q_lab, g, g_lab


def test_retrieval_matches_brute_force_with_ties_a_small_gallery_and_queries_without_relevant_items():
    q, q_lab, g, g_lab = _integer_case(0, n_query=40, n_gallery=20, n_labels=5, query_labels_extra=2)
    order, match, r = _brute_force(q, q_lab, g, g_lab)
    assert (r == 0).sum() >= 3 and (r > 0).sum() >= 20  # labels l5, l6 have no gallery item
    found = evaluation.Retrieval.from_arrays(q, q_lab, g, g_lab, max_k=50)  # gallery (20) < max_k
    assert found.depth == 20 and found.relevant.tolist() == r.tolist()
    np.testing.assert_array_equal(found.indices, order)
    assert found.recall(range(1, 21)) == {k: match[:, :k].any(axis=1).sum() / 40 for k in range(1, 21)}
    assert found.curve() == found.recall(range(1, 21)) and list(found.curve(7)) == list(range(1, 8))
    aps = [_brute_ap(m, n) for m, n in zip(match, r) if n > 0]
    assert found.map_at_r() == pytest.approx(np.mean(aps), rel=1e-12, abs=0)
    first = np.where(match.any(axis=1), match.argmax(axis=1) + 1, 0)
    ranks = found.first_hit_ranks()
    assert ranks["rank"].tolist() == first.tolist() and ranks["row"].tolist() == list(range(40))
    assert (ranks.loc[r == 0, "rank"] == 0).all()  # no relevant item: never found
    assert found.first_hit_ranks(3)["rank"].tolist() == np.where(first <= 3, first, 0).tolist()
    per_query = found.per_query(ks=(1, 5))
    assert per_query["recall@5"].tolist() == match[:, :5].any(axis=1).astype(float).tolist()
    assert per_query["ap@r"].isna().tolist() == (r == 0).tolist()
    np.testing.assert_allclose(per_query["ap@r"].dropna(), aps, rtol=1e-12)
    with pytest.warns(UserWarning, match=r"K = \[50\] left out: the gallery has only 20"):
        assert list(found.metrics()) == ["recall@1", "recall@5", "recall@10", "recall@20", "map@r"]
    with pytest.raises(ValueError, match="larger than the gallery"):
        found.recall([21])


def test_retrieval_searches_deep_enough_for_map_at_r_and_says_when_a_reading_is_deeper():
    q, q_lab, g, g_lab = _integer_case(1, n_query=30, n_gallery=150, n_labels=2)  # R is about 75 > max_k
    order, match, r = _brute_force(q, q_lab, g, g_lab)
    found = evaluation.Retrieval.from_arrays(q, q_lab, g, g_lab, max_k=10)
    assert found.depth == r.max() > 10
    np.testing.assert_array_equal(found.indices, order[:, : found.depth])
    assert found.map_at_r() == pytest.approx(np.mean([_brute_ap(m, n) for m, n in zip(match, r)]), rel=1e-12, abs=0)
    assert list(found.curve()) == list(range(1, 11)) and len(found.first_hit_ranks()) == 30
    with pytest.raises(ValueError, match=f"max_k >= {found.depth + 1}"):
        found.recall([found.depth + 1])


def test_retrieval_of_queries_that_have_no_relevant_gallery_item():
    q, _, g, g_lab = _integer_case(2, n_query=6, n_gallery=8, n_labels=3)
    found = evaluation.Retrieval.from_arrays(q, np.array(["none"] * 6), g, g_lab, max_k=5)
    assert found.map_at_r() == 0.0 and found.recall([1, 5]) == {1: 0.0, 5: 0.0}
    assert found.first_hit_ranks()["rank"].tolist() == [0] * 6
    assert found.per_query((1,))["ap@r"].isna().all()
    assert found.map_at_r() == metrics.map_at_r(q, np.array(["none"] * 6), g, g_lab)


def test_every_evaluation_user_reads_the_same_numbers_as_the_separate_searches(tmp_path):
    rng = np.random.default_rng(3)
    labels = [f"c{i}" for i in rng.integers(0, 12, 60)] + [f"c{i}" for i in rng.integers(0, 10, 40)]
    table = _rows(labels, ["query"] * 60 + ["gallery"] * 40)
    emb = np.round(rng.normal(size=(100, 6)), 1).astype(np.float32)  # float ties
    q, g, lab = emb[:60], emb[60:], np.array(labels)
    found = evaluation.retrieve(table, emb, max_k=50)
    assert found.query_rows.tolist() == list(range(60)) and found.gallery_rows.tolist() == list(range(60, 100))
    with pytest.warns(UserWarning, match="left out"):
        result = evaluation.evaluate(table, emb)
    recall = metrics.recall_at_k(q, lab[:60], g, lab[60:], ks=(1, 5, 10, 20))
    map_r = metrics.map_at_r(q, lab[:60], g, lab[60:])
    assert result == {**{f"recall@{k}": v for k, v in recall.items()}, "map@r": map_r}
    assert evaluation.recall_curve(table, emb) == metrics.recall_at_k(q, lab[:60], g, lab[60:], ks=range(1, 41))
    pd.testing.assert_frame_equal(evaluation.first_hit_ranks(table, emb, max_k=7), found.first_hit_ranks(7))
    scores = study.query_scores(table, emb, ks=(1, 5))
    pd.testing.assert_frame_equal(scores, stats.per_query_scores(q, lab[:60], g, lab[60:], ks=(1, 5)), check_exact=True)
    assert scores["recall@1"].mean() == result["recall@1"] and scores["ap@r"].mean() == pytest.approx(result["map@r"])
    folder = runs.save_run(tmp_path, "run", table, emb, result)
    assert runs.check_run(folder, ks=(1, 5, 10, 20)) == result


def test_retrieval_arrays_are_read_only_and_the_callers_stay_writable():
    q, q_lab, g, g_lab = _integer_case(4, n_query=5, n_gallery=6, n_labels=2)
    found = evaluation.Retrieval.from_arrays(q, q_lab, g, g_lab, max_k=3)
    with pytest.raises(ValueError, match="read-only"):
        found.matches[0, 0] = True
    q_lab[0] = "changed"  # the caller's labels were copied, not frozen
    assert found.query_labels[0] != "changed"
    with pytest.raises(ValueError, match="max_k must be an integer"):
        evaluation.Retrieval.from_arrays(q, q_lab, g, g_lab, max_k=2.5)


def test_retrieval_examples_read_from_the_retrieval_show_the_ranking_the_ranks_came_from():
    from fashlib import analysis

    rng = np.random.default_rng(5)
    labels = [f"c{i}" for i in rng.integers(0, 4, 30)]
    table = _rows(labels, ["query"] * 10 + ["gallery"] * 20).assign(category=labels)
    emb = postprocess.l2_normalize(rng.normal(size=(30, 8)))
    found = evaluation.retrieve(table, emb, max_k=5)
    hardest = found.hardest(3)
    shown = analysis.retrieval_examples(table, emb, hardest["row"], k=5, retrieval=found)
    assert shown == analysis.retrieval_examples(table, emb, hardest["row"], k=5)  # no ties: the same search
    for correct, rank in zip(shown["correct"], hardest["rank"]):
        assert (correct.index(True) + 1 if True in correct else 0) == rank
    gallery_rows, _ = found.ranked([2], 3)
    order = 10 + np.argsort(-(emb[10:] @ emb[2]), kind="stable")[:3]
    assert gallery_rows.tolist() == [order.tolist()]
    with pytest.raises(ValueError, match=r"rows \[12\] are not queries"):
        found.ranked([12], 3)


def test_embeddings_of_another_length_than_the_table_are_refused(tmp_path):
    from fashlib import runs

    table = pd.DataFrame(
        {"split": ["query", "gallery", "gallery", "train"], "label": ["a", "a", "b", "a"], "path": list("wxyz")}
    )
    good = np.eye(4, dtype=np.float32)
    assert evaluation.evaluate(table, good, ks=(1,))["recall@1"] == 1.0  # a tie, broken by gallery order: row 1 (a)
    for bad in (np.vstack([good, good[:1]]), good[:3], good[:, 0]):  # padded (silently wrong before), cut, 1-D
        with pytest.raises(ValueError, match="one row per table row"):
            evaluation.evaluate(table, bad, ks=(1,))
        with pytest.raises(ValueError, match="one row per table row"):
            runs.save_run(tmp_path, "r", table, bad, {"recall@1": 0.0})

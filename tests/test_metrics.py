"""Retrieval metrics: cross-checked against brute-force numpy and PML's AccuracyCalculator."""

import numpy as np
import pytest
import torch

from fashlib import metrics

DIM = 24


def _normalise(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(seed: int, n: int, classes: int, noise: float = 0.9, dim: int = DIM):
    """Unit vectors scattered around class centres: retrieval is neither trivial nor random."""
    centres = np.random.default_rng(1234).standard_normal((classes, dim))  # shared by query and gallery
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return _normalise(centres[labels] + noise * rng.standard_normal((n, dim))), labels


def _brute_ranking(q, g, exclude_self=False):
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return order[:, : g.shape[0] - int(exclude_self)], sims


def _brute_recall(q, ql, g, gl, ks, exclude_self=False):
    order, _ = _brute_ranking(q, g, exclude_self)
    out = {}
    for k in ks:
        out[k] = float(np.mean([np.any(gl[order[i, :k]] == ql[i]) for i in range(len(q))]))
    return out


def _brute_map_at_r(q, ql, g, gl, exclude_self=False):
    order, _ = _brute_ranking(q, g, exclude_self)
    aps = []
    for i in range(len(q)):
        rel_all = gl == ql[i]
        if exclude_self:
            rel_all[i] = False
        r = int(rel_all.sum())
        if r == 0:
            continue
        rel = rel_all[order[i, :r]]
        aps.append(sum(rel[: j + 1].sum() / (j + 1) for j in range(r) if rel[j]) / r)
    return float(np.mean(aps))


@pytest.fixture(scope="module")
def data():
    gallery, g_lab = _clustered(0, 600, 40)
    query, q_lab = _clustered(1, 150, 40)
    return query, q_lab, gallery, g_lab


def test_search_matches_brute_force(data):
    query, _, gallery, _ = data
    scores, idx = metrics.search(query, gallery, k=20)
    order, sims = _brute_ranking(query, gallery)
    assert scores.shape == idx.shape == (150, 20) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, order[:, :20])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, order[:, :20], 1), atol=1e-5)


def test_search_accepts_torch_and_float64(data):
    query, _, gallery, _ = data
    s1, i1 = metrics.search(torch.from_numpy(query).double(), torch.from_numpy(gallery), k=5)
    s2, i2 = metrics.search(query, gallery.astype(np.float64)[:, :], k=5)
    np.testing.assert_array_equal(i1, i2)
    # non-contiguous input is fine too
    wide = np.repeat(gallery, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(metrics.search(query, wide, k=5)[1], i2)


@pytest.mark.parametrize("ks", [(1, 5, 10, 20, 50), (3,)])
def test_recall_at_k_matches_brute_force(data, ks):
    query, q_lab, gallery, g_lab = data
    got = metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=ks)
    assert list(got) == sorted(ks)
    assert got == pytest.approx(_brute_recall(query, q_lab, gallery, g_lab, ks))
    assert 0.05 < got[min(ks)] < 1.0
    values = list(got.values())
    assert values == sorted(values)


def test_string_and_torch_labels(data):
    query, q_lab, gallery, g_lab = data
    as_int = metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1, 10))
    as_str = metrics.recall_at_k(
        query, [f"item_{x}" for x in q_lab], gallery, np.array([f"item_{x}" for x in g_lab]), ks=(1, 10)
    )
    as_torch = metrics.recall_at_k(
        torch.from_numpy(query), torch.from_numpy(q_lab), torch.from_numpy(gallery), torch.from_numpy(g_lab), ks=(1, 10)
    )
    assert as_int == as_str == as_torch
    assert metrics.map_at_r(query, q_lab.astype(str), gallery, g_lab.astype(str)) == pytest.approx(
        metrics.map_at_r(query, q_lab, gallery, g_lab)
    )


def test_map_at_r_matches_brute_force(data):
    query, q_lab, gallery, g_lab = data
    got = metrics.map_at_r(query, q_lab, gallery, g_lab)
    assert got == pytest.approx(_brute_map_at_r(query, q_lab, gallery, g_lab), abs=1e-9)
    assert 0.02 < got < 0.9


def test_map_at_r_hand_example():
    # query label a; gallery ranked by score: a, b, a, a  -> R = 3, rel = 1,0,1 -> (1 + 2/3) / 3
    q = np.array([[1.0, 0.0]])
    g = _normalise(np.array([[1.0, 0.01], [1.0, 0.2], [1.0, 0.5], [1.0, 0.9]]))
    assert metrics.map_at_r(q, ["a"], g, ["a", "b", "a", "a"]) == pytest.approx((1 + 2 / 3) / 3)
    # queries without relevant items are left out; all left out -> 0.0
    assert metrics.map_at_r(np.vstack([q, q]), ["a", "z"], g, ["a", "b", "a", "a"]) == pytest.approx((1 + 2 / 3) / 3)
    assert metrics.map_at_r(q, ["z"], g, ["a", "b", "a", "a"]) == 0.0
    # while recall counts them as misses
    assert metrics.recall_at_k(np.vstack([q, q]), ["a", "z"], g, ["a", "b", "a", "a"], ks=(1,)) == {1: 0.5}


def test_exclude_self(data):
    _, _, gallery, g_lab = data
    got = metrics.recall_at_k(gallery, g_lab, gallery, g_lab, ks=(1, 5, 10), exclude_self=True)
    assert got == pytest.approx(_brute_recall(gallery, g_lab, gallery, g_lab, (1, 5, 10), exclude_self=True))
    # without exclusion every item finds itself first
    assert metrics.recall_at_k(gallery, g_lab, gallery, g_lab, ks=(1,))[1] == 1.0
    nb = metrics.neighbours(gallery, gallery, k=7, exclude_self=True)
    assert not (nb.indices == np.arange(len(gallery))[:, None]).any()
    order, _ = _brute_ranking(gallery, gallery, exclude_self=True)
    np.testing.assert_array_equal(nb.indices, order[:, :7])
    assert metrics.map_at_r(gallery, g_lab, gallery, g_lab, exclude_self=True) == pytest.approx(
        _brute_map_at_r(gallery, g_lab, gallery, g_lab, exclude_self=True), abs=1e-9
    )


def test_exclude_self_is_by_position_even_with_duplicates():
    # rows 0 and 1 are identical: query 0 must drop row 0 (itself) and keep its twin, row 1
    g = _normalise(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    nb = metrics.neighbours(g, g, k=2, query_labels=[0, 0, 1], gallery_labels=[0, 0, 1], exclude_self=True)
    assert nb.indices[0, 0] == 1 and nb.indices[1, 0] == 0
    assert nb.matches[:, 0].tolist() == [True, True, False]
    assert metrics.recall_at_k(g, [0, 0, 1], g, [0, 0, 1], ks=(1, 2), exclude_self=True) == {1: 2 / 3, 2: 2 / 3}
    assert metrics.map_at_r(g, [0, 0, 1], g, [0, 0, 1], exclude_self=True) == 1.0  # row 2 has R = 0


def test_neighbours_matches_and_scores(data):
    query, q_lab, gallery, g_lab = data
    nb = metrics.neighbours(query, gallery, k=4, query_labels=q_lab, gallery_labels=g_lab)
    assert nb.matches.dtype == bool and nb.matches.shape == (150, 4)
    np.testing.assert_array_equal(nb.matches, g_lab[nb.indices] == q_lab[:, None])
    assert (np.diff(nb.scores, axis=1) <= 1e-6).all()
    assert metrics.neighbours(query, gallery, k=4).matches is None


def test_errors(data):
    query, q_lab, gallery, g_lab = data
    with pytest.raises(ValueError, match="query_labels"):
        metrics.recall_at_k(query, q_lab[:-1], gallery, g_lab)
    with pytest.raises(ValueError, match="gallery_labels"):
        metrics.map_at_r(query, q_lab, gallery, g_lab[:10])
    with pytest.raises(ValueError, match="empty"):
        metrics.search(query, gallery[:0], k=1)
    with pytest.raises(ValueError, match="empty"):
        metrics.recall_at_k(query, q_lab, gallery[:0], g_lab[:0])
    with pytest.raises(ValueError, match="larger than the gallery"):
        metrics.search(query, gallery[:10], k=11)
    with pytest.raises(ValueError, match="larger than the gallery"):
        metrics.recall_at_k(query, q_lab, gallery[:30], g_lab[:30])  # default ks reach 50
    with pytest.raises(ValueError, match="once self is excluded"):
        metrics.neighbours(gallery[:5], gallery[:5], k=5, exclude_self=True)
    with pytest.raises(ValueError, match="2-D"):
        metrics.search(query[0], gallery, k=1)
    with pytest.raises(ValueError, match="2-D"):
        metrics.search(query, gallery[None], k=1)
    with pytest.raises(ValueError, match="dim"):
        metrics.search(query[:, :10], gallery, k=1)
    with pytest.raises(ValueError, match="row for row"):
        metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1,), exclude_self=True)
    with pytest.raises(ValueError, match="unknown index"):
        metrics.search(query, gallery, k=1, index="lsh")
    with pytest.raises(ValueError, match="positive"):
        metrics.search(query, gallery, k=0)


@pytest.mark.parametrize(
    "index,options,floor",
    [
        ("ivf", {"nlist": 12, "nprobe": 12}, 1.0),  # visiting every cell is exact
        ("ivf", {"nlist": 12, "nprobe": 3}, 0.5),
        ("hnsw", {"M": 16, "efSearch": 64}, 0.9),
    ],
)
def test_approximate_indexes_recall(data, index, options, floor, capsys):
    query, q_lab, gallery, g_lab = data
    recall = metrics.index_recall(query, gallery, 10, index=index, **options)
    with capsys.disabled():
        print(f"\n  index_recall@10 {index} {options}: {recall:.3f}")
    assert floor <= recall <= 1.0
    approx = metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1, 10), index=index, **options)
    exact = metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1, 10))
    assert abs(approx[10] - exact[10]) <= 1 - floor + 1e-9
    assert metrics.index_recall(query, gallery, 10, index="flat") == 1.0


def test_pml_accuracy_calculator_agrees(data):
    calc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    query, q_lab, gallery, g_lab = data
    # every query label present in the gallery, so precision@1 == recall@1
    present = np.isin(q_lab, g_lab)
    query, q_lab = query[present], q_lab[present]
    calc = calc_mod.AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"))
    acc = calc.get_accuracy(
        torch.from_numpy(query), torch.from_numpy(q_lab), torch.from_numpy(gallery), torch.from_numpy(g_lab)
    )
    assert metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1,))[1] == pytest.approx(
        acc["precision_at_1"], abs=1e-6
    )
    assert metrics.map_at_r(query, q_lab, gallery, g_lab) == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-6)
    # the gallery against itself: PML's ref_includes_query == our exclude_self
    acc = calc.get_accuracy(
        torch.from_numpy(gallery),
        torch.from_numpy(g_lab),
        torch.from_numpy(gallery),
        torch.from_numpy(g_lab),
        ref_includes_query=True,
    )
    ours = metrics.map_at_r(gallery, g_lab, gallery, g_lab, exclude_self=True)
    assert ours == pytest.approx(acc["mean_average_precision_at_r"], abs=1e-6)
    lone = np.array([np.sum(g_lab == x) == 1 for x in g_lab])  # PML leaves singletons out of precision@1
    r1 = metrics.neighbours(gallery, gallery, k=1, query_labels=g_lab, gallery_labels=g_lab, exclude_self=True).matches[
        :, 0
    ]
    assert r1[~lone].mean() == pytest.approx(acc["precision_at_1"], abs=1e-6)


@pytest.mark.skipif(metrics.faiss is None, reason="faiss not installed")
def test_exact_search_ranks_as_faiss_flat_without_ties():
    """Exact search (numpy, the module's tie rule) ranks exactly as faiss.IndexFlatIP on tie-free data."""
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    query = rng.normal(size=(40, 16)).astype(np.float32)
    index = metrics.faiss.IndexFlatIP(16)
    index.add(gallery)
    want_scores, want_idx = index.search(query, 10)
    got_scores, got_idx = metrics.ExactIP(gallery, block=7).search(query, 10)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- one tie rule


@pytest.mark.parametrize("k", [1, 2, 3, 7, 19, 20])
def test_top_k_stable_is_a_prefix_of_the_stable_sort(k):
    scores = np.random.default_rng(k).integers(0, 4, size=(50, 20)).astype(np.float32)  # many ties
    scores[0] = 1.0  # a fully collapsed row
    got_scores, got_idx = metrics.top_k_stable(scores, k)
    want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got_idx, want)
    np.testing.assert_array_equal(got_scores, np.take_along_axis(scores, want, 1))


@pytest.fixture(params=["faiss", "numpy"])
def faiss_or_not(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(metrics, "faiss", None)
    elif metrics.faiss is None:
        pytest.skip("faiss not installed")
    return request.param


def test_collapsed_model_recall_independent_of_ks(faiss_or_not):
    """All scores equal: the ranking is the gallery in file order, whatever ks and whatever is installed."""
    gallery = np.ones((6, 4), dtype=np.float32) / 2
    query = np.ones((5, 4), dtype=np.float32) / 2
    g_lab = np.array([7, 3, 3, 9, 1, 1])
    q_lab = np.array([3, 3, 7, 1, 9])
    # by hand: top-1 is gallery row 0 (label 7), top-2 rows 0-1 (7, 3), top-4 rows 0-3 (7, 3, 3, 9)
    want = {1: 1 / 5, 2: 3 / 5, 4: 4 / 5}
    assert metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1,)) == {1: want[1]}
    assert metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1, 2)) == {1: want[1], 2: want[2]}
    assert metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(4, 1, 2)) == want
    assert metrics.search(query, gallery, k=3)[1].tolist() == [[0, 1, 2]] * 5
    # exclude_self: row i is removed, the rest stays in file order
    nb = metrics.neighbours(gallery, gallery, k=2, exclude_self=True)
    assert nb.indices.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]
    # MAP@R (R = 2 for label 3): ranks 1-2 are rows 0, 1 -> one hit at rank 2 -> AP = (1/2) / 2
    assert metrics.map_at_r(query[:1], q_lab[:1], gallery, g_lab) == pytest.approx(0.25)


def test_partial_ties_same_with_and_without_faiss(data, monkeypatch):
    query, q_lab, gallery, g_lab = data
    coarse_q, coarse_g = np.round(query * 2) / 2, np.round(gallery * 2) / 2  # many equal scores
    with_faiss = metrics.recall_at_k(coarse_q, q_lab, coarse_g, g_lab, ks=(1, 5, 10))
    singles = {k: metrics.recall_at_k(coarse_q, q_lab, coarse_g, g_lab, ks=(k,))[k] for k in (1, 5, 10)}
    monkeypatch.setattr(metrics, "faiss", None)
    assert metrics.recall_at_k(coarse_q, q_lab, coarse_g, g_lab, ks=(1, 5, 10)) == with_faiss == singles
    scores = coarse_q.astype(np.float64) @ coarse_g.T.astype(np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(metrics.search(coarse_q, coarse_g, k=10)[1], order)


# ---------------------------------------------------------------- bad inputs


def test_non_finite_rows_are_an_error_naming_count_and_rows(data):
    query, q_lab, gallery, g_lab = data
    bad = query.copy()
    bad[[3, 40]] = np.nan
    bad[41, 0] = np.inf
    with pytest.raises(ValueError, match=r"query has 3 of 150 rows with NaN or infinite values \(rows \[3, 40, 41\]"):
        metrics.recall_at_k(bad, q_lab, gallery, g_lab, ks=(1,))
    with pytest.raises(ValueError, match=r"gallery has 1 of 600 rows"):
        metrics.search(query, np.where(np.arange(600)[:, None] == 7, np.nan, gallery), k=1)
    with pytest.raises(ValueError, match="NaN"):
        metrics.map_at_r(bad, q_lab, gallery, g_lab)
    as_bf16 = metrics.search(torch.from_numpy(query).bfloat16(), gallery, k=3)[1]  # accepted, no numpy bf16
    assert as_bf16.shape == (150, 3)


def test_labels_that_can_never_match_are_an_error(data):
    query, q_lab, gallery, g_lab = data
    with pytest.raises(ValueError, match=r"query labels \(number.*can never equal gallery labels \(text"):
        metrics.recall_at_k(query, q_lab, gallery, g_lab.astype(str), ks=(1,))
    with pytest.raises(ValueError, match="can never equal"):
        metrics.map_at_r(query, q_lab.astype(object).astype(str).astype(object), gallery, g_lab)
    with pytest.raises(ValueError, match="can never equal"):
        metrics.neighbours(
            query, gallery, k=1, query_labels=list(map(str, q_lab)), gallery_labels=torch.from_numpy(g_lab)
        )
    same = metrics.recall_at_k(query, q_lab, gallery, g_lab, ks=(1,))
    assert metrics.recall_at_k(query, q_lab.astype(float), gallery, g_lab, ks=(1,)) == same  # numbers compare
    assert metrics.recall_at_k(query, q_lab.astype(str), gallery, g_lab.astype(str).astype(object), ks=(1,)) == same


@pytest.mark.skipif(metrics.faiss is None, reason="faiss not installed")
def test_search_never_returns_missing_ids_silently(data):
    query, _, gallery, _ = data
    with pytest.warns(
        metrics.IncompleteSearchWarning, match=r"fewer than k=200 gallery rows for \d+ of 150 queries.*nprobe"
    ):
        _, idx = metrics.search(query, gallery, k=200, index="ivf", nlist=12, nprobe=1)
    assert (idx < 0).any()


# ---------------------------------------------------------------- inputs that used to give silent wrong numbers


def _three_queries():
    base = np.eye(3, DIM)
    gallery = _normalise(np.concatenate([base, base + 0.1 * np.eye(3, DIM, k=3)]))  # rows 3-5 near rows 0-2
    return gallery[:3].copy(), np.array([0, 1, 2]), gallery, np.array([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("ks", [(0, 5), (-1, 2), (1.7,), (1, True), "15", ()])
def test_recall_cutoffs_that_are_not_positive_integers_are_refused(ks):
    # (0, 5) used to return {0: Recall@5}; "15" was read as (1, 5)
    q, ql, g, gl = _three_queries()
    with pytest.raises(ValueError, match="ks must be"):
        metrics.recall_at_k(q, ql, g, gl, ks=ks)


def test_a_single_int_cutoff_is_one_k():
    q, ql, g, gl = _three_queries()
    assert metrics.recall_at_k(q, ql, g, gl, ks=2) == {2: 1.0}


def test_text_labels_against_bytes_labels_are_refused():
    # numpy never finds 'a' == b'a': Recall@1 was 0.0 on a perfect ranking
    q, ql, g, gl = _three_queries()
    with pytest.raises(ValueError, match="can never equal"):
        metrics.recall_at_k(q, ql.astype(str), g, gl.astype(str).astype("S"), ks=(1,))
    with pytest.raises(ValueError, match="can never equal"):
        metrics.map_at_r(q, ql.astype(str).astype(object), g, np.array([str(v).encode() for v in gl], dtype=object))


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0, np.nan]), np.array(["0", "1", None], dtype=object)])
def test_missing_query_labels_are_refused_not_counted_as_misses(labels):
    # a NaN / None label matched nothing: Recall@1 was 0.667 on a perfect ranking
    q, _, g, gl = _three_queries()
    gallery_labels = gl.astype(labels.dtype) if labels.dtype != object else gl.astype(str).astype(object)
    with pytest.raises(ValueError, match=r"query_labels has 1 missing label\(s\) .* rows \[2\]"):
        metrics.recall_at_k(q, labels, g, gallery_labels, ks=(1,))
    with pytest.raises(ValueError, match="missing label"):
        metrics.map_at_r(q, labels, g, gallery_labels)


def test_map_at_r_counts_relevant_items_for_mixed_label_objects():
    # object labels mixing ints and strings used to crash np.unique; the value must equal brute force
    q, ql, g, gl = _three_queries()
    mixed = lambda a: np.array([int(v) if v % 2 else f"s{v}" for v in a], dtype=object)  # noqa: E731
    assert metrics.map_at_r(q, mixed(ql), g, mixed(gl)) == pytest.approx(1.0)


def test_float64_values_beyond_float32_are_named_as_such():
    q, ql, g, gl = _three_queries()
    with pytest.raises(ValueError, match="beyond the float32 range"):
        metrics.recall_at_k(q.astype(np.float64) * 1e39, ql, g, gl, ks=(1,))

"""Post-processing steps on toy galleries whose right answer is known, and k-reciprocal re-ranking
against a dense port of the authors' code, with its memory bound."""

import tracemalloc

import numpy as np
import pytest

from fashlib import postprocess as P

# query e0; gallery: w (wrong label) ranks first, the two correct items c1, c2 second and third,
# far wrong item w2 on w's side. Labels: w=0, c1=1, c2=1, w2=0; the query's label is 1.
QUERY = P.l2_normalize([[1, 0, 0]])
GALLERY = P.l2_normalize([[1, 0.35, 0], [1, -0.4, 0.05], [1, -0.45, -0.05], [1, 0.9, 0.0]])


def test_average_views_is_renormalised_mean():
    a, b = np.array([[2.0, 0.0]]), np.array([[0.0, 1.0]])  # each view normalised first
    np.testing.assert_allclose(P.average_views([a, b]), [[2**-0.5, 2**-0.5]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(P.average_views([a, b], weights=[3, 1]), P.l2_normalize([[3, 1]]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        P.average_views([a, np.ones((2, 2))])


def test_topk_matches_argsort_and_excludes_self():
    x = P.l2_normalize(np.random.default_rng(0).normal(size=(30, 5)))
    s, i = P.topk(x, x, 4, chunk=7)
    np.testing.assert_array_equal(i, np.argsort(-(x @ x.T), axis=1, kind="stable")[:, :4])
    _, i2 = P.topk(x, x, 3, exclude_self=True, chunk=7)
    np.testing.assert_array_equal(i2, i[:, 1:4])


def test_query_expansion_fixes_rank_two_match():
    assert P.rank(QUERY, GALLERY, 4)[0].tolist() == [0, 1, 2, 3]  # the wrong item is first
    expanded = P.query_expansion(QUERY, GALLERY, k=3)
    assert P.rank(expanded, GALLERY, 4)[0, 0] == 1  # now a correct one is
    # average QE by hand: q' = normalise(q + w + c1 + c2)
    np.testing.assert_allclose(expanded, P.l2_normalize(QUERY + GALLERY[:3].sum(0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(P.query_expansion(QUERY, GALLERY, k=0), QUERY)


def test_alpha_query_expansion_weights():
    sims = (QUERY @ GALLERY.T)[0]
    expected = P.l2_normalize(QUERY + sum(sims[j] ** 3 * GALLERY[j] for j in range(2)))
    np.testing.assert_allclose(P.query_expansion(QUERY, GALLERY, k=2, alpha=3), expected, rtol=1e-5, atol=1e-6)


def test_database_augmentation_fixes_rank_two_match():
    augmented = P.database_augmentation(GALLERY, k=1)
    # by hand: each row plus its nearest OTHER row: w <-> w2 and c1 <-> c2
    sims = GALLERY @ GALLERY.T
    np.fill_diagonal(sims, -np.inf)
    expected = P.l2_normalize(GALLERY + GALLERY[sims.argmax(1)])
    np.testing.assert_allclose(augmented, expected, rtol=1e-5, atol=1e-6)
    assert P.rank(QUERY, augmented, 1)[0, 0] in (1, 2)


def test_gallery_centroids():
    g = np.array([[1.0, 0], [0, 1.0], [0, 3.0]])
    centroids, labels = P.gallery_centroids(g, ["b", "a", "b"])
    assert labels.tolist() == ["a", "b"]
    np.testing.assert_allclose(centroids, [[0, 1], [2**-0.5, 2**-0.5]], rtol=1e-5, atol=1e-6)


def _reference_rerank(q, g, k1, k2, lam):
    """Dense port of Zhong et al.'s re_ranking (github.com/zhunzhong07/person-re-ranking), distances 2-2s."""
    allf = np.concatenate([q, g]).astype(np.float64)
    nq, n = len(q), len(q) + len(g)
    dist = 2 - 2 * allf @ allf.T
    dist = np.transpose(dist / np.max(dist, axis=0))
    v = np.zeros((n, n))
    rank = np.argsort(dist, axis=1, kind="stable")
    for i in range(n):
        fw = rank[i, : k1 + 1]
        bw = rank[fw, : k1 + 1]
        recip = fw[np.where(bw == i)[0]]
        exp_idx = recip
        for c in recip:
            cf = rank[c, : int(np.around(k1 / 2)) + 1]
            cb = rank[cf, : int(np.around(k1 / 2)) + 1]
            crec = cf[np.where(cb == c)[0]]
            if len(np.intersect1d(crec, recip)) > 2 / 3 * len(crec):
                exp_idx = np.append(exp_idx, crec)
        exp_idx = np.unique(exp_idx)
        w = np.exp(-dist[i, exp_idx])
        v[i, exp_idx] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n))
    for i in range(nq):
        mins = np.minimum(v[i][None, :], v).sum(1)
        jac[i] = 1 - mins / (2 - mins)
    final = jac * (1 - lam) + dist[:nq] * lam
    return final[:, nq:]


def test_k_reciprocal_matches_dense_reference():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 6))
    q = P.l2_normalize(centres[rng.integers(0, 4, 12)] + 0.6 * rng.normal(size=(12, 6)))
    g = P.l2_normalize(centres[rng.integers(0, 4, 40)] + 0.6 * rng.normal(size=(40, 6)))
    ref = _reference_rerank(q, g, k1=8, k2=3, lam=0.3)
    d, i = P.k_reciprocal_rerank(q, g, k1=8, k2=3, lambda_value=0.3, chunk=5)
    np.testing.assert_allclose(np.take_along_axis(ref, i, 1), d, atol=1e-5)
    np.testing.assert_allclose(np.sort(ref, axis=1), d, atol=1e-5)
    d5, i5 = P.k_reciprocal_rerank(q, g, k1=8, k2=3, lambda_value=0.3, top=5, chunk=5)
    np.testing.assert_allclose(d5, d[:, :5], atol=1e-6)
    # lambda = 1 is the original ranking
    _, i1 = P.k_reciprocal_rerank(q, g, k1=8, k2=3, lambda_value=1.0)
    np.testing.assert_array_equal(i1[:, :5], P.rank(q, g, 5))


def test_k_reciprocal_memory_stays_below_dense_matrix():
    rng = np.random.default_rng(0)
    q = P.l2_normalize(rng.normal(size=(40, 16)))
    g = P.l2_normalize(rng.normal(size=(1200, 16)))
    n = len(q) + len(g)
    tracemalloc.start()
    P.k_reciprocal_rerank(q, g, k1=8, k2=3, top=20, chunk=32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dense = n * n * 4  # one float32 N x N matrix: 6.2 MB
    assert peak < dense / 2, f"peak {peak / 1e6:.1f} MB vs dense {dense / 1e6:.1f} MB"


def test_k_reciprocal_errors():
    with pytest.raises(ValueError, match="k1"):
        P.k_reciprocal_rerank(QUERY, GALLERY, k1=10)

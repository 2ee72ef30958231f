"""fashlib.analysis: split summaries, contributor overlap and leakage, box statistics, projections and
category-separation scores, checked on small hand-made tables against values computed by hand or by
independent implementations (brute-force numpy, sklearn)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fashlib import analysis


def make_table(tmp_path=None) -> pd.DataFrame:
    rows = [  # split, label, sender
        ("train", "A", 1),
        ("train", "A", 1),
        ("train", "B", 2),
        ("train", "B", 2),
        ("train", "B", 3),
        ("query", "A", 4),
        ("query", "B", 4),
        ("gallery", "A", 5),
        ("gallery", "B", 6),
        ("gallery", "B", 6),
    ]
    table = pd.DataFrame(rows, columns=["split", "label", "sender_id"])
    table["item_id"] = [f"img{i}" for i in range(len(table))]
    table["category"] = table["label"]
    table["domain"] = "consumer"
    table["path"] = [f"/nowhere/{i}.jpg" for i in range(len(table))]
    for c in ("x1", "y1", "x2", "y2"):
        table[c] = np.nan
    return table


def test_split_summary_counts_per_split():
    summary = analysis.split_summary(make_table(), group="sender_id")
    assert list(summary.index) == ["train", "query", "gallery", "all"]
    assert summary.loc["train", "images"] == 5 and summary.loc["train", "labels"] == 2
    assert summary.loc["train", "sender_ids"] == 3 and summary.loc["all", "sender_ids"] == 6
    assert summary.loc["gallery", "images/label (max)"] == 2
    assert summary.loc["all", "consumer images"] == 10


def test_count_table_sorted_with_total():
    counts = analysis.count_table(make_table(), "label")
    assert list(counts.index) == ["B", "A"]
    assert counts.loc["B", "total"] == 6 and counts.loc["A", "query"] == 1
    assert list(counts.columns) == ["train", "query", "gallery", "total"]


def test_group_overlap_disjoint_and_leaky():
    table = make_table()
    overlap = analysis.group_overlap(table, "sender_id")
    assert np.array_equal(np.diag(overlap.to_numpy()), [3, 1, 2])
    assert overlap.to_numpy().sum() == 6  # disjoint: off-diagonal all zero
    assert analysis.split_leakage(table, "sender_id") == 0.0
    table.loc[5, "sender_id"] = 1  # one query image from a training contributor
    overlap = analysis.group_overlap(table, "sender_id")
    assert overlap.loc["train", "query"] == 1 == overlap.loc["query", "train"]
    assert analysis.split_leakage(table, "sender_id") == pytest.approx(1 / 5)


def test_top_groups_shares():
    top = analysis.top_groups(make_table(), "sender_id", n=2)
    assert list(top["images"]) == [2, 2]
    assert top["cumulative share"].iloc[-1] == pytest.approx(0.4)
    assert set(top["split"]) <= {"train", "query", "gallery"}


def test_random_split_leakage_against_brute_force():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 20, size=500)
    leak = analysis.random_split_leakage(groups, (0.6, 0.2, 0.2), seed=3)
    # independent recomputation with the same draw
    part = np.random.default_rng(3).choice(3, size=500, p=[0.6, 0.2, 0.2])
    train = set(groups[part == 0].tolist())
    expected = np.mean([g in train for g in groups[part == 2]])
    assert leak == pytest.approx(expected)
    assert leak > 0.9  # few large groups: almost every held-out image leaks
    assert analysis.random_split_leakage(np.arange(500), seed=0) == 0.0  # one image per group: none


def test_image_sizes_and_box_statistics(tmp_path):
    paths = []
    for i, size in enumerate([(40, 20), (30, 30)]):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", size).save(path)
        paths.append(str(path))
    paths.append(str(tmp_path / "missing.jpg"))
    sizes = analysis.image_sizes(paths)
    assert sizes.iloc[0].tolist() == [40, 20] and sizes.iloc[2].isna().all()
    table = make_table().iloc[:3].reset_index(drop=True)
    table.loc[0, ["x1", "y1", "x2", "y2"]] = [0, 0, 20, 10]
    table.loc[1, ["x1", "y1", "x2", "y2"]] = [0, 0, 30, 15]
    stats = analysis.box_statistics(table, sizes)
    assert len(stats) == 2  # the row without a box is dropped
    assert stats["area share"].tolist() == pytest.approx([0.25, 0.5])
    assert stats["aspect"].tolist() == pytest.approx([2.0, 2.0])
    assert analysis.box_statistics(make_table()).empty


def test_examples_per_group_deterministic():
    table = make_table()
    a = analysis.examples_per_group(table, "label", per_group=2, seed=0)
    b = analysis.examples_per_group(table, "label", per_group=2, seed=0)
    assert a.index.tolist() == b.index.tolist()
    assert a["label"].value_counts().to_dict() == {"B": 2, "A": 2}


def clustered(n_per: int = 20, n_labels: int = 3, dim: int = 8, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:n_labels]
    x = np.repeat(centres, n_per, axis=0) + noise * rng.standard_normal((n_per * n_labels, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat([f"c{i}" for i in range(n_labels)], n_per)


def test_knn_purity_against_brute_force():
    x, labels = clustered(noise=0.8, seed=2)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    expected = (labels[nn] == labels[:, None]).mean()
    assert analysis.knn_purity(x, labels, k=5) == pytest.approx(expected)


def test_category_separation_clean_vs_shuffled():
    from sklearn.metrics import silhouette_score

    x, labels = clustered()
    clean = analysis.category_separation(x, labels, k=5)
    assert clean["knn purity@5"] == 1.0
    assert clean["silhouette"] == pytest.approx(silhouette_score(x, labels, metric="cosine"))
    shuffled = analysis.category_separation(x, np.random.default_rng(0).permutation(labels), k=5)
    assert shuffled["knn purity@5"] < 0.6 and shuffled["silhouette"] < clean["silhouette"]
    assert np.isnan(analysis.category_separation(x, np.full(len(x), "one"))["silhouette"])


def test_project_2d_pca_and_errors():
    x, _ = clustered()
    xy = analysis.project_2d(x, method="pca", seed=0)
    assert xy.shape == (len(x), 2) and xy.dtype == np.float32
    # independent computation: the centred rows on the two leading right-singular vectors (sign is arbitrary)
    centred = x.astype(np.float64) - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    np.testing.assert_allclose(np.abs(xy), np.abs(expected), atol=1e-4)  # sklearn works in float32
    with pytest.raises(ValueError, match="unknown projection"):
        analysis.project_2d(x, method="tsne")
    with pytest.raises(ValueError, match="at least 3"):
        analysis.project_2d(x[:2], method="pca")


def test_retrieval_examples_flags_and_paths():
    table = make_table()
    emb = np.zeros((len(table), 2), dtype=np.float32)
    emb[table["label"] == "A"] = [1, 0]
    emb[table["label"] == "B"] = [0, 1]
    emb[5] = [0, 1]  # query 5 (label A) looks like B: its top results are wrong
    shown = analysis.retrieval_examples(table, emb, [5, 6], k=2)
    assert shown["queries"] == [table.path[5], table.path[6]]
    assert shown["correct"] == [[False, False], [True, True]]
    assert all(p in set(table.path[table.split == "gallery"]) for row in shown["results"] for p in row)
    assert shown["query_titles"][0] == "query: A"

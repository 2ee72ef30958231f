"""fashlib.plots: every helper renders tiny generated images and returns a Figure of the expected shape."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from fashlib import plots  # noqa: E402


@pytest.fixture
def images(tmp_path):
    """Six tiny JPEGs of different colours and sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        arr = rng.integers(0, 255, size=(40 + 4 * i, 30, 3), dtype=np.uint8)
        p = tmp_path / f"img{i}.jpg"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def frame_colours(ax) -> set[str]:
    return {to_hex(s.get_edgecolor()) for s in ax.spines.values()}


def test_image_grid_axes_titles_and_boxes(images):
    fig = plots.image_grid(
        images[:5], titles=list("abcde"), ncols=3, boxes=[(2, 3, 20, 30), None, (np.nan,) * 4, (0, 0, 10, 10), None]
    )
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 5  # the unused sixth slot of the 2x3 grid is removed
    assert [ax.get_title() for ax in fig.axes] == list("abcde")
    boxes = [sum(isinstance(p, Rectangle) for p in ax.patches) for ax in fig.axes]
    assert boxes == [1, 0, 0, 1, 0]
    rect = next(p for p in fig.axes[0].patches if isinstance(p, Rectangle))
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (2, 3, 18, 27)
    # the image shown is the real one, pixel for pixel (each image differs: random pixels, its own height)
    for ax, path in zip(fig.axes, images[:5]):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), np.asarray(Image.open(path).convert("RGB")))


def test_image_grid_rejects_empty():
    with pytest.raises(ValueError):
        plots.image_grid([])


def test_retrieval_strip_frames(images):
    flags = [True, False, True, False]
    fig = plots.retrieval_strip(images[0], images[1:5], flags)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 5
    assert frame_colours(fig.axes[0]) == {plots.QUERY}
    for ax, ok in zip(fig.axes[1:], flags):
        assert frame_colours(ax) == {plots.CORRECT if ok else plots.WRONG}
        assert all(s.get_visible() and s.get_linewidth() >= 3 for s in ax.spines.values())
    assert plots.CORRECT == "#2ca02c" and plots.WRONG == "#d62728"


def test_retrieval_strip_length_mismatch(images):
    with pytest.raises(ValueError, match="correct flags"):
        plots.retrieval_strip(images[0], images[1:3], [True])


def test_retrieval_grid_frames_per_row(images):
    queries = images[:2]
    results = [images[2:5], images[3:5]]  # second row shorter: its spare slot is removed
    correct = [[False, True, True], [True, False]]
    fig = plots.retrieval_grid(queries, results, correct)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 * 4 - 1
    colours = [frame_colours(ax) for ax in fig.axes]
    expected = [
        {plots.QUERY},
        {plots.WRONG},
        {plots.CORRECT},
        {plots.CORRECT},
        {plots.QUERY},
        {plots.CORRECT},
        {plots.WRONG},
    ]
    assert colours == expected


def test_recall_curves():
    curves = {"triplet": {1: 0.5, 5: 0.7, 10: 0.8}, "arcface": {1: 0.6, 5: 0.75, 10: 0.85}}
    fig = plots.recall_curves(curves)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["triplet", "arcface"]
    np.testing.assert_allclose(lines[1].get_ydata(), [60, 75, 85])
    np.testing.assert_allclose(lines[0].get_xdata(), [1, 5, 10])


def test_bar_with_cost():
    df = pd.DataFrame(
        {"backbone": ["lite0", "lite1", "lite2"], "recall@1": [0.4, 0.45, 0.5], "gflops": [0.4, 0.6, 0.9]}
    )
    fig = plots.bar_with_cost(df)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    np.testing.assert_allclose(heights, [40, 45, 50])
    offsets = fig.axes[1].collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(offsets), [[0.4, 40], [0.6, 45], [0.9, 50]])


def test_training_curves():
    hist = {
        "triplet": [{"epoch": 1, "loss": 1.0, "recall@1": 0.2}, {"epoch": 2, "loss": 0.8, "recall@1": 0.3}],
        "ms": pd.DataFrame({"epoch": [1, 2, 3], "loss": [2.0, 1.5, 1.0]}),
    }
    fig = plots.training_curves(hist)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["loss", "recall@1"]
    assert len(fig.axes[0].get_lines()) == 2 and len(fig.axes[1].get_lines()) == 1


def test_embedding_scatter():
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(60, 2))
    hue = np.repeat(["shirt", "dress", "pants"], 20)
    fig = plots.embedding_scatter(xy, hue)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert len(fig.axes[0].collections[0].get_offsets()) == 60
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"shirt", "dress", "pants"}
    with pytest.raises(ValueError):
        plots.embedding_scatter(rng.normal(size=(5, 3)))


def test_figures_are_not_tracked_by_pyplot(images):
    before = plt.get_fignums()
    plots.retrieval_strip(images[0], images[1:3], [True, False])
    plots.recall_curves({"a": {1: 0.1}})
    assert plt.get_fignums() == before  # notebooks show each figure once, no leak across cells


def test_embedding_scatter_many_labels_no_legend():
    xy = np.random.default_rng(1).normal(size=(50, 2))
    fig = plots.embedding_scatter(xy, hue=np.arange(50), max_legend=20)
    assert fig.axes[0].get_legend() is None

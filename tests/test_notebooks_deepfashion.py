"""Notebooks executed with papermill on generated DeepFashion trees (fashlib.data.synthetic): no error outputs,
saved runs with metrics."""

import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

REPO = Path(__file__).resolve().parents[1]


def _execute(tmp_path, name, dataset, max_images, **parameters):
    """Run notebook `name` with papermill on a generated DeepFashion tree.

    Returns (executed notebook, its text and markdown outputs joined, the notebook's output folder)."""
    from fashlib.data import synthetic

    root, out_dir = tmp_path / "data", tmp_path / "runs"
    synthetic.make_all(root)
    output = tmp_path / f"{name}.out.ipynb"
    pm.execute_notebook(
        str(REPO / "notebooks" / f"{name}.ipynb"),
        str(output),
        cwd=str(tmp_path),
        kernel_name="python3",
        progress_bar=False,
        parameters=dict(
            dataset=dataset,
            data_root=str(root),
            max_images=max_images,
            cache_dir=str(tmp_path / "cache"),
            out_dir=str(out_dir),
            **parameters,
        ),
    )
    nb = nbformat.read(str(output), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    return nb, text, out_dir / name


def _glued(nb) -> dict[str, str]:
    """The values a notebook glued into its prose (myst-nb glue): name -> text (markdown or plain)."""
    found = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                data = out.get("data", {})
                prefix = "application/papermill.record/"
                found[name] = str(data.get(prefix + "text/markdown", data.get(prefix + "text/plain", "")))
    return found


def _saved_metrics(folder):
    files = sorted(folder.glob("*/metrics.json"))
    assert files, f"no saved run under {folder}"
    for f in files:
        metrics = json.loads(f.read_text())["metrics"]
        assert "map@r" in metrics and "recall@1" in metrics and 0.0 <= metrics["recall@1"] <= 1.0
        assert (f.parent / "embeddings.npz").exists()
    return files


def test_02_backbone_comparison_on_generated_inshop(tmp_path):
    _, text, folder = _execute(
        tmp_path,
        "02_backbone_comparison",
        "inshop",
        24,
        epochs=1,
        backbones=["tf_efficientnet_lite0"],
        random_controls=True,
        throughput_batch_size=2,
        throughput_batches=1,
        image_size=64,
    )
    names = {f.parent.name for f in _saved_metrics(folder)}
    assert names == {f"tf_efficientnet_lite0-{w}-{s}" for w in ("imagenet", "random") for s in ("frozen", "head")}
    assert "no validation protocol" in text  # inshop falls back to the test protocol and says so


@pytest.mark.parametrize("dataset", ["consumer2shop", "deepfashion2"])
def test_03_loss_comparison_on_generated_trees(tmp_path, dataset):
    _, _, folder = _execute(
        tmp_path,
        "03_loss_comparison",
        dataset,
        24,
        epochs=1,
        image_size=64,
        losses=["triplet_semi_hard", "proxy_anchor"],
        embedding_dims=[32, 256],
    )
    names = {f.parent.name for f in _saved_metrics(folder)}
    assert {"triplet_semi_hard-256", "proxy_anchor-256", "frozen-1280"} <= names
    assert any(n.endswith("-32") for n in names)  # the embedding-size ablation ran


# ---------------------------------------------------------------- 01_dataset_analysis, 04_embedding_umap
@pytest.mark.parametrize("dataset", ["inshop", "deepfashion2"])
def test_01_dataset_analysis_on_generated_trees(tmp_path, dataset):
    nb, text, _ = _execute(tmp_path, "01_dataset_analysis", dataset, 32, size_sample=16)
    glued = _glued(nb)  # the answer's numbers, glued into its prose
    assert dataset in glued["b01_dataset"] and int(glued["b01_images"]) > 0
    assert "item_ids shared by train and query/gallery: 0" in text
    assert glued["b01_crossing"] == "0"  # items never cross from training to evaluation


def test_04_embedding_umap_on_generated_consumer2shop(tmp_path):
    nb, text, folder = _execute(
        tmp_path,
        "04_embedding_umap",
        "consumer2shop",
        32,
        epochs=1,
        image_size=64,
        projection="pca",
        embedding_dim=32,
        n_examples=2,
        top_k=3,
    )
    saved = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= saved["metrics"]["recall@1"] <= 1.0 and "map@r" in saved["metrics"]
    assert "silhouette" in saved["metrics"] and "frozen" in saved["metrics"]
    assert saved["config"]["eval_split"] == "val" and (folder / "embeddings.npz").exists()
    assert "no domain colouring" not in text  # consumer queries, shop gallery: coloured by domain too
    assert "consumer2shop" in _glued(nb)["b04_setup"]  # the answer names the dataset it measured


# ---------------------------------------------------------------- 05_recall_at_k_results
@pytest.mark.parametrize("dataset,finetune", [("inshop", True), ("consumer2shop", False)])
def test_05_recall_at_k_results_on_generated_trees(tmp_path, dataset, finetune):
    """inshop: no val protocol, so selection on a held-out part of train, plus the fine-tuning path (1 epoch);
    consumer2shop: its own val protocol, head reused on test."""
    nb, text, folder = _execute(
        tmp_path,
        "05_recall_at_k_results",
        dataset,
        32,
        image_size=64,
        epochs=1,
        candidate_backbones=["tf_efficientnet_lite0"],
        ensemble=False,
        candidate_losses=["multi_similarity", "proxy_anchor"],
        finetune=finetune,
        finetune_epochs=1,
        n_examples=2,
        top_k=3,
        n_failures=2,
    )
    saved = json.loads((folder / "best_test" / "metrics.json").read_text())
    assert 0.0 <= saved["metrics"]["recall@1"] <= 1.0 and "map@r" in saved["metrics"]
    assert (folder / "best_test" / "embeddings.npz").exists() and (folder / "frozen_baseline_test").is_dir()
    assert saved["config"]["finetune"] is finetune
    if dataset == "inshop":
        assert "has no validation protocol" in text
        assert ("retraining the chosen head" in text) is (not finetune and "none" not in saved["config"]["loss"])
    assert "Published results" not in text  # the published table is for the CC0 book only
    glued = _glued(nb)  # the answer: the target compared with the measured test Recall@1
    assert glued["b05_reached"] in ("**reached**", "**not reached**") and float(glued["b05_r1"]) >= 0.0

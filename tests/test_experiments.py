"""Tests of fashlib.experiments (the notebooks' glue). Authors append their sections; none are removed."""

# ---------------------------------------------------------------- 02/03: comparisons (loss variants, try_call...)
import inspect as _inspect
import json as _json05

import numpy as _np
import pandas as _pd
import pytest as _pytest
import torch as _torch

from fashlib import experiments as _E
from fashlib import losses as _losses
from fashlib.miners import TRIPLET_MINERS as _MINERS


def test_loss_variants_cover_every_loss_and_every_triplet_mining():
    variants = _E.loss_variants()
    assert {loss for loss, _ in variants.values()} == set(_losses.LOSSES)
    triplets = {name: opts["mining"] for name, (loss, opts) in variants.items() if loss == "triplet"}
    assert set(triplets.values()) == set(_MINERS) == {"batch_all", "batch_hard", "semi_hard"}
    assert all(name == f"triplet_{mining}" for name, mining in triplets.items())
    # every variant builds and gives a finite loss on a P x K batch
    torch_labels = _torch.arange(4).repeat_interleave(3)
    emb = _torch.nn.functional.normalize(_torch.randn(12, 8, generator=_torch.Generator().manual_seed(0)), dim=1)
    for name, (loss, options) in variants.items():
        accepted = _inspect.signature(_losses.LOSSES[loss]).parameters
        extra = {k: v for k, v in (("num_classes", 4), ("embedding_dim", 8)) if k in accepted}
        value = _losses.create(loss, **options, **extra)(emb, torch_labels)
        assert _torch.isfinite(value), name


def test_loss_spec_resolves_variants_plain_names_and_rejects_unknown():
    assert _E.loss_spec("triplet_semi_hard") == ("triplet", {"mining": "semi_hard"})
    assert _E.loss_spec("triplet") == ("triplet", {})
    assert _E.loss_spec("arcface") == ("arcface", {})
    spec = _E.loss_spec("triplet_batch_all")
    spec[1]["mining"] = "changed"  # a copy: the registry is not mutated
    assert _E.loss_spec("triplet_batch_all")[1] == {"mining": "batch_all"}
    with _pytest.raises(ValueError, match="unknown loss 'nope'"):
        _E.loss_spec("nope")


def test_try_call_returns_value_or_error_message():
    assert _E.try_call(lambda a, b=1: a + b, 2, b=3) == (5, None)
    value, error = _E.try_call(int, "x")
    assert value is None and error.startswith("ValueError: invalid literal")


def test_try_call_reports_a_backbone_that_cannot_be_built():
    from fashlib import models

    value, error = _E.try_call(models.backbone_info, "no_such_backbone_xyz")
    assert value is None and error.startswith("RuntimeError") and "no_such_backbone_xyz" in error


def test_relative_history_divides_by_the_first_epoch():
    frame = _E.relative_history([4.0, 2.0, 1.0])
    assert list(frame.columns) == ["epoch", "loss", "relative loss"]
    assert frame["epoch"].tolist() == [1, 2, 3]
    _np.testing.assert_allclose(frame["relative loss"], [1.0, 0.5, 0.25])
    assert _E.relative_history([0.0, 0.0])["relative loss"].tolist() == [0.0, 0.0]  # no division by zero
    assert len(_E.relative_history([])) == 0


def test_run_name_is_folder_safe():
    assert _E.run_name("triplet_batch_hard", 256) == "triplet_batch_hard-256"
    assert _E.run_name("a/b c", None, "(x)") == "a_b_c-_x_"


def test_protocol_note_names_the_protocol():
    assert "validation protocol" in _E.protocol_note("clothing")
    assert "TEST" in _E.protocol_note("inshop") and "no validation protocol" in _E.protocol_note("deepfashion2")


def _toy_table(category_level: bool) -> _pd.DataFrame:
    import pandas as pd

    rows = []
    for i in range(600):
        split = ["train", "train", "query", "gallery"][i % 4]
        if category_level:
            label = f"c{i % 17}"
        else:  # items: 3 images each; train items never in query/gallery
            label = f"{'t' if split == 'train' else 'e'}{i // 12}"
        rows.append({"path": f"/x/{i}.jpg", "label": label, "split": split})
    return pd.DataFrame(rows)


def test_cap_table_category_level_keeps_every_label_in_every_split():
    from fashlib.experiments import cap_table

    table = _toy_table(category_level=True)
    capped = cap_table(table, 48, seed=0)
    assert len(capped) < len(table)
    for split in ("train", "query", "gallery"):
        assert set(capped.loc[capped.split == split, "label"]) == set(table.label), split
    assert capped.equals(cap_table(table, 48, seed=0))


def test_cap_table_item_level_keeps_query_matches_in_the_gallery():
    from fashlib.experiments import cap_table

    table = _toy_table(category_level=False)
    capped = cap_table(table, 60, seed=1)
    assert 30 <= len(capped) <= 120
    query = set(capped.loc[capped.split == "query", "label"])
    gallery = set(capped.loc[capped.split == "gallery", "label"])
    assert query and query <= gallery
    assert not set(capped.loc[capped.split == "train", "label"]) & (query | gallery)


# ------------------------------------------------- 05: final results (ensemble, selection, protocols, recorded runs)


def test_ensemble_features_weights_each_backbone_equally_and_is_unit_length():
    rng = _np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)) * 100.0, rng.normal(size=(5, 7)) * 0.01  # very different scales
    out = _E.ensemble_features([a, b])
    assert out.shape == (5, 10) and out.dtype == _np.float32
    _np.testing.assert_allclose(_np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # independent computation: each part unit length, so each contributes exactly 1/sqrt(2) of the norm
    expect = _np.hstack([a / _np.linalg.norm(a, axis=1, keepdims=True), b / _np.linalg.norm(b, axis=1, keepdims=True)])
    _np.testing.assert_allclose(out, expect / _np.sqrt(2.0), rtol=1e-5)
    # cosine similarity of the ensemble = mean of the parts' cosine similarities
    cos = lambda x: (x / _np.linalg.norm(x, axis=1, keepdims=True)) @ (x / _np.linalg.norm(x, axis=1, keepdims=True)).T
    _np.testing.assert_allclose(out @ out.T, (cos(a) + cos(b)) / 2, atol=1e-5)
    with _pytest.raises(ValueError, match="different numbers of rows"):
        _E.ensemble_features([a, b[:4]])
    with _pytest.raises(ValueError):
        _E.ensemble_features([])


def test_pick_best_uses_recall_then_map_as_tie_break():
    frame = _pd.DataFrame(
        {"recall@1": [0.5, 0.7, 0.7, _np.nan], "map@r": [0.9, 0.2, 0.3, 0.99]}, index=["a", "b", "c", "d"]
    )
    assert _E.pick_best(frame) == "c"
    assert _E.pick_best(frame, by=("map@r",)) == "d"
    with _pytest.raises(ValueError):
        _E.pick_best(frame.iloc[:0])


def _toy_table05(labels, splits):
    return _pd.DataFrame({"path": [f"/img/{i}.jpg" for i in range(len(labels))], "label": labels, "split": splits})


def test_first_hit_ranks_and_hardest_queries_match_a_brute_force_ranking():
    rng = _np.random.default_rng(1)
    labels = ["a", "b", "c", "a", "b", "c", "z"] + list("abcabc")
    splits = ["query"] * 7 + ["gallery"] * 6
    table = _toy_table05(labels, splits)
    emb = _E.l2_normalize(rng.normal(size=(13, 4)))
    ranks = _E.first_hit_ranks(table, emb, max_k=50)
    assert ranks["row"].tolist() == list(range(7))
    gallery = _np.arange(7, 13)
    for row, rank in zip(ranks["row"], ranks["rank"]):
        order = gallery[_np.argsort(-(emb[gallery] @ emb[row]), kind="stable")]
        hits = [i + 1 for i, g in enumerate(order) if labels[g] == labels[row]]
        assert rank == (hits[0] if hits else 0)
    assert ranks.loc[ranks["row"] == 6, "rank"].item() == 0  # label "z" has no gallery image
    # recall@1 agrees with the share of rank-1 hits
    assert _np.isclose((ranks["rank"] == 1).mean(), _E.evaluate(table, emb, ks=(1,))["recall@1"])
    hardest = _E.hardest_queries(ranks, 3)
    assert hardest["row"].iloc[0] == 6  # missing from the top K comes first
    assert hardest["rank"].iloc[1:].tolist() == sorted(ranks.loc[ranks["rank"] > 0, "rank"], reverse=True)[:2]


def test_holdout_validation_carves_queries_and_gallery_out_of_training_rows():
    labels = [f"i{i // 3}" for i in range(30)] + ["t0", "t0", "t1", "t1"]
    splits = ["train"] * 30 + ["query", "gallery", "query", "gallery"]
    table = _toy_table05(labels, splits)
    val = _E.holdout_validation(table, fraction=0.3, seed=0)
    assert (val["path"] == table["path"]).all() and (val["label"] == table["label"]).all()
    assert set(val.loc[30:, "split"]) == {"test"}  # the test protocol is never used
    held = val[val["split"].isin(["query", "gallery"])]
    assert held["label"].nunique() == 3  # 30% of 10 training items
    assert (held.groupby("label")["split"].apply(lambda s: (s == "query").sum()) == 1).all()
    assert not set(held["label"]) & set(val.loc[val["split"] == "train", "label"])  # held-out items never train
    assert _E.holdout_validation(table, 0.3, seed=0).equals(val)  # deterministic
    with _pytest.raises(ValueError, match="cannot hold out"):
        _E.holdout_validation(_toy_table05(["a", "b", "c"], ["train", "train", "query"]))


def test_holdout_validation_uses_consumer_queries_and_shop_gallery_when_both_exist():
    table = _toy_table05(["x", "x", "x", "y", "y"], ["train"] * 5).assign(
        domain=["consumer", "shop", "shop", "consumer", "shop"]
    )
    val = _E.holdout_validation(table, fraction=1.0, seed=0)  # one of the two labels is held out
    held = val[val["split"].isin(["query", "gallery"])]
    assert held["label"].nunique() == 1
    assert (held["split"] == held["domain"].map({"consumer": "query", "shop": "gallery"})).all()


def test_load_protocols_gives_identical_training_rows_on_generated_trees(tmp_path):
    from fashlib.data import synthetic

    synthetic.make_all(tmp_path)
    val, test, note = _E.load_protocols("consumer2shop", tmp_path, max_images=24, seed=0)
    assert _E.same_training_rows(val, test) and "validation protocol" in note
    assert set(test["split"]) <= {"train", "query", "gallery"} and {"query", "gallery"} <= set(val["split"])
    val, test, note = _E.load_protocols("inshop", tmp_path, seed=0)
    assert "no validation protocol" in note and "TRAINING" in note
    assert not _E.same_training_rows(val, test)
    held_out = set(val.loc[val["split"].isin(["query", "gallery"]), "path"])
    assert held_out <= set(test.loc[test["split"] == "train", "path"])


def test_load_recorded_runs_reads_the_finetune_json(tmp_path):
    record = {
        "results": {"val": {"recall@1": 0.5, "map@r": 0.2}, "test": {"recall@1": 0.4, "map@r": 0.1}},
        "history": {"epoch": [1, 2], "recall@1": [0.3, 0.5]},
        "config": {"backbone": "tf_efficientnet_lite0", "loss": "triplet", "epochs": 2, "train_seconds": 9.5},
        "device": "some GPU",
        "command": "bash benchmarks/finetune_gpu.sh",
        "data_note": "note",
    }
    (tmp_path / "b.json").write_text(_json05.dumps(record))
    (tmp_path / "a.json").write_text(_json05.dumps({**record, "config": {**record["config"], "loss": "arcface"}}))
    runs = _E.load_recorded_runs(tmp_path)
    assert runs["run"].tolist() == ["a", "b"] and runs["loss"].tolist() == ["arcface", "triplet"]
    assert runs.loc[1, "test_recall@1"] == 0.4 and runs.loc[1, "val_map@r"] == 0.2
    assert runs.loc[1, "train_seconds"] == 9.5
    assert runs.loc[0, "history"]["recall@1"] == [0.3, 0.5] and runs.loc[0, "device"] == "some GPU"
    (tmp_path / "empty").mkdir()
    assert len(_E.load_recorded_runs(tmp_path / "empty")) == 0
    (tmp_path / "c.json").write_text("{not json")
    with _pytest.raises(ValueError, match="c.json"):
        _E.load_recorded_runs(tmp_path)


def test_load_recorded_runs_reads_the_repository_gpu_runs():
    from pathlib import Path

    folder = Path(_E.__file__).resolve().parents[1] / "book" / "gpu-runs"
    runs = _E.load_recorded_runs(folder)
    assert len(runs) == len(list(folder.glob("*.json"))) >= 1
    assert runs["test_recall@1"].between(0, 1).all() and runs["device"].str.contains("H100").all()

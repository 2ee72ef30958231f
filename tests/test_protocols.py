"""fashlib.data.protocols: capped tables, validation protocols (own or held out of training rows), row roles."""

import pandas as pd
import pytest

from fashlib.data import protocols


def test_protocol_note_names_the_protocol():
    assert "validation protocol" in protocols.protocol_note("clothing")
    assert "TEST" in protocols.protocol_note("inshop") and "no validation protocol" in protocols.protocol_note(
        "deepfashion2"
    )


def _toy_table(category_level: bool) -> pd.DataFrame:
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
    table = _toy_table(category_level=True)
    capped = protocols.cap_table(table, 48, seed=0)
    assert len(capped) < len(table)
    for split in ("train", "query", "gallery"):
        assert set(capped.loc[capped.split == split, "label"]) == set(table.label), split
    assert capped.equals(protocols.cap_table(table, 48, seed=0))


def test_cap_table_item_level_keeps_query_matches_in_the_gallery():
    table = _toy_table(category_level=False)
    capped = protocols.cap_table(table, 60, seed=1)
    assert 30 <= len(capped) <= 120
    query = set(capped.loc[capped.split == "query", "label"])
    gallery = set(capped.loc[capped.split == "gallery", "label"])
    assert query and query <= gallery
    assert not set(capped.loc[capped.split == "train", "label"]) & (query | gallery)


def _rows(labels, splits):
    return pd.DataFrame({"path": [f"/img/{i}.jpg" for i in range(len(labels))], "label": labels, "split": splits})


def test_holdout_validation_carves_queries_and_gallery_out_of_training_rows():
    labels = [f"i{i // 3}" for i in range(30)] + ["t0", "t0", "t1", "t1"]
    splits = ["train"] * 30 + ["query", "gallery", "query", "gallery"]
    table = _rows(labels, splits)
    val = protocols.holdout_validation(table, fraction=0.3, seed=0)
    assert (val["path"] == table["path"]).all() and (val["label"] == table["label"]).all()
    assert set(val.loc[30:, "split"]) == {"test"}  # the test protocol is never used
    held = val[val["split"].isin(["query", "gallery"])]
    assert held["label"].nunique() == 3  # 30% of 10 training items
    assert (held.groupby("label")["split"].apply(lambda s: (s == "query").sum()) == 1).all()
    assert not set(held["label"]) & set(val.loc[val["split"] == "train", "label"])  # held-out items never train
    assert protocols.holdout_validation(table, 0.3, seed=0).equals(val)  # deterministic
    with pytest.raises(ValueError, match="cannot hold out"):
        protocols.holdout_validation(_rows(["a", "b", "c"], ["train", "train", "query"]))


def test_holdout_validation_uses_consumer_queries_and_shop_gallery_when_both_exist():
    table = _rows(["x", "x", "x", "y", "y"], ["train"] * 5).assign(
        domain=["consumer", "shop", "shop", "consumer", "shop"]
    )
    val = protocols.holdout_validation(table, fraction=1.0, seed=0)  # one of the two labels is held out
    held = val[val["split"].isin(["query", "gallery"])]
    assert held["label"].nunique() == 1
    assert (held["split"] == held["domain"].map({"consumer": "query", "shop": "gallery"})).all()


def test_load_protocols_gives_identical_training_rows_on_generated_trees(tmp_path):
    from fashlib.data import synthetic

    synthetic.make_all(tmp_path)
    val, test, note = protocols.load_protocols("consumer2shop", tmp_path, max_images=24, seed=0)
    assert protocols.same_training_rows(val, test) and "validation protocol" in note
    assert set(test["split"]) <= {"train", "query", "gallery"} and {"query", "gallery"} <= set(val["split"])
    val, test, note = protocols.load_protocols("inshop", tmp_path, seed=0)
    assert "no validation protocol" in note and "TRAINING" in note
    assert not protocols.same_training_rows(val, test)
    held_out = set(val.loc[val["split"].isin(["query", "gallery"]), "path"])
    assert held_out <= set(test.loc[test["split"] == "train", "path"])

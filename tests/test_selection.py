"""Seeds against noise (study.seed_comparison / noise_verdicts / noise_prose), chapter 05's selection protocol
(fashlib.selection) and the reader-facing helpers report.warning_prose / relative_path."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from fashlib import evaluation, postprocess, report, selection, stats, study
from fashlib.features import train_head
from fashlib.runs import check_run


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def _tables(n_labels=4, per_label=10, dim=16, seed=3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_labels), per_label)
    x = (rng.normal(size=(n_labels, dim))[labels] + 0.8 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    role = np.array((["train"] * 4 + ["val_q", "val_g", "test_q", "test_g", "test_g", "val_g"]) * n_labels)
    val_split = np.where(
        role == "val_q", "query", np.where(role == "val_g", "gallery", np.where(role == "train", "train", "test"))
    )
    test_split = np.where(
        role == "test_q", "query", np.where(role == "test_g", "gallery", np.where(role == "train", "train", "val"))
    )
    base = pd.DataFrame({"path": [f"img{i}.jpg" for i in range(len(labels))], "label": labels.astype(str)})
    return x, base.assign(split=val_split), base.assign(split=test_split)


HEAD = dict(loss="multi_similarity", hidden_dim=16, embedding_dim=8, epochs=2, p=4, k=2)


def test_seed_comparison_means_stds_and_intervals():
    x, val, _ = _tables()
    configs = {"frozen": {"features": "toy", "loss": None}, "mlp": {"features": "toy", "head_type": "mlp", **HEAD}}
    runs, summary, per_query = study.seed_comparison({"toy": x}, val, configs, seeds=(0, 1, 2), n_boot=300)
    assert runs.groupby("config").size().tolist() == [3, 3]
    mlp = runs[runs["config"] == "mlp"]
    assert summary.at["mlp", "recall@1"] == pytest.approx(mlp["recall@1"].mean())
    assert summary.at["mlp", "recall@1 std"] == pytest.approx(mlp["recall@1"].std(ddof=1))
    # the frozen features do not depend on the seed; their interval is the bootstrap of their per-query scores
    assert summary.at["frozen", "recall@1 std"] == 0.0
    frozen_scores = study.query_scores(val, x)
    assert per_query["frozen"]["recall@1"].tolist() == frozen_scores["recall@1"].tolist()
    ci = stats.bootstrap_ci(frozen_scores["ap@r"].to_numpy(), n_boot=300)
    assert (summary.at["frozen", "map@r low"], summary.at["frozen", "map@r high"]) == pytest.approx((ci.low, ci.high))
    # per-query scores of "mlp" are the seed average: their mean is the mean over seeds
    assert per_query["mlp"]["recall@1"].mean() == pytest.approx(summary.at["mlp", "recall@1"])
    with pytest.raises(KeyError, match="names features"):
        study.seed_comparison({"toy": x}, val, {"bad": {"features": "other", "loss": None}})


def _fake(per_query_a, per_query_b, std_a=0.0, std_b=0.0):
    per_query = {"a": pd.DataFrame({"recall@1": per_query_a}), "b": pd.DataFrame({"recall@1": per_query_b})}
    summary = pd.DataFrame(
        {"recall@1": [np.mean(per_query_a), np.mean(per_query_b)], "recall@1 std": [std_a, std_b]},
        index=pd.Index(["a", "b"], name="config"),
    )
    return summary, per_query


def test_noise_verdicts_separate_only_clear_gaps():
    # a hits every query, b misses 60 of 100: the paired interval excludes 0 and the gap beats the seed spread
    summary, per_query = _fake(np.ones(100), np.r_[np.ones(40), np.zeros(60)], 0.01, 0.02)
    verdicts = study.noise_verdicts(summary, per_query, "recall@1", n_boot=500)
    assert verdicts.index.tolist() == ["b"] and verdicts.at["b", "versus"] == "a"
    assert verdicts.at["b", "points"] == pytest.approx(-60.0)
    assert verdicts.at["b", "high"] < 0 and bool(verdicts.at["b", "separated"])
    assert "Larger than the noise" in study.noise_prose(verdicts) and "b -60.0 points" in study.noise_prose(verdicts)
    # same gap, but the seeds disagree by more than the gap: within the noise
    summary, per_query = _fake(np.ones(100), np.r_[np.ones(40), np.zeros(60)], 0.5, 0.5)
    assert not study.noise_verdicts(summary, per_query, "recall@1", n_boot=500).at["b", "separated"]
    # a one-query difference: the paired interval includes 0
    summary, per_query = _fake(np.r_[1.0, np.zeros(99)], np.zeros(100))
    verdicts = study.noise_verdicts(summary, per_query, "recall@1", n_boot=500)
    assert verdicts.at["b", "low"] <= 0 <= verdicts.at["b", "high"] and not verdicts.at["b", "separated"]
    assert study.noise_prose(verdicts).startswith("Within the noise of **a**")
    with pytest.raises(KeyError, match="map@r"):
        study.noise_verdicts(summary, per_query, "map@r")
    assert study.noise_prose(verdicts.iloc[:0]) == ""


def test_post_names_round_trip():
    assert selection.post_settings([1, 3]) == ["none", "qe k=1", "qe k=3"]
    assert [selection.parse_post(p) for p in selection.post_settings([2])] == [("none", {}), ("qe", {"k": 2})]
    with pytest.raises(ValueError, match="dba"):
        selection.parse_post("dba k=2")


def test_candidate_scores_cover_every_setting_and_match_evaluate():
    x, val, _ = _tables()
    table = selection.candidate_scores(
        {"toy": x},
        val,
        ["multi_similarity"],
        ["linear", "mlp"],
        [1, 2],
        ks=(1, 5),
        hidden_dim=16,
        embedding_dim=8,
        epochs=2,
        p=4,
        k=2,
    )
    assert len(table) == 3 * 3  # (frozen, linear, mlp) x (none, qe k=1, qe k=2)
    assert set(table.index.get_level_values("head")) == {"none", "linear", "mlp"}
    frozen = table.loc[("toy", "none", "none", "none")]
    expected = evaluation.evaluate(val, postprocess.l2_normalize(x), ks=(1, 5))  # cosine, as postprocess ranks
    assert frozen["recall@1"] == pytest.approx(expected["recall@1"])
    assert frozen["map@r"] == pytest.approx(expected["map@r"])
    qe = table.loc[("toy", "none", "none", "qe k=2")]
    assert qe["recall@1"] == pytest.approx(study.postprocessed_scores(val, x, "qe", ks=(1, 5), k=2)["recall@1"].mean())
    assert (table["error"] == "").all()
    failed = selection.candidate_scores(
        {"toy": x},
        val,
        ["multi_similarity"],
        ["linear"],
        [],
        ks=(1,),
        embedding_dim=8,
        epochs=1,
        p=4,
        k=2,
        sampler="nope",
    )
    assert "nope" in failed.loc[("toy", "multi_similarity", "linear", "none"), "error"]


def test_refit_uses_train_and_validation_rows():
    x, val, test = _tables()
    options = dict(embedding_dim=8, epochs=2, p=4, k=2, hidden_dim=16)
    emb, head = selection.refit({"toy": x}, val, test, ("toy", "multi_similarity", "mlp", "qe k=1"), **options)
    direct, _, _ = study.refit_on_train_val(
        x, val, test, loss="multi_similarity", head_type="mlp", progress=False, **options
    )
    np.testing.assert_allclose(emb, direct, atol=1e-6)
    assert selection.refit({"toy": x}, val, test, ("toy", "none", "none", "none"))[0] is x
    # capped tables (different rows): the test table lacks the validation queries and the test queries'
    # "test" rows; its validation gallery rows become training rows, the validation queries are appended
    keep = ~((val["split"] == "test") | (val["split"] == "query")).to_numpy()
    small_test = test[keep].reset_index(drop=True)
    chosen = ("toy", "multi_similarity", "linear", "none")
    with pytest.raises(ValueError, match="val_features"):
        selection.refit({"toy": x[keep]}, val, small_test, chosen, **options)
    emb, head = selection.refit({"toy": x[keep]}, val, small_test, chosen, {"toy": x}, **options)
    train_first = small_test["split"].isin(["train", "val"]).to_numpy()
    queries = (val["split"] == "query").to_numpy()
    direct, _ = train_head(
        np.concatenate([x[keep][train_first], x[queries]]),
        np.concatenate([small_test["label"][train_first], val["label"][queries]]),
        loss="multi_similarity",
        progress=False,
        **options,
    )
    assert emb.shape == (len(small_test), 8)
    np.testing.assert_allclose(emb, direct(torch.as_tensor(x[keep])).detach().numpy(), atol=1e-6)
    # a validation query/gallery image that is also a test query/gallery image is never trained on
    shared_test = val.iloc[1:].reset_index(drop=True)
    with pytest.warns(UserWarning, match="left out of the refit"):
        emb, _ = selection.refit({"toy": x[1:]}, val, shared_test, chosen, {"toy": x}, **options)
    trained_on = shared_test["split"].isin(["train", "val"]).to_numpy()
    alone, _ = train_head(
        x[1:][trained_on], shared_test["label"][trained_on], loss="multi_similarity", progress=False, **options
    )
    np.testing.assert_allclose(emb, alone(torch.as_tensor(x[1:])).detach().numpy(), atol=1e-6)


def test_test_report_and_paired_report():
    a = pd.DataFrame({"recall@1": np.r_[np.ones(30), np.zeros(10)], "ap@r": np.linspace(0, 1, 40)})
    b = pd.DataFrame({"recall@1": np.r_[np.ones(10), np.zeros(30)], "ap@r": np.linspace(0, 1, 40)})
    table = selection.test_report({"a": a, "b": b}, n_boot=300)
    assert table.at["a", "recall@1"] == 0.75 and table.at["b", "recall@1"] == 0.25
    assert table.at["a", "recall@1 low"] < 0.75 < table.at["a", "recall@1 high"]
    paired = selection.paired_report(a, b, n_boot=300)
    assert paired.at["recall@1", "points"] == pytest.approx(50.0)
    assert paired.at["recall@1", "low (points)"] > 0 and paired.at["recall@1", "p_value"] < 0.01
    assert paired.at["map@r", "points"] == 0 and paired.at["map@r", "p_value"] == 1.0


def test_warning_prose_and_relative_path(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            warnings.warn(
                "clothing: 5 of 5403 listed images are missing on disk; their rows were dropped "
                "(e.g. /data/clothing/images/a.jpg, /data/clothing/images/b.jpg ...)",
                stacklevel=1,
            )
        warnings.warn(f"cannot read {tmp_path}/x/photo.png", stacklevel=1)
    text = report.warning_prose(caught)
    assert text == (
        "Clothing: 5 of 5403 listed images are missing on disk; their rows were dropped. Cannot read photo.png."
    )
    assert report.warning_prose([]) == ""
    assert report.relative_path(tmp_path / "runs" / "x", root=tmp_path) == "runs/x"
    assert report.relative_path("/elsewhere/model", root=tmp_path) == "model"


def test_loss_sweep_rows_runs_and_failures(tmp_path):
    from fashlib import sweeps

    x, val, _ = _tables()
    head = dict(epochs=2, seed=0, p=4, k=2)
    results, runs = sweeps.loss_sweep(
        x,
        val,
        ["multi_similarity", "no_such_loss"],
        8,
        head=head,
        out_dir=tmp_path,
        prefix="03",
        config={"seed": 0},
        max_k=5,
    )
    assert results["loss"].tolist() == ["frozen (no head)", "multi_similarity", "no_such_loss"]
    assert list(runs) == ["frozen (no head)", "multi_similarity"]
    assert results.loc[2, "error"] and np.isnan(results.loc[2, "seconds"])
    frozen = evaluation.evaluate(val, x)
    assert results.loc[0, "map@r"] == pytest.approx(frozen["map@r"])
    run = runs["multi_similarity"]
    assert len(run["history"]) == 2 and max(run["curve"]) == 5
    rechecked = check_run(run["folder"])
    assert all(rechecked[m] == pytest.approx(run["result"][m]) for m in rechecked)
    with pytest.raises(RuntimeError, match="no loss"):
        sweeps.loss_sweep(x, val, ["no_such_loss"], 8, head=head, out_dir=tmp_path, prefix="03b", config={})


def test_evaluate_on_test_and_the_answer_values():
    """evaluate_on_test refits the chosen head (as refit does), applies its post-processing at search time and
    compares with the candidate's frozen features; answer_values reads the chapter's numbers from it."""
    x, val, test = _tables()
    options = dict(embedding_dim=8, epochs=2, p=4, k=2, hidden_dim=16)
    chosen = ("toy", "multi_similarity", "mlp", "qe k=1")
    outcome = selection.evaluate_on_test(chosen, {"toy": x}, val, test, ks=(1, 5), **options)
    emb, _ = selection.refit({"toy": x}, val, test, chosen, **options)
    np.testing.assert_allclose(outcome.embeddings, emb, atol=1e-6)
    assert outcome.baseline_embeddings is x and outcome.chosen == chosen
    expected = selection.post_scores(test, emb, "qe k=1", ks=(1, 5))["recall@1"].mean()
    assert outcome.results["recall@1"] == pytest.approx(expected)
    assert outcome.baseline_results["recall@1"] == pytest.approx(evaluation.evaluate(test, x, ks=(1, 5))["recall@1"])
    assert list(outcome.report.index) == [outcome.name, outcome.baseline_name]
    diff = 100 * (outcome.results["recall@1"] - outcome.baseline_results["recall@1"])
    assert outcome.paired.at["recall@1", "points"] == pytest.approx(diff)
    validation = pd.DataFrame(
        {"recall@1": [0.5, 0.7], "map@r": [0.4, 0.3], "error": ["", ""]},
        index=pd.MultiIndex.from_tuples([("toy", "none", "none", "none"), chosen], names=selection.INDEX),
    )
    answer = selection.answer_values(outcome, validation, 0.8)
    assert answer["val_r1"] == 0.7 and answer["candidates"] == 2 and answer["target"] == 0.8
    assert answer["r1"] == pytest.approx(outcome.results["recall@1"]) and answer["diff"] == round(diff, 1)
    assert answer["queries"] == int((test["split"] == "query").sum())
    assert set(selection.PERCENT_ANSWER) <= set(answer)


def test_protocol_sizes_and_choose():
    _, val, test = _tables()
    sizes = selection.protocol_sizes(val, test, "clothing")
    assert sizes.loc["query", ("validation protocol", "images")] == int((val["split"] == "query").sum())
    assert sizes.loc["val", ("validation protocol", "images")] == 0  # the test protocol's val rows only
    moved = test.assign(split=test["split"].where(test.index != 0, "query"))  # a training row moved out
    with pytest.raises(ValueError, match="identical rows"):
        selection.protocol_sizes(val, moved, "clothing")
    validation = pd.DataFrame(
        {"recall@1": [0.9, 0.7, 0.7], "map@r": [0.5, 0.3, 0.4], "error": ["failed", "", ""]},
        index=pd.MultiIndex.from_tuples([("a",) * 4, ("b",) * 4, ("c",) * 4], names=selection.INDEX),
    )
    assert selection.choose(validation) == ("c",) * 4  # the failed row never wins; ties broken by mAP@R
    html = selection.validation_table(validation.assign(seconds=[1.25, 2.0, 3.0]), "toy", 5).to_html()
    assert "90.0" in html and "2.0<" in html and "2.000000" not in html


def test_recorded_runs_table():
    recorded = pd.DataFrame(
        {"backbone": ["lite0", "lite2"], "loss": ["ms", "ms"], "test_recall@1": [0.70178, 0.7078],
         "device": ["H100", "H100"], "command": ["bash run.sh", "bash run.sh"]}
    )  # fmt: skip
    table, notes = report.recorded_runs_table(recorded)
    html = table.to_html()
    assert "70.2" in html and "font-weight: bold" in html and "70.8" in html
    assert notes.splitlines() == ["- **device:** `H100`", "- **command:** `bash run.sh`"]
    with pytest.raises(ValueError, match="no recorded run"):
        report.recorded_runs_table(recorded.iloc[:0])


def test_post_retrieval_is_the_search_the_chosen_scores_come_from():
    x, table, _ = _tables(n_labels=12, seed=5)
    raw = evaluation.retrieve(table, x, max_k=20)
    for post in ("none", "qe k=3"):
        found = selection.post_retrieval(table, x, post, max_k=20)
        scores = selection.post_scores(table, x, post, ks=(1, 5))
        metrics = found.metrics((1, 5))
        assert metrics["recall@1"] == pytest.approx(scores["recall@1"].mean())
        assert metrics["map@r"] == pytest.approx(np.nanmean(scores["ap@r"]))
        assert found.curve(20)[5] == pytest.approx(scores["recall@5"].mean())
    expanded = selection.post_retrieval(table, x, "qe k=3", max_k=20)
    assert not np.array_equal(expanded.first_hit_ranks()["rank"], raw.first_hit_ranks()["rank"])
    with pytest.raises(ValueError, match="unknown post-processing 'rerank'"):
        study.postprocessed_retrieval(table, x, "rerank")

"""Head architectures, samplers and the train+validation refit of head-on-features training."""

import numpy as np
import pandas as pd
import pytest
import torch

from fashlib import evaluation, postprocess, study
from fashlib.data import protocols
from fashlib.features import MLPHead, MPerClassBatches, build_head, train_head
from fashlib.models import EmbeddingHead


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def _clusters(n_labels=6, per_label=12, dim=16, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels, dim))
    labels = np.repeat(np.arange(n_labels), per_label)
    return (centres[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


@pytest.mark.parametrize("bnneck", [False, True])
def test_build_head_shapes(bnneck):
    mlp = build_head("mlp", 40, 8, bnneck=bnneck, hidden_dim=12)
    assert isinstance(mlp, MLPHead) and mlp.embedding_dim == 8 and mlp.bnneck == bnneck
    # in-hidden-out with BatchNorm: 40*12+12 + 2*12 + 12*8+8 (+ BNNeck 2*40)
    n_params = sum(p.numel() for p in mlp.parameters())
    assert n_params == 40 * 12 + 12 + 24 + 12 * 8 + 8 + (80 if bnneck else 0)
    if bnneck:
        assert not mlp.bn.bias.requires_grad
    mlp.eval()
    out = mlp(torch.randn(5, 40))
    assert out.shape == (5, 8) and torch.allclose(out.norm(dim=1), torch.ones(5))
    assert isinstance(build_head("linear", 40, 8), EmbeddingHead)
    with pytest.raises(ValueError, match="unknown head"):
        build_head("transformer", 40, 8)


def test_m_per_class_batches():
    codes = np.array([0] * 10 + [1] * 3 + [2] * 6 + [3] * 1)
    sampler = MPerClassBatches(codes, p=2, k=4, seed=1)
    assert len(sampler) == 20 // 8
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            labels = codes[batch]
            assert len(batch) == 8 and len(set(labels)) == 2 and 3 not in labels  # singleton label never drawn
            for lab in set(labels):
                rows = [i for i in batch if codes[i] == lab]
                assert len(rows) == 4
                if lab != 1:  # enough rows: drawn without replacement
                    assert len(set(rows)) == 4
    with pytest.raises(ValueError, match="p=4"):
        MPerClassBatches(codes, p=4, k=2)


def _hidden_clusters(n_labels=6, per_label=16, dim=32, seed=0):
    """Labels live in 4 of 32 dimensions, the other 28 are louder noise: raw 1-NN is poor, a learned head is not."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_labels, dim))
    centres[:, :4] = 2 * rng.normal(size=(n_labels, 4))
    labels = np.repeat(np.arange(n_labels), per_label)
    noise = rng.normal(size=(len(labels), dim)) * np.r_[np.full(4, 0.5), np.full(dim - 4, 2.0)]
    return (centres[labels] + noise).astype(np.float32), labels


def _one_nn_accuracy(emb, y):
    emb = postprocess.l2_normalize(emb)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return (y[sims.argmax(1)] == y).mean()


@pytest.mark.parametrize("head_type,sampler", [("mlp", "m_per_class"), ("mlp", "pk"), ("linear", "m_per_class")])
def test_train_head_types_learn_and_are_seeded(head_type, sampler):
    x, y = _hidden_clusters()
    assert _one_nn_accuracy(x, y) < 0.4
    kwargs = dict(
        head_type=head_type,
        sampler=sampler,
        embedding_dim=8,
        hidden_dim=16,
        epochs=15,
        p=4,
        k=4,
        lr=1e-2,
        progress=False,
        loss="multi_similarity",
    )
    head, history = train_head(x, y, **kwargs)
    again, _ = train_head(x, y, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    assert history[-1] < history[0]
    assert _one_nn_accuracy(head(torch.as_tensor(x)).detach().numpy(), y) > 0.85  # leave-one-out 1-NN
    with pytest.raises(ValueError, match="unknown sampler"):
        train_head(x, y, sampler="random", epochs=1, p=4, progress=False)


def _protocol_tables():
    x, y = _clusters(n_labels=4, per_label=10, seed=3)
    n = len(y)
    role = np.array((["train"] * 4 + ["val_q", "val_g", "test_q", "test_g", "test_g", "val_g"]) * 4)
    val_split = np.where(
        role == "val_q", "query", np.where(role == "val_g", "gallery", np.where(role == "train", "train", "test"))
    )
    test_split = np.where(
        role == "test_q", "query", np.where(role == "test_g", "gallery", np.where(role == "train", "train", "val"))
    )
    base = pd.DataFrame({"path": [f"img{i}.jpg" for i in range(n)], "label": y.astype(str)})
    return x, base.assign(split=val_split), base.assign(split=test_split)


def test_train_val_table_and_refit():
    x, val, test = _protocol_tables()
    merged = study.train_val_table(val, test)
    expected = np.isin(val["split"], ["train", "query", "gallery"])
    assert (merged["split"].to_numpy() == "train").tolist() == expected.tolist()
    assert (merged["split"] == "query").sum() == (test["split"] == "query").sum()
    options = dict(
        loss="multi_similarity",
        head_type="mlp",
        hidden_dim=16,
        embedding_dim=8,
        epochs=3,
        p=4,
        k=2,
        progress=False,
        sampler="m_per_class",
    )
    emb, _, head = study.refit_on_train_val(x, val, test, **options)
    # the refit is exactly a head trained on the train + validation rows
    rows = np.flatnonzero(expected)
    direct, _ = train_head(x[rows], val["label"].to_numpy()[rows], **options)
    np.testing.assert_allclose(emb, direct(torch.as_tensor(x)).detach().numpy(), atol=1e-6)
    train_only, _ = train_head(
        x[protocols.train_rows(test)], test["label"].to_numpy()[protocols.train_rows(test)], **options
    )
    assert not torch.allclose(train_only.mlp[0].weight, head.mlp[0].weight)
    with pytest.raises(ValueError, match="different images"):
        study.train_val_table(val.iloc[1:], test)
    with pytest.raises(ValueError, match="test query/gallery"):
        study.train_val_table(test, test)


def test_postprocessing_tables():
    x, val, _ = _protocol_tables()
    emb = postprocess.l2_normalize(x)
    plain = study.postprocessed_scores(val, emb, "none")
    assert plain["recall@1"].mean() == pytest.approx(evaluation.evaluate(val, emb, ks=(1,))["recall@1"])
    sweep = study.postprocessing_sweep(val, emb, [("none", {}), ("qe", {"k": 1}), ("rerank", {"k1": 5, "k2": 2})])
    assert sweep["method"].tolist() == ["none", "qe", "rerank"]
    assert (sweep["recall@1_low"] <= sweep["recall@1"]).all() and (sweep["recall@1"] <= sweep["recall@1_high"]).all()


def test_postprocessing_test_uses_validation_choice():
    x, val, test = _protocol_tables()
    emb = postprocess.l2_normalize(x)
    sweep = study.postprocessing_sweep(val, emb, [("none", {}), ("qe", {"k": 1}), ("qe", {"k": 2})])
    sweep.loc[2, "recall@1"] = 2.0  # pretend k=2 won on validation: the test row must use it
    result = study.postprocessing_test(sweep, test, emb, n_boot=200)
    assert result.loc["qe", "params (chosen on val)"] == "k=2"
    expected = study.postprocessed_scores(test, emb, "qe", k=2)["recall@1"].mean()
    assert result.loc["qe", "recall@1"] == pytest.approx(expected)
    assert result.loc["none", "Δ recall@1"] == 0 and result.loc["none", "Δ recall@1 p"] == 1.0


def test_train_head_refuses_batches_a_pair_loss_cannot_learn_from():
    """k=1 gives multi-similarity no positive pair: loss 0, zero gradient, nothing learnt; refused up front."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    y = np.repeat(np.arange(10), 4)
    with pytest.raises(ValueError, match="k >= 2"):
        train_head(x, y, loss="multi_similarity", p=4, k=1, epochs=1, progress=False)
    head, history = train_head(x, y, loss="arcface", p=4, k=1, epochs=1, progress=False)  # proxies learn
    assert len(history) == 1

"""Losses: cross-checked against pytorch-metric-learning (PML) and a brute-force centroid triplet loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from fashlib import losses, miners

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning missing")
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

DIM = 16


def _batch(seed: int, n: int = 32, classes: int = 8, pk: bool = True):
    """Random float64 embeddings with labels: P x K layout (shuffled) or iid labels (singletons likely)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    if pk:
        labels = torch.arange(n) % classes
        labels = labels[torch.randperm(n, generator=g)]
    else:
        labels = torch.randint(0, classes, (n,), generator=g)
    return emb, labels


BATCHES = [(s, pk) for s in range(2) for pk in (True, False)]


def _both(ours, theirs, emb, labels, miner=None):
    """Values and embedding-gradients of our loss and of PML's on the same batch."""
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    v1 = ours(e1, labels)
    v1.backward()
    pairs = miner(e2, labels) if miner is not None else None
    v2 = theirs(e2, labels, pairs)
    v2.backward()
    return v1, v2, e1.grad, e2.grad


def _assert_match(ours, theirs, emb, labels, miner=None):
    v1, v2, g1, g2 = _both(ours, theirs, emb, labels, miner)
    assert v1.ndim == 0
    torch.testing.assert_close(v1.detach(), v2.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_registry_and_create():
    assert set(losses.LOSSES) == {
        "contrastive",
        "triplet",
        "multi_similarity",
        "arcface",
        "normalized_softmax",
        "proxy_anchor",
        "centroid_triplet",
    }
    assert isinstance(losses.create("triplet", mining="semi_hard"), losses.TripletLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.create("nope")
    with pytest.raises(ValueError, match="mining"):
        losses.create("triplet", mining="hardest")
    for cls in losses.LOSSES.values():
        assert cls.__doc__ and len(cls.__doc__) > 40


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("pos_margin,neg_margin", [(0.0, 1.0), (0.2, 1.3)])
def test_contrastive_matches_pml(seed, pk, pos_margin, neg_margin):
    emb, labels = _batch(seed, pk=pk)
    _assert_match(
        losses.create("contrastive", pos_margin=pos_margin, neg_margin=neg_margin),
        pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin),
        emb,
        labels,
    )


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_batch_all_matches_pml(seed, pk, margin):
    emb, labels = _batch(seed, pk=pk)
    ours = losses.create("triplet", mining="batch_all", margin=margin)
    theirs = pml_losses.TripletMarginLoss(margin=margin)
    _assert_match(ours, theirs, emb, labels)  # PML without miner: all triplets
    _assert_match(ours, theirs, emb, labels, pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="all"))


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_batch_hard_matches_pml(seed, pk, margin):
    emb, labels = _batch(seed, pk=pk)
    _assert_match(
        losses.create("triplet", mining="batch_hard", margin=margin),
        pml_losses.TripletMarginLoss(margin=margin),
        emb,
        labels,
        pml_miners.BatchHardMiner(),
    )


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_semi_hard_matches_pml(seed, pk, margin):
    emb, labels = _batch(seed, pk=pk)
    ours = losses.create("triplet", mining="semi_hard", margin=margin)
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    a, _, _ = miner(emb, labels)
    assert len(a) > 0  # the check must exercise real triplets
    assert len(miners.semi_hard_triplets(torch.cdist(F.normalize(emb), F.normalize(emb)), labels, margin)[0]) == len(a)
    _assert_match(ours, pml_losses.TripletMarginLoss(margin=margin), emb, labels, miner)


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("alpha,beta,base,eps", [(2.0, 50.0, 0.5, 0.1), (1.0, 20.0, 0.0, 0.3)])
def test_multi_similarity_matches_pml(seed, pk, alpha, beta, base, eps):
    emb, labels = _batch(seed, pk=pk)
    theirs = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    _assert_match(
        losses.create("multi_similarity", alpha=alpha, beta=beta, base=base, epsilon=eps),
        theirs,
        emb,
        labels,
        pml_miners.MultiSimilarityMiner(epsilon=eps),
    )
    _assert_match(
        losses.create("multi_similarity", alpha=alpha, beta=beta, base=base, epsilon=None), theirs, emb, labels
    )


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("margin,scale", [(0.5, 64.0), (0.2, 30.0), (1.2, 16.0)])
def test_arcface_matches_pml(seed, pk, margin, scale):
    emb, labels = _batch(seed, pk=pk)
    ours = losses.create("arcface", num_classes=8, embedding_dim=DIM, margin=margin, scale=scale).double()
    theirs = pml_losses.ArcFaceLoss(num_classes=8, embedding_size=DIM, margin=math.degrees(margin), scale=scale)
    theirs.W.data = ours.weight.detach().T.clone()
    _assert_match(ours, theirs, emb, labels)


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_normalized_softmax_matches_pml(seed, pk, temperature):
    emb, labels = _batch(seed, pk=pk)
    ours = losses.create("normalized_softmax", num_classes=8, embedding_dim=DIM, temperature=temperature).double()
    theirs = pml_losses.NormalizedSoftmaxLoss(num_classes=8, embedding_size=DIM, temperature=temperature)
    theirs.W.data = ours.weight.detach().T.clone()
    _assert_match(ours, theirs, emb, labels)


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("num_classes", [8, 11])  # 11: some proxies without samples in the batch
@pytest.mark.parametrize("margin,alpha", [(0.1, 32.0), (0.3, 8.0)])
def test_proxy_anchor_matches_pml(seed, pk, num_classes, margin, alpha):
    emb, labels = _batch(seed, pk=pk)
    ours = losses.create(
        "proxy_anchor", num_classes=num_classes, embedding_dim=DIM, margin=margin, alpha=alpha
    ).double()
    theirs = pml_losses.ProxyAnchorLoss(num_classes=num_classes, embedding_size=DIM, margin=margin, alpha=alpha)
    theirs.proxies.data = ours.proxies.detach().clone()
    _assert_match(ours, theirs, emb, labels)
    # the proxies get the same gradient too
    ours.zero_grad()
    theirs.zero_grad()
    ours(emb, labels).backward()
    theirs(emb, labels).backward()
    torch.testing.assert_close(ours.proxies.grad, theirs.proxies.grad, atol=1e-5, rtol=1e-5)


def _centroid_triplet_brute(emb, labels, margin, negatives, reducer, normalize=True):
    """Loop re-implementation of our reading of Wieczorek et al. 2021."""
    x = F.normalize(emb, dim=1) if normalize else emb
    terms = []
    classes = sorted(set(labels.tolist()))
    for i in range(len(x)):
        same = [j for j in range(len(x)) if labels[j] == labels[i] and j != i]
        if not same or len(classes) < 2:
            continue
        c_pos = torch.stack([x[j] for j in same]).mean(0)
        d_pos = torch.sqrt(((x[i] - c_pos) ** 2).sum())
        d_negs = []
        for c in classes:
            if c == labels[i]:
                continue
            c_neg = torch.stack([x[j] for j in range(len(x)) if labels[j] == c]).mean(0)
            d_negs.append(torch.sqrt(((x[i] - c_neg) ** 2).sum()))
        if negatives == "hardest":
            terms.append(torch.relu(d_pos - min(d_negs) + margin))
        else:
            terms.extend(torch.relu(d_pos - d + margin) for d in d_negs)
    terms = torch.stack(terms)
    if reducer == "mean_nonzero":
        terms = terms[terms > 0]
    return terms.mean()


@pytest.mark.parametrize("seed,pk", BATCHES)
@pytest.mark.parametrize("negatives", ["hardest", "all"])
@pytest.mark.parametrize("reducer", ["mean", "mean_nonzero"])
@pytest.mark.parametrize("normalize", [True, False])
def test_centroid_triplet_matches_brute_force(seed, pk, negatives, reducer, normalize):
    emb, labels = _batch(seed, n=20, classes=5, pk=pk)
    ours = losses.create("centroid_triplet", margin=0.3, negatives=negatives, reducer=reducer, normalize=normalize)
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    v1, v2 = ours(e1, labels), _centroid_triplet_brute(e2, labels, 0.3, negatives, reducer, normalize)
    v1.backward()
    v2.backward()
    torch.testing.assert_close(v1, v2, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(e1.grad, e2.grad, atol=1e-8, rtol=1e-8)
    assert v1 > 0


def test_centroid_triplet_excludes_anchor_from_positive_centroid():
    # class 0 = {a, b}: a's positive centroid is b alone, so d_pos = |a - b|
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    loss = losses.create("centroid_triplet", margin=0.0, negatives="hardest", reducer="mean")
    # anchors a=(1,0), b=(0,1): positive centroid = the other one, d_pos = sqrt2; class-1 centroid (-1,0)
    # anchors c=d=(-1,0): positive centroid = the twin, d_pos = 0; class-0 centroid (0.5, 0.5)
    assert loss(emb, labels).item() == pytest.approx(0.0, abs=1e-12)
    loss = losses.create("centroid_triplet", margin=1.0, negatives="hardest", reducer="mean")
    # a: relu(sqrt2 - 2 + 1); b: relu(sqrt2 - sqrt2 + 1) = 1; c, d: relu(0 - sqrt(2.5) + 1) = 0
    # (with the anchor inside its own centroid this would be (0 + (sqrt.5 - sqrt2 + 1)) / 4 instead)
    expected = (math.sqrt(2) - 1 + 1) / 4
    assert loss(emb, labels).item() == pytest.approx(expected, abs=1e-12)


PAIR_LOSSES = [
    ("contrastive", {}),
    ("triplet", {"mining": "batch_all"}),
    ("triplet", {"mining": "batch_hard"}),
    ("triplet", {"mining": "semi_hard"}),
    ("multi_similarity", {}),
    ("centroid_triplet", {}),
]


@pytest.mark.parametrize("name,opts", PAIR_LOSSES)
@pytest.mark.parametrize("case", ["distinct", "single_class", "one_sample"])
def test_no_valid_pairs_gives_zero_with_grad(name, opts, case):
    g = torch.Generator().manual_seed(0)
    n = 1 if case == "one_sample" else 6
    emb = torch.randn(n, DIM, generator=g).requires_grad_(True)
    labels = torch.arange(n) if case == "distinct" else torch.zeros(n, dtype=torch.long)
    loss = losses.create(name, **opts)(emb, labels)
    if name == "contrastive" and case != "one_sample":
        # contrastive still has pairs of one kind here (negatives only, or positives only): PML's value
        expected = pml_losses.ContrastiveLoss()(emb.detach().double(), labels)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    else:
        assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", ["arcface", "normalized_softmax", "proxy_anchor"])
def test_parametric_losses_expose_parameters_and_train(name):
    torch.manual_seed(0)
    loss_fn = losses.create(name, num_classes=4, embedding_dim=DIM)
    assert loss_fn.requires_classes
    params = list(loss_fn.parameters())
    assert len(params) == 1 and params[0].shape == (4, DIM)
    emb = torch.randn(12, DIM, requires_grad=True)
    labels = torch.arange(12) % 4
    opt = torch.optim.SGD([emb, *params], lr=0.05)
    first = None
    for _ in range(10):
        opt.zero_grad()
        value = loss_fn(emb, labels)
        value.backward()
        assert params[0].grad is not None and params[0].grad.abs().sum() > 0
        opt.step()
        first = value.item() if first is None else first
    assert value.item() < first
    with pytest.raises(ValueError, match="labels must lie"):
        loss_fn(emb, torch.full((12,), 4))


@pytest.mark.parametrize("name,opts", PAIR_LOSSES)
def test_pair_losses_get_gradients_and_decrease(name, opts):
    torch.manual_seed(0)
    emb = torch.randn(16, DIM, requires_grad=True)
    labels = torch.arange(16) % 4
    loss_fn = losses.create(name, **opts)
    assert not loss_fn.requires_classes and not list(loss_fn.parameters())
    value = loss_fn(emb, labels)
    value.backward()
    assert value.item() > 0 and emb.grad.abs().sum() > 0
    with torch.no_grad():
        emb -= 0.5 * emb.grad / emb.grad.norm()
    assert loss_fn(emb, labels).item() < value.item()


def test_bad_shapes_raise():
    loss_fn = losses.create("triplet")
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(4, DIM), torch.arange(3))
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.randn(4), torch.arange(4))


def test_float32_close_to_float64():
    emb, labels = _batch(5)
    for name, opts in PAIR_LOSSES:
        loss_fn = losses.create(name, **opts)
        assert loss_fn(emb.float(), labels).item() == pytest.approx(loss_fn(emb, labels).item(), abs=1e-4)

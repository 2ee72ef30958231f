"""Metric-learning losses in pytorch-metric-learning (PML) style: ``loss(embeddings, labels) -> scalar``.

Build one with ``create(name, **options)``; ``LOSSES`` maps names to classes; ``loss_variants()`` names
every loss once per triplet mining (the names the notebooks take), ``loss_spec(name)`` turns one back.
Conventions (chosen to agree with PML defaults, so values can be cross-checked):
- pair/triplet losses use Euclidean distance between L2-normalised embeddings
  (PML ``LpDistance(normalize_embeddings=True)``); multi-similarity and the proxy/classifier
  losses use cosine similarity.
- contrastive and triplet losses average over the terms with a non-zero loss
  (PML ``AvgNonZeroReducer``); ``reducer="mean"`` averages over all mined terms instead.
- a batch without any valid pair/triplet yields ``embeddings.sum() * 0``: zero, never NaN,
  and still part of the graph.
- losses with learnable parameters (``requires_classes = True``) take ``num_classes`` and
  ``embedding_dim``, keep them as ``nn.Parameter`` and need integer labels in [0, num_classes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fashlib.miners import TRIPLET_MINERS, multi_similarity_pairs, pair_masks

LOSSES: dict[str, type[nn.Module]] = {}


def register(name: str):
    """Class decorator adding a loss to the LOSSES registry under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        LOSSES[name] = cls
        return cls

    return add


def create(name: str, **options: Any) -> nn.Module:
    """Instantiate the loss registered as ``name`` with its keyword options."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[name](**options)


# ---------------------------------------------------------------- helpers


def _as_labels(labels: Any, embeddings: torch.Tensor) -> torch.Tensor:
    """Labels as a 1-D long tensor on the embeddings' device, length-checked."""
    labels = torch.as_tensor(labels, device=embeddings.device)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    if labels.ndim != 1 or len(labels) != len(embeddings):
        raise ValueError(f"labels must be 1-D of length {len(embeddings)}, got shape {tuple(labels.shape)}")
    return labels.long()


def _zero(embeddings: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """A zero loss that stays in the autograd graph (gradients are zeros, not None)."""
    out = embeddings.sum() * 0
    for p in params:
        out = out + p.sum() * 0
    return out


def _reduce(losses: torch.Tensor, reducer: str, embeddings: torch.Tensor) -> torch.Tensor:
    """Average ``losses`` over all terms ("mean") or over the positive ones ("mean_nonzero")."""
    if reducer == "mean_nonzero":
        losses = losses[losses > 0]
    elif reducer != "mean":
        raise ValueError(f"reducer must be 'mean' or 'mean_nonzero', got {reducer!r}")
    return losses.mean() if losses.numel() else _zero(embeddings)


def _euclidean(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances between rows of L2-normalised ``x``."""
    x = F.normalize(x, dim=1)
    return torch.cdist(x, x)


def _log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 + sum over masked entries of exp(x)) along ``dim``, stable; 0 where nothing is masked."""
    x = x.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([x, zeros], dim=dim), dim=dim)


def _check_classes(labels: torch.Tensor, num_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]")


# ---------------------------------------------------------------- pair / triplet losses


@register("contrastive")
class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006) on Euclidean distances.

    Positive pairs cost relu(d - pos_margin), negative pairs relu(neg_margin - d); each part is
    averaged (non-zero terms by default, like PML ContrastiveLoss) and the two parts are summed.
    """

    requires_classes = False

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, reducer: str = "mean_nonzero"):
        super().__init__()
        self.pos_margin, self.neg_margin, self.reducer = pos_margin, neg_margin, reducer

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        labels = _as_labels(labels, embeddings)
        dist = _euclidean(embeddings)
        pos, neg = pair_masks(labels)
        if not (pos.any() or neg.any()):
            return _zero(embeddings)
        pos_loss = F.relu(dist[pos] - self.pos_margin)
        neg_loss = F.relu(self.neg_margin - dist[neg])
        return _reduce(pos_loss, self.reducer, embeddings) + _reduce(neg_loss, self.reducer, embeddings)


@register("triplet")
class TripletLoss(nn.Module):
    """Triplet margin loss (Schroff et al., FaceNet, CVPR 2015; Hermans et al. 2017 batch mining).

    relu(d(a,p) - d(a,n) + margin) on Euclidean distances of L2-normalised embeddings, over triplets
    from ``mining``: "batch_all" (every valid triplet), "batch_hard" (per anchor the farthest positive
    and closest negative) or "semi_hard" (all triplets with 0 < d(a,n) - d(a,p) <= margin).
    Matches PML TripletMarginLoss(margin) with no miner / BatchHardMiner / TripletMarginMiner(margin,
    "semihard"); reduced by averaging the non-zero terms.
    """

    requires_classes = False

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard", reducer: str = "mean_nonzero"):
        super().__init__()
        if mining not in TRIPLET_MINERS:
            raise ValueError(f"unknown mining {mining!r}; known: {sorted(TRIPLET_MINERS)}")
        self.margin, self.mining, self.reducer = margin, mining, reducer

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        labels = _as_labels(labels, embeddings)
        dist = _euclidean(embeddings)
        a, p, n = TRIPLET_MINERS[self.mining](dist.detach(), labels, self.margin)
        if len(a) == 0:
            return _zero(embeddings)
        losses = F.relu(dist[a, p] - dist[a, n] + self.margin)
        return _reduce(losses, self.reducer, embeddings)


@register("multi_similarity")
class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss with its pair mining (Wang et al., CVPR 2019).

    On cosine similarities S: per anchor (1/alpha) log(1 + sum_p exp(-alpha (S_ap - base)))
    + (1/beta) log(1 + sum_n exp(beta (S_an - base))) over the pairs kept by the MS mining step
    (``epsilon``; ``epsilon=None`` uses all pairs), averaged over all anchors of the batch.
    Equals PML MultiSimilarityLoss(alpha, beta, base) + MultiSimilarityMiner(epsilon).
    """

    requires_classes = False

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float | None = 0.1):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        labels = _as_labels(labels, embeddings)
        x = F.normalize(embeddings, dim=1)
        sim = x @ x.T
        pos, neg = pair_masks(labels)
        if self.epsilon is not None:
            pos, neg = multi_similarity_pairs(sim.detach(), labels, self.epsilon)
        if not (pos.any() or neg.any()):
            return _zero(embeddings)
        pos_term = _log1p_sum_exp(-self.alpha * (sim - self.base), pos, dim=1) / self.alpha
        neg_term = _log1p_sum_exp(self.beta * (sim - self.base), neg, dim=1) / self.beta
        return (pos_term + neg_term).mean()


@register("centroid_triplet")
class CentroidTripletLoss(nn.Module):
    """Centroid triplet loss (Wieczorek, Rychalska & Dabrowski, "On the Unreasonable Effectiveness of
    Centroids in Image Retrieval", ICONIP 2021).

    Our reading: each sample is a query; its positive is the centroid (mean) of the OTHER samples of
    its class in the batch (the query itself excluded), its negatives are the centroids of the other
    classes in the batch (mean of all their samples). Loss relu(||q - c_P|| - ||q - c_N|| + margin)
    with the closest negative centroid (``negatives="hardest"``) or every one (``"all"``), averaged
    over the terms (``reducer``: "mean" as in the paper's margin ranking loss, or "mean_nonzero").
    Embeddings are L2-normalised first (``normalize``); centroids are plain means, not re-normalised.
    Queries whose class has no other sample in the batch, or batches of one class, give no triplet.
    (The authors' code takes the negatives among leave-one-out centroids of other-class samples with
    batch-hard mining; the hardest full-class centroid used here is the same idea per class.)
    """

    requires_classes = False

    def __init__(self, margin: float = 0.3, negatives: str = "hardest", reducer: str = "mean", normalize: bool = True):
        super().__init__()
        if negatives not in ("hardest", "all"):
            raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")
        self.margin, self.negatives, self.reducer, self.normalize = margin, negatives, reducer, normalize

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        labels = _as_labels(labels, embeddings)
        x = F.normalize(embeddings, dim=1) if self.normalize else embeddings
        classes, idx = torch.unique(labels, return_inverse=True)
        member = F.one_hot(idx, len(classes)).to(x.dtype)  # (N, C)
        counts = member.sum(0)  # (C,)
        sums = member.T @ x  # (C, D)
        own = counts[idx]
        valid = own > 1
        if len(classes) < 2 or not valid.any():
            return _zero(embeddings)
        x, idx, own = x[valid], idx[valid], own[valid]
        pos_centroid = (sums[idx] - x) / (own - 1)[:, None]
        d_pos = _safe_norm(x - pos_centroid)  # (Q,)
        d_neg = _safe_norm(x[:, None, :] - (sums / counts[:, None])[None])  # (Q, C)
        is_neg = idx[:, None] != torch.arange(len(classes), device=x.device)[None]
        if self.negatives == "hardest":
            losses = F.relu(d_pos - d_neg.masked_fill(~is_neg, float("inf")).min(1).values + self.margin)
        else:
            losses = F.relu(d_pos[:, None] - d_neg + self.margin)[is_neg]
        return _reduce(losses, self.reducer, embeddings)


def _safe_norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last axis with a finite gradient at zero."""
    return v.pow(2).sum(-1).clamp_min(1e-12).sqrt()


# ---------------------------------------------------------------- proxy / classifier losses


class _ClassWeightLoss(nn.Module):
    """Base of the classifier-style losses: one learnable weight vector per class, (C, D)."""

    requires_classes = True

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (N, C) of every embedding to every class weight."""
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T


@register("arcface")
class ArcFaceLoss(_ClassWeightLoss):
    """Additive angular margin loss (Deng et al., ArcFace, CVPR 2019).

    Cross-entropy over ``scale * cos(theta_j)`` with the target angle replaced by theta + margin
    (margin in RADIANS, paper default 0.5); where theta + margin would pass pi the logit becomes
    cos(theta) - margin*sin(margin) (as in the paper's code) to stay monotonic. ``weight`` has shape
    (num_classes, embedding_dim). PML ArcFaceLoss takes the margin in degrees: PML margin =
    math.degrees(margin) and PML ``W`` = ``weight.T``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.5, scale: float = 64.0):
        super().__init__(num_classes, embedding_dim)
        self.margin, self.scale = margin, scale

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        labels = _as_labels(labels, embeddings)
        _check_classes(labels, self.num_classes)
        if len(labels) == 0:
            return _zero(embeddings, self.weight)
        cos = self.cosine(embeddings)
        eps = 1e-7
        target = cos.gather(1, labels[:, None]).clamp(-1 + eps, 1 - eps)
        theta = torch.acos(target)
        shifted = torch.where(
            theta <= math.pi - self.margin, torch.cos(theta + self.margin), target - self.margin * math.sin(self.margin)
        )
        logits = cos.scatter(1, labels[:, None], shifted) * self.scale
        return F.cross_entropy(logits, labels)


@register("normalized_softmax")
class NormalizedSoftmaxLoss(_ClassWeightLoss):
    """Normalised softmax / NormFace (Wang et al. 2017; Zhai & Wu, "Classification is a Strong
    Baseline for Deep Metric Learning", BMVC 2019).

    Cross-entropy over cosine(embedding, class weight) / temperature; ``weight`` is
    (num_classes, embedding_dim). Equals PML NormalizedSoftmaxLoss with ``W`` = ``weight.T``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05):
        super().__init__(num_classes, embedding_dim)
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        labels = _as_labels(labels, embeddings)
        _check_classes(labels, self.num_classes)
        if len(labels) == 0:
            return _zero(embeddings, self.weight)
        logits = self.cosine(embeddings) / self.temperature
        return F.cross_entropy(logits, labels)


@register("proxy_anchor")
class ProxyAnchorLoss(nn.Module):
    """Proxy-anchor loss (Kim, Kim, Cho & Kwak, CVPR 2020).

    With cosine s(x, p): (1/|P+|) sum_{p in P+} log(1 + sum_{x of class p} exp(-alpha (s - margin)))
    + (1/C) sum_p log(1 + sum_{x not of class p} exp(alpha (s + margin))), P+ = proxies with a
    sample in the batch. ``proxies`` is (num_classes, embedding_dim), kaiming-normal initialised as
    in the paper's code. Equals PML ProxyAnchorLoss (same proxies layout).
    """

    requires_classes = True

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__()
        self.num_classes, self.margin, self.alpha = num_classes, margin, alpha
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings: torch.Tensor, labels: Any) -> torch.Tensor:
        labels = _as_labels(labels, embeddings)
        _check_classes(labels, self.num_classes)
        if len(labels) == 0:
            return _zero(embeddings, self.proxies)
        cos = F.normalize(embeddings, dim=1) @ F.normalize(self.proxies, dim=1).T  # (N, C)
        pos = F.one_hot(labels, self.num_classes).bool()
        pos_term = _log1p_sum_exp(-self.alpha * (cos - self.margin), pos, dim=0)
        neg_term = _log1p_sum_exp(self.alpha * (cos + self.margin), ~pos, dim=0)
        with_pos = pos.any(0).sum()
        return pos_term.sum() / with_pos + neg_term.sum() / self.num_classes


# ------------------------------------------------------------------------------------------ variant names
def loss_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every loss of fashlib.losses as name -> (loss, options); triplet once per mining (triplet_batch_hard, ...)."""
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in LOSSES:
        if name == "triplet":
            variants.update({f"triplet_{mining}": ("triplet", {"mining": mining}) for mining in TRIPLET_MINERS})
        else:
            variants[name] = (name, {})
    return variants


def loss_spec(name: str) -> tuple[str, dict[str, Any]]:
    """(loss name, loss options) of a variant name from loss_variants() or a plain fashlib.losses name."""
    variants = loss_variants()
    if name in variants:
        loss, options = variants[name]
        return loss, dict(options)
    if name in LOSSES:
        return name, {}
    raise ValueError(f"unknown loss {name!r}; known: {sorted(set(variants) | set(LOSSES))}")

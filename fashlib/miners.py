"""Pair and triplet miners: pick which comparisons of a batch a loss trains on.

Each miner takes a (N, N) distance matrix (Euclidean, smaller = closer) or similarity matrix
and the (N,) label tensor, and returns index tensors; none of them carries gradients.
Conventions follow pytorch-metric-learning (PML) so that the losses can be cross-checked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, N) boolean masks of positive pairs (same label, i != j) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _triplet_mask(labels: torch.Tensor) -> torch.Tensor:
    """(N, N, N) mask of valid triplets [a, p, n]: a~p (a != p) and a !~ n."""
    pos, neg = pair_masks(labels)
    return pos[:, :, None] & neg[:, None, :]


@torch.no_grad()
def all_triplets(dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> Triplets:
    """Every valid triplet (PML TripletMarginMiner type "all" keeps the same non-zero-loss ones)."""
    a, p, n = torch.where(_triplet_mask(labels))
    return a, p, n


@torch.no_grad()
def semi_hard_triplets(dist: torch.Tensor, labels: torch.Tensor, margin: float) -> Triplets:
    """All triplets with 0 < d(a,n) - d(a,p) <= margin (PML TripletMarginMiner "semihard").

    Unlike FaceNet (one semi-hard negative per anchor-positive pair) every semi-hard triplet is kept.
    """
    gap = dist[:, None, :] - dist[:, :, None]  # gap[a, p, n] = d(a,n) - d(a,p)
    a, p, n = torch.where(_triplet_mask(labels) & (gap > 0) & (gap <= margin))
    return a, p, n


@torch.no_grad()
def batch_hard_triplets(dist: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> Triplets:
    """One triplet per anchor: farthest positive, closest negative (Hermans et al. 2017).

    Anchors lacking a positive or a negative are dropped (as PML BatchHardMiner does).
    """
    pos, neg = pair_masks(labels)
    keep = pos.any(1) & neg.any(1)
    hardest_p = dist.masked_fill(~pos, float("-inf")).argmax(1)
    hardest_n = dist.masked_fill(~neg, float("inf")).argmin(1)
    a = torch.where(keep)[0]
    return a, hardest_p[a], hardest_n[a]


@torch.no_grad()
def multi_similarity_pairs(
    sim: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair mining of Wang et al. 2019 on a similarity matrix; returns (pos_mask, neg_mask).

    Keeps a negative (a, n) when S_an + eps > min_p S_ap and a positive (a, p) when
    S_ap - eps < max_n S_an (same rule as PML MultiSimilarityMiner).
    """
    pos, neg = pair_masks(labels)
    max_neg = sim.masked_fill(~neg, float("-inf")).max(1).values
    min_pos = sim.masked_fill(~pos, float("inf")).min(1).values
    pos_keep = pos & (sim - epsilon < max_neg[:, None])
    neg_keep = neg & (sim + epsilon > min_pos[:, None])
    return pos_keep, neg_keep


TRIPLET_MINERS: dict[str, Callable[..., Triplets]] = {
    "batch_all": all_triplets,
    "batch_hard": batch_hard_triplets,
    "semi_hard": semi_hard_triplets,
}

"""fashlib.losses.loss_variants / loss_spec: the loss names the notebooks take (triplet once per mining)."""

import inspect

import pytest
import torch

from fashlib import losses
from fashlib.miners import TRIPLET_MINERS


def test_loss_variants_cover_every_loss_and_every_triplet_mining():
    variants = losses.loss_variants()
    assert {loss for loss, _ in variants.values()} == set(losses.LOSSES)
    triplets = {name: opts["mining"] for name, (loss, opts) in variants.items() if loss == "triplet"}
    assert set(triplets.values()) == set(TRIPLET_MINERS) == {"batch_all", "batch_hard", "semi_hard"}
    assert all(name == f"triplet_{mining}" for name, mining in triplets.items())
    # every variant builds and gives a finite loss on a P x K batch
    torch_labels = torch.arange(4).repeat_interleave(3)
    emb = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    for name, (loss, options) in variants.items():
        accepted = inspect.signature(losses.LOSSES[loss]).parameters
        extra = {k: v for k, v in (("num_classes", 4), ("embedding_dim", 8)) if k in accepted}
        value = losses.create(loss, **options, **extra)(emb, torch_labels)
        assert torch.isfinite(value), name


def test_loss_spec_resolves_variants_plain_names_and_rejects_unknown():
    assert losses.loss_spec("triplet_semi_hard") == ("triplet", {"mining": "semi_hard"})
    assert losses.loss_spec("triplet") == ("triplet", {})
    assert losses.loss_spec("arcface") == ("arcface", {})
    spec = losses.loss_spec("triplet_batch_all")
    spec[1]["mining"] = "changed"  # a copy: the registry is not mutated
    assert losses.loss_spec("triplet_batch_all")[1] == {"mining": "batch_all"}
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        losses.loss_spec("nope")

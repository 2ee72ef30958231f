"""fashlib.embeddings: the ensemble of several backbones' features."""

import numpy as np
import pytest

from fashlib import embeddings


def test_ensemble_features_weights_each_backbone_equally_and_is_unit_length():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)) * 100.0, rng.normal(size=(5, 7)) * 0.01  # very different scales
    out = embeddings.ensemble_features([a, b])
    assert out.shape == (5, 10) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # independent computation: each part unit length, so each contributes exactly 1/sqrt(2) of the norm
    expect = np.hstack([a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)])
    np.testing.assert_allclose(out, expect / np.sqrt(2.0), rtol=1e-5)
    # cosine similarity of the ensemble = mean of the parts' cosine similarities
    cos = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    np.testing.assert_allclose(out @ out.T, (cos(a) + cos(b)) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="different numbers of rows"):
        embeddings.ensemble_features([a, b[:4]])
    with pytest.raises(ValueError):
        embeddings.ensemble_features([])

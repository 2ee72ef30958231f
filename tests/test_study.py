"""fashlib.study helpers: try_call (a failing entry becomes a row) and relative_history (losses on one scale)."""

import numpy as np

from fashlib import study


def test_try_call_returns_value_or_error_message():
    assert study.try_call(lambda a, b=1: a + b, 2, b=3) == (5, None)
    value, error = study.try_call(int, "x")
    assert value is None and error.startswith("ValueError: invalid literal")


def test_try_call_reports_a_backbone_that_cannot_be_built():
    from fashlib import models

    value, error = study.try_call(models.backbone_info, "no_such_backbone_xyz")
    assert value is None and error.startswith("RuntimeError") and "no_such_backbone_xyz" in error


def test_relative_history_divides_by_the_first_epoch():
    frame = study.relative_history([4.0, 2.0, 1.0])
    assert list(frame.columns) == ["epoch", "loss", "relative loss"]
    assert frame["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(frame["relative loss"], [1.0, 0.5, 0.25])
    assert study.relative_history([0.0, 0.0])["relative loss"].tolist() == [0.0, 0.0]  # no division by zero
    assert len(study.relative_history([])) == 0

"""Tests for fashlib.engine: ONNX export + parity, the export cache, the registry and the PyTorch fallback."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from fashlib import engine as engines
from fashlib.engine import (
    EngineParityError,
    check_parity,
    create_engine,
    default_engine,
)
from fashlib.models import create_embedder, offline_backbones

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_embedder("test_efficientnet", embedding_dim=16, pretrained=False)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _torch_features(model, x, fn="pooled") -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return (model.pooled_features(x) if fn == "pooled" else model(x)).numpy()


@pytest.mark.parametrize("backbone", offline_backbones())
def test_offline_backbones_export_with_parity(backbone):
    """Lite0-2 with their ImageNet weights: exported, parity-checked, equal to PyTorch on new images."""
    model = create_embedder(backbone, embedding_dim=None, pooling="avg")
    size = int(model.data_config["input_size"][-1])
    with create_engine(model, "onnx", sample=_images(12, size), threads=1) as onnx:
        assert onnx.name == "onnx" and onnx.parity["rows"] == 12 and onnx.parity["top_k"] == 10
        assert onnx.parity["max_abs_diff"] <= 1e-4
        x = _images(5, size, seed=1)  # other images, another batch size (the batch axis is dynamic)
        got = onnx(x)
    assert got.shape == (5, model.feature_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, _torch_features(model, x), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("fn", ["pooled", "embedding"])
def test_export_of_either_output_matches_torch_and_keeps_the_models_mode(tiny, fn):
    tiny.train()  # the exporter must not leave it in another mode (the TorchScript exporter restores its own)
    with create_engine(tiny, "onnx", fn=fn, sample=_images(16, 64)) as onnx:
        assert tiny.training and tiny.backbone.training
        x = _images(20, 64, seed=2)  # 20 rows: split into engine calls of at most 16
        got = onnx(x)
    assert got.shape == (20, 256 if fn == "pooled" else 16)
    np.testing.assert_allclose(got, _torch_features(tiny, x, fn), atol=1e-5, rtol=1e-4)
    assert all(p.is_contiguous() for p in tiny.parameters())


def test_check_parity_catches_differences_and_reordered_rankings():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8)).astype(np.float32)
    report = check_parity(a, a * 3.0)  # only the scale differs: equal after L2 normalisation
    assert report == {"max_abs_diff": pytest.approx(0.0, abs=1e-7), "rows": 20, "top_k": 10}
    with pytest.raises(EngineParityError, match="max \\|diff\\|"):
        check_parity(a, a + 1e-2 * rng.normal(size=a.shape).astype(np.float32))
    with pytest.raises(EngineParityError, match="shapes differ"):
        check_parity(a, a[:, :4])
    # rows 1 and 2 nearly equal (row 2 a hair closer to row 0); exchanging them changes every ranking that
    # holds both, while the outputs move by ~1e-6, well inside the tolerance
    x = a / np.linalg.norm(a, axis=1, keepdims=True)
    x[2] = x[1] + 1e-6 * x[0]
    swapped = x.copy()
    swapped[[1, 2]] = x[[2, 1]]
    with pytest.raises(EngineParityError, match="top-10 ranking"):
        check_parity(x, swapped)
    assert check_parity(x[:4], x[:4])["top_k"] == 3  # k capped at N - 1


def test_export_is_cached_by_weights_and_input_size(tiny, tmp_path, monkeypatch):
    exports = []
    real_export = engines._export
    monkeypatch.setattr(engines, "_export", lambda *a: exports.append(a[1]) or real_export(*a))
    create_engine(tiny, "onnx", sample=_images(4, 64), cache_dir=tmp_path).close()
    create_engine(tiny, "onnx", sample=_images(4, 64, seed=3), cache_dir=tmp_path).close()
    assert len(exports) == 1 and len(list(tmp_path.glob("*.onnx"))) == 1  # reused
    create_engine(tiny, "onnx", sample=_images(4, 72), cache_dir=tmp_path).close()  # another input size
    before = set(tmp_path.glob("*.onnx"))
    with torch.no_grad():
        next(tiny.backbone.parameters()).mul_(1.5)  # other weights
    create_engine(tiny, "onnx", sample=_images(4, 64), cache_dir=tmp_path).close()
    assert len(exports) == 3 and len(list(tmp_path.glob("*.onnx"))) == 3
    (newest,) = set(tmp_path.glob("*.onnx")) - before
    newest.write_bytes(newest.read_bytes()[:100])  # truncated file: detected by its sha256, exported again
    with (
        pytest.warns(UserWarning, match="exporting it again"),
        create_engine(tiny, "onnx", sample=_images(4, 64), cache_dir=tmp_path) as onnx,
    ):
        np.testing.assert_allclose(onnx(_images(3, 64)), _torch_features(tiny, _images(3, 64)), atol=1e-5)
    assert len(exports) == 4


def test_auto_falls_back_to_torch_when_parity_fails(tiny, monkeypatch):
    def failing(*_, **__):
        raise EngineParityError("simulated")

    monkeypatch.setattr(engines, "check_parity", failing)
    with pytest.raises(EngineParityError):
        create_engine(tiny, "onnx", sample=_images(4, 64))
    with (
        pytest.warns(UserWarning, match="falling back to PyTorch"),
        create_engine(tiny, "auto", sample=_images(4, 64)) as engine,
    ):
        assert engine.name == "torch" and engine.batch_size == engines.DEFAULT_BATCH_SIZE  # PyTorch's own best


def test_each_engine_runs_its_measured_batch_size_unless_told(tiny):
    pytest.importorskip("onnxruntime")
    x = _images(11, 64)
    with create_engine(tiny, "onnx", sample=x[:4]) as fast, create_engine(tiny, "torch") as slow:
        assert (fast.batch_size, slow.batch_size) == (engines.ONNX_BATCH_SIZE, engines.DEFAULT_BATCH_SIZE)
        np.testing.assert_allclose(fast(x), slow(x), atol=1e-4)  # 11 images in chunks of 4 and of 16
    with create_engine(tiny, "onnx", sample=x[:4], batch_size=7) as told:
        assert told.batch_size == 7 and told(x).shape == (11, tiny.feature_dim)


def test_pytorch_is_the_fallback_without_onnxruntime(tiny, tmp_path, monkeypatch):
    from PIL import Image
    from torchvision import transforms as T

    from fashlib.features import extract

    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    import pandas as pd

    table = pd.DataFrame({"path": paths})
    transform = T.Compose([T.Resize((64, 64)), T.ToTensor()])
    with_onnx = extract(tiny, table, transform=transform, progress=False)
    assert default_engine(tiny) == "onnx" and default_engine(tiny, "cuda") == "torch"
    assert default_engine(lambda x: x) == "torch"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert not engines.onnxruntime_available() and engines.available_engines() == ["torch"]
    assert default_engine(tiny) == "torch"
    with pytest.raises(ImportError, match="pip install onnx onnxruntime"):
        create_engine(tiny, "onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: PyTorch is simply the engine
        without = extract(tiny, table, transform=transform, progress=False)
    np.testing.assert_allclose(without, with_onnx, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown engine"):
        create_engine(tiny, "tensorrt")


def test_throughput_is_measured_for_every_engine():
    from fashlib.throughput import engine_throughputs

    speeds = engine_throughputs("test_efficientnet", 64, batch_size=4, batches=2)
    assert sorted(speeds) == ["onnx", "torch"] and all(v > 0 and np.isfinite(v) for v in speeds.values())


class _Branchy(torch.nn.Module):
    """Python control flow on a tensor value: a trace keeps only the branch of its sample batch."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        return y if float(x.mean()) > 0 else -2 * y


def test_a_trace_that_depends_on_the_batch_fails_parity_and_auto_falls_back():
    torch.manual_seed(0)
    model = _Branchy().eval()
    sample = _images(4, 32).abs()  # positive mean: the traced branch
    with pytest.raises(EngineParityError, match="tracer warned"):
        create_engine(model, "onnx", sample=sample)
    other = -_images(3, 32, seed=1).abs()  # the other branch
    with torch.no_grad():
        expected = model(other).numpy()
    with (
        pytest.warns(UserWarning, match="falling back to PyTorch"),
        create_engine(model, "auto", sample=sample) as engine,
    ):
        assert engine.name == "torch"
        np.testing.assert_allclose(engine(other), expected, atol=1e-6)


def test_export_cache_keys_see_the_architecture_not_only_the_weights(tmp_path):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    relu, tanh = (
        torch.nn.Sequential(conv, act, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        for act in (torch.nn.ReLU(), torch.nn.Tanh())
    )
    x = _images(3, 16, seed=2)
    for model in (relu, tanh):
        with create_engine(model, "onnx", sample=_images(4, 16), cache_dir=tmp_path) as engine, torch.no_grad():
            np.testing.assert_allclose(engine(x), model(x).numpy(), atol=1e-5)
    assert len(list(tmp_path.glob("*.onnx"))) == 2


def test_float16_models_run_in_pytorch_with_float32_features(tiny):
    half = tiny.half()
    x = _images(3, 64)
    assert engines.model_dtype(half) == torch.float16 and default_engine(half) == "torch"
    with pytest.raises(TypeError, match="float32 models"):
        create_engine(half, "onnx", sample=x)
    with create_engine(half, "auto", sample=x) as engine:
        got = engine(x)
    assert engine.name == "torch" and got.dtype == np.float32
    np.testing.assert_allclose(got, _torch_features(half.float(), x), rtol=2e-2, atol=2e-2)


def test_unwritable_export_cache_keeps_the_onnx_engine(tiny, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with (
        pytest.warns(UserWarning, match="not kept"),
        create_engine(tiny, "auto", sample=_images(4, 64), cache_dir=tmp_path / "file" / "engines") as engine,
    ):
        assert engine.name == "onnx"
        np.testing.assert_allclose(engine(_images(2, 64)), _torch_features(tiny, _images(2, 64)), atol=1e-5)


def test_images_of_another_size_than_the_export_run_in_pytorch(tiny):
    tiny.train()
    wide, square = _images(3, 64)[..., :56], _images(2, 64, seed=4)  # e.g. Resize(64) of a landscape photo
    with create_engine(tiny, "onnx", sample=_images(4, 64)) as engine:
        with pytest.warns(UserWarning, match=r"differ from the exported \(3, 64, 64\)"):
            got_wide = engine(wide)
        got_square = engine(square)
    assert tiny.training  # the PyTorch fallback gave the mode back
    np.testing.assert_allclose(got_wide, _torch_features(tiny, wide), atol=1e-5)
    np.testing.assert_allclose(got_square, _torch_features(tiny, square), atol=1e-5)


def test_torch_engine_gives_back_the_models_own_memory_format(tiny):
    conv = tiny.backbone.conv_stem.weight
    with create_engine(tiny, "torch") as engine:
        engine(_images(2, 64))
    assert conv.is_contiguous()  # channels_last only while extracting
    tiny.to(memory_format=torch.channels_last)
    with create_engine(tiny, "torch") as engine:
        engine(_images(2, 64))
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)  # kept as it was


@pytest.mark.parametrize("engine", ["torch", "auto"])
@pytest.mark.parametrize("batch_size", [0, -4])
def test_a_batch_size_below_one_is_refused_naming_the_value(tiny, engine, batch_size):
    # 0 used to mean "the default" silently (or a range() error), a negative size gave no features at all
    with pytest.raises(ValueError, match=rf"batch_size must be a positive number of images, got {batch_size}"):
        create_engine(tiny, engine, sample=_images(2, 32), batch_size=batch_size)


@pytest.mark.parametrize("threads", [0, -2])
def test_onnx_threads_below_one_are_refused(tiny, threads):
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="threads must be a positive number"):
        create_engine(tiny, "onnx", sample=_images(2, 64), threads=threads)


def test_full_batches_run_in_a_fixed_batch_session_with_the_same_features(tiny, monkeypatch):
    x = _images(11, 64)  # batches of 4: two full ones (fixed session) and a remainder of 3 (dynamic session)
    with create_engine(tiny, "onnx", sample=_images(8, 64, seed=1), batch_size=4) as eng:
        assert eng.fixed is not None
        used = []
        for name in ("fixed", "session"):
            real = getattr(eng, name)
            monkeypatch.setattr(eng, name, _Recording(real, name, used))
        got = eng(x)
    assert used == ["fixed", "fixed", "session"]
    np.testing.assert_allclose(got, _torch_features(tiny, x), atol=1e-4)


class _Recording:
    """An ONNX Runtime session stand-in that records which session ran and delegates to the real one."""

    def __init__(self, session, name, log):
        self.session, self.name, self.log = session, name, log

    def run(self, *args, **kwargs):
        self.log.append(self.name)
        return self.session.run(*args, **kwargs)


def test_a_fixed_batch_session_that_differs_is_dropped_with_a_warning(tiny, monkeypatch):
    real_check = engines.check_parity

    def fail_the_fixed_session_check(reference, candidate, **kwargs):
        if "k" in kwargs:  # only the dynamic-vs-fixed session check passes k
            raise EngineParityError("planted difference")
        return real_check(reference, candidate, **kwargs)

    monkeypatch.setattr(engines, "check_parity", fail_the_fixed_session_check)
    with pytest.warns(UserWarning, match="batch fixed to 4 unusable.*planted difference"):
        eng = create_engine(tiny, "onnx", sample=_images(8, 64), batch_size=4)
    assert eng.fixed is None
    x = _images(9, 64, seed=3)
    np.testing.assert_allclose(eng(x), _torch_features(tiny, x), atol=1e-4)


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_a_batch_of_no_images_gives_no_rows_of_the_right_width(tiny, engine):
    if engine == "onnx":
        pytest.importorskip("onnxruntime")
    with create_engine(tiny, engine, sample=_images(4, 64)) as eng:
        width = eng(_images(1, 64)).shape[1]
        got = eng(_images(0, 64))  # used to fail in np.concatenate: "need at least one array to concatenate"
    assert got.shape == (0, width) and got.dtype == np.float32


def test_an_empty_sample_is_refused_naming_the_sample_not_the_batch_size(tiny):
    pytest.importorskip("onnxruntime")
    # used to say "batch_size must be a positive number of images, got 0" for batch_size=4
    with pytest.raises(ValueError, match=r"sample must be a batch .* got shape \(0, 3, 64, 64\)"):
        create_engine(tiny, "onnx", sample=_images(0, 64), batch_size=4)


def test_a_batch_size_above_the_samples_rows_builds_the_fixed_session_on_the_first_full_batch(tiny):
    pytest.importorskip("onnxruntime")
    # batch_size=10**7 used to build a batch of repeated sample rows at construction: a 491 GB allocation
    with create_engine(tiny, "onnx", sample=_images(2, 64), batch_size=10**7) as eng:
        x = _images(3, 64)
        np.testing.assert_allclose(eng(x), _torch_features(tiny, x), atol=1e-4)
        assert eng.fixed is None  # never a full batch: never built
    with create_engine(tiny, "onnx", sample=_images(2, 64), batch_size=6) as eng:
        assert eng.fixed is None
        x = _images(8, 64, seed=5)  # one full batch of 6, checked against the dynamic session, then 2 rows
        np.testing.assert_allclose(eng(x), _torch_features(tiny, x), atol=1e-4)
        assert eng.fixed is not None


@pytest.mark.parametrize(("option", "value"), [("batch_size", 2.5), ("batch_size", "4"), ("threads", 1.5)])
def test_counts_that_are_not_whole_numbers_are_refused_not_truncated(tiny, option, value):
    pytest.importorskip("onnxruntime")  # 2.5 used to run batches of 2, "4" to be taken as 4, 1.5 as 1 thread
    with pytest.raises(ValueError, match=f"{option} must be a positive number of .*got {value!r}"):
        create_engine(tiny, "onnx", sample=_images(2, 32), **{option: value})

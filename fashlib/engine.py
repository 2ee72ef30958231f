"""Inference engines for feature extraction: ONNX Runtime on CPU, PyTorch on GPU and as the fallback.

`create_engine(model, engine="auto")` returns an object that maps a float32 image batch (N, 3, H, W) to
features (N, D) float32 numpy, chosen from the registry `ENGINES`:

- "onnx": the model (backbone + pooling for fn="pooled", the whole embedder with its head for
  fn="embedding", or any nn.Module) exported with the TorchScript ONNX exporter (`dynamo=False`: the
  dynamo exporter of torch 2.14 needs onnxscript, which is not installed and not needed here) at
  opset 17 with a dynamic batch axis, and run by ONNX Runtime CPU sessions (one with the batch fixed to
  the engine's batch size for full batches, one dynamic for the rest). Every export is checked
  against PyTorch on a sample batch (`check_parity`: max |diff| of L2-normalised outputs <= 1e-4 and
  identical top-10 rankings; when the tracer warns that it turned a tensor into a Python value, also on
  a second, different batch); with `cache_dir` the .onnx file is kept under a key of (weights and
  structure digests, output, input shape, torch version) with its sha256 and parity figures, so it is
  exported once.
- "torch": the nn.Module (or plain callable) under inference_mode, channels_last on CPU.

"auto" picks "onnx" on CPU when onnxruntime is importable and the model is a float32 nn.Module, else "torch";
an ONNX export that fails or misses parity falls back to PyTorch with a warning under "auto" (and raises
under "onnx").

Measured on this machine (2 cores, AMD EPYC, tf_efficientnet_lite0 at 224 px, pooled features, 2 threads;
`python3 benchmarks/bench_embedding.py --threads 2 --repeat 3`, 256 CC0 photos, 2026-11-29 18:55, median of 3):
forward only, ONNX Runtime at batch 4 / 16 / 32: 216 / 209 / 199 img/s; PyTorch (channels_last): 113 / 120 /
115 img/s. Full batches run in a session whose batch axis is fixed (`_fixed_session`: ONNX Runtime's
free-dimension override on the exported dynamic axis): with every shape known its layout optimisations
apply: in six passes over the same model (batch 4, same process, minutes apart) the fixed session ran at
155-221 img/s and the dynamic one at 86-168 img/s, the fixed one 1.3-2.6x faster in each pass. A last
shorter batch runs in the dynamic session. Smaller batches keep the activations
in the cache, so each engine has its own batch size (`ONNX_BATCH_SIZE` = 4, `DEFAULT_BATCH_SIZE` = 16 for
PyTorch and for GPUs; larger batches are split). Threads: ONNX Runtime gets the caller's
torch.get_num_threads() (intra-op; inter-op 1) unless `threads` is given, with spinning off: with extract's
decoding threads running beside it (1,024 CC0 photos, batch 4), 2 sleeping threads gave 131 img/s and 2
spinning threads 77 img/s; idle threads that spin take the cycles the decoding threads need. PyTorch on
CPU runs in channels_last (see fashlib.features.extract).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .pool import positive_count

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ENGINES",
    "ONNX_BATCH_SIZE",
    "PARITY_ATOL",
    "PARITY_TOP_K",
    "EngineParityError",
    "OnnxEngine",
    "TorchEngine",
    "available_engines",
    "check_parity",
    "create_engine",
    "default_engine",
    "model_dtype",
    "onnxruntime_available",
]

DEFAULT_BATCH_SIZE = 16  # PyTorch, and any engine on a GPU: measured, see the module docstring
ONNX_BATCH_SIZE = 4  # ONNX Runtime on the CPU: measured, see the module docstring
PARITY_ATOL = 1e-4
PARITY_TOP_K = 10
OPSET = 17


class EngineParityError(RuntimeError):
    """An exported model's outputs differ from PyTorch's beyond the tolerance."""


def onnxruntime_available() -> bool:
    """Whether onnxruntime (and onnx) can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _forward_fn(model: Any, fn: str) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    from .features import OUTPUTS

    if fn not in OUTPUTS:
        raise ValueError(f"unknown output {fn!r}; choose one of {sorted(OUTPUTS)}")
    return OUTPUTS[fn][0] if hasattr(model, "pooled_features") else (lambda m, x: m(x))


def model_dtype(model: Any) -> torch.dtype:
    """dtype of the first floating-point parameter or buffer of an nn.Module (float32 for anything else)."""
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_parity(
    reference: np.ndarray, candidate: np.ndarray, atol: float = PARITY_ATOL, k: int = PARITY_TOP_K
) -> dict[str, float]:
    """Compare two engines' outputs (N, D) on the same inputs; raise EngineParityError when they differ.

    Checks: max |difference| of the L2-normalised rows <= atol, and for every row the top-k ranking of
    the other rows by cosine similarity (k capped at N - 1) is identical. Returns
    {"max_abs_diff": float, "rows": N, "top_k": k}.
    """
    a, b = _l2(reference), _l2(candidate)
    if a.shape != b.shape:
        raise EngineParityError(f"output shapes differ: {a.shape} (PyTorch) vs {b.shape} (exported)")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    if not diff <= atol:
        raise EngineParityError(
            f"exported model differs from PyTorch: max |diff| of L2-normalised outputs "
            f"{diff:.2e} > {atol:.0e}; use engine='torch'"
        )
    k = min(k, len(a) - 1)
    if k > 0:
        rank_a, rank_b = (np.argsort(-(x @ x.T - 3 * np.eye(len(x))), axis=1, kind="stable")[:, :k] for x in (a, b))
        bad = np.flatnonzero((rank_a != rank_b).any(axis=1))
        if len(bad):
            raise EngineParityError(
                f"exported model changes the top-{k} ranking of {len(bad)} of {len(a)} sample "
                f"rows (max |diff| {diff:.2e}); use engine='torch'"
            )
    return {"max_abs_diff": diff, "rows": len(a), "top_k": int(max(k, 0))}


class _Forward(nn.Module):
    """nn.Module whose forward is one output (pooled / embedding) of a model: what gets exported."""

    def __init__(self, model: nn.Module, forward: Callable[[Any, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.forward_fn = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(self.model, x)


def _positive_count(value: Any, name: str = "batch_size", hint: str = "images") -> int:
    """pool.positive_count, with the engine's fix: None for the engine's own value."""
    return positive_count(value, name, hint, fix="; pass None for the engine's own")


class _Engine:
    """Common part: split batches into chunks of at most `batch_size`; context manager; close()."""

    name = "base"

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE):
        self.batch_size = _positive_count(batch_size)

    def _run(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Images (N, 3, H, W) float32 -> features (N, D) float32 numpy, in row order; N = 0 gives (0, D)."""
        if len(images) == 0:  # D from one blank image (np.concatenate refuses an empty list)
            return self._run(torch.zeros((1, *images.shape[1:]), dtype=images.dtype))[:0].astype(np.float32)
        parts = [self._run(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def close(self) -> None:
        """Give the model back as it was (mode, memory format)."""

    def __enter__(self) -> _Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TorchEngine(_Engine):
    """PyTorch forward under inference_mode; an nn.Module is put in eval mode (and channels_last on CPU).

    Images are cast to the model's dtype (model_dtype: float16/bfloat16 models take float32 images);
    features come back as float32.

    The model's previous mode and memory format are restored by close().
    """

    name = "torch"

    def __init__(
        self,
        model: Any,
        fn: str = "pooled",
        device: str | torch.device = "cpu",
        channels_last: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        super().__init__(batch_size)
        self.model, self.device = model, torch.device(device)
        self.forward = _forward_fn(model, fn)
        self.is_module = isinstance(model, nn.Module)
        self.was_training = model.training if self.is_module else False
        self.memory_format = torch.channels_last if channels_last and self.is_module else torch.contiguous_format
        self.dtype = model_dtype(model)
        self.was_channels_last = self.is_module and any(  # a model already in channels_last stays so
            t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            for t in model.parameters()
        )
        if self.is_module:
            model.to(self.device, memory_format=self.memory_format).eval()

    def _run(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = images.to(self.device, self.dtype, non_blocking=True, memory_format=self.memory_format)
            return self.forward(self.model, x).float().cpu().numpy()

    def close(self) -> None:
        if self.is_module:
            self.model.train(self.was_training)
            if self.memory_format is torch.channels_last and not self.was_channels_last:
                self.model.to(memory_format=torch.contiguous_format)


def _export_key(model: nn.Module, fn: str, shape: tuple[int, ...]) -> str:
    from .features import OUTPUTS, structure_digest, weights_digest

    modules = OUTPUTS[fn][1](model) if hasattr(model, "pooled_features") else [model]
    parts = {
        "weights": weights_digest(modules),
        "structure": structure_digest(model, modules),
        "fn": fn,
        "input": list(shape),
        "torch": torch.__version__,
        "opset": OPSET,
        "model": type(model).__name__,
        "name": str(getattr(model, "backbone_name", "")),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _export(model: nn.Module, fn: str, sample: torch.Tensor) -> tuple[bytes, list[str]]:
    """(ONNX bytes of one output of `model`, the tracer's warnings); eval mode, the model's mode restored.

    A TracerWarning means the trace turned a tensor into a Python value (a branch, a size): the graph
    may hold only for inputs like `sample`, so the caller checks parity on a different batch too.
    """
    was_training = model.training
    wrapper = _Forward(model, _forward_fn(model, fn)).eval()  # the exporter restores the *wrapper's* mode
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*will be removed.*")
            torch.onnx.export(
                wrapper,
                (sample.contiguous(),),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            )
    finally:
        model.train(was_training)
    traced = sorted({str(w.message).split(".")[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    return buffer.getvalue(), traced


def _probe(sample: torch.Tensor) -> torch.Tensor:
    """A batch unlike `sample` for a second parity check: negated, mirrored, one row fewer (another size)."""
    probe = -sample.flip(-1)
    return probe[:-1] if len(probe) > 1 else probe


def _cached_export(
    model: nn.Module, fn: str, sample: torch.Tensor, cache_dir: Path | None, parity: Callable[[bytes, list[str]], dict]
) -> bytes:
    """The exported ONNX bytes: from `cache_dir` when a verified copy exists, else exported + parity-checked.

    A cache_dir that cannot be written (read-only, full) only costs the reuse: warning, bytes returned.
    """
    if cache_dir is None:
        onnx_bytes, traced = _export(model, fn, sample)
        parity(onnx_bytes, traced)
        return onnx_bytes
    key = _export_key(model, fn, tuple(sample.shape[1:]))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(getattr(model, "backbone_name", "model")))
    stem = Path(cache_dir) / f"{safe}-{fn}-{'x'.join(map(str, sample.shape[1:]))}-{key[:20]}"
    path, meta = stem.with_suffix(".onnx"), stem.with_suffix(".json")
    if path.exists() and meta.exists():
        try:
            info = json.loads(meta.read_text())
            onnx_bytes = path.read_bytes()
            if info.get("key") == key and hashlib.sha256(onnx_bytes).hexdigest() == info.get("sha256"):
                return onnx_bytes
            raise ValueError("key or sha256 differs from the stored one")
        except (OSError, ValueError) as err:
            warnings.warn(f"exported model {path} unusable ({err}); exporting it again", stacklevel=4)
    onnx_bytes, traced = _export(model, fn, sample)
    report = parity(onnx_bytes, traced)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)  # written last: the commit marker
        for target, data in (
            (path, onnx_bytes),
            (
                meta,
                json.dumps(
                    {"key": key, "sha256": hashlib.sha256(onnx_bytes).hexdigest(), "parity": report}, indent=1
                ).encode(),
            ),
        ):
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
    except OSError as err:
        warnings.warn(
            f"exported model not kept in {cache_dir} ({err}); it is used from memory and exported "
            "again next time: pass a writable cache_dir",
            stacklevel=4,
        )
    return onnx_bytes


def _session_options(ort: Any, threads: int, spin: bool, batch: int | None = None) -> Any:
    """ONNX Runtime CPU session options: `threads` intra-op threads (inter-op 1, sequential), every graph
    optimisation, spinning as `spin` says; `batch` fixes the exported dynamic batch axis to that size."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle intra-op threads sleep instead of spinning: the decoding threads need those cycles (module docstring)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if batch is not None:
        options.add_free_dimension_override_by_name("batch", int(batch))
    return options


def _fixed_session(session: Any, make: Callable[[], Any], sample: torch.Tensor, batch: int) -> Any:
    """A second session with the batch axis fixed to `batch`, or None (warned) when it differs from `session`.

    With every shape known, ONNX Runtime's layout optimisations apply (module docstring: 1.3-2.6x the
    dynamic session's img/s). It is checked against the dynamic session on `batch` rows of `sample` (rows
    repeated when it has fewer) with check_parity's tolerance and top-k rankings. OnnxEngine builds it at
    construction when its sample has at least `batch` rows, else on the first full batch, with that batch.
    """
    rows = sample[torch.arange(batch) % len(sample)].numpy()
    k = PARITY_TOP_K if len(sample) >= batch else 0  # repeated rows tie: compare values only
    try:
        fixed = make()
        check_parity(session.run(None, {"images": rows})[0], fixed.run(None, {"images": rows})[0], k=k)
    except Exception as err:  # an optimisation that fails costs speed, never correctness
        warnings.warn(
            f"ONNX Runtime session with the batch fixed to {batch} unusable ({type(err).__name__}: {err}); "
            "every batch runs in the dynamic-batch session (slower)",
            stacklevel=4,
        )
        return None
    return fixed


class OnnxEngine(_Engine):
    """ONNX Runtime CPU session over the exported model; parity with PyTorch checked at every export.

    `sample` (N, 3, H, W) fixes the input size and is the parity batch (use real images: their features
    are well spread, so rankings are meaningful). `spin=False` lets idle intra-op threads sleep instead of
    busy-waiting. Raises EngineParityError when the check fails. Batches of another image size than
    `sample`'s (a transform without a fixed output size) run in PyTorch, with one warning.
    """

    name = "onnx"

    def __init__(
        self,
        model: nn.Module,
        sample: torch.Tensor,
        fn: str = "pooled",
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = ONNX_BATCH_SIZE,
        spin: bool = False,
    ):
        import onnxruntime as ort

        super().__init__(batch_size)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the ONNX engine exports nn.Modules; got {type(model).__name__}: use engine='torch'")
        if model_dtype(model) != torch.float32:
            raise TypeError(
                f"the ONNX engine exports float32 models; this one is {model_dtype(model)}: "
                "use engine='torch' or model.float()"
            )
        threads = _positive_count(torch.get_num_threads() if threads is None else threads, "threads", "threads")
        if sample.dim() != 4 or len(sample) == 0:
            raise ValueError(
                f"sample must be a batch (N, 3, H, W) of at least one image, got shape {tuple(sample.shape)}; "
                "pass real images of the size to extract, or None for random ones"
            )
        sample = sample.detach().float().cpu().contiguous()
        self.parity: dict | None = None

        def make(onnx_bytes: bytes, batch: int | None = None) -> Any:
            options = _session_options(ort, threads, spin, batch)
            return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

        checked: dict[str, Any] = {}

        def parity(onnx_bytes: bytes, traced: list[str]) -> dict:
            batches = [sample, _probe(sample)] if traced else [sample]  # see _export
            with TorchEngine(model, fn, "cpu", channels_last=False, batch_size=len(sample)) as reference:
                expected = [reference(x) for x in batches]
            checked["session"] = session = make(onnx_bytes)
            got = [session.run(None, {"images": x.numpy()})[0] for x in batches]
            self.parity = check_parity(expected[0], got[0])
            if traced:
                try:
                    check_parity(expected[1], got[1])
                except EngineParityError as err:
                    raise EngineParityError(
                        f"the exported graph holds only for batches like the traced one "
                        f"(the tracer warned: {'; '.join(traced)}): {err}"
                    ) from None
            return self.parity

        onnx_bytes = _cached_export(model, fn, sample, None if cache_dir is None else Path(cache_dir), parity)
        self.session = checked.get("session") or make(onnx_bytes)  # the checked session, or the cached file's
        lazy = self.batch_size > len(sample)  # then built on the first full batch, not on repeated sample rows
        self._make_fixed, self._fixed_pending = (lambda: make(onnx_bytes, self.batch_size)), lazy
        self.fixed = None if lazy else _fixed_session(self.session, self._make_fixed, sample, self.batch_size)
        self.model, self.fn, self.shape = model, fn, tuple(sample.shape[1:])
        self.fallback: TorchEngine | None = None

    def _run(self, images: torch.Tensor) -> np.ndarray:
        if tuple(images.shape[1:]) != self.shape:  # the graph's image size is fixed at export
            return self._other_size(images)
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        if self._fixed_pending and len(x) == self.batch_size:
            self._fixed_pending = False
            self.fixed = _fixed_session(self.session, self._make_fixed, torch.from_numpy(x), self.batch_size)
        session = self.fixed if self.fixed is not None and len(x) == self.batch_size else self.session
        return session.run(None, {"images": x})[0]

    def _other_size(self, images: torch.Tensor) -> np.ndarray:
        """Images of another size than the exported one run in PyTorch (warned once per engine)."""
        if self.fallback is None:
            warnings.warn(
                f"images of size {tuple(images.shape[1:])} differ from the exported {self.shape}: they "
                "run in PyTorch (slower); a transform with a fixed output size, e.g. Resize((h, w)) or "
                "CenterCrop, keeps every batch on ONNX Runtime",
                stacklevel=4,
            )
            self.fallback = TorchEngine(self.model, self.fn, "cpu", batch_size=DEFAULT_BATCH_SIZE)
        return self.fallback(images)

    def close(self) -> None:
        if self.fallback is not None:
            self.fallback.close()
            self.fallback = None


def _make_torch(
    model: Any, *, fn: str, device: str | torch.device, channels_last: bool, batch_size: int, **_: Any
) -> _Engine:
    return TorchEngine(model, fn, device, channels_last=channels_last, batch_size=batch_size)


def _make_onnx(
    model: Any,
    *,
    fn: str,
    sample: torch.Tensor,
    threads: int | None,
    cache_dir: Any,
    batch_size: int,
    device: str | torch.device,
    **_: Any,
) -> _Engine:
    if torch.device(device).type != "cpu":
        raise ValueError(f"the ONNX engine runs on the CPU; device={device!r}: use engine='torch'")
    return OnnxEngine(model, sample, fn, threads=threads, cache_dir=cache_dir, batch_size=batch_size)


# Registry: engine name -> (factory, availability check).
ENGINES: dict[str, tuple[Callable[..., _Engine], Callable[[], bool]]] = {
    "onnx": (_make_onnx, onnxruntime_available),
    "torch": (_make_torch, lambda: True),
}


def available_engines() -> list[str]:
    """Names of the engines usable in this environment."""
    return [name for name, (_, available) in ENGINES.items() if available()]


def default_engine(model: Any, device: str | torch.device = "cpu") -> str:
    """ "onnx" for a float32 nn.Module on the CPU when onnxruntime is installed, else "torch"."""
    cpu = torch.device(device).type == "cpu"
    exportable = isinstance(model, nn.Module) and model_dtype(model) == torch.float32
    return "onnx" if cpu and exportable and "onnx" in available_engines() else "torch"


def create_engine(
    model: Any,
    engine: str = "auto",
    *,
    sample: torch.Tensor | None = None,
    fn: str = "pooled",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    channels_last: bool = True,
    batch_size: int | None = None,
    image_size: int = 224,
) -> _Engine:
    """An engine mapping images (N, 3, H, W) float32 -> features (N, D) float32 numpy; use it as a context manager.

    engine: "auto" (see default_engine), or a name of ENGINES. `sample`: the parity batch and input shape of
    an ONNX export (default: 16 seeded N(0, 1) images of image_size px). `cache_dir`: where exported .onnx
    files are kept (None: export in memory). Under "auto" a failing export or parity check warns and falls
    back to PyTorch; naming "onnx" raises instead (ImportError without onnxruntime, EngineParityError).
    `batch_size`: images per engine call (larger batches are split); None = the engine's measured best,
    ONNX_BATCH_SIZE for ONNX Runtime, DEFAULT_BATCH_SIZE for PyTorch (see the module docstring); ValueError
    when it is below 1.
    """
    name = default_engine(model, device) if engine == "auto" else engine
    if batch_size is not None:
        batch_size = _positive_count(batch_size)
    if name not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose 'auto' or one of {sorted(ENGINES)}")
    factory, available = ENGINES[name]
    if not available():
        raise ImportError(f"engine {name!r} is not available here (pip install onnx onnxruntime), or use 'torch'")
    if sample is None:
        sample = torch.randn(16, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    kwargs = {
        "fn": fn,
        "sample": sample,
        "device": device,
        "threads": threads,
        "cache_dir": cache_dir,
        "channels_last": channels_last,
        "batch_size": batch_size or (ONNX_BATCH_SIZE if name == "onnx" else DEFAULT_BATCH_SIZE),
    }
    try:
        return factory(model, **kwargs)
    except Exception as err:
        if engine != "auto" or name == "torch":
            raise
        warnings.warn(
            f"{name} engine unusable for {type(model).__name__} ({type(err).__name__}: {err}); falling back to PyTorch",
            stacklevel=2,
        )
        return ENGINES["torch"][0](model, **{**kwargs, "batch_size": batch_size or DEFAULT_BATCH_SIZE})

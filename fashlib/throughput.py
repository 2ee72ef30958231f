"""Forward-pass speed of a backbone (images per second to pooled features) through each engine of
fashlib.engine, measured with random weights and inputs (chapter 02's cost columns, tests of the engines)."""

from __future__ import annotations

import time

import torch


def forward_throughput(
    backbone: str,
    image_size: int | None = None,
    *,
    batch_size: int = 16,
    batches: int = 3,
    device: str = "cpu",
    seed: int = 0,
    engine: str = "torch",
) -> float:
    """Images per second of the backbone's forward pass to pooled features through `engine` (fashlib.engine).

    Random weights and (batch_size, 3, S, S) float32 inputs, S = image_size pixels or the backbone's own;
    one warm-up call first (the ONNX export and its parity check are not timed), then `batches` timed calls.
    Returns images per second (float, wall clock: decoding and preprocessing are not included). ValueError
    for an unknown timm name or engine; ImportError for engine="onnx" without onnxruntime;
    engine.EngineParityError when the ONNX export disagrees with PyTorch.
    """
    from .engine import create_engine
    from .models import create_embedder

    torch.manual_seed(seed)
    embedder = create_embedder(backbone, embedding_dim=None, pretrained=False, allow_random=True)
    size = image_size or int(embedder.data_config["input_size"][-1])
    x = torch.randn(batch_size, 3, size, size)
    with create_engine(embedder, engine, sample=x, device=device, batch_size=batch_size) as runner:
        runner(x)
        start = time.perf_counter()
        for _ in range(batches):
            runner(x)  # returns numpy: the device work is finished when it returns
        return batch_size * batches / (time.perf_counter() - start)


def engine_throughputs(
    backbone: str,
    image_size: int | None = None,
    *,
    batch_size: int = 16,
    batches: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """forward_throughput of every engine usable on `device`, measured in turn: {"torch": img/s, "onnx": img/s}
    (floats; "onnx" only on the CPU and when onnxruntime is installed). Errors as forward_throughput."""
    from .engine import available_engines

    names = [n for n in available_engines() if n == "torch" or torch.device(device).type == "cpu"]
    return {
        name: forward_throughput(
            backbone, image_size, batch_size=batch_size, batches=batches, device=device, seed=seed, engine=name
        )
        for name in names
    }

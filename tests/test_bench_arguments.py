"""benchmarks/bench_embedding.py refuses counts below 1 before loading anything (issue 9: a benchmark that
tells the truth): --n 0 used to end in 'stack expects a non-empty TensorList', --n -3 silently timed all but 3
of the 5,756 CC0 photos and printed negative images/s, --threads 0 a torch RuntimeError, --repeat 0 claimed
a 'median of 0'."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_embedding.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_embedding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("option", ["--n", "--repeat", "--threads", "--image-size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_below_one_are_refused_naming_the_option_and_value(bench, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args([option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and f"{value!r}" in err and "positive whole number" in err


def test_valid_arguments_are_kept(bench):
    args = bench.parse_args(["--n", "16", "--repeat", "1", "--threads", "2", "--image-size", "160"])
    assert (args.n, args.repeat, args.threads, args.image_size) == (16, 1, 2, 160)


def test_the_batch_column_says_what_each_row_runs(bench):
    from fashlib.engine import DEFAULT_BATCH_SIZE, ONNX_BATCH_SIZE

    # extract decodes 32 photos at a time but each engine runs its own batch size on the CPU
    assert bench.forward_batch(32, 256, "onnx", extract=True) == ONNX_BATCH_SIZE
    assert bench.forward_batch(32, 256, "torch", extract=True) == DEFAULT_BATCH_SIZE
    assert bench.forward_batch(32, 256, "onnx") == 32
    assert bench.forward_batch(32, 16, "torch") == 16  # --n 16: "batch 32" rows run one batch of 16

"""Tests of fashlib.train: learning, exact resume, NaN handling, evaluation cadence, schedule, DDP on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fashlib.data.sampler import PKSampler
from fashlib.train import (
    CHECKPOINT_NAME,
    NonFiniteLossError,
    TrainConfig,
    fit,
    load_checkpoint,
    lr_factor,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("fashlib_test_ddp_script", HERE / "ddp_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


def _config(**overrides) -> TrainConfig:
    base = dict(epochs=4, lr=1e-2, p=4, k=4, seed=7, warmup_steps=2, eval_every=0, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def _run(tmp: Path, config: TrainConfig, *, dropout: float = 0.0, jitter: float = 0.0, model_seed: int = 0, **kw):
    model, loss_fn, data = script.build(seed=0, dropout=dropout)
    if model_seed:  # a different initialisation (resume must overwrite it)
        torch.manual_seed(model_seed)
        model, loss_fn = script.TinyEmbedder(dropout=dropout), script.TripletPlusProxies()
    data.jitter = jitter
    history = fit(model, loss_fn, data, data.labels, config, tmp, progress=False, **kw)
    return model, loss_fn, history


def _recall_at_1(model, data) -> float:
    with torch.no_grad():
        emb = model(data.images)
    sim = emb @ emb.T
    sim.fill_diagonal_(-math.inf)
    nearest = sim.argmax(1).numpy()
    return float((data.labels[nearest] == data.labels).mean())


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


class _Crash(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster (and steadier on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_loss_decreases_and_retrieval_improves(tmp_path):
    model, loss_fn, data = script.build(seed=0)
    before = _recall_at_1(model, data)
    proxies_before = loss_fn.proxy.weight.detach().clone()
    history = fit(
        model,
        loss_fn,
        data,
        data.labels,
        _config(epochs=8),
        tmp_path,
        progress=False,
        eval_fn=lambda m: {"recall@1": _recall_at_1(m, data)},
    )
    assert history["epoch"] == list(range(1, 9))
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["recall@1"][-1] > max(before, 0.6)
    assert not torch.equal(loss_fn.proxy.weight, proxies_before)  # the loss's own parameters are trained
    assert all(np.isfinite(history["loss"]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_identical(tmp_path, num_workers):
    epochs, crash_at = (4, 2) if num_workers == 0 else (3, 1)
    # dropout and a random augmentation make the global/worker RNG streams matter
    opts = dict(dropout=0.2, jitter=0.3)
    config = _config(epochs=epochs, num_workers=num_workers, eval_every=1)
    eval_fn = lambda m: {"w": float(m.net[1].weight.sum())}  # noqa: E731
    ref_model, ref_loss, ref_hist = _run(tmp_path / "ref", config, eval_fn=eval_fn, **opts)

    def crash(epoch, history):
        if epoch == crash_at:
            raise _Crash(f"simulated crash after epoch {epoch}")

    with pytest.raises(_Crash):
        _run(tmp_path / "run", config, on_epoch_end=crash, eval_fn=eval_fn, **opts)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["epoch"] == crash_at
    # a fresh process would build a differently initialised model: resume must restore everything
    model, loss_fn, history = _run(tmp_path / "run", config, resume="auto", eval_fn=eval_fn, model_seed=123, **opts)
    assert _states_equal(model.state_dict(), ref_model.state_dict())
    assert _states_equal(loss_fn.state_dict(), ref_loss.state_dict())
    assert history == ref_hist
    assert len(history["epoch"]) == epochs
    ckpt, ref_ckpt = (load_checkpoint(p / CHECKPOINT_NAME) for p in (tmp_path / "run", tmp_path / "ref"))
    assert ckpt["step"] == ref_ckpt["step"] and ckpt["epoch"] == epochs
    assert ckpt["optimizer"]["state"][0]["step"] == ref_ckpt["optimizer"]["state"][0]["step"]


def test_resume_of_a_finished_run_is_a_no_op_and_errors_are_clear(tmp_path):
    model, _, history = _run(tmp_path, _config(epochs=2))
    again_model, _, again = _run(tmp_path, _config(epochs=2), resume=True, model_seed=5)
    assert again == history and _states_equal(again_model.state_dict(), model.state_dict())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(tmp_path / "empty", _config(epochs=1), resume=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        _run(tmp_path / "x", _config(epochs=1), resume=tmp_path / "missing.pt")


def test_nan_loss_raises_with_epoch_and_step_and_keeps_last_good_checkpoint(tmp_path):
    model, loss_fn, data = script.build(seed=0)
    steps = len(PKSampler(data.labels, 4, 4, seed=7))
    calls = {"n": 0}
    inner_forward = loss_fn.forward

    def poisoned(embeddings, labels):
        calls["n"] += 1
        loss = inner_forward(embeddings, labels)
        return loss * float("nan") if calls["n"] == 2 * steps + 2 else loss  # epoch 3, step 2

    loss_fn.forward = poisoned
    saved = {}

    def keep(epoch, history):
        saved[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(FloatingPointError, match=r"epoch 3, step 2/") as info:
        fit(model, loss_fn, data, data.labels, _config(epochs=4), tmp_path, progress=False, on_epoch_end=keep)
    assert isinstance(info.value, NonFiniteLossError)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * steps
    assert _states_equal(ckpt["model"], saved[2])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file behind


def test_eval_every_n_epochs_and_at_the_end(tmp_path):
    seen = []

    def eval_fn(model):
        seen.append(model.training)
        return {"score": float(len(seen))}

    model, _, history = _run(tmp_path, _config(epochs=5, eval_every=2), eval_fn=eval_fn)
    assert history["score"] == [None, 1.0, None, 2.0, 3.0]
    assert seen == [False, False, False]  # evaluated in eval mode ...
    assert model.training  # ... and put back into train mode
    import pandas as pd

    frame = pd.DataFrame(history)
    assert list(frame.columns) == ["epoch", "loss", "lr", "score"] and frame["score"].isna().sum() == 2


def test_warmup_then_cosine_schedule(tmp_path):
    total, warm = 20, 4
    factors = [lr_factor(s, total, warm) for s in range(total)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    config = _config(epochs=3, warmup_steps=None, warmup_epochs=1.0, loss_lr=3.0)
    steps = len(PKSampler(script.TinyImages().labels, 4, 4, seed=7))
    _, _, history = _run(tmp_path, config)
    expected = [config.lr * lr_factor(e * steps - 1, 3 * steps, steps) for e in (1, 2, 3)]
    assert history["lr"] == pytest.approx(expected)
    groups = load_checkpoint(tmp_path / CHECKPOINT_NAME)["optimizer"]["param_groups"]
    assert groups[-1]["lr"] == pytest.approx(3.0 * groups[0]["lr"])  # loss parameters: lr * loss_lr
    assert groups[0]["weight_decay"] == config.weight_decay and groups[1]["weight_decay"] == 0.0


def test_rank_slices_equal_the_samplers_own_rank_split():
    """fit slices each global P x K batch contiguously; that is the PKSampler's own per-rank split."""
    from fashlib.train import _RankSlice

    labels = script.TinyImages().labels
    global_sampler = PKSampler(labels, 4, 2, seed=1)
    for rank in range(2):
        ours = list(_RankSlice(global_sampler, rank, 2))
        theirs = list(PKSampler(labels, 2, 2, seed=1, rank=rank, world_size=2))
        assert ours == theirs


def test_two_process_ddp_matches_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_script.py"),
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        output, _ = proc.communicate()
        pytest.fail("torchrun run timed out:\n" + output[-3000:])
    assert proc.returncode == 0, output[-6000:]

    model, loss_fn, data = script.build()
    reference_grads = script.gradients(model, loss_fn, data, script.global_batch(data))
    for rank in range(2):  # the exact gradient of the global batch, not 1/world_size of it
        grads = torch.load(out / f"grads_rank{rank}.pt")
        assert grads.keys() == reference_grads.keys()
        for key, value in reference_grads.items():
            torch.testing.assert_close(grads[key], value, rtol=1e-5, atol=1e-7, msg=key)

    model, loss_fn, data = script.build()
    single = fit(
        model, loss_fn, data, data.labels, TrainConfig(**script.DDP_CONFIG), tmp_path / "single", progress=False
    )
    ranks = [torch.load(out / f"final_rank{r}.pt") for r in range(2)]
    for name in ("model", "loss"):
        assert _states_equal(ranks[0][name], ranks[1][name])  # replicas stay in sync
    reference = {
        **{f"m.{k}": v for k, v in model.state_dict().items()},
        **{f"l.{k}": v for k, v in loss_fn.state_dict().items()},
    }
    trained = {
        **{f"m.{k}": v for k, v in ranks[0]["model"].items()},
        **{f"l.{k}": v for k, v in ranks[0]["loss"].items()},
    }
    initial_model, _, _ = script.build()
    assert not torch.equal(initial_model.state_dict()["net.1.weight"], trained["m.net.1.weight"])
    for key, value in reference.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6, msg=key)
    ddp_history = json.loads((out / "history_rank0.json").read_text())
    assert ddp_history["epoch"] == single["epoch"]
    assert ddp_history["loss"] == pytest.approx(single["loss"], rel=1e-5)
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)  # written by rank 0 only
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (mixed precision runs on CUDA only)")
def test_cuda_amp_learns_and_resumes_exactly(tmp_path):
    """On CUDA: autocast + GradScaler are on by default, and resume is exact with deterministic=True."""
    config = _config(device="cuda", epochs=3, eval_every=1, deterministic=True)
    opts = dict(dropout=0.2, jitter=0.3)  # dropout draws from the CUDA RNG, the jitter from the CPU RNG
    eval_fn = lambda m: {"w": float(m.net[1].weight.sum())}  # noqa: E731
    ref_model, ref_loss, ref_hist = _run(tmp_path / "ref", config, eval_fn=eval_fn, **opts)
    assert next(ref_model.parameters()).is_cuda
    ckpt = load_checkpoint(tmp_path / "ref" / CHECKPOINT_NAME)
    assert ckpt["scaler"].get("scale") is not None  # the GradScaler was enabled
    assert ckpt["config"]["amp"] is None and "cuda" in ckpt["rng"][0]
    assert ref_hist["loss"][-1] < ref_hist["loss"][0]

    def crash(epoch, history):
        if epoch == 1:
            raise _Crash("simulated crash")

    with pytest.raises(_Crash):
        _run(tmp_path / "run", config, on_epoch_end=crash, eval_fn=eval_fn, **opts)
    model, loss_fn, history = _run(tmp_path / "run", config, resume="auto", eval_fn=eval_fn, model_seed=9, **opts)
    assert _states_equal(model.state_dict(), ref_model.state_dict())
    assert _states_equal(loss_fn.state_dict(), ref_loss.state_dict())
    assert history == ref_hist

"""Tests for fashlib.pool: jobs in worker processes give the results of the same jobs run here, in order."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from fashlib import pool
from fashlib.features import train_head
from fashlib.pool import intra_op_threads, map_jobs


def _head_weights(shared: dict, seed: int) -> np.ndarray:
    """An MLP head (BatchNorm: its arithmetic depends on the thread count) trained briefly; flat weights."""
    head, _ = train_head(
        shared["x"], shared["y"], head_type="mlp", hidden_dim=64, embedding_dim=8, epochs=2, p=4, k=2, seed=seed,
        progress=False,
    )  # fmt: skip
    return torch.cat([t.flatten() for t in head.state_dict().values() if t.is_floating_point()]).numpy()


def _warn_or_fail(shared: dict, job: str) -> str:
    if job == "fail":
        raise ValueError("planted failure of job 'fail'")
    if job.startswith("warn"):
        warnings.warn("planted warning", UserWarning, stacklevel=1)
    return job.upper() + str(torch.get_num_threads())


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((96, 40)).astype(np.float32), "y": np.repeat(np.arange(24), 4)}


def test_workers_give_the_results_of_the_jobs_run_here_in_job_order(data):
    seeds = [3, 0, 2, 1]
    here = map_jobs(_head_weights, seeds, shared=data, workers=1, progress=False)
    there = map_jobs(_head_weights, seeds, shared=data, workers=2, progress=False)
    for a, b in zip(here, there):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(here[0], here[1])  # different seeds: different heads, so order is checked


def test_every_job_runs_with_the_given_thread_count_and_this_process_keeps_its_own():
    before = torch.get_num_threads()
    assert map_jobs(_warn_or_fail, ["a", "b"], workers=2, threads=1, progress=False) == ["A1", "B1"]
    assert map_jobs(_warn_or_fail, ["a"], workers=1, threads=1, progress=False) == ["A1"]
    assert torch.get_num_threads() == before


def test_a_warning_raised_in_a_worker_is_raised_here_once():
    with pytest.warns(UserWarning, match="planted warning") as caught:
        map_jobs(_warn_or_fail, ["warn1", "a", "warn2"], workers=2, progress=False)
    assert sum("planted warning" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_raises_its_own_error(workers):
    with pytest.raises(ValueError, match="planted failure of job 'fail'"):
        map_jobs(_warn_or_fail, ["a", "fail", "b"], workers=workers, progress=False)


@pytest.mark.parametrize(("option", "value"), [("threads", 0), ("workers", 0), ("workers", -1)])
def test_counts_below_one_are_refused_naming_the_value(option, value):
    with pytest.raises(ValueError, match=f"{option} must be a positive.*got {value}"):
        map_jobs(_warn_or_fail, ["a"], progress=False, **{option: value})


def test_intra_op_threads_restores_the_count_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), intra_op_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_default_workers_is_one_per_cpu_at_most_one_per_job_and_one_on_a_gpu(monkeypatch):
    monkeypatch.setattr(pool, "available_cpus", lambda: 4)
    assert [pool.default_workers(n) for n in (0, 1, 3, 9)] == [1, 1, 3, 4]
    assert pool.default_workers(9, "cuda") == 1


def _tiny_table(n_labels: int = 12, per_label: int = 4) -> pd.DataFrame:
    labels = np.repeat(np.arange(n_labels), per_label)
    split = np.where(labels < n_labels // 2, "train", np.where(np.arange(len(labels)) % 2, "query", "gallery"))
    return pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(labels))], "label": labels, "split": split})


def test_seed_comparison_and_candidate_scores_do_not_depend_on_workers():
    from fashlib import selection, study

    table = _tiny_table()
    rng = np.random.default_rng(1)
    features = {"a": rng.standard_normal((len(table), 24)).astype(np.float32)}
    configs = {"mlp": dict(features="a", loss="multi_similarity", head_type="mlp", embedding_dim=8, epochs=2, p=4, k=2)}
    one = study.seed_comparison(features, table, configs, seeds=[0, 1], n_boot=50, workers=1)
    two = study.seed_comparison(features, table, configs, seeds=[0, 1], n_boot=50, workers=2)
    pd.testing.assert_frame_equal(one[0], two[0])
    pd.testing.assert_frame_equal(one[1], two[1])
    options = dict(embedding_dim=8, epochs=2, p=4, k=2, ks=(1, 2))
    one = selection.candidate_scores(features, table, ["multi_similarity"], ("linear", "mlp"), workers=1, **options)
    two = selection.candidate_scores(features, table, ["multi_similarity"], ("linear", "mlp"), workers=2, **options)
    pd.testing.assert_frame_equal(one.drop(columns="seconds"), two.drop(columns="seconds"))
    assert list(one.index.get_level_values("head")) == ["none", "linear", "mlp"]


def test_costliest_jobs_start_first_and_results_stay_in_job_order():
    jobs = ["a", "b", "c", "d"]
    started = map_jobs(_start_order, jobs, workers=2, progress=False, cost=lambda job: "abcd".index(job))
    assert [job for job, _ in started] == jobs  # job order
    first_two = {job for job, _ in sorted(started, key=lambda pair: pair[1])[:2]}
    assert first_two == {"d", "c"}  # the two costliest, one per worker


def _start_order(shared, job):
    import time

    start = time.monotonic()
    time.sleep(0.3)  # each worker is busy long enough for the other to take the next job
    return job, start


def test_a_head_trained_in_this_process_does_not_depend_on_its_thread_count():
    from fashlib.embeddings import train_head_on_features

    table = _tiny_table()
    x = np.random.default_rng(2).standard_normal((len(table), 24)).astype(np.float32)
    options = dict(loss="multi_similarity", head_type="mlp", embedding_dim=8, epochs=3, p=4, k=2, progress=False)
    before = torch.get_num_threads()
    got = []
    for threads in (1, 2):
        with intra_op_threads(threads):
            got.append(train_head_on_features(x, table, **options)[0])
            assert torch.get_num_threads() == threads  # given back after training
    np.testing.assert_array_equal(got[0], got[1])
    assert torch.get_num_threads() == before


class _NeedsTwoArguments(Exception):
    def __init__(self, text: str, code: int):
        super().__init__(text)
        self.code = code


def _awkward(shared, job: str):
    if job == "odd error":
        raise _NeedsTwoArguments("planted error that does not unpickle", 7)
    if job == "lock":
        import threading

        return threading.Lock()
    return job


def test_a_lambda_or_an_unpicklable_job_is_refused_before_any_job_runs_naming_it():
    # a lambda as fn used to hang for ever in the pool's shutdown (Python 3.11)
    with pytest.raises(TypeError, match="fn '.*<lambda>' cannot be sent to worker processes.*workers=1"):
        map_jobs(lambda shared, job: job, ["a", "b"], workers=2, progress=False)
    with pytest.raises(TypeError, match="job 1 .* cannot be sent to worker processes"):
        map_jobs(_awkward, ["a", lambda: 0], workers=2, progress=False)
    assert map_jobs(lambda shared, job: job + "!", ["a", "b"], workers=1, progress=False) == ["a!", "b!"]


def test_what_cannot_come_back_from_a_worker_is_named_not_reported_as_a_dead_worker():
    with pytest.raises(RuntimeError, match="job 'odd error' raised _NeedsTwoArguments: planted error"):
        map_jobs(_awkward, ["a", "odd error"], workers=2, progress=False)
    with pytest.raises(TypeError, match="result of job 'lock' cannot be sent back.*workers=1"):
        map_jobs(_awkward, ["a", "lock"], workers=2, progress=False)


@pytest.mark.parametrize(("option", "value"), [("workers", 2.7), ("workers", "2"), ("threads", 1.5), ("workers", True)])
def test_counts_that_are_not_whole_numbers_are_refused_not_truncated(option, value):
    with pytest.raises(ValueError, match=f"{option} must be a positive number .*got {value!r}"):
        map_jobs(_warn_or_fail, ["a", "b"], progress=False, **{option: value})


def test_jobs_may_be_any_iterable():
    assert map_jobs(_awkward, (job for job in "abc"), workers=2, progress=False) == ["a", "b", "c"]


def _dies(shared, job: str) -> str:
    if job == "die":
        import os

        os._exit(1)  # as the system's out-of-memory killer would end it
    return job


def test_a_worker_that_dies_is_reported_with_the_unfinished_jobs_and_the_fix():
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool, match=r"worker process died .*'die'.*workers=1"):
        map_jobs(_dies, ["a", "die"], workers=2, progress=False)

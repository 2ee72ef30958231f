"""Independent jobs (head trainings on cached features) run side by side in worker processes.

Training a small head on cached features is a stream of small tensor operations: on this 2-core machine
one process with 2 intra-op threads keeps the cores about half busy, and the same heads run about 1.3x
faster as two processes with one thread each (4 heads of chapter 05's shapes, 14.0 s in one process with
2 threads against 10.1-10.9 s in two processes; measured 2026-11-29). `map_jobs` runs a list of jobs that
way and returns their results in job order.

Every job runs with the same number of intra-op threads (`threads`, default 1), in a worker or, with
`workers=1`, in this process. The thread count is part of the arithmetic (BatchNorm's reductions split
differently with 2 threads than with 1), so fixing it makes results independent of `workers` and of the
machine's core count: a head trained here equals the same head trained on a 16-core machine.
`embeddings.train_head_on_features` trains with one thread too, also outside a pool.

Workers are forked where the platform allows it (Linux): the shared data (`shared`, e.g. the feature
arrays) is inherited, not copied, and nothing is re-imported. Elsewhere they are spawned, and `shared` is
pickled once per worker.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

__all__ = ["available_cpus", "default_workers", "intra_op_threads", "map_jobs"]

J = TypeVar("J")
R = TypeVar("R")

_WORKER: dict[str, Any] = {}  # per worker process: the shared data (set once by _start_worker)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_workers(n_jobs: int, device: str | torch.device = "cpu") -> int:
    """Worker processes for n_jobs CPU jobs: one per available CPU, at most one per job; 1 off the CPU."""
    if torch.device(device).type != "cpu":
        return 1  # a GPU runs one job at a time better than several processes sharing it
    return max(1, min(int(n_jobs), available_cpus()))


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _start_worker(shared: Any, threads: int) -> None:
    torch.set_num_threads(int(threads))
    _WORKER["shared"] = shared
    # a forked Jupyter kernel's sys.stdout/stderr send through sockets whose thread the child lacks
    sys.stdout = sys.__stdout__ or open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    sys.stderr = sys.__stderr__ or sys.stdout


def _run_in_worker(fn: Callable[[Any, Any], Any], job: Any) -> tuple[Any, list[tuple[type[Warning], str]]]:
    """fn(shared, job) and the warnings it raised (category, text), which the parent raises again."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(_WORKER["shared"], job)
    return result, [(w.category, str(w.message)) for w in caught]


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def map_jobs(
    fn: Callable[[Any, J], R],
    jobs: Sequence[J],
    *,
    shared: Any = None,
    workers: int | None = None,
    threads: int = 1,
    desc: str = "jobs",
    progress: bool = True,
    cost: Callable[[J], float] | None = None,
) -> list[R]:
    """[fn(shared, job) for job in jobs], run in `workers` processes with `threads` intra-op threads each.

    fn: a module-level function (workers find it by name); jobs: picklable; shared: read-only data every
    job needs (feature arrays, the table), given to each worker once. workers: None = default_workers
    (one per available CPU, at most one per job); 1 runs the jobs here, in order. Results come back in job
    order and do not depend on `workers` (see the module docstring). With `cost` (job -> a relative cost),
    workers take the costliest jobs first, so that no long job starts last and runs alone. An exception
    raised by a job is raised here, after the jobs already running have finished; catch errors inside fn
    to keep the others (study.try_call). ValueError for threads or workers below 1.
    """
    if int(threads) < 1:
        raise ValueError(f"threads must be a positive number of intra-op threads per job, got {threads}")
    workers = default_workers(len(jobs)) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be a positive number of processes, got {workers}; or None for one per CPU")
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress)
    if workers == 1 or len(jobs) <= 1:
        with intra_op_threads(threads), bar:
            return [_tick(bar, fn(shared, job)) for job in jobs]
    outcomes: list[Any] = [None] * len(jobs)
    with warnings.catch_warnings(), bar:
        warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*")
        pool = ProcessPoolExecutor(workers, _context(), initializer=_start_worker, initargs=(shared, threads))
        with pool:
            order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])) if cost else range(len(jobs))
            futures: dict[Future, int] = {pool.submit(_run_in_worker, fn, jobs[i]): i for i in order}
            try:
                for future in as_completed(futures):
                    outcomes[futures[future]] = _tick(bar, future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    for category, text in dict.fromkeys(w for _, caught in outcomes for w in caught):  # once each, in job order
        warnings.warn(text, category, stacklevel=2)
    return [result for result, _ in outcomes]


def _tick(bar: Any, result: R) -> R:
    bar.update(1)
    return result

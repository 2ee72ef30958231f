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
import operator
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

__all__ = ["available_cpus", "default_workers", "intra_op_threads", "map_jobs", "positive_count"]

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


def _run_in_worker(fn: Callable[[Any, Any], Any], job_bytes: bytes) -> bytes:
    """Pickled (fn(shared, job), the warnings it raised as (category, text)), which the parent raises again.

    What cannot go back to the parent fails here, naming the job: a result that cannot be pickled, and an
    exception that cannot be unpickled (the pool would report it as a worker "terminated abruptly").
    """
    job = pickle.loads(job_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(_WORKER["shared"], job)
        except Exception as err:
            try:
                pickle.loads(pickle.dumps(err))
            except Exception:
                raise RuntimeError(
                    f"job {job!r:.80} raised {type(err).__name__}: {err} (its traceback follows; the exception "
                    "itself cannot be sent back from a worker process: pass workers=1 to get it as raised)"
                ) from err
            raise
    try:
        return pickle.dumps((result, [(w.category, str(w.message)) for w in caught]))
    except Exception as err:
        raise TypeError(
            f"the result of job {job!r:.80} cannot be sent back from a worker process ({type(err).__name__}: "
            f"{err}); return picklable data (numbers, arrays, tensors, dicts, DataFrames) or pass workers=1"
        ) from err


def _pickled_jobs(fn: Callable[[Any, Any], Any], jobs: Sequence[Any]) -> list[bytes]:
    """Each job pickled here, fn checked to pickle (by name): what cannot go to a worker fails here, named.

    Left to the pool, a pickling error surfaces in its queue thread, and on Python 3.11 the pool can then
    hang for ever on shutdown (a lambda as fn, measured 2026-11-29).
    """
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        pickle.dumps(fn)
    except Exception as err:
        raise TypeError(
            f"fn {name!r} cannot be sent to worker processes ({type(err).__name__}: {err}); define it at "
            "module level (not a lambda or a nested function), or pass workers=1"
        ) from err
    packed = []
    for i, job in enumerate(jobs):
        try:
            packed.append(pickle.dumps(job))
        except Exception as err:
            raise TypeError(
                f"job {i} ({job!r:.80}) cannot be sent to worker processes ({type(err).__name__}: {err}); "
                "jobs must be picklable data (numbers, strings, tuples, dicts), or pass workers=1"
            ) from err
    return packed


def positive_count(value: Any, name: str, hint: str, fix: str = "") -> int:
    """`value` as a positive int; ValueError naming `name`, the value and `fix` for anything else (2.5, "2", True,
    0): a count (workers, threads, a batch size) is never truncated or guessed."""
    try:
        count = operator.index(value) if not isinstance(value, bool) else 0
    except TypeError:
        count = 0
    if count < 1:
        raise ValueError(f"{name} must be a positive number of {hint}, got {value!r}{fix}")
    return count


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
    to keep the others (study.try_call). ValueError for threads or workers that are not whole numbers
    >= 1; TypeError, before any job runs, for an fn or a job that cannot be pickled (with workers > 1).
    """
    jobs = list(jobs)
    threads = positive_count(threads, "threads", "intra-op threads per job")
    workers = positive_count(
        default_workers(len(jobs)) if workers is None else workers, "workers", "processes, or None"
    )
    packed = _pickled_jobs(fn, jobs) if workers > 1 and len(jobs) > 1 else None  # fails before any job runs
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress)
    if packed is None:
        with intra_op_threads(threads), bar:
            return [_tick(bar, fn(shared, job)) for job in jobs]
    outcomes: list[Any] = [None] * len(jobs)
    with warnings.catch_warnings(), bar:
        warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*")
        pool = ProcessPoolExecutor(workers, _context(), initializer=_start_worker, initargs=(shared, threads))
        with pool:
            order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])) if cost else range(len(jobs))
            futures: dict[Future, int] = {pool.submit(_run_in_worker, fn, packed[i]): i for i in order}
            try:
                for future in as_completed(futures):
                    outcomes[futures[future]] = _tick(bar, pickle.loads(future.result()))
            except BrokenProcessPool as err:
                left = [job for job, outcome in zip(jobs, outcomes) if outcome is None]
                raise BrokenProcessPool(
                    f"a worker process died (killed by the system, e.g. out of memory, or a job called os._exit) "
                    f"with {len(left)} job(s) unfinished, among them {left[:3]!r:.200}; pass fewer workers, or "
                    "workers=1 to run the jobs here and see where it fails"
                ) from err
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    for category, text in dict.fromkeys(w for _, caught in outcomes for w in caught):  # once each, in job order
        warnings.warn(text, category, stacklevel=2)
    return [result for result, _ in outcomes]


def _tick(bar: Any, result: R) -> R:
    bar.update(1)
    return result

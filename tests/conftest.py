"""Fixtures shared by several test modules, and the list of slow tests.

``python3 -m pytest -m "not slow"`` leaves out the tests named in SLOW (notebook runs, book builds, DDP
workers, a browser): the newcomer's run of about two minutes. ``python3 -m pytest`` (CI) runs everything.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Slow tests, by file: None marks every test of the file, a set names the tests (a bare name: all its
# parameters; "name[params]": that one).
# Measured with `pytest --durations` on a shared 2-core machine; anything over ~5 s goes here.
SLOW: dict[str, set[str] | None] = {
    "test_book.py": {"test_book_end_to_end_smoke", "test_minimal_site_end_to_end"},
    "test_book_pages.py": None,  # reads the smoke book (papermill + jupyter-book)
    "test_notebooks_deepfashion.py": None,  # papermill runs of the chapters on generated DeepFashion trees
    "test_train.py": {"test_two_process_ddp_matches_single_process", "test_resume_is_bit_identical[2]"},
    "test_report.py": {"test_glued_number_renders_in_the_built_page"},
}


def pytest_collection_modifyitems(config, items):
    """Mark the tests listed in SLOW with @pytest.mark.slow (test files stay free of the list)."""
    for item in items:
        names = SLOW.get(item.path.name, set())
        if names is None or {item.name, getattr(item, "originalname", item.name)} & names:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy 2-core machine one thread avoids contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class SmokeBook:
    """The smoke book built once for the session (book/params-smoke.yaml), into a temporary site."""

    site: Path  # the site root (sources copied there, executed notebooks under book/notebooks)
    html: Path  # site/_build/html
    runs: list  # fashlib.book.NotebookRun, one per listed notebook
    result: object  # fashlib.book.BuildResult
    listed: list[str]  # notebooks of the parameter file, in book order
    missing: list[str] = field(default_factory=list)  # listed notebooks without a source (left out)
    machine_paths: list[str] = field(default_factory=list)  # absolute folders of this machine used by the build


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory) -> SmokeBook:
    """Execute every notebook of book/params.yaml with the smoke parameters and build the HTML once.

    The feature cache and run folders sit in the repository's ignored .cache/ and runs/ (relative paths, as a
    real build has them), fresh for each session; the site goes to a temporary folder."""
    from fashlib import book

    tmp = tmp_path_factory.mktemp("smoke_book")
    scratch = [REPO / ".cache" / "pytest-smoke-book", REPO / "runs" / "pytest-smoke-book"]
    for folder in scratch:
        shutil.rmtree(folder, ignore_errors=True)
    params = book.load_params(REPO / "book" / "params-smoke.yaml")
    listed = list(params["notebooks"])
    missing = [n for n in listed if not (REPO / "notebooks" / f"{n}.ipynb").exists()]
    site = tmp / "site"
    overrides = [f"cache_dir={scratch[0].relative_to(REPO)}", f"out_dir={scratch[1].relative_to(REPO)}"]
    with pytest.MonkeyPatch.context() as mp:
        shared = REPO.parent / "shared" / "data"
        if not os.environ.get("FASHLIB_DATA") and shared.is_dir():  # as .ci/run does: the CC0 data beside the clone
            mp.setenv("FASHLIB_DATA", str(shared))
        data = os.environ.get("FASHLIB_DATA", "")
        runs, result = book.build(
            REPO / "book" / "params-smoke.yaml", overrides, output_dir=site, allow_missing=True, log=print
        )
    paths = [str(REPO), str(tmp), str(Path(tmp).resolve())] + ([data, str(Path(data).resolve())] if data else [])
    yield SmokeBook(site, site / "_build" / "html", runs, result, listed, missing, sorted(set(paths)))
    for folder in scratch:
        shutil.rmtree(folder, ignore_errors=True)

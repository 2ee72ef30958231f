"""fashlib.params: one source of notebook defaults (book/params.yaml), parameters checked at the top of each
notebook with a message naming the parameter, and paths resolved against the repository root wherever the
kernel starts."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from fashlib import book, params
from fashlib.paths import GPU_RUNS_DIR, PROJECT_ROOT, data_root

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _cells(path: Path) -> tuple[list, int]:
    cells = nbformat.read(str(path), as_version=4).cells
    return cells, next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_parameters_cell_equals_the_parameter_file(path):
    full = book.load_params(REPO / "book" / "params.yaml")
    assert path.stem in full["notebooks"]
    cells, i = _cells(path)
    cell = params.cell_parameters(cells[i].source)
    assert params.parameter_drift(cell, full, path.stem) == []
    assert set(cell) <= set(params.SCHEMA), "every parameter has a check in fashlib.params.SCHEMA"
    assert params.validate(cell) == cell
    # the smoke file only overrides parameters the notebook declares, with valid values
    smoke = book.load_params(REPO / "book" / "params-smoke.yaml")
    assert set(smoke["notebooks"][path.stem]) <= set(cell)
    params.validate(params.expected_parameters(smoke, path.stem))
    # the next cell checks and resolves them: one library call, before any work
    assert "globals().update(book_params.prepare(globals()))" in cells[i + 1].source


def test_parameter_drift_names_each_difference():
    file = {"seed": 0, "flip_average": False, "notebooks": {"n": {"epochs": 3, "top_k": 5}}}
    drift = params.parameter_drift({"seed": 0, "flip_average": True, "epochs": 3, "lr": 0.1}, file, "n")
    assert drift == [
        "n: flip_average = True in the notebook, False in the parameter file",
        "n: lr is declared in the notebook but not in the parameter file",
        "n: top_k is in its section of the parameter file but not declared in the notebook",
    ]


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("epochs", "ten", "epochs='ten': expected an integer >= 1"),
        ("epochs", 2.0, "epochs=2.0: expected an integer >= 1"),
        ("epochs", True, "epochs=True: expected an integer >= 1"),
        ("max_images", 0, "max_images=0: expected an integer >= 1 or None"),
        ("lr", "1e-3", "lr='1e-3': expected a number > 0.0"),
        ("flip_average", "yes", "flip_average='yes': expected True or False"),
        ("device", "gpu", "device='gpu': expected 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        ("dataset", "inshopp", "'inshopp' is not; did you mean 'inshop'?"),
        ("losses", ["multi_similarity", "proxy_ancor"], "'proxy_ancor' is not; did you mean 'proxy_anchor'?"),
        ("losses", [], "losses=[]: expected a non-empty list of loss names"),
        (
            "backbones",
            ["tf_efficientnet_lite0", "tf_efficientnet_lit1"],
            "known timm model names; 'tf_efficientnet_lit1' is not; did you mean 'tf_efficientnet_lite1'?",
        ),
        ("random_controls", ["resnet5O"], "True, False or a list of timm model names"),
        ("projection", "tsne", "expected one of umap, pca"),
        ("select_by", "map@R", "did you mean 'map@r'?"),
        ("ks", [1, 0], "ks=[1, 0]: expected a non-empty list of integers >= 1"),
        ("holdout_fraction", 1.5, "holdout_fraction=1.5: expected a number > 0.0 and <= 1.0"),
        # one image per label (or one label) per batch: pair losses are 0 with zero gradient, nothing is learnt
        ("batch_k", 1, "batch_k=1: expected an integer >= 2"),
        ("batch_p", 1, "batch_p=1: expected an integer >= 2"),
        # a loss or backbone listed twice gave two rows of one configuration
        ("losses", ["triplet", "proxy_anchor", "triplet"], "a list without repeats ('triplet' is listed twice)"),
    ],
)
def test_a_bad_value_names_the_parameter_the_value_and_what_is_allowed(name, value, expected):
    with pytest.raises(params.ParameterError) as err:
        params.validate({"seed": 0, name: value})
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once_and_good_values_pass():
    with pytest.raises(params.ParameterError) as err:
        params.validate({"epochs": "ten", "losses": ["tripet"], "seed": 0})
    assert len(str(err.value).splitlines()) == 3  # title + one line per bad parameter
    good = {
        "epochs": 1,
        "lr": 1e-3,
        "losses": ["triplet_batch_hard", "triplet"],
        "random_controls": True,
        "backbones": ["resnet18", "resnet50.a1_in1k"],
        "data_root": None,
        "ks": [1, 5],
        "ignored": object(),
    }
    assert params.validate(good) == {k: v for k, v in good.items() if k != "ignored"}


def test_resolve_uses_the_repository_root_wherever_the_process_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHLIB_DATA", raising=False)
    monkeypatch.chdir(REPO / "notebooks")  # where JupyterLab starts a kernel
    values = {"data_root": None, "cache_dir": ".cache/features", "out_dir": "runs/book", "gpu_runs_dir": None}
    assert params.resolve(values) == {
        "data_root": str(REPO / "data"),
        "cache_dir": str(REPO / ".cache" / "features"),
        "out_dir": str(REPO / "runs" / "book"),
        "gpu_runs_dir": str(GPU_RUNS_DIR),
    }
    assert data_root() == REPO / "data" and PROJECT_ROOT == REPO
    monkeypatch.setenv("FASHLIB_DATA", "shared/data")  # relative: against the repository root
    assert params.resolve({"data_root": None})["data_root"] == str(REPO / "shared" / "data")
    monkeypatch.setenv("FASHLIB_DATA", str(tmp_path))
    assert params.resolve({"data_root": None, "out_dir": str(tmp_path / "o")}) == {
        "data_root": str(tmp_path),
        "out_dir": str(tmp_path / "o"),
    }
    assert params.resolve({"data_root": "~/d"})["data_root"] == str(Path.home() / "d")


def test_values_are_read_like_the_parameter_file():
    assert params.load_yaml("a: 1e-3\nb: None\nc: null\nd: [1, 2.5]\ne: '1e-3'\nf: 1_000\ng: 3") == {
        "a": 0.001,
        "b": None,
        "c": None,
        "d": [1, 2.5],
        "e": "1e-3",
        "f": 1000,
        "g": 3,
    }
    assert params.parse_value(" ") is None and params.parse_value("Nonesuch") == "Nonesuch"


BAD = """try:
    book_params.prepare({**globals(), "epochs": "ten", "losses": ["multi_similarty"]})
except book_params.ParameterError as err:
    print("REFUSED", err)"""


def _validation_notebook(tmp_path: Path, source: Path) -> Path:
    """The real parameters cell and validation cell of `source`, a cell printing the resolved paths, and a
    cell feeding the same call bad values (one kernel start: they take most of this test's time)."""
    cells, i = _cells(source)
    nb = nbformat.v4.new_notebook(
        cells=cells[i : i + 2]
        + [
            nbformat.v4.new_code_cell("print('RESOLVED', data_root, cache_dir, out_dir, epochs)"),
            nbformat.v4.new_code_cell(BAD),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / source.name
    nbformat.write(nb, str(path))
    return path


def test_in_a_kernel_started_in_notebooks_the_paths_are_the_repository_ones(tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.delenv("FASHLIB_DATA", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = _validation_notebook(tmp_path, REPO / "notebooks" / "03_loss_comparison.ipynb")
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(
        str(nb),
        str(out),
        cwd=str(REPO / "notebooks"),
        progress_bar=False,
        kernel_name="python3",
        parameters={"epochs": 3},
    )  # as `papermill -p epochs 3` injects it
    cells = nbformat.read(str(out), as_version=4).cells
    assert cells[-2].outputs[0]["text"].split() == [
        "RESOLVED",
        str(REPO / "data"),
        str(REPO / ".cache" / "features"),
        str(REPO / "runs" / "book"),
        "3",
    ]
    refused = cells[-1].outputs[0]["text"]
    assert "epochs='ten': expected an integer >= 1" in refused and "did you mean 'multi_similarity'?" in refused


def test_repository_root_found_from_a_kernel_in_notebooks_when_fashlib_is_installed_elsewhere(tmp_path):
    # `pip install .` puts fashlib in site-packages (no pyproject.toml beside it): the root was the kernel's
    # working directory, so a kernel started in notebooks/ read notebooks/data and wrote notebooks/runs
    from fashlib.paths import project_root

    site = tmp_path / "site-packages"
    site.mkdir()
    assert project_root(site, cwd=REPO / "notebooks") == REPO
    assert project_root(site, cwd=REPO) == REPO
    assert project_root(site, cwd=tmp_path) == tmp_path.resolve()  # not in a checkout: the working directory
    assert project_root(REPO, cwd=tmp_path) == REPO  # a checkout's own fashlib wins


def test_random_controls_must_name_listed_backbones():
    # the notebook runs a random-weights control only for a backbone it compares: other names were ignored
    backbones = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    with pytest.raises(
        params.ParameterError,
        match=r"random_controls=\['tf_efficientnet_lite2'\]: expected names "
        r"from backbones .*'tf_efficientnet_lite2' is not",
    ):
        params.validate({"backbones": backbones, "random_controls": ["tf_efficientnet_lite2"]})
    for good in (True, False, ["tf_efficientnet_lite1"]):
        params.validate({"backbones": backbones, "random_controls": good})


def test_a_list_that_arrived_as_text_says_how_to_pass_it():
    # papermill -p losses "[triplet, arcface]" passes a string; the error now says to use -y
    with pytest.raises(
        params.ParameterError,
        match=r"losses='\[triplet, arcface\]': expected a non-empty list "
        r"of loss names \(it arrived as text: .*-y 'losses: \[triplet, arcface\]'\)",
    ):
        params.validate({"losses": "[triplet, arcface]"})
    with pytest.raises(params.ParameterError) as err:
        params.validate({"epochs": "ten"})
    assert "arrived as text" not in str(err.value)  # plain words get no hint

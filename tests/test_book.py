"""fashlib.book: parameter merging, skip-when-unchanged stamps, failing notebooks, and the whole book end to end
(papermill -> jupyter-book -> headless Chromium, checking every chapter page and its images)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest
import yaml

from fashlib import book

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- helpers


def make_notebook(path: Path, parameters: str, *cells: str) -> Path:
    """Write a notebook: a markdown title, a `parameters`-tagged cell, then code cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {path.stem}\n\nA throwaway notebook for tests."))
    param_cell = nbformat.v4.new_code_cell(parameters)
    param_cell.metadata["tags"] = ["parameters"]
    nb.cells.append(param_cell)
    nb.cells.extend(nbformat.v4.new_code_cell(c) for c in cells)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def write_params(path: Path, shared: dict, notebooks: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**shared, "notebooks": notebooks}, sort_keys=False))
    return path


def injected(nb_path: Path) -> str:
    nb = nbformat.read(str(nb_path), as_version=4)
    cells = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    return cells[0].source if cells else ""


def find_chromium() -> str | None:
    return shutil.which("chromium") or (shutil.which("/usr/bin/chromium")) or shutil.which("chromium-browser")


def require_chromium() -> str:
    """Chromium's path; fail under CI (CI=true) when it is missing, skip with a reason locally."""
    exe = find_chromium()
    if exe is None:
        msg = "headless Chromium not found (Debian: apt-get install chromium); the built book cannot be opened"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


class PageParser(HTMLParser):
    """Collects <img> sources, output-cell classes and the <h1> text of a rendered page."""

    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.output_classes: list[str] = []
        self.h1 = 0
        self.main = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and "src" in a:
            self.imgs.append(a["src"] or "")
        if tag == "h1":
            self.h1 += 1
        if tag in ("main", "article"):
            self.main += 1
        cls = a.get("class") or ""
        if "output" in cls.split():
            self.output_classes.append(cls)


def dump_dom(chromium: str, page: Path, profile: Path) -> str:
    """The DOM of a local page after Chromium loaded it (headless, no network)."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"chromium failed on {page}: {proc.stderr[-2000:]}"
    return proc.stdout


def check_page(chromium: str, page: Path, site: Path, profile: Path) -> PageParser:
    """Open one built page in Chromium: it loads, all its images exist, no error output is shown."""
    assert page.exists(), f"page not built: {page}"
    dom = dump_dom(chromium, page, profile)
    assert "<html" in dom.lower() and len(dom) > 1000, f"{page.name}: Chromium returned an empty DOM"
    parsed = PageParser()
    parsed.feed(dom)
    assert parsed.main >= 1 and parsed.h1 >= 1, f"{page.name}: no article/heading rendered"
    for src in parsed.imgs:
        assert src, f"{page.name}: <img> with an empty src"
        if src.startswith("data:"):
            continue
        url = urlparse(src)
        assert url.scheme in ("", "file"), f"{page.name}: image from the network: {src}"
        target = Path(unquote(url.path)) if url.scheme == "file" else (page.parent / unquote(url.path))
        target = target.resolve()
        assert target.is_file(), f"{page.name}: broken image {src} -> {target}"
        assert site in target.parents, f"{page.name}: image outside the built site: {target}"
    assert "Traceback (most recent call last)" not in dom, f"{page.name}: shows a Python traceback"
    assert "An Exception was encountered" not in dom, f"{page.name}: shows papermill's error banner"
    bad = [c for c in parsed.output_classes if "traceback" in c or "error" in c.split()]
    assert not bad, f"{page.name}: error output cells {bad}"
    return parsed


def index_target(index_html: Path) -> Path:
    """jupyter-book's index.html only redirects to the root document: the page it points at."""
    m = re.search(r'url=([^"\' >]+)', index_html.read_text(), re.I)
    assert m, f"{index_html} does not redirect anywhere"
    target = (index_html.parent / m.group(1)).resolve()
    assert target.is_file(), f"{index_html} redirects to a missing page {target}"
    return target


def built_pages(result: book.BuildResult, site: Path) -> list[Path]:
    """The HTML page of every document of the (possibly pruned) toc."""
    toc_file = site / "_build" / "_toc.pruned.yml" if result.dropped else site / "_toc.yml"
    docs = book.toc_files(yaml.safe_load(toc_file.read_text()))
    return [site / "_build" / "html" / f"{doc}.html" for doc in docs]


# --------------------------------------------------------------------------- parameters


def test_repo_param_files_agree():
    full = book.load_params(REPO / "book" / "params.yaml")
    smoke = book.load_params(REPO / "book" / "params-smoke.yaml")
    for key in ("dataset", "data_root", "device", "seed", "max_images", "cache_dir", "out_dir"):
        assert key in full, key
    assert full["dataset"] == "clothing" and full["device"] == "cpu" and full["data_root"] is None
    assert full["max_images"] is None and isinstance(smoke["max_images"], int) and smoke["max_images"] <= 200
    assert list(smoke["notebooks"]) == list(full["notebooks"])
    # every notebook of the parameter file is a chapter of the toc, in the same order
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    chapters = [Path(f).name for f in book.toc_files(toc) if f.startswith("book/notebooks/")]
    assert chapters == list(full["notebooks"])


def test_params_merge_extends_and_set(tmp_path):
    write_params(
        tmp_path / "base.yaml",
        {
            "dataset": "clothing",
            "device": "cpu",
            "seed": 0,
            "cache_dir": ".cache/f",
            "data_root": None,
            "max_images": None,
        },
        {"a": {"epochs": 3, "losses": ["triplet"]}, "b": {"device": "cpu", "finetune": False}, "c": None},
    )
    (tmp_path / "smoke.yaml").write_text("extends: base.yaml\nseed: 1\nnotebooks:\n  a:\n    epochs: 1\n  c:\n")
    params = book.load_params(tmp_path / "smoke.yaml")
    assert list(params["notebooks"]) == ["a", "b", "c"]
    assert params["seed"] == 1 and params["notebooks"]["a"] == {"epochs": 1, "losses": ["triplet"]}
    assert params["notebooks"]["c"] == {}

    a = book.notebook_params(params, "a", root=tmp_path)
    assert a["epochs"] == 1 and a["seed"] == 1 and a["dataset"] == "clothing"
    assert a["cache_dir"] == str(tmp_path / ".cache" / "f")  # relative paths made absolute
    assert a["data_root"] is None  # null stays null: the notebook resolves it (fashlib.params.resolve)

    over = book.apply_overrides(
        params,
        ["device=cuda", "a.losses=[arcface, proxy_anchor]", "max_images=8", "b.finetune=true", "data_root=/data"],
    )
    assert params["device"] == "cpu" and params["notebooks"]["a"]["losses"] == ["triplet"]  # input untouched
    assert over["device"] == "cuda" and over["max_images"] == 8
    assert book.notebook_params(over, "b")["device"] == "cuda"  # the command line wins over a section
    assert book.notebook_params(over, "b")["finetune"] is True
    assert book.notebook_params(over, "a")["losses"] == ["arcface", "proxy_anchor"]
    assert book.notebook_params(over, "a")["data_root"] == "/data"
    with pytest.raises(KeyError, match="no notebook 'zz'"):
        book.apply_overrides(params, ["zz.epochs=1"])
    with pytest.raises(ValueError, match="key=value"):
        book.apply_overrides(params, ["device"])


def test_count_warnings_and_prune_toc(tmp_path):
    log = (
        "reading sources... \n/x/a.md:3: WARNING: undefined label\n\x1b[91m/x/b.ipynb: WARNING: bad\x1b[39;49;00m\n"
        "build succeeded, 2 warnings.\n"
    )
    n, lines = book.count_warnings(log)
    assert n == 2 and lines[0] == "/x/a.md:3: WARNING: undefined label" and lines[1] == "/x/b.ipynb: WARNING: bad"
    assert book.count_warnings("build succeeded.\n")[0] == 0

    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# i\n")
    (tmp_path / "book" / "a.md").write_text("# a\n")
    toc = {
        "format": "jb-book",
        "root": "book/intro",
        "parts": [
            {"caption": "A", "chapters": [{"file": "book/a"}, {"file": "book/notebooks/gone"}]},
            {"caption": "B", "chapters": [{"file": "book/notebooks/gone2"}]},
        ],
    }
    pruned, dropped = book.prune_toc(toc, tmp_path)
    assert dropped == ["book/notebooks/gone", "book/notebooks/gone2"]
    assert pruned["parts"] == [{"caption": "A", "chapters": [{"file": "book/a"}]}]
    assert book.toc_files(pruned) == ["book/intro", "book/a"]


# --------------------------------------------------------------------------- execution


def test_run_notebooks_passes_declared_params_and_skips_unchanged(tmp_path):
    nbdir, outdir = tmp_path / "notebooks", tmp_path / "executed"
    src = make_notebook(
        nbdir / "n1.ipynb",
        "seed = 0\nout_dir = None\nepochs = 1",
        "import pathlib\np = pathlib.Path(out_dir) / 'n1'\np.mkdir(parents=True, exist_ok=True)\n"
        "(p / 'result.txt').write_text(f'{seed} {epochs}')\nprint('epochs', epochs)",
    )
    params = {"seed": 3, "out_dir": "runs", "device": "cpu", "notebooks": {"n1": {"epochs": 2}}}
    logs: list[str] = []
    run = _runner(nbdir, outdir, tmp_path, log=logs.append)
    runs = run(params)
    assert [r.status for r in runs] == ["executed"]
    assert runs[0].ignored == ["device"]  # not declared by the notebook: never injected
    assert (tmp_path / "runs" / "n1" / "result.txt").read_text() == "3 2"
    inj = injected(outdir / "n1.ipynb")
    assert "seed = 3" in inj and "epochs = 2" in inj and "device" not in inj
    # relative out_dir resolved against the root (result.txt above); the book shows it relative, not the machine's path
    assert 'out_dir = "./runs"' in inj and str(tmp_path) not in inj
    stamp = json.loads((outdir / "n1.stamp.json").read_text())
    assert {"source", "parameters", "fashlib", "seconds"} <= set(stamp)
    assert any("n1" in line and "done in" in line for line in logs)

    # nothing changed: skipped, fast
    runs = run(params)
    assert [r.status for r in runs] == ["skipped"]
    # a parameter the notebook does not declare changes nothing it would see: still skipped
    runs = run(book.apply_overrides(params, ["device=cuda"]))
    assert [r.status for r in runs] == ["skipped"]
    changed = book.apply_overrides(params, ["n1.epochs=5"])
    runs = run(changed)
    assert [r.status for r in runs] == ["executed"]
    assert (tmp_path / "runs" / "n1" / "result.txt").read_text() == "3 5"
    # source edited: re-executed; executed copy deleted: re-executed; force: re-executed
    nb = nbformat.read(str(src), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("x = 1"))
    nbformat.write(nb, str(src))
    assert run(changed)[0].status == "executed"
    assert run(changed)[0].status == "skipped"
    assert run(changed, library_hash="lib2")[0].status == "executed"  # the fashlib sources changed
    (outdir / "n1.ipynb").unlink()
    assert run(changed, library_hash="lib2")[0].status == "executed"  # executed copy gone
    assert run(changed, library_hash="lib2", force=True)[0].status == "executed"


def test_stamp_logic(tmp_path):
    src = make_notebook(tmp_path / "n.ipynb", "a = 1")
    out = tmp_path / "out" / "n.ipynb"
    stamp = book.make_stamp(src, {"a": 1}, "lib1")
    assert not book.is_up_to_date(out, stamp)  # never run
    out.parent.mkdir()
    shutil.copy(src, out)
    book.write_stamp(out, stamp, 1.0)
    assert book.is_up_to_date(out, stamp)
    assert not book.is_up_to_date(out, book.make_stamp(src, {"a": 2}, "lib1"))  # parameters
    assert not book.is_up_to_date(out, book.make_stamp(src, {"a": 1}, "lib2"))  # fashlib source
    make_notebook(src, "a = 1", "b = 2")
    assert not book.is_up_to_date(out, book.make_stamp(src, {"a": 1}, "lib1"))  # notebook source
    book.stamp_path(out).write_text("not json")
    assert not book.is_up_to_date(out, stamp)
    # the library hash follows the fashlib sources
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "m.py").write_text("x = 1\n")
    h1 = book.fashlib_hash(lib)
    (lib / "m.py").write_text("x = 2\n")
    assert book.fashlib_hash(lib) != h1 and len(h1) == 64


def test_failing_notebook_names_notebook_and_cell(tmp_path, capsys):
    nbdir = tmp_path / "notebooks"
    make_notebook(nbdir / "ok.ipynb", "seed = 0", "print('fine')")
    make_notebook(
        nbdir / "broken.ipynb", "seed = 0", "a = 1", "# load the table\nresult = 1 / 0\nprint(result)", "print('never')"
    )
    make_notebook(nbdir / "after.ipynb", "seed = 0", "print('not reached')")
    params = {"seed": 1, "notebooks": {"ok": {}, "broken": {}, "after": {}}}
    outdir = tmp_path / "executed"
    with pytest.raises(book.NotebookFailed) as info:
        book.run_notebooks(params, nbdir, outdir, root=tmp_path, progress_bar=False)
    err = info.value
    assert err.notebook == "broken"
    assert err.cell_index == 3  # markdown 0, parameters 1, `a = 1` 2, the failing cell 3 of the source notebook
    assert err.first_line == "# load the table"
    assert err.ename == "ZeroDivisionError" and "division by zero" in err.evalue
    msg = str(err)
    assert "'broken'" in msg and "cell 3" in msg and "ZeroDivisionError" in msg
    # the executed copy is kept for inspection outside the book, never in it; the next notebook was not run
    failed = tmp_path / "_build" / "failed" / "broken.ipynb"
    assert err.output_path == failed and str(failed) in msg
    assert not (outdir / "broken.ipynb").exists() and not book.stamp_path(outdir / "broken.ipynb").exists()
    assert not (outdir / "after.ipynb").exists()
    assert "ZeroDivisionError" in failed.read_text()
    assert not any((tmp_path / "_build" / "executing").iterdir())

    # the CLI prints the same message and exits non-zero
    cfg = write_params(tmp_path / "params.yaml", {"seed": 0}, {"broken": {}})
    (tmp_path / "_config.yml").write_text("title: t\n")
    code = book.main(
        ["build", "--config", str(cfg), "--skip-html", "--output-dir", str(tmp_path / "site")], root=tmp_path
    )
    assert code == 1
    err_out = capsys.readouterr().err
    assert "notebook 'broken' failed in cell 3" in err_out and "ZeroDivisionError" in err_out


def test_missing_notebook(tmp_path):
    params = {"notebooks": {"nope": {}}}
    with pytest.raises(FileNotFoundError, match="nope"):
        book.run_notebooks(params, tmp_path, tmp_path / "out", root=tmp_path)
    runs = book.run_notebooks(params, tmp_path, tmp_path / "out", root=tmp_path, allow_missing=True, log=lambda m: None)
    assert [r.status for r in runs] == ["missing"]
    with pytest.raises(KeyError, match="--only"):
        book.run_notebooks(params, tmp_path, tmp_path / "out", root=tmp_path, only=["other"])


# --------------------------------------------------------------------------- end to end

FIGURE_CELL = """from fashlib import plots
fig = plots.recall_curves({"a": {1: 0.2 + 0.01 * seed, 5: 0.5, 10: 0.7}})
fig"""


@pytest.mark.timeout(240)
def test_minimal_site_end_to_end(tmp_path):
    """A throwaway project (one notebook drawing a figure) built by fashlib.book and opened in Chromium."""
    chromium = require_chromium()
    root = tmp_path / "project"
    make_notebook(root / "notebooks" / "01_demo.ipynb", "seed = 0", FIGURE_CELL, "print('seed is', seed)")
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Demo book\n\nIntro text.\n")
    (root / "_toc.yml").write_text(
        yaml.safe_dump(
            {
                "format": "jb-book",
                "root": "book/intro",
                "parts": [{"caption": "Experiments", "chapters": [{"file": "book/notebooks/01_demo"}]}],
            },
            sort_keys=False,
        )
    )
    write_params(root / "book" / "params.yaml", {"seed": 0}, {"01_demo": {}})
    runs, result = book.build("book/params.yaml", ["seed=7"], root=root, log=lambda m: None)
    assert [r.status for r in runs] == ["executed"]
    assert result.returncode == 0 and result.index_html.exists()
    assert result.warnings == 0, result.warning_lines
    site = root / "_build" / "html"
    page = check_page(chromium, site / "book" / "notebooks" / "01_demo.html", site.resolve(), tmp_path / "profile")
    assert len([s for s in page.imgs if "_images" in s or s.startswith("data:")]) >= 1, page.imgs
    dom = dump_dom(chromium, site / "book" / "notebooks" / "01_demo.html", tmp_path / "profile")
    assert "seed is 7" in dom
    check_page(chromium, index_target(result.index_html), site.resolve(), tmp_path / "profile")

    # a broken image is detected
    (site / "_images").mkdir(exist_ok=True)
    for img in (site / "_images").iterdir():
        img.unlink()
    with pytest.raises(AssertionError, match="broken image"):
        check_page(chromium, site / "book" / "notebooks" / "01_demo.html", site.resolve(), tmp_path / "profile")


@pytest.mark.timeout(900)  # the first test to use smoke_book builds it
def test_book_end_to_end_smoke(smoke_book, tmp_path):
    """Every notebook of book/params.yaml, run with book/params-smoke.yaml into a temporary site, built with
    jupyter-book and every chapter page opened in headless Chromium (the build is conftest's smoke_book)."""
    chromium = require_chromium()
    listed, missing, runs, result, site = (
        smoke_book.listed,
        smoke_book.missing,
        smoke_book.runs,
        smoke_book.result,
        smoke_book.site,
    )
    if missing and IN_CI:
        pytest.fail(f"notebooks listed in book/params.yaml but missing from notebooks/: {missing}")
    assert [r.status for r in runs if r.name not in missing] == ["executed"] * (len(listed) - len(missing))
    assert result.returncode == 0, result.log[-3000:]
    assert sorted(Path(d).name for d in result.dropped) == sorted(missing)
    print(f"jupyter-book: {result.warnings} warning(s)", *result.warning_lines, sep="\n  ")
    html = (site / "_build" / "html").resolve()
    pages = built_pages(result, site)
    assert index_target(result.index_html) == pages[0].resolve()
    assert len(pages) == len(book.toc_files(yaml.safe_load((REPO / "_toc.yml").read_text()))) - len(missing)
    for page in pages:
        check_page(chromium, page, html, tmp_path / "profile")
    # the executed notebooks are in the site, not in the repository
    for name in listed:
        if name not in missing:
            assert (site / "book" / "notebooks" / f"{name}.ipynb").exists()


def test_missing_chromium_fails_under_ci_and_skips_locally(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    globals_ = globals()
    monkeypatch.setitem(globals_, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="Chromium not found"):
        require_chromium()
    monkeypatch.setitem(globals_, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="Chromium not found"):
        require_chromium()


# --------------------------------------------------------------------------- issue 7 (9): never stale


def test_set_values_are_read_as_the_parameter_file_reads_them():
    parsed = dict(
        (".".join(k), v)
        for k, v in book.parse_set(
            [
                "data_root=None",
                "a=null",
                "lr=1e-3",
                "b=2.5E+2",
                "epochs=5",
                "losses=[triplet, arcface]",
                "x=true",
                "device=cuda",
                "empty=",
                "neg=-1e-2",
            ]
        )
    )
    assert parsed == {
        "data_root": None,
        "a": None,
        "lr": 0.001,
        "b": 250.0,
        "epochs": 5,
        "losses": ["triplet", "arcface"],
        "x": True,
        "device": "cuda",
        "empty": None,
        "neg": -0.01,
    }
    assert isinstance(parsed["lr"], float) and isinstance(parsed["epochs"], int)


def test_set_with_an_unknown_key_lists_the_valid_ones_and_the_closest():
    params = {"seed": 0, "data_root": None, "notebooks": {"a": {"epochs": 3}, "b": {"top_k": 2}}}
    with pytest.raises(ValueError) as err:
        book.apply_overrides(params, ["epoch=5"])
    assert "no parameter 'epoch'" in str(err.value) and "did you mean 'epochs'?" in str(err.value)
    assert "valid keys: data_root, epochs, seed, top_k" in str(err.value)
    with pytest.raises(ValueError, match="for notebook 'a'; did you mean 'epochs'"):
        book.apply_overrides(params, ["a.epoc=5"])
    with pytest.raises(ValueError, match="no parameter 'top_k' for notebook 'a'"):
        book.apply_overrides(params, ["a.top_k=5"])  # b's key, not a's
    over = book.apply_overrides(params, ["data_root=None", "a.seed=2"])
    assert over["data_root"] is None and book.notebook_params(over, "a")["data_root"] is None
    assert book.notebook_params(over, "a")["seed"] == 2


def test_cli_exits_2_on_an_unknown_set_key_before_running_anything(tmp_path, capsys):
    make_notebook(tmp_path / "notebooks" / "n.ipynb", "epochs = 1", "open('ran', 'w').close()")
    cfg = write_params(tmp_path / "params.yaml", {"seed": 0}, {"n": {"epochs": 1}})
    code = book.main(["build", "--config", str(cfg), "--skip-html", "--set", "epoch=5"], root=tmp_path)
    assert code == 2 and "did you mean 'epochs'?" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


def test_bad_parameter_value_stops_the_build_before_any_notebook_runs(tmp_path):
    nbdir = tmp_path / "notebooks"
    make_notebook(nbdir / "first.ipynb", "seed = 0", "open('ran', 'w').close()")
    make_notebook(nbdir / "second.ipynb", "epochs = 1\nlosses = ['triplet']")
    params = {"seed": 0, "notebooks": {"first": {}, "second": {"epochs": "ten", "losses": ["tripplet"]}}}
    with pytest.raises(ValueError) as err:
        book.run_notebooks(params, nbdir, tmp_path / "out", root=tmp_path, progress_bar=False, log=lambda m: None)
    text = str(err.value)
    assert text.startswith("second:") and "epochs='ten': expected an integer >= 1" in text
    assert "'tripplet' is not; did you mean 'triplet'?" in text
    assert not (tmp_path / "ran").exists()


def _runner(nbdir: Path, outdir: Path, root: Path, log=lambda m: None) -> functools.partial:
    """book.run_notebooks over nbdir -> outdir, quiet, with a fixed library hash (the fashlib sources may change
    under a developer's feet while a test runs)."""
    return functools.partial(
        book.run_notebooks,
        notebooks_dir=nbdir,
        output_dir=outdir,
        root=root,
        progress_bar=False,
        library_hash="lib",
        log=log,
    )


def _data_notebook(tmp_path: Path) -> tuple[Path, Path, functools.partial]:
    nbdir, outdir = tmp_path / "notebooks", tmp_path / "executed"
    make_notebook(nbdir / "d.ipynb", "dataset = 'clothing'\ndata_root = None\ngpu_runs_dir = None", "x = 1")
    run = _runner(nbdir, outdir, tmp_path)
    return nbdir, outdir, run


def test_a_notebook_reruns_when_its_data_or_recorded_runs_change(tmp_path, monkeypatch):
    data_a, data_b, gpu_runs = tmp_path / "A", tmp_path / "B", tmp_path / "gpu-runs"
    for root in (data_a, data_b):
        (root / "clothing-dataset" / "images").mkdir(parents=True)
        (root / "clothing-dataset" / "images.csv").write_text("image,label\n1,shirt\n")
    gpu_runs.mkdir()
    (gpu_runs / "r1.json").write_text("{}")
    _, outdir, run = _data_notebook(tmp_path)
    params = {"dataset": "clothing", "data_root": None, "gpu_runs_dir": str(gpu_runs), "notebooks": {"d": {}}}
    monkeypatch.setenv("FASHLIB_DATA", str(data_a))
    status = lambda p=params: run(p)[0].status  # noqa: E731
    assert status() == "executed" and status() == "skipped"
    stamp = json.loads(book.stamp_path(outdir / "d.ipynb").read_text())
    assert stamp["data"].startswith(str(data_a / "clothing-dataset")) and stamp["runs"].startswith(str(gpu_runs))
    monkeypatch.setenv("FASHLIB_DATA", str(data_b))  # another data root: same parameters, other data
    assert status() == "executed" and status() == "skipped"
    (data_b / "clothing-dataset" / "images.csv").write_text("image,label\n1,shirt\n2,dress\n")  # annotations
    assert status() == "executed" and status() == "skipped"
    (data_b / "clothing-dataset" / "images" / "2.jpg").write_bytes(b"jpeg")  # a new image
    assert status() == "executed" and status() == "skipped"
    (gpu_runs / "r2.json").write_text("{}")  # a newly recorded run
    assert status() == "executed" and status() == "skipped"
    assert status(book.apply_overrides(params, [f"data_root={data_a}"])) == "executed"


def test_tree_fingerprint_sees_names_sizes_and_mtimes(tmp_path):
    assert book.tree_fingerprint(tmp_path / "nope") == "absent"
    (tmp_path / "a.txt").write_text("1")
    first = book.tree_fingerprint(tmp_path)
    assert book.tree_fingerprint(tmp_path) == first
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    second = book.tree_fingerprint(tmp_path)
    assert second != first
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert book.tree_fingerprint(tmp_path) not in (first, second)


def test_an_interrupted_run_leaves_nothing_that_the_html_build_publishes(tmp_path, monkeypatch):
    nbdir, outdir = tmp_path / "notebooks", tmp_path / "book" / "notebooks"
    make_notebook(nbdir / "n.ipynb", "seed = 0", "print('seed', seed)")
    run = _runner(nbdir, outdir, tmp_path)
    assert run({"seed": 1, "notebooks": {"n": {}}})[0].status == "executed"
    good = (outdir / "n.ipynb").read_text()
    assert book.read_valid_stamp(outdir / "n.ipynb") is not None

    import papermill

    def killed(source, output, **kwargs):  # papermill writes its output as it goes, then the run dies
        Path(output).write_text('{"half": "executed"}')
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", killed)
    with pytest.raises(KeyboardInterrupt):
        run({"seed": 2, "notebooks": {"n": {}}})
    assert (outdir / "n.ipynb").read_text() == good  # the half-executed copy never reached the book
    assert book.read_valid_stamp(outdir / "n.ipynb") is None  # ... and the old one is no longer "current"
    assert (tmp_path / "_build" / "executing" / "n.ipynb").exists()

    (tmp_path / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "book/notebooks/n"}))
    with pytest.raises(RuntimeError, match=r"without a valid stamp .* book/notebooks/n.ipynb"):
        book.build_html(tmp_path)
    # a stamp that does not describe the file (edited or replaced after the run) is not valid either
    book.write_stamp(outdir / "n.ipynb", {"source": "s"}, 1.0)
    assert book.read_valid_stamp(outdir / "n.ipynb") is not None
    (outdir / "n.ipynb").write_text(good.replace("seed", "sed"))
    assert book.read_valid_stamp(outdir / "n.ipynb") is None
    with pytest.raises(RuntimeError, match="without a valid stamp"):
        book.build_html(tmp_path)


def test_tree_fingerprint_follows_a_linked_image_folder_and_survives_loops(tmp_path):
    # images/ linked to another disk: an edited image there rebuilt nothing (os.walk does not follow links)
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.jpg").write_bytes(b"one")
    data = tmp_path / "data"
    data.mkdir()
    (data / "images.csv").write_text("image\na\n")
    (data / "images").symlink_to(store, target_is_directory=True)
    (store / "loop").symlink_to(data, target_is_directory=True)  # a cycle must end
    (data / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")  # dangling: counted, not a crash
    first = book.tree_fingerprint(data)
    (store / "a.jpg").write_bytes(b"two!")
    assert book.tree_fingerprint(data) != first


def test_only_names_the_notebooks_it_leaves_stale_and_the_html_build_refuses_them(tmp_path, monkeypatch):
    # --only ran one notebook after the data changed; the others, computed on the old data, were published
    data = tmp_path / "data" / "clothing-dataset"
    data.mkdir(parents=True)
    (data / "images.csv").write_text("image,label\n1,shirt\n")
    monkeypatch.setenv("FASHLIB_DATA", str(tmp_path / "data"))
    for name in ("a", "b"):
        make_notebook(tmp_path / "notebooks" / f"{name}.ipynb", "dataset = 'clothing'\ndata_root = None", "x = 1")
    (tmp_path / "params.yaml").write_text("dataset: clothing\ndata_root: null\nnotebooks:\n  a: {}\n  b: {}\n")
    build = functools.partial(book.build, tmp_path / "params.yaml", root=tmp_path, log=lambda m: None)
    runs, _ = build(skip_html=True)
    assert [r.status for r in runs] == ["executed", "executed"]
    assert [r.status for r in build(only=["a"], skip_html=True)[0]] == ["skipped"]  # nothing changed: no stale
    (data / "images.csv").write_text("image,label\n1,shirt\n2,dress\n")
    runs, _ = build(only=["a"], skip_html=True)
    assert [(r.name, r.status) for r in runs] == [("a", "executed"), ("b", "stale")]
    with pytest.raises(RuntimeError, match="not publishing stale results: b ran with other inputs"):
        build(only=["a"])


def test_an_upgraded_package_changes_the_library_hash(monkeypatch):
    # torch or timm upgraded: the notebooks' numbers may change, but nothing was re-executed
    from importlib import metadata

    before = book.packages_hash()
    assert book.packages_hash() == before and len(before) == 64
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "99.0" if name == "timm" else real(name))
    assert book.packages_hash() != before
    assert book.packages_hash(("surely-not-installed-pkg",)) != book.packages_hash(("timm",))

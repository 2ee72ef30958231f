"""What may reach the built book: fashlib.site_check finds progress bars, warning blocks, tracebacks, machine
paths and CDN scripts; fashlib.book tidies executed notebooks (stderr out, progress widgets out, portable paths)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from fashlib import book, site_check

CLEAN = """<html><head><script src="../_static/doctools.js?v=1"></script>
<script async="async" src="../_static/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"></script>
<link rel="stylesheet" href="../_static/styles/theme.css"/></head><body><main>
<p>See <a href="https://github.com/home/user">the home page</a>; 75% of queries and 2 it/s in prose.</p>
<div class="cell_output docutils container"><div class="output stream"><pre>Recall@1 = 70.8 %</pre></div></div>
</main></body></html>"""


def page(output: str = "", head: str = "", body: str = "") -> str:
    return CLEAN.replace("</head>", head + "</head>").replace(
        "</main>", f'{body}<div class="cell_output docutils container">{output}</div></main>'
    )


def test_clean_page_has_no_problem():
    assert site_check.page_problems(CLEAN) == []


@pytest.mark.parametrize(
    "html,expected",
    [
        (page(output="<pre>extract: 37%|███▋      | 3/8 [00:01&lt;00:02, 2.51it/s]</pre>"), "progress bar"),
        (page(output="<pre> 12/12 [00:03&lt;00:00,  3.98it/s]</pre>"), "progress bar"),
        (page(output="<pre>MissingImagesWarning: clothing: 5 of 5403 listed images</pre>"), "warning in an output"),
        (page(output='<div class="output stderr"><pre>something</pre></div>'), "stderr output block"),
        (page(body="<pre>Traceback (most recent call last):\n  File x</pre>"), "traceback"),
        (page(head='<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script>'), "network"),
        (page(head='<script src="//unpkg.com/thebe"></script>'), "script from the network"),
        (page(head='<link rel="stylesheet" href="https://fonts.example.org/a.css">'), "stylesheet from the network"),
        (page(output="<pre>saved to /tmp/pytest-of-root/pytest-9/runs/05</pre>"), "machine path: /tmp/pytest-of-root"),
        (page(body='<img src="file:///home/ann/x.png">'), "machine path: /home/ann"),
        (page(output="<pre>cache_dir = &quot;/root/.cache/x&quot;</pre>"), "machine path: /root/.cache"),
    ],
)
def test_each_problem_is_found(html, expected):
    problems = site_check.page_problems(html)
    assert any(expected in p for p in problems), problems


def test_warning_word_in_prose_is_not_an_output_warning():
    html = page(body="<p>A UserWarning: is what Python prints.</p>")
    assert site_check.page_problems(html) == []


def test_extra_paths_and_site_scan(tmp_path):
    site = tmp_path / "html"
    (site / "book").mkdir(parents=True)
    (site / "_static").mkdir()
    (site / "_sources").mkdir()
    (site / "index.html").write_text(CLEAN)
    (site / "book" / "a.html").write_text(page(output="<pre>read /srv/repo/data/x.csv</pre>"))
    (site / "_sources" / "a.ipynb").write_text(json.dumps({"metadata": {"input_path": "/srv/repo/notebooks/a"}}))
    (site / "_static" / "lib.js").write_text("var p = '/tmp/whatever';")  # libraries are not the site's text
    found = site_check.site_problems(site, extra_paths=["/srv/repo"])
    assert found == {"book/a.html": ["machine path: /srv/repo"], "_sources/a.ipynb": ["machine path: /srv/repo"]}
    with pytest.raises(FileNotFoundError, match="no .html page"):
        site_check.site_problems(tmp_path / "empty")


def test_portable_path_text(monkeypatch, tmp_path):
    root = tmp_path / "repo"
    monkeypatch.setenv("FASHLIB_DATA", "/data/shared")
    text = f'cache_dir = "{root}/.cache/f"\ndata_root = "/data/shared/clothing"\nother = "{root}-old/x"\nr = "{root}"'
    assert book.portable_path_text(text, root) == (
        f'cache_dir = "./.cache/f"\ndata_root = "$FASHLIB_DATA/clothing"\nother = "{root}-old/x"\nr = "."'
    )


def _executed_copy(path: Path, root: Path) -> Path:
    """An executed notebook as papermill leaves it: injected parameters, a tqdm widget, stderr, metadata."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {
        "input_path": f"{root}/notebooks/n.ipynb",
        "output_path": str(path),
        "parameters": {"out_dir": f"{root}/runs"},
    }
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    injected = nbformat.v4.new_code_cell(f'out_dir = "{root}/runs"\nepochs = 2')
    injected.metadata["tags"] = ["injected-parameters"]
    work = nbformat.v4.new_code_cell("train()")
    work.outputs = [
        nbformat.v4.new_output(
            "display_data",
            data={
                "application/vnd.jupyter.widget-view+json": {"model_id": "a", "version_major": 2, "version_minor": 0},
                "text/plain": "train: 100%|##########| 3/3 [00:01<00:00, 2.9it/s]",
            },
        ),
        nbformat.v4.new_output("stream", name="stderr", text=f"{root}/fashlib/x.py:3: UserWarning: careful\n"),
        nbformat.v4.new_output("stream", name="stdout", text="Recall@1 0.708\n"),
    ]
    nb.cells = [injected, work]
    nbformat.write(nb, str(path))
    return path


def test_tidy_executed_moves_stderr_out_and_drops_progress_widgets(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHLIB_DATA", raising=False)
    root = tmp_path / "repo"
    path = _executed_copy(tmp_path / "n.ipynb", root)
    lines = book._tidy_executed(path, root)
    assert lines == [f"cell 1 stderr: {root}/fashlib/x.py:3: UserWarning: careful"]
    nb = nbformat.read(str(path), as_version=4)
    assert nb.cells[0].source == 'out_dir = "./runs"\nepochs = 2'
    assert [o.get("text") for o in nb.cells[1].outputs] == ["Recall@1 0.708\n"]  # stdout stays, the rest goes
    assert "widgets" not in nb.metadata
    assert nb.metadata["papermill"] == {
        "input_path": "./notebooks/n.ipynb",
        "output_path": "n.ipynb",
        "parameters": {"out_dir": "./runs"},
    }
    assert str(root) not in path.read_text()

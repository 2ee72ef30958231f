"""The smoke book as a reader opens it (conftest's smoke_book, built once per session): on every page no
progress bar, no Python warning block, no traceback, no absolute path of the build machine, no script from a
CDN; the formulas typeset from the site's own MathJax, without a network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import nbformat
import pytest

from fashlib import site_check

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
pytestmark = pytest.mark.timeout(900)  # the first test to use smoke_book builds it


def test_every_page_is_clean(smoke_book):
    assert smoke_book.result.returncode == 0, smoke_book.result.log[-3000:]
    problems = site_check.site_problems(smoke_book.html, extra_paths=smoke_book.machine_paths)
    listing = "\n".join(f"{page}:\n    " + "\n    ".join(found) for page, found in problems.items())
    assert not problems, f"the built book shows what a reader must not see:\n{listing}"


def test_executed_notebooks_hold_no_stderr_nor_progress_widget(smoke_book):
    """fashlib.book moves stderr to the terminal and drops tqdm widgets: the executed copies keep neither."""
    executed = [r.output_path for r in smoke_book.runs if r.output_path]
    assert executed, "no notebook was executed"
    for path in executed:
        nb = nbformat.read(str(path), as_version=4)
        assert "widgets" not in nb.metadata, f"{path.name}: widget state left (the page would load it from a CDN)"
        for i, cell in enumerate(nb.cells):
            for out in cell.get("outputs", []):
                assert out.get("name") != "stderr", f"{path.name} cell {i}: stderr output {out.get('text', '')[:200]!r}"
                text = str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
                assert not site_check.PROGRESS.search(text), f"{path.name} cell {i}: progress bar {text[:200]!r}"


def test_formulas_use_the_sites_mathjax(smoke_book, tmp_path):
    """Pages with formulas load _static/mathjax/MathJax.js, which is in the site; Chromium typesets them
    from file:// with networking off."""
    page = smoke_book.html / "book" / "protocol.html"
    html = page.read_text()
    assert '<span class="math' in html or '<div class="math' in html, "the protocol chapter has no formula"
    scripts = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', html, re.I)
    assert scripts == ["../_static/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"], scripts
    assert (smoke_book.html / "_static" / "mathjax" / "MathJax.js").is_file()
    assert (smoke_book.html / "_static" / "mathjax" / "config" / "TeX-AMS-MML_HTMLorMML-full.js").is_file()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if IN_CI:
            pytest.fail("headless Chromium not found (Debian: apt-get install chromium)")
        pytest.skip("headless Chromium not found: the typesetting is not checked")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
           "--proxy-server=127.0.0.1:9", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=15000", "--dump-dom", page.as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    typeset = len(re.findall(r'id="MathJax-Element-\d+-Frame"', dom))
    assert typeset >= 1, "MathJax typeset no formula on the protocol page"
    assert "MathJax_Error" not in re.sub(r"<style.*?</style>", "", dom, flags=re.S)

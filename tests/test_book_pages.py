"""The smoke book as a reader opens it (conftest's smoke_book, built once per session): on every page no
progress bar, no Python warning block, no traceback, no absolute path of the build machine, no script from a
CDN; each chapter's answer paragraph states the numbers its run measured (myst-nb glue, read back from the
executed notebook); the formulas typeset from the site's own MathJax, without a network."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

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


GLUE_ROLE = re.compile(r"\{glue(?::(\w+))?\}`([^`:]+)(?::([^`]*))?`")  # {glue:text}`name:.1f` -> (text, name, .1f)
RECORD = "application/papermill.record/"


def glued_outputs(nb) -> dict[str, dict]:
    """name -> the mime bundle (papermill record keys stripped) a notebook glued with myst-nb glue."""
    found = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                found[name] = {k.removeprefix(RECORD): v for k, v in out.get("data", {}).items()}
    return found


def answer_roles(nb) -> list[tuple[str, str, str]]:
    """The glue roles (kind, name, format spec) written in the markdown of the notebook's "## Answer" section."""
    roles, inside = [], False
    for cell in nb.cells:
        for line in cell.source.splitlines() if cell.cell_type == "markdown" else []:
            heading = re.match(r"(#{1,2})\s+(.*)", line)
            if heading:
                inside = heading.group(2).strip().lower() == "answer"
            elif inside:
                roles += GLUE_ROLE.findall(line)
    return roles


def _words(text: str) -> str:
    """Markdown or HTML text as a reader reads it: no emphasis or code marks, single spaces."""
    return " ".join(re.sub(r"\*\*|\*|`", "", text).split())


def rendered_value(bundle: dict, kind: str, spec: str) -> str:
    """The text the page must show for a glued value: Markdown as read (glue:md, or a Markdown bundle), else the
    plain value, formatted with the role's spec when it has one."""
    if kind == "md" or (not kind and "text/markdown" in bundle):
        return _words(str(bundle.get("text/markdown", "")))
    plain = str(bundle.get("text/plain", ""))
    return format(float(plain), spec) if spec else plain


class _AnswerText(HTMLParser):
    """The text of the page's answer section (<section id="answer">) outside code cells (div.cell)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.found = False
        self._section = 0  # open <section>s since the answer's, 0 outside it
        self._cell: list[bool] = []  # per open <div> inside the answer: is it (inside) a code cell

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and (self._section or a.get("id") == "answer"):
            self.found = True
            self._section += 1
        elif tag == "div" and self._section:
            self._cell.append(bool(self._cell and self._cell[-1]) or "cell" in (a.get("class") or "").split())

    def handle_endtag(self, tag):
        if tag == "section" and self._section:
            self._section -= 1
        elif tag == "div" and self._cell:
            self._cell.pop()

    def handle_data(self, data):
        if self._section and not (self._cell and self._cell[-1]):
            self.parts.append(data)


def answer_text(html: str) -> str | None:
    """What a reader reads in the page's Answer section, code cells left out; None when the page has none."""
    parser = _AnswerText()
    parser.feed(html)
    return _words(" ".join(parser.parts)) if parser.found else None


def answer_problems(nb, html: str) -> list[str]:
    """What is wrong with a chapter page's answer: no Answer section, no glued number in its prose, a role
    naming a value the run did not glue, a glued value missing from the rendered paragraph, a role left raw."""
    text, roles, glued = answer_text(html), answer_roles(nb), glued_outputs(nb)
    if text is None:
        return ["the page has no Answer section"]
    problems = [f"{{glue}}`{name}` names no value the notebook glued" for _, name, _ in roles if name not in glued]
    numbers = [
        (name, rendered_value(glued[name], kind, spec))
        for kind, name, spec in roles
        if name in glued and kind != "md" and "text/markdown" not in glued[name]
    ]
    if not numbers:
        problems.append("the answer prose states no glued number (write it with {glue:text}`name`)")
    expected = [(name, rendered_value(glued[name], kind, spec)) for kind, name, spec in roles if name in glued]
    problems += [
        f"{name} = {value!r} is not in the answer paragraph" for name, value in expected if value and value not in text
    ]
    if "{glue" in text:
        problems.append("a glue role is shown raw: " + text[text.index("{glue") :][:80])
    return problems


def test_every_answer_states_its_measured_numbers(smoke_book):
    """Each chapter ends with its answer as prose: every value it names with {glue} was glued by the run and
    appears, as measured, in the rendered paragraph of its Answer section."""
    executed = [r.output_path for r in smoke_book.runs if r.output_path]
    assert executed, "no notebook was executed"
    found = {}
    for path in executed:
        page = smoke_book.html / "book" / "notebooks" / f"{path.stem}.html"
        assert page.is_file(), f"{path.stem}: no page at {page}"
        problems = answer_problems(nbformat.read(str(path), as_version=4), page.read_text())
        if problems:
            found[path.stem] = problems
    listing = "\n".join(f"{name}:\n    " + "\n    ".join(p) for name, p in found.items())
    assert not found, f"answers that do not state what the run measured:\n{listing}"


def test_answer_check_catches_a_wrong_or_missing_number():
    """answer_problems on a hand-made notebook and page: it fails for a number that differs from the glued one,
    a role naming nothing glued and a page without answer, and passes for the right page."""
    nb = nbformat.v4.new_notebook()
    glue = {"output_type": "display_data", "metadata": {"scrapbook": {"name": "r1", "mime_prefix": RECORD}}}
    code = nbformat.v4.new_code_cell("report.glue_percent('r1', 0.7083)")
    code.outputs = [nbformat.from_dict({**glue, "data": {RECORD + "text/plain": "70.8"}})]
    nb.cells = [
        nbformat.v4.new_markdown_cell("## Answer"),
        code,
        nbformat.v4.new_markdown_cell("R@1 {glue:text}`r1` %"),
    ]
    page = '<section id="answer"><h2>Answer</h2><div class="cell"><pre>70.8</pre></div><p>R@1 {} %</p></section>'
    assert answer_problems(nb, page.format('<span class="pasted-text">70.8</span>')) == []
    assert answer_problems(nb, page.format("70.9")) == ["r1 = '70.8' is not in the answer paragraph"]
    nb.cells[2].source = "R@1 {glue:text}`r2` %"
    assert "{glue}`r2` names no value the notebook glued" in answer_problems(nb, page.format("70.8"))
    assert answer_problems(nb, "<p>70.8</p>") == ["the page has no Answer section"]


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

"""What a reader must not see in the built book: progress bars, Python warning blocks, tracebacks, absolute
paths of the build machine, and scripts loaded from a CDN (the book must work offline).

``page_problems(html)`` checks one page's HTML; ``site_problems(html_dir)`` checks every page of a built site
(``_build/html``) and the text files a reader can download from it (``_sources``), and returns
``{relative path: [problem, ...]}`` for the pages that have any.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

# tqdm's bar ("37%|███▋      | 3/8 [00:01<00:02, 2.51it/s]") in text: a percent followed by a bar, or a rate.
PROGRESS = re.compile(r"\d+%\|| \d+(?:\.\d+)?(?:it|s)/(?:s|it)\]|\[\d\d:\d\d<")
# "UserWarning: ..." / "  warnings.warn(" as Python prints them to stderr.
WARNING = re.compile(r"\b\w*Warning: |warnings\.warn\(")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|An Exception was encountered")
# An absolute path under a home, temporary or data folder. A URL's path ("https://x.org/home/a") is not one:
# the slash there follows a host name character.
MACHINE_PATH = re.compile(r"(?<![\w.\-~])/(?:root|home|tmp|work|mnt|Users|private/var|var/folders)/[\w.\-]+")
TEXT_SUFFIXES = (".html", ".ipynb", ".md", ".txt", ".py", ".json")


class _Page(HTMLParser):
    """Collects the script sources, stylesheet links and the text of output areas and of the whole body."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.scripts: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.output_text: list[str] = []
        self.stderr_blocks = 0
        self._skip = 0  # inside <script> or <style>
        self._output_depth = 0  # open <div>s inside an output area
        self._stack: list[bool] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        if tag == "link" and a.get("href") and "stylesheet" in (a.get("rel") or ""):
            self.links.append(a["href"])
        if tag in ("script", "style"):
            self._skip += 1
        if "stderr" in classes:
            self.stderr_blocks += 1
        if tag == "div":
            starts = "cell_output" in classes or "output" in classes
            self._stack.append(starts)
            self._output_depth += starts

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        if tag == "div" and self._stack:
            self._output_depth -= self._stack.pop()

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._output_depth:
            self.output_text.append(data)


def is_remote(url: str) -> bool:
    """True for an http(s) or protocol-relative URL (a CDN), False for a file of the site or a data: URL."""
    return url.startswith(("http://", "https://", "//"))


def machine_paths(text: str, extra: Iterable[str] = ()) -> list[str]:
    """Absolute paths of a machine found in text: under /root, /home, /tmp, /work, ... and any of extra
    (e.g. the repository root, $FASHLIB_DATA) wherever it appears. Sorted, without duplicates."""
    found = set(MACHINE_PATH.findall(text))
    found |= {p for p in extra if p and len(p) > 1 and p in text}
    return sorted(found)


def page_problems(html: str, extra_paths: Iterable[str] = ()) -> list[str]:
    """Everything wrong with one built page, as sentences naming the offending text (empty when clean)."""
    page = _Page()
    page.feed(html)
    text, output = "".join(page.text), "".join(page.output_text)
    problems = [f"script from the network: {s}" for s in page.scripts if is_remote(s)]
    problems += [f"stylesheet from the network: {s}" for s in page.links if is_remote(s)]
    problems += [f"progress bar: {m.group(0)!r} in {_around(text, m)!r}" for m in PROGRESS.finditer(text)][:3]
    problems += [f"warning in an output: {_around(output, m)!r}" for m in WARNING.finditer(output)][:3]
    if page.stderr_blocks:
        problems.append(f"{page.stderr_blocks} stderr output block(s)")
    problems += [f"traceback: {_around(text, m)!r}" for m in TRACEBACK.finditer(text)][:1]
    problems += [f"machine path: {p}" for p in machine_paths(html, extra_paths)]
    return problems


def _around(text: str, match: re.Match, width: int = 60) -> str:
    return " ".join(text[max(0, match.start() - width) : match.end() + width].split())


def site_problems(html_dir: str | os.PathLike, extra_paths: Iterable[str] = ()) -> dict[str, list[str]]:
    """page_problems for every .html page of a built site, and machine paths in its other text files
    (downloadable notebook sources, the search index); _static (the theme's and MathJax's files) is skipped.

    Raises FileNotFoundError when html_dir holds no .html page (the book was not built there)."""
    html_dir = Path(html_dir)
    extra = list(extra_paths)
    pages = sorted(p for p in html_dir.rglob("*.html") if "_static" not in p.relative_to(html_dir).parts)
    if not pages:
        raise FileNotFoundError(f"no .html page under {html_dir}: build the book first (python3 -m fashlib.book build)")
    report: dict[str, list[str]] = {}
    for path in sorted(html_dir.rglob("*")):
        rel = path.relative_to(html_dir)
        if not path.is_file() or "_static" in rel.parts:
            continue
        if path.suffix == ".html":
            problems = page_problems(path.read_text(encoding="utf-8", errors="replace"), extra)
        elif path.suffix in TEXT_SUFFIXES or path.name == "searchindex.js":
            problems = [f"machine path: {p}" for p in machine_paths(path.read_text(errors="replace"), extra)]
        else:
            continue
        if problems:
            report[rel.as_posix()] = problems
    return report

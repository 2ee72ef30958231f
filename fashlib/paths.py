"""Where things live: the repository root, the data root (an explicit argument, else $FASHLIB_DATA, else
<repository>/data) and the recorded GPU runs. Nothing here depends on the current working directory, so a
kernel that JupyterLab starts in notebooks/ finds the same folders as a command run at the repository root."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_VAR = "FASHLIB_DATA"
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


REPOSITORY_MARKER = Path("book") / "params.yaml"  # a folder holding this is a checkout of the course


def project_root(package_parent: str | os.PathLike = _PACKAGE_PARENT, cwd: str | os.PathLike | None = None) -> Path:
    """The repository: the folder holding this fashlib when it is a checkout (pyproject.toml beside it, the
    editable install); else the nearest of the working directory and its parents that holds book/params.yaml
    (fashlib installed with `pip install .` and a kernel started in <repository>/notebooks); else the
    working directory."""
    package_parent = Path(package_parent)
    if (package_parent / "pyproject.toml").exists():
        return package_parent
    here = Path(cwd if cwd is not None else Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if (d / REPOSITORY_MARKER).is_file()), here)


PROJECT_ROOT = project_root()
GPU_RUNS_DIR = PROJECT_ROOT / "book" / "gpu-runs"


def resolve_path(value: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """`value` with ~ expanded, made absolute against `root` (default: the repository root) if relative."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else Path(root or PROJECT_ROOT) / path).resolve()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Return the data root (absolute): `root` if given, else $FASHLIB_DATA, else <repository root>/data.

    A relative `root` or $FASHLIB_DATA is taken as the shell would (against the current directory); the
    notebooks resolve theirs against the repository root first (fashlib.params.resolve)."""
    for value in (root, os.environ.get(ENV_VAR) or None):
        if value is not None:
            return Path(value).expanduser().resolve()
    return PROJECT_ROOT / "data"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call write(file) on a temporary file in path's folder, fsync, then os.replace it onto path.

    Readers never see half a file, and a crash leaves the old file (or none), never a torn one; the
    temporary file is removed on any error, which is re-raised. The one atomic write of the package."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

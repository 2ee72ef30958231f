"""Where things live: the repository root, the data root (an explicit argument, else $FASHLIB_DATA, else
<repository>/data) and the recorded GPU runs. Nothing here depends on the current working directory, so a
kernel that JupyterLab starts in notebooks/ finds the same folders as a command run at the repository root."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FASHLIB_DATA"
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The repository that holds this fashlib (it has pyproject.toml); else the current directory."""
    return _PACKAGE_PARENT if (_PACKAGE_PARENT / "pyproject.toml").exists() else Path.cwd().resolve()


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

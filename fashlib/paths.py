"""Where datasets live: an explicit argument, else $FASHLIB_DATA, else ./data."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FASHLIB_DATA"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Return the data root: `root` if given, else $FASHLIB_DATA, else ./data (absolute)."""
    if root is not None:
        return Path(root).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / "data").resolve()

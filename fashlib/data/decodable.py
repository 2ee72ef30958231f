"""Remove rows whose image cannot be decoded, before anything is computed on a table.

A truncated or corrupt file must never be replaced by another image (that would give a query a
gallery photo's features, a guaranteed hit). `drop_undecodable` decodes every listed image once
(JPEG in draft mode: shrunk by a power of two while decoding, about 0.7 ms per CC0 photo), drops the
rows of the files that fail, counts them per split and warns once with the count and examples.
The result per file is cached (keyed by absolute path, byte size and modification time) in
<cache_dir>/decodable.json, so a table is not decoded again on the next run.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .images import UndecodableImageError, open_rgb

__all__ = ["drop_undecodable", "decode_errors", "UndecodableImagesWarning", "CACHE_FILE", "DRAFT_SIZE"]

CACHE_FILE = "decodable.json"
CACHE_VERSION = 1
DRAFT_SIZE = (64, 64)  # JPEG draft target: enough to run the whole entropy decoder, cheap to reconstruct
_PROGRESS_MIN = 200  # show a progress bar only when at least this many files must be decoded


class UndecodableImagesWarning(UserWarning):
    """Rows were dropped because their image file could not be decoded."""


def _stamp(path: str) -> list[int] | None:
    """[size in bytes, mtime in ns] of a file, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _read_cache(file: Path | None) -> dict[str, list]:
    if file is None or not file.is_file():
        return {}
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache is only a cache: decode again
    if not isinstance(content, dict) or content.get("version") != CACHE_VERSION:
        return {}
    return dict(content.get("files", {}))


def _write_cache(file: Path, entries: dict[str, list]) -> None:
    """Write the cache atomically (a parallel run sees the old or the new file, never half of one)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": entries}), encoding="utf-8")
    os.replace(tmp, file)


def _decode_error(path: str) -> str | None:
    """None when `path` decodes, else the reason (exception type and message)."""
    try:
        open_rgb(path, draft_size=DRAFT_SIZE)
    except UndecodableImageError as err:
        cause = err.__cause__ or err
        return f"{type(cause).__name__}: {cause}"
    return None


def decode_errors(
    paths: Iterable[str], cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> dict[str, str | None]:
    """Decode each distinct path once: path -> None (decodes) or the reason it does not.

    With `cache_dir`, results are reused for files whose absolute path, size and mtime are unchanged.
    """
    unique = list(dict.fromkeys(str(p) for p in paths))
    file = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    cache = _read_cache(file)
    result: dict[str, str | None] = {}
    todo: list[tuple[str, str, list[int] | None]] = []
    for path in unique:
        key, stamp = os.path.abspath(path), _stamp(path)
        entry = cache.get(key)
        if stamp is not None and entry is not None and entry[:2] == stamp:
            result[path] = entry[2]
        else:
            todo.append((path, key, stamp))
    bar = tqdm(todo, desc="check images decode", unit="img", disable=not progress or len(todo) < _PROGRESS_MIN)
    for path, key, stamp in bar:
        result[path] = _decode_error(path)
        if stamp is not None:
            cache[key] = [*stamp, result[path]]
    if file is not None and todo:
        _write_cache(file, cache)
    return result


def drop_undecodable(
    table: pd.DataFrame,
    dataset: str = "table",
    column: str = "path",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    limit: int = 5,
) -> pd.DataFrame:
    """`table` without the rows whose image (table[column]) cannot be decoded; warns once if any.

    Counts per split (column "split", else "all") are stored in result.attrs["undecodable"]
    (dict split -> rows dropped; {} when none) and the dropped paths in attrs["undecodable_paths"];
    the warning (UndecodableImagesWarning) gives the counts and the first `limit` file names with
    their errors. A missing file counts as undecodable. Row order is kept; the index is reset.
    """
    paths = table[column].astype(str).to_numpy()
    errors = decode_errors(paths, cache_dir=cache_dir, progress=progress)
    bad = np.fromiter((errors[p] is not None for p in paths), dtype=bool, count=len(paths))
    if not bad.any():
        out = table.reset_index(drop=True)
        out.attrs.update(undecodable={}, undecodable_paths=[])
        return out
    splits = table["split"].astype(str).to_numpy() if "split" in table else np.full(len(table), "all")
    counts = {str(s): int(n) for s, n in zip(*np.unique(splits[bad], return_counts=True))}
    bad_paths = list(dict.fromkeys(paths[bad]))
    examples = "; ".join(f"{os.path.basename(p)} ({errors[p]})" for p in bad_paths[:limit])
    more = " ..." if len(bad_paths) > limit else ""
    per_split = ", ".join(f"{s}: {n}" for s, n in counts.items())
    warnings.warn(
        f"{dataset}: {int(bad.sum())} of {len(table)} rows dropped because their image cannot be decoded "
        f"({per_split}); metrics are computed on the rest. Files: {examples}{more}",
        UndecodableImagesWarning,
        stacklevel=2,
    )
    out = table.loc[~bad].reset_index(drop=True)
    out.attrs.update(undecodable=counts, undecodable_paths=bad_paths)
    return out

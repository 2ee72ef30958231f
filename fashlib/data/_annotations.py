"""Parser for DeepFashion annotation text files, and the errors readers raise for missing files.

Layout (see FORMATS.md): line 1 a record count, line 2 the column names, then one record per
line with fields separated by runs of spaces (columns are padded for alignment).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..paths import ENV_VAR

DEEPFASHION_URL = "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html"
DEEPFASHION2_URL = "https://github.com/switchablenorms/DeepFashion2"
CLOTHING_URL = (
    "https://github.com/alexeygrigorev/clothing-dataset/archive/"
    "7ed86a9cc56763b6acb35e41cb35184e43a5d218.zip"
)

# dataset name -> official download page, quoted in every "missing file" error
DOWNLOAD_PAGES: dict[str, str] = {
    "inshop": DEEPFASHION_URL,
    "consumer2shop": DEEPFASHION_URL,
    "attributes": DEEPFASHION_URL,
    "deepfashion2": DEEPFASHION2_URL,
    "clothing": CLOTHING_URL,
}

_TITLES: dict[str, str] = {
    "inshop": "DeepFashion In-shop Clothes Retrieval",
    "consumer2shop": "DeepFashion Consumer-to-shop Clothes Retrieval",
    "attributes": "DeepFashion Category and Attribute Prediction",
    "deepfashion2": "DeepFashion2",
    "clothing": "Clothing dataset (CC0)",
}


class AnnotationCountWarning(UserWarning):
    """Line 1 of an annotation file disagrees with the number of records that follow."""


def missing_path_error(path: str | os.PathLike, dataset: str, what: str = "file") -> FileNotFoundError:
    """Build the FileNotFoundError readers raise: expected path, download page, and $FASHLIB_DATA."""
    title = _TITLES.get(dataset, dataset)
    url = DOWNLOAD_PAGES.get(dataset, DEEPFASHION_URL)
    fetch = 'run fashlib.data.download("clothing", root) or download it from' if dataset == "clothing" else "Download the dataset from its official page"
    return FileNotFoundError(
        f"{title}: expected {what} not found: {Path(path)}\n"
        f"{fetch} {url} and unpack it there, "
        f"or point the data root elsewhere with load(..., root=...), load(..., path=<dataset folder>) "
        f"or the environment variable {ENV_VAR}."
    )


def require_path(path: str | os.PathLike, dataset: str, what: str = "file") -> Path:
    """Return `path` as a Path if it exists, else raise missing_path_error."""
    path = Path(path)
    if not path.exists():
        raise missing_path_error(path, dataset, what)
    return path


def _malformed(path: Path, line_no: int, text: str, why: str) -> ValueError:
    return ValueError(f"{path}, line {line_no}: {why}: {text.rstrip()!r}")


def read_annotation(
    path: str | os.PathLike,
    columns: Sequence[str],
    converters: Mapping[str, Callable[[str], object]] | None = None,
    choices: Mapping[str, Iterable[str]] | None = None,
    merge_extra_into: str | None = None,
    dataset: str = "deepfashion",
) -> pd.DataFrame:
    """Parse a DeepFashion annotation file into a DataFrame with `columns` (in file order).

    converters: column -> function applied to each field (e.g. float); choices: column -> allowed
    values; merge_extra_into: a column whose value may contain spaces (e.g. attribute names), so
    extra fields on a line are joined into it. Malformed lines raise ValueError naming file, line
    number and text; a line-1 count that disagrees with the records read gives a warning.
    """
    path = require_path(path, dataset, "annotation file")
    columns = list(columns)
    converters = dict(converters or {})
    allowed = {k: set(v) for k, v in (choices or {}).items()}
    merge_at = columns.index(merge_extra_into) if merge_extra_into is not None else None
    n_cols = len(columns)

    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path}, line 1: empty annotation file, expected a record count")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise _malformed(path, 1, lines[0], "line 1 must be the record count") from None
    if len(lines) < 2:
        raise ValueError(f"{path}, line 2: missing header line (expected columns {' '.join(columns)})")
    header = lines[1].split()
    if len(header) != n_cols:
        raise _malformed(path, 2, lines[1], f"header should name {n_cols} columns ({' '.join(columns)})")

    records: list[list[object]] = []
    for line_no, text in enumerate(lines[2:], start=3):
        fields = text.split()
        if not fields:
            continue  # blank lines (trailing newlines) carry no record
        if len(fields) != n_cols:
            if merge_at is None or len(fields) < n_cols:
                raise _malformed(path, line_no, text, f"expected {n_cols} fields ({' '.join(columns)}), got {len(fields)}")
            extra = len(fields) - n_cols
            fields = fields[:merge_at] + [" ".join(fields[merge_at : merge_at + extra + 1])] + fields[merge_at + extra + 1 :]
        row: list[object] = []
        for name, value in zip(columns, fields):
            if name in allowed and value not in allowed[name]:
                raise _malformed(path, line_no, text, f"{name} must be one of {sorted(allowed[name])}, got {value!r}")
            if name in converters:
                try:
                    value = converters[name](value)
                except (TypeError, ValueError):
                    raise _malformed(path, line_no, text, f"cannot read {name} from {value!r}") from None
            row.append(value)
        records.append(row)

    if declared != len(records):
        warnings.warn(
            f"{path}: line 1 declares {declared} records but {len(records)} were read",
            AnnotationCountWarning,
            stacklevel=2,
        )
    return pd.DataFrame(records, columns=columns)


def read_annotation_matrix(path: str | os.PathLike, dataset: str = "attributes", chunksize: int = 20_000):
    """Parse `image_name v1 v2 ... vN` files (e.g. list_attr_img.txt) fast: (names, int8 matrix).

    Uses pandas' C parser in chunks; on any irregularity falls back to a line scan that raises
    ValueError naming file, line number and text. Count mismatches warn like read_annotation.
    """
    import numpy as np

    path = require_path(path, dataset, "annotation file")
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
        second = f.readline()
        third = f.readline()
    try:
        declared = int(first.strip())
    except ValueError:
        raise _malformed(path, 1, first, "line 1 must be the record count") from None
    if not second.split():
        raise ValueError(f"{path}, line 2: missing header line")
    n_values = len(third.split()) - 1
    if not third.split():
        n_values = 0
    names: list[np.ndarray] = []
    blocks: list[np.ndarray] = []
    if n_values > 0:
        try:
            reader = pd.read_csv(
                path, sep=r"\s+", header=None, skiprows=2, chunksize=chunksize, engine="c",
                names=["image_name", *range(n_values)], dtype={"image_name": str},
                skip_blank_lines=True,
            )
            for chunk in reader:
                values = chunk.iloc[:, 1:]
                if values.isna().to_numpy().any() or not all(np.issubdtype(t, np.integer) for t in values.dtypes):
                    raise ValueError("irregular")
                names.append(chunk["image_name"].to_numpy(dtype=object))
                blocks.append(values.to_numpy(dtype=np.int8))
        except (ValueError, pd.errors.ParserError):
            _locate_matrix_error(path, n_values)
            raise  # _locate_matrix_error raises; this is a safety net
    image_names = np.concatenate(names) if names else np.empty(0, dtype=object)
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, max(n_values, 0)), dtype=np.int8)
    if declared != len(image_names):
        warnings.warn(
            f"{path}: line 1 declares {declared} records but {len(image_names)} were read",
            AnnotationCountWarning,
            stacklevel=2,
        )
    return image_names, matrix


def _locate_matrix_error(path: Path, n_values: int) -> None:
    """Scan a matrix annotation file line by line and raise ValueError at the first bad line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, text in enumerate(f, start=1):
            if line_no <= 2:
                continue
            fields = text.split()
            if not fields:
                continue
            if len(fields) != n_values + 1:
                raise _malformed(path, line_no, text, f"expected image_name and {n_values} values, got {len(fields) - 1} values")
            try:
                [int(v) for v in fields[1:]]
            except ValueError:
                raise _malformed(path, line_no, text, "values must be integers") from None
    raise ValueError(f"{path}: could not parse (no single malformed line found)")

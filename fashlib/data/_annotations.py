"""Parser for DeepFashion annotation text files, and the errors readers raise for missing files.

Layout (see FORMATS.md): line 1 a record count, line 2 the column names, then one record per
line with fields separated by runs of spaces (columns are padded for alignment).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..paths import ENV_VAR

DEEPFASHION_URL = "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html"
DEEPFASHION2_URL = "https://github.com/switchablenorms/DeepFashion2"
CLOTHING_URL = "https://github.com/alexeygrigorev/clothing-dataset/archive/7ed86a9cc56763b6acb35e41cb35184e43a5d218.zip"

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


class DuplicateLinesWarning(UserWarning):
    """Exact duplicate record lines were dropped from an annotation file."""


def encoding_error(
    path: str | os.PathLike, data: bytes, err: UnicodeDecodeError, offset: int = 0, lines_before: int = 0
) -> ValueError:
    """ValueError naming the file, the undecodable bytes, their byte offset and line, and the fix.

    `data` is the decoded buffer, starting `offset` bytes (and `lines_before` newlines) into the file.
    """
    line = lines_before + data.count(b"\n", 0, err.start) + 1
    bad = data[err.start : err.end]
    return ValueError(
        f"{path}: not UTF-8 text: byte(s) {bad!r} at byte offset {offset + err.start} (line {line}) cannot be "
        f"decoded ({err.reason}). Annotation files must be UTF-8 (a byte-order mark is fine); re-save it as "
        "UTF-8, e.g. iconv -f latin1 -t utf-8."
    )


def read_text(path: str | os.PathLike) -> str:
    """Whole text of a UTF-8 file (BOM stripped); ValueError naming file, byte offset and line if not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise encoding_error(path, data, err) from None


def text_lines(text: str) -> list[str]:
    """Lines ended by LF, CRLF or CR only. str.splitlines would also break at form feeds, U+0085, U+2028 and
    other separators, which can sit inside a field: records would be cut in two and line numbers shift."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def check_utf8(path: str | os.PathLike, chunk: int = 1 << 24) -> None:
    """Raise encoding_error at the first non-UTF-8 byte of a (possibly large) file, read in chunks."""
    offset, lines, carry = 0, 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            data = carry + block
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as err:
                if block and err.reason == "unexpected end of data" and err.end == len(data):
                    carry = data[err.start :]  # a character split across two blocks: decode with the next
                    data = data[: err.start]
                else:
                    raise encoding_error(path, data, err, offset, lines) from None
            if not block:
                return
            offset += len(data)
            lines += data.count(b"\n")


def missing_path_error(path: str | os.PathLike, dataset: str, what: str = "file") -> FileNotFoundError:
    """Build the FileNotFoundError readers raise: expected path, download page, and $FASHLIB_DATA."""
    title = _TITLES.get(dataset, dataset)
    url = DOWNLOAD_PAGES.get(dataset, DEEPFASHION_URL)
    fetch = (
        'run fashlib.data.download("clothing", root) or download it from'
        if dataset == "clothing"
        else "Download the dataset from its official page"
    )
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
    """ValueError naming the file, the line number, why the line is wrong and its text."""
    return ValueError(f"{path}, line {line_no}: {why}: {text.rstrip()!r}")


def _read_count_and_header(path: Path, lines: list[str], columns: list[str]) -> int:
    """The record count declared on line 1, after checking that line 2 names len(columns) columns.

    ValueError naming the file and line for an empty file, a line 1 that is not an integer, or a missing or
    mis-sized header."""
    if not lines:
        raise ValueError(f"{path}, line 1: empty annotation file, expected a record count")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise _malformed(path, 1, lines[0], "line 1 must be the record count") from None
    if len(lines) < 2:
        raise ValueError(f"{path}, line 2: missing header line (expected columns {' '.join(columns)})")
    header = lines[1].split()
    if len(header) != len(columns):
        raise _malformed(path, 2, lines[1], f"header should name {len(columns)} columns ({' '.join(columns)})")
    return declared


def _parse_record(
    path: Path,
    line_no: int,
    text: str,
    fields: list[str],
    columns: list[str],
    merge_at: int | None,
    converters: Mapping[str, Callable[[str], object]],
    allowed: Mapping[str, set[str]],
) -> list[object]:
    """One record's values in column order: extra fields joined into column `merge_at`, choices checked,
    converters applied. ValueError naming file, line number and text for a wrong field count or value."""
    n_cols = len(columns)
    if len(fields) != n_cols:
        if merge_at is None or len(fields) < n_cols:
            raise _malformed(path, line_no, text, f"expected {n_cols} fields ({' '.join(columns)}), got {len(fields)}")
        extra = len(fields) - n_cols
        fields = (
            fields[:merge_at] + [" ".join(fields[merge_at : merge_at + extra + 1])] + fields[merge_at + extra + 1 :]
        )
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
    return row


def _read_records(
    path: Path,
    lines: list[str],
    columns: list[str],
    merge_at: int | None,
    converters: Mapping[str, Callable[[str], object]],
    allowed: Mapping[str, set[str]],
    line_column: str | None,
) -> tuple[list[list[object]], int, list[tuple[int, int]]]:
    """Parse the record lines (line 3 on): (records, number of non-blank record lines, duplicates).

    Blank lines are skipped; an exact repeat of an earlier line is left out and listed in duplicates as
    (line, the earlier line it repeats); each record ends with its line number when `line_column` is set."""
    records: list[list[object]] = []
    first_seen: dict[tuple[str, ...], int] = {}
    duplicates: list[tuple[int, int]] = []  # (line, the earlier line it repeats)
    n_lines = 0
    for line_no, text in enumerate(lines[2:], start=3):
        fields = text.split()
        if not fields:
            continue  # blank lines (trailing newlines) carry no record
        n_lines += 1
        if tuple(fields) in first_seen:
            duplicates.append((line_no, first_seen[tuple(fields)]))
            continue
        first_seen[tuple(fields)] = line_no
        row = _parse_record(path, line_no, text, fields, columns, merge_at, converters, allowed)
        records.append(row + [line_no] if line_column else row)
    return records, n_lines, duplicates


def read_annotation(
    path: str | os.PathLike,
    columns: Sequence[str],
    converters: Mapping[str, Callable[[str], object]] | None = None,
    choices: Mapping[str, Iterable[str]] | None = None,
    merge_extra_into: str | None = None,
    dataset: str = "deepfashion",
    line_column: str | None = None,
) -> pd.DataFrame:
    """Parse a DeepFashion annotation file into a DataFrame with `columns` (in file order).

    converters: column -> function applied to each field (e.g. float); choices: column -> allowed
    values; merge_extra_into: a column whose value may contain spaces (e.g. attribute names), so
    extra fields on a line are joined into it; line_column: name of an extra column holding each
    record's line number in the file (for error messages of the readers).
    Text: UTF-8 with or without byte-order mark, LF or CRLF line ends, fields separated by any run of
    spaces/tabs, trailing blanks ignored. Not UTF-8: ValueError naming file, byte offset and line.
    Malformed lines raise ValueError naming file, line number and text; exact duplicate record lines
    (same fields) are dropped with one DuplicateLinesWarning naming the lines; a line-1 count that
    disagrees with the record lines read gives an AnnotationCountWarning.
    """
    path = require_path(path, dataset, "annotation file")
    columns = list(columns)
    converters = dict(converters or {})
    allowed = {k: set(v) for k, v in (choices or {}).items()}
    merge_at = columns.index(merge_extra_into) if merge_extra_into is not None else None

    lines = text_lines(read_text(path))
    declared = _read_count_and_header(path, lines, columns)
    records, n_lines, duplicates = _read_records(path, lines, columns, merge_at, converters, allowed, line_column)

    if declared != n_lines:
        warnings.warn(
            f"{path}: line 1 declares {declared} records but {n_lines} were read",
            AnnotationCountWarning,
            stacklevel=2,
        )
    if duplicates:
        listed = ", ".join(f"line {a} repeats line {b}" for a, b in duplicates[:5])
        more = " ..." if len(duplicates) > 5 else ""
        warnings.warn(
            f"{path}: {len(duplicates)} exact duplicate record line(s) dropped ({listed}{more})",
            DuplicateLinesWarning,
            stacklevel=2,
        )
    return pd.DataFrame(records, columns=columns + ([line_column] if line_column else []))


def require_unique(
    table: pd.DataFrame, key: str, path: str | os.PathLike, rule: str, line_column: str = "line"
) -> None:
    """ValueError naming `path` and the two lines of the first `key` listed twice (after exact duplicates went)."""
    clash = conflicting_rows(table, key, line_column)
    if clash is not None:
        a, b = clash
        value = table.loc[table[line_column] == a, key].iloc[0]
        raise ValueError(
            f"{path}: {key} {value!r} is listed on line {a} and again, with other values, on line {b}; {rule}. "
            "Fix the file (keep the right line)."
        )


def conflicting_rows(table: pd.DataFrame, key: str, line_column: str = "line") -> tuple[int, int] | None:
    """(earlier line, later line) of the first two records sharing `key`, or None when keys are unique."""
    repeated = table[key].duplicated(keep=False)
    if not repeated.any():
        return None
    first = table.loc[repeated].groupby(key, sort=False)[line_column].agg(list).iloc[0]
    return int(first[0]), int(first[1])


def read_annotation_matrix(path: str | os.PathLike, dataset: str = "attributes", chunksize: int = 20_000):
    """Parse `image_name v1 v2 ... vN` files (e.g. list_attr_img.txt) fast: (names, int8 matrix).

    Uses pandas' C parser in chunks; on any irregularity falls back to a line scan that raises
    ValueError naming file, line number and text. Count mismatches warn like read_annotation.
    """
    path = require_path(path, dataset, "annotation file")
    declared, n_values = _read_matrix_head(path)
    image_names, matrix = _read_matrix_values(path, n_values, chunksize)
    if declared != len(image_names):
        warnings.warn(
            f"{path}: line 1 declares {declared} records but {len(image_names)} were read",
            AnnotationCountWarning,
            stacklevel=2,
        )
    return image_names, matrix


def _read_matrix_head(path: Path) -> tuple[int, int]:
    """(record count declared on line 1, values per record after the image name on line 3; 0 if line 3 is blank).

    ValueError naming the file (and line) for a non-UTF-8 byte in lines 1-3, a line 1 that is not an integer or a
    blank line 2 (the header)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
            second = f.readline()
            third = f.readline()
    except UnicodeDecodeError:
        check_utf8(path)
        raise
    try:
        declared = int(first.strip())
    except ValueError:
        raise _malformed(path, 1, first, "line 1 must be the record count") from None
    if not second.split():
        raise ValueError(f"{path}, line 2: missing header line")
    n_values = len(third.split()) - 1
    if not third.split():
        n_values = 0
    return declared, n_values


def _read_matrix_values(path: Path, n_values: int, chunksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(image names, object array of shape (N,); values, int8 array of shape (N, n_values)) of lines 3 on.

    pandas' C parser reads `chunksize` lines at a time; a missing or non-integer value sends the file to
    _locate_matrix_error (ValueError naming the line), a non-UTF-8 byte to check_utf8 (ValueError naming it).
    n_values <= 0 reads nothing: (empty names, (0, 0) matrix)."""
    names: list[np.ndarray] = []
    blocks: list[np.ndarray] = []
    if n_values > 0:
        try:
            reader = pd.read_csv(
                path,
                sep=r"\s+",
                header=None,
                skiprows=2,
                chunksize=chunksize,
                engine="c",
                names=["image_name", *range(n_values)],
                dtype={"image_name": str},
                skip_blank_lines=True,
                encoding="utf-8-sig",
            )
            for chunk in reader:
                values = chunk.iloc[:, 1:]
                if values.isna().to_numpy().any() or not all(np.issubdtype(t, np.integer) for t in values.dtypes):
                    raise ValueError("irregular")
                names.append(chunk["image_name"].to_numpy(dtype=object))
                blocks.append(values.to_numpy(dtype=np.int8))
        except UnicodeDecodeError:
            check_utf8(path)
            raise
        except (ValueError, pd.errors.ParserError):
            _locate_matrix_error(path, n_values)
            raise  # _locate_matrix_error raises; this is a safety net
    image_names = np.concatenate(names) if names else np.empty(0, dtype=object)
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, max(n_values, 0)), dtype=np.int8)
    return image_names, matrix


def _locate_matrix_error(path: Path, n_values: int) -> None:
    """Scan a matrix annotation file line by line and raise ValueError at the first bad line."""
    with open(path, encoding="utf-8-sig") as f:
        for line_no, text in enumerate(f, start=1):
            if line_no <= 2:
                continue
            fields = text.split()
            if not fields:
                continue
            if len(fields) != n_values + 1:
                raise _malformed(
                    path, line_no, text, f"expected image_name and {n_values} values, got {len(fields) - 1} values"
                )
            try:
                [int(v) for v in fields[1:]]
            except ValueError:
                raise _malformed(path, line_no, text, "values must be integers") from None
    raise ValueError(f"{path}: could not parse (no single malformed line found)")

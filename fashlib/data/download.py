"""Download freely redistributable datasets (today: the CC0 clothing dataset) from pinned sources.

Only urllib is used. A download streams into a temporary file inside the data root, is checked
(archive sha256 when known, then a content digest of the extracted files), and is moved into place
atomically; on any failure nothing is left behind. DeepFashion sets are never downloaded here: their
licence requires users to fetch them from the authors themselves.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ..paths import ENV_VAR, data_root

__all__ = ["Source", "SOURCES", "DownloadError", "download", "tree_digest", "dataset_files"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """A pinned download: archive URL, the folder it becomes under the data root, and its checks."""

    url: str
    folder: str  # name under the data root, e.g. "clothing-dataset"
    archive_top: str | None  # the single top folder inside the zip (None: the zip root)
    patterns: tuple[str, ...]  # glob patterns (relative) that the content digest covers
    tree_sha256: str | None  # tree_digest(folder, patterns) of the pinned content
    sha256: str | None = None  # sha256 of the archive itself, when known
    page: str = ""  # human-readable download page
    licence: str = ""


_CLOTHING_COMMIT = "7ed86a9cc56763b6acb35e41cb35184e43a5d218"

# Registry of pinned sources (name -> Source). The clothing archive's own sha256 is unknown
# (nobody building this project could download it); its CONTENT is pinned instead by
# `tree_digest` computed on a verified copy of that commit (5,403-row images.csv + 5,756 JPEGs).
SOURCES: dict[str, Source] = {
    "clothing": Source(
        url=f"https://github.com/alexeygrigorev/clothing-dataset/archive/{_CLOTHING_COMMIT}.zip",
        folder="clothing-dataset",
        archive_top=f"clothing-dataset-{_CLOTHING_COMMIT}",
        patterns=("images.csv", "images/*.jpg"),
        tree_sha256="73145be11d555f8cf9a9f83171081578f4b4e0613d8fcf50495d96705352ab44",
        sha256=None,
        page="https://github.com/alexeygrigorev/clothing-dataset",
        licence="CC0 1.0",
    ),
}


class DownloadError(RuntimeError):
    """A download, checksum or extraction failure (nothing was left behind in the data root)."""


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dataset_files(folder: str | os.PathLike, patterns: Iterable[str]) -> list[str]:
    """Sorted POSIX relative paths of the plain files under `folder` matching any of `patterns`."""
    folder = Path(folder)
    found = {p.relative_to(folder).as_posix() for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def tree_digest(folder: str | os.PathLike, patterns: Iterable[str] = SOURCES["clothing"].patterns) -> str:
    """Content digest of a dataset folder: sha256 over the sorted lines "<relpath>\\t<sha256 of file>\\n".

    Independent of archive packing (zip metadata, timestamps), so it pins what a dataset holds.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for rel in dataset_files(folder, patterns):
        h.update(f"{rel}\t{_sha256_file(folder / rel)}\n".encode())
    return h.hexdigest()


def _offline_hint(source: Source, url: str, target: Path) -> str:
    top = f" (the archive's top folder {source.archive_top}/ renamed)" if source.archive_top else ""
    return (
        f"Without network: download {url} by hand and unzip it into {target}{top}, "
        f"or set {ENV_VAR} to a data root that already holds {source.folder}/."
    )


def _fetch(url: str, dest: Path, progress: bool, timeout: float) -> str:
    """Stream `url` into `dest` with a progress bar; return the sha256 of the bytes written."""
    h = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "fashlib-download"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        with tqdm(
            total=int(total) if total and total.isdigit() else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest.name,
            disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip into `dest`, refusing members that would land outside it."""
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            p = PurePosixPath(name)
            if p.is_absolute() or ".." in p.parts:
                raise DownloadError(f"refusing unsafe path {name!r} in archive {archive.name}")
        bad = zf.testzip()
        if bad is not None:
            raise DownloadError(f"corrupt member {bad!r} in archive {archive.name}")
        zf.extractall(dest)


def _content_root(extracted: Path, source: Source) -> Path:
    """The folder inside the extraction that becomes the dataset folder."""
    if source.archive_top is not None:
        top = extracted / source.archive_top
        if top.is_dir():
            return top
    entries = [p for p in extracted.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    if source.archive_top is None:
        return extracted
    raise DownloadError(
        f"archive does not hold the expected top folder {source.archive_top}/ "
        f"(found: {sorted(p.name for p in entries)[:5]})"
    )


def _fetch_checked(
    name: str, source: Source, url: str, archive: Path, target: Path, sha256: str | None, progress: bool, timeout: float
) -> None:
    """Stream `url` into `archive` and compare its sha256 with `sha256` (when given).

    DownloadError when the download fails (with the offline hint for `target`) or the sha256 differs."""
    try:
        got = _fetch(url, archive, progress, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"could not download {name!r} from {url}: {reason}. {_offline_hint(source, url, target)}"
        ) from err
    if sha256 is not None and got.lower() != sha256.lower():
        raise DownloadError(
            f"sha256 mismatch for {url}: expected {sha256}, got {got}; "
            "the download is corrupt or the source changed. Nothing was kept."
        )


def _extract_checked(
    name: str, source: Source, url: str, archive: Path, extracted: Path, tree_sha256: str | None
) -> Path:
    """Extract `archive` into `extracted`; return the dataset folder inside, its content digest checked.

    DownloadError for an invalid or unsafe zip, a missing top folder, or a content digest other than
    `tree_sha256` (when given)."""
    try:
        _safe_extract(archive, extracted)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise DownloadError(f"{url} is not a valid zip archive ({err}). Nothing was kept.") from err
    content = _content_root(extracted, source)
    if tree_sha256 is not None:
        digest = tree_digest(content, source.patterns)
        if digest != tree_sha256:
            raise DownloadError(
                f"content digest mismatch for {name!r} from {url}: expected {tree_sha256}, "
                f"got {digest} over {len(dataset_files(content, source.patterns))} files. "
                "Nothing was kept."
            )
    return content


def download(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    tree_sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download dataset `name` into <data root>/<folder> and return that folder (no-op if present).

    Checks the archive `sha256` (argument, else the pinned one) and the content digest `tree_sha256`
    (argument, else the pinned one, which applies only to the pinned URL: pass url= with your own
    digests, e.g. tree_sha256=SOURCES[name].tree_sha256 for a mirror of the same data).
    On any failure nothing is left in the data root and DownloadError is raised.
    """
    try:
        source = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; downloadable: {sorted(SOURCES)}") from None
    base = data_root(root)
    target = base / source.folder
    if target.is_dir() and any(target.iterdir()):
        return target

    pinned = url is None or url == source.url
    url = source.url if url is None else url
    sha256 = sha256 if sha256 is not None else (source.sha256 if pinned else None)
    tree_sha256 = tree_sha256 if tree_sha256 is not None else (source.tree_sha256 if pinned else None)
    if sha256 is None and tree_sha256 is None:
        warnings.warn(f"downloading {url} with no checksum to verify it against", stacklevel=2)

    base.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{source.folder}-", suffix=".zip.part", dir=base)
    os.close(fd)
    archive = Path(tmp_name)
    extracted = Path(tempfile.mkdtemp(prefix=f".{source.folder}-extract-", dir=base))
    try:
        _fetch_checked(name, source, url, archive, target, sha256, progress, timeout)
        content = _extract_checked(name, source, url, archive, extracted, tree_sha256)
        try:
            os.rename(content, target)  # atomic on one filesystem; fails if target appeared meanwhile
        except OSError as err:
            raise DownloadError(f"could not move the dataset into {target}: {err}") from err
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(extracted, ignore_errors=True)
    return target

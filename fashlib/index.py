"""Search your own catalogue: an on-disk index of a folder of photos (or a table), built with a saved model.

Index folder layout (format "fashlib-index", version 2):
    manifest.json           the files indexed (paths relative to the catalogue root, sizes, modification times,
                            sha256 of their bytes), the files skipped and why, the model (reference, digest,
                            embedding size), the faiss index type with its measured recall@10 against exact
                            search, the sha256 of the two files below, and `manifest_sha256` over its own
                            content (a hand edit is detected); written last: the commit point of every build/update
    embeddings-<sha>.npy    float32 (N, D) L2-normalised embeddings, row i = manifest file i
    index-<sha>.faiss       serialised faiss index over those rows (inner product = cosine similarity; the
                            compressed "ivf-sq" index ranks by L2 distance, returned as cosines)

Exact search (faiss IndexFlatIP) up to `exact_max` photos; above it an HNSW, IVF or compressed "ivf-sq" index
(faiss "PCA64,IVF{nlist},SQ8": 73 bytes per photo instead of 1 KB, see benchmarks/bench_index.py) whose
recall@10 against exact search is measured on a sample of the catalogue and reported. `update` embeds only new or
changed files (size, modification time or content hash differ) and drops deleted ones. Command line: see `python3 -m
fashlib.index --help` (build, update, query, serve).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics
from .paths import atomic_write

FORMAT, FORMAT_VERSION = "fashlib-index", 2  # 2: per-file sha256 and manifest_sha256
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
EXACT_MAX = 50_000
APPROX_OPTIONS = {
    "hnsw": {"M": 32, "efConstruction": 40, "efSearch": 128},
    "ivf": {"nprobe": 32},
    "ivf-sq": {"pca": 64, "target_recall": 0.95},
}
IVF_SQ_NPROBES = (8, 16, 32, 64, 128, 256, 384, 512, 768, 1024)
RECALL_K, RECALL_QUERIES = 10, 1000


class CatalogueIndexError(RuntimeError):
    """An index cannot be used as asked; the message says why and how to fix it."""


class ModelMismatchError(CatalogueIndexError):
    """The index was built with another model than the one given."""


class CorruptIndexError(CatalogueIndexError):
    """An index file is missing, truncated or altered (its sha256 differs from the manifest's)."""


# ------------------------------------------------------------------------------------------ files
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan_folder(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(image paths, other files) under `root`, recursive, relative POSIX paths, sorted; hidden entries ignored.

    Images are files ending in .jpg, .jpeg, .png or .webp (any case); linked folders are not followed (no loops)
    and are listed among the other files with a trailing "/". NotADirectoryError if root is no folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"catalogue folder {root} does not exist or is not a folder")
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        linked = [Path(dirpath, d) for d in dirnames if Path(dirpath, d).is_symlink()]
        others += [link.relative_to(root).as_posix() + "/" for link in linked]
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            (images if name.lower().endswith(IMAGE_SUFFIXES) else others).append(rel)
    return sorted(images), sorted(others)


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


# ------------------------------------------------------------------------------------------ model
def resolve_model(model: Any) -> tuple[Any, dict]:
    """(SavedEmbedder, reference stored in the manifest) from a saved model folder, a backbone name or an object.

    A backbone name (e.g. tf_efficientnet_lite0) gives its frozen ImageNet features (average pooling, no head).
    Raises CatalogueIndexError when `model` is neither.
    """
    from .saved_model import CONFIG_FILE, SavedEmbedder, features_embedder, load_embedder

    if isinstance(model, SavedEmbedder):
        return model, {"object": model.describe()}
    text = str(model)
    if (Path(text) / CONFIG_FILE).is_file():
        return load_embedder(text), {"folder": str(Path(text).resolve())}
    import timm

    if text in timm.list_models():
        return features_embedder(text), {"backbone": text}
    raise CatalogueIndexError(
        f"--model {text!r} is neither a saved model folder (no {Path(text) / CONFIG_FILE}) nor "
        "a timm backbone name; use e.g. runs/book/05_recall_at_k_results/model or "
        "tf_efficientnet_lite0"
    )


def model_from_manifest(manifest: dict) -> Any:
    """Reload the model an index was built with, from the reference its manifest holds."""
    ref = manifest["model"]["ref"]
    if "folder" in ref:
        if not (Path(ref["folder"]) / "config.json").is_file():
            raise CatalogueIndexError(
                f"the saved model {ref['folder']} this index was built with is gone; if it moved, give its new place "
                f"with --model NEW_PLACE (model=... in Python); it must be the same model "
                f"({manifest['model']['description']}, digest {manifest['model']['digest'][:12]})"
            )
        return resolve_model(ref["folder"])[0]
    if "backbone" in ref:
        return resolve_model(ref["backbone"])[0]
    raise CatalogueIndexError(f"the index was built with an in-memory model ({ref.get('object')}); pass it again")


def read_photo(root: Path, rel: str) -> tuple[dict, Any]:
    """({path, size, mtime_ns, sha256}, decoded RGB image) of root/rel, hashed and decoded from the same bytes.

    The file is stat'ed before it is read, so a change during the read shows at the next update.
    Raises OSError (data.images.UndecodableImageError) when it cannot be read or decoded.
    """
    from .saved_model import open_rgb

    entry = {"path": rel, **_stat(root / rel)}
    raw = (root / rel).read_bytes()
    entry["sha256"] = _sha256(raw)
    return entry, open_rgb(io.BytesIO(raw))


def _reason(err: BaseException, path: str = "") -> str:
    """`Type: message` of why a file was skipped (at most 300 characters), an in-memory file named by `path`."""
    cause = err.__cause__ or err
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", path or "the file", str(cause))
    return f"{type(cause).__name__}: {text}"[:300]


ENGINE_MIN_PHOTOS = 64  # fewer photos: exporting each backbone to ONNX costs more than it saves


def embed_files(
    model: Any,
    root: Path,
    paths: Sequence[str],
    batch_size: int = 16,
    progress: bool = True,
    engine: str = "auto",
) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Embed root/path for every path.

    Photos are read, hashed, decoded and preprocessed in threads ahead of the model (at most 4 batches
    ahead); the model runs through `model.engines(engine)` ("auto": ONNX Runtime on the CPU, parity-checked;
    "torch": PyTorch) when there are at least ENGINE_MIN_PHOTOS photos. Returns (float32 (N, D) embeddings of
    the decodable photos, their manifest entries [{path, size, mtime_ns, sha256}] in the same order, skipped
    [{path, reason}]).
    """
    from contextlib import nullcontext

    import torch
    from tqdm.auto import tqdm

    out, kept, skipped, batch = [], [], [], []

    def flush() -> None:
        if batch:
            out.append(model(model.collate([views for _, views in batch])).float().numpy())
            kept.extend(entry for entry, _ in batch)
            batch.clear()

    fast = engine != "torch" and len(paths) >= ENGINE_MIN_PHOTOS and hasattr(model, "engines")
    with model.engines(engine) if fast else nullcontext(model), torch.inference_mode():
        reads = _read_ahead(model, root, paths, ahead=4 * batch_size)
        for rel, result in tqdm(reads, total=len(paths), disable=not progress, desc="index photos", unit="photo"):
            if isinstance(result, BaseException):  # any decoding failure skips the file, listed with its reason
                skipped.append({"path": rel, "reason": _reason(result, rel)})
                continue
            batch.append(result)
            if len(batch) >= batch_size:
                flush()
        flush()
    dim = model.embedding_dim
    return (np.concatenate(out) if out else np.empty((0, dim), np.float32)), kept, skipped


def _read_ahead(model: Any, root: Path, paths: Sequence[str], ahead: int):
    """(path, (manifest entry, model.prepare views) or the exception) for every path, in order, computed by a
    thread pool at most `ahead` photos before they are used."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def task(rel: str) -> tuple[dict, list] | BaseException:
        try:
            entry, image = read_photo(root, rel)
            return entry, model.prepare(image)
        except Exception as err:  # noqa: BLE001 - returned, so the caller lists the file as skipped
            return err

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="fashlib-index") as pool:
        for rel in paths:
            pending.append((rel, pool.submit(task, rel)))
            if len(pending) > ahead:
                rel_done, future = pending.popleft()
                yield rel_done, future.result()
        while pending:
            rel_done, future = pending.popleft()
            yield rel_done, future.result()


def embed_images(model: Any, images: Sequence[Any]) -> np.ndarray:
    """Decoded PIL images -> float32 (N, D) embeddings with the model's own preprocessing."""
    import torch

    with torch.inference_mode():
        return model(model.preprocess(list(images))).float().numpy()


# ------------------------------------------------------------------------------------------ faiss
def _recall(index: Any, embeddings: np.ndarray, rows: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approximate top-k & exact top-k| / k for catalogue rows `rows` used as queries (exact: (Q, k) ids)."""
    found = index.search(np.ascontiguousarray(embeddings[rows]), exact.shape[1])[1]
    return float(np.mean([len(np.intersect1d(a[a >= 0], e)) for a, e in zip(found, exact)]) / exact.shape[1])


def _as_cosine(index: Any, scores: np.ndarray) -> np.ndarray:
    """Scores of an L2 index over unit vectors (squared distances d) as cosine similarities 1 - d / 2."""
    import faiss

    return (1.0 - scores / 2.0).astype(np.float32) if index.metric_type == faiss.METRIC_L2 else scores


def ivf_sq_index(embeddings: np.ndarray, pca: int = 64, target_recall: float = 0.95, seed: int = 0) -> tuple[Any, dict]:
    """Compressed index faiss "PCA{pca},IVF{nlist},SQ8", nprobe tuned: (index, options).

    The metric is L2, which ranks unit vectors as the inner product does (|q - x|^2 = 2 - 2 q.x) and is not
    biased by the mean the PCA step subtracts; CatalogueIndex.search turns its distances into cosines.

    Rows are projected on the `pca` (at most D, N) principal directions of a training sample (max(50,000,
    39 nlist) rows), assigned to nlist ~ 4 sqrt(N) k-means cells (a power of 2, at most N/39) and stored as
    `pca` one-byte scalar-quantised residual components plus an 8-byte id. Measured by benchmarks/bench_index.py
    on 1M synthetic 256-d catalogue vectors (32-d latent structure), 2 shared cores: 73 bytes per vector,
    recall@10 0.962 at nprobe 256 (chosen on tuning queries), p50 0.79 ms on one thread = 121x exact search,
    built in 92 s. 64 directions suit embeddings of low intrinsic dimension; when they lose too much, nprobe
    grows or the target is missed (warned), and `pca` up to 112 keeps the index under 128 bytes per vector.
    nprobe is the smallest of IVF_SQ_NPROBES whose recall@10 against exact search reaches `target_recall` on
    500 seeded tuning rows (else all nlist cells, with a UserWarning); options = {"factory", "nlist", "pca",
    "nprobe", "target_recall", "tuning_recall_at_10"}.
    """
    import faiss

    n, dim = embeddings.shape
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    nlist = int(max(1, min(2 ** round(np.log2(4 * np.sqrt(n))), n // 39)))
    pca = min(pca, dim, n)  # faiss PCAMatrix outputs at most as many directions as training rows
    factory = f"PCA{pca},IVF{nlist},SQ8"
    index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    rng = np.random.default_rng(seed + 1)
    index.train(x[np.sort(rng.choice(n, size=min(n, max(50_000, 39 * nlist)), replace=False))])
    index.add(x)
    rows = np.sort(rng.choice(n, size=min(500, n), replace=False))
    exact = metrics.search(x[rows], x, min(RECALL_K, n), "flat")[1]
    ivf = faiss.extract_index_ivf(index)
    for nprobe in [p for p in IVF_SQ_NPROBES if p < nlist] + [nlist]:
        ivf.nprobe = nprobe
        recall = _recall(index, x, rows, exact)
        if recall >= target_recall:
            break
    else:
        warnings.warn(
            f"the {factory} index reaches recall@10 {recall:.3f} < {target_recall} against exact search "
            f"even visiting all {nlist} cells (PCA{pca} drops too much of these embeddings); build with "
            f"approx='hnsw' or a larger exact_max for exact search",
            UserWarning,
            stacklevel=3,
        )
    return index, {
        "factory": factory,
        "nlist": nlist,
        "pca": pca,
        "nprobe": int(ivf.nprobe),
        "target_recall": target_recall,
        "tuning_recall_at_10": recall,
    }


def make_faiss_index(
    embeddings: np.ndarray, exact_max: int = EXACT_MAX, approx: str = "hnsw", seed: int = 0
) -> tuple[Any, dict]:
    """(faiss index, its description) over the rows: exact up to `exact_max` rows, else `approx` ("hnsw", "ivf"
    or the compressed "ivf-sq", see ivf_sq_index).

    The approximate index's recall@10 against exact search is measured on up to 1000 catalogue rows used as
    queries (seeded sample) and returned as `recall_at_10`.
    """
    n = len(embeddings)
    if n <= exact_max:  # a faiss index (it is serialised with the catalogue), not metrics' numpy exact search
        import faiss

        flat = faiss.IndexFlatIP(embeddings.shape[1])
        flat.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        return flat, {"type": "flat", "options": {}, "recall_at_10": 1.0}
    if approx not in APPROX_OPTIONS:
        raise ValueError(f"approx must be one of {sorted(APPROX_OPTIONS)}, got {approx!r}")
    options = dict(APPROX_OPTIONS[approx])
    if approx == "ivf-sq":
        index, options = ivf_sq_index(embeddings, **options, seed=seed)
    else:
        index = metrics.build_index(embeddings, approx, k=RECALL_K, **options)
    k = min(RECALL_K, n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(RECALL_QUERIES, n), replace=False))
    exact = metrics.search(embeddings[rows], embeddings, k, "flat")[1]
    recall = _recall(index, embeddings, rows, exact)
    return index, {"type": approx, "options": options, "recall_at_10": recall, "recall_queries": len(rows)}


# ------------------------------------------------------------------------------------------ the index
@dataclass
class CatalogueIndex:
    """An opened index: `embeddings` (N, D) float32, `faiss` index, `manifest`, catalogue `root`."""

    folder: Path
    manifest: dict
    embeddings: np.ndarray
    faiss: Any
    model: Any = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        return Path(self.manifest["source"]["root"])

    @property
    def paths(self) -> list[str]:
        return [f["path"] for f in self.manifest["files"]]

    def __len__(self) -> int:
        return len(self.manifest["files"])

    def file_path(self, item: int) -> Path:
        """Absolute path of catalogue photo `item`; PermissionError if it resolves outside the catalogue root."""
        if not 0 <= int(item) < len(self):
            raise IndexError(f"no photo {item} in an index of {len(self)}")
        root = self.root.resolve()
        path = (root / self.manifest["files"][int(item)]["path"]).resolve()
        if not path.is_relative_to(root):
            raise PermissionError(f"photo {item} resolves outside the catalogue folder {root}")
        return path

    def search(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, ids (Q, k) int64) of the k most similar catalogue photos per query vector."""
        if int(k) < 1:
            raise ValueError(f"k must be a positive number of results, got {k}")
        if len(self) == 0:
            raise CatalogueIndexError(f"index {self.folder} is empty: no photo of {self.root} could be indexed")
        k = min(int(k), len(self))
        scores, ids = self.faiss.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return (_as_cosine(self.faiss, scores), ids)

    def is_stale(self, item: int) -> bool:
        """True when catalogue photo `item` is gone or its size or modification time differ from the manifest's:
        its embedding is from the old content (run update)."""
        entry = self.manifest["files"][int(item)]
        try:
            return _stat(self.root / entry["path"]) != {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}
        except OSError:
            return True

    def query(self, photos: Sequence[Any], k: int = 10) -> list[list[dict]]:
        """Top-k results per photo (path or PIL image): [{rank, id, path, score, stale}], best first.

        `stale` is True for a catalogue photo changed or deleted since it was indexed (its score is the old
        content's; run update). Raises ValueError naming the photo when it cannot be decoded.
        """
        from .saved_model import open_rgb

        images = []
        for photo in photos:
            try:
                images.append(open_rgb(photo))
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"query photo {photo} cannot be read as an image ({_reason(err)})") from err
        scores, ids = self.search(embed_images(self.require_model(), images), k)
        return [
            [
                {"rank": r + 1, "id": int(i), "path": self.paths[i], "score": float(s), "stale": self.is_stale(i)}
                for r, (s, i) in enumerate(zip(srow, irow))
                if i >= 0
            ]
            for srow, irow in zip(scores, ids)
        ]

    def require_model(self) -> Any:
        if self.model is None:
            self.model = model_from_manifest(self.manifest)
            check_model(self.manifest, self.model, self.folder)
        return self.model


def check_model(manifest: dict, model: Any, folder: Path) -> None:
    """ModelMismatchError when `model`'s digest differs from the one the index was built with."""
    built = manifest["model"]
    if model.digest() != built["digest"]:
        raise ModelMismatchError(
            f"index {folder} was built with another model: {built['description']} (digest {built['digest'][:12]}), "
            f"not {model.describe()} (digest {model.digest()[:12]}). Query it with the model it was built with, or "
            f"rebuild it: {rebuild_command(manifest, folder, 'MODEL')}"
        )


def rebuild_command(manifest: dict, folder: Path, model: str | None = None) -> str:
    ref = manifest.get("model", {}).get("ref", {}) if isinstance(manifest, dict) else {}
    model = model or ref.get("folder") or ref.get("backbone") or "MODEL"
    root = manifest.get("source", {}).get("table") or manifest.get("source", {}).get("root") or "FOLDER"
    return f"python3 -m fashlib.index build {root} --model {model} --out {folder}"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_sha256` (detects hand edits)."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())


def _corrupt(folder: Path, manifest: dict, what: str) -> CorruptIndexError:
    return CorruptIndexError(f"index {folder} is corrupt: {what}. Rebuild it: {rebuild_command(manifest, folder)}")


def open_index(folder: str | os.PathLike, model: Any = None) -> CatalogueIndex:
    """Open and verify an index (sha256 of every file, row counts); check `model` against it when given.

    Raises CorruptIndexError (with the command that rebuilds it) or ModelMismatchError.
    """
    import faiss

    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CatalogueIndexError(
            f"{path} not found: {folder} is not an index; build one with "
            "python3 -m fashlib.index build FOLDER --model MODEL --out INDEX"
        )
    try:
        manifest = json.loads(path.read_text())
        assert manifest["format"] == FORMAT
    except Exception as err:  # noqa: BLE001
        raise _corrupt(folder, {}, f"{path} is unreadable or not a fashlib index ({type(err).__name__})") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CatalogueIndexError(
            f"index {folder} has format version {manifest.get('format_version')}, this fashlib "
            f"reads version {FORMAT_VERSION}; rebuild it: {rebuild_command(manifest, folder)}"
        )
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise _corrupt(
            folder,
            manifest,
            f"{path} was edited or damaged (its content differs from its "
            "manifest_sha256), so its rows may no longer name the right photos",
        )
    data = {}
    for key in ("embeddings", "index"):
        file = folder / Path(str(manifest[f"{key}_file"])).name
        raw = file.read_bytes() if file.is_file() else None
        if raw is None or _sha256(raw) != manifest[f"{key}_sha256"]:
            raise _corrupt(folder, manifest, f"{file.name} is missing or its sha256 differs from the manifest's")
        data[key] = raw
    embeddings = np.load(io.BytesIO(data["embeddings"]), allow_pickle=False)
    index = faiss.deserialize_index(np.frombuffer(data["index"], dtype=np.uint8))
    n = len(manifest["files"])
    if embeddings.shape[0] != n or index.ntotal != n:
        raise _corrupt(folder, manifest, f"{n} files but {embeddings.shape[0]} embeddings and {index.ntotal} indexed")
    opened = CatalogueIndex(folder, manifest, embeddings, index)
    if model is not None:
        model = resolve_model(model)[0]
        check_model(manifest, model, folder)
        opened.model = model
    return opened


def _write_bytes(path: Path, data: bytes) -> None:
    """Atomic write of `data` to `path` (paths.atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def _write(folder: Path, manifest: dict, embeddings: np.ndarray, index: Any) -> None:
    """Write embeddings and index under content-named files, then the manifest (the commit), then drop old files."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(embeddings, dtype=np.float32), allow_pickle=False)
    blobs = {"embeddings": (buffer.getvalue(), "npy"), "index": (faiss.serialize_index(index).tobytes(), "faiss")}
    for key, (raw, suffix) in blobs.items():
        digest = _sha256(raw)
        manifest[f"{key}_file"], manifest[f"{key}_sha256"] = f"{key}-{digest[:16]}.{suffix}", digest
        _write_bytes(folder / manifest[f"{key}_file"], raw)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    keep = {MANIFEST, manifest["embeddings_file"], manifest["index_file"]}
    for old in list(folder.glob("embeddings-*.npy")) + list(folder.glob("index-*.faiss")):
        if old.name not in keep:
            old.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ build / update
def _source(source: Any) -> tuple[dict, Path, list[str], list[str]]:
    """(manifest source, root, image paths relative to root, unsupported files) of a folder, table or CSV."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        root = Path(source).resolve()
        images, others = scan_folder(root)
        inside = [p for p in images if (root / p).resolve().is_relative_to(root)]
        outside = sorted(set(images) - set(inside))
        return {"type": "folder", "root": str(root), "table": None}, root, inside, others + outside
    table_file = None
    if isinstance(source, (str, os.PathLike)):
        table_file = Path(source).resolve()
        if not table_file.is_file():
            raise FileNotFoundError(f"catalogue {source} is neither a folder nor a CSV table")
        table = pd.read_csv(table_file)
        base = table_file.parent
    else:
        table, base = source, Path.cwd()
    if "path" not in table.columns:
        raise ValueError(f"the catalogue table {table_file or ''} needs a 'path' column")
    paths = [(base / p).resolve() for p in table["path"].astype(str)]
    if not paths:
        raise ValueError("the catalogue table is empty")
    root = Path(os.path.commonpath([p.parent for p in paths]))
    rel = [p.relative_to(root).as_posix() for p in paths]
    images = [r for r in rel if r.lower().endswith(IMAGE_SUFFIXES)]
    others = [r for r in rel if not r.lower().endswith(IMAGE_SUFFIXES)]
    return {"type": "table", "root": str(root), "table": str(table_file) if table_file else None}, root, images, others


def _without_index(root: Path, rels: Sequence[str], out: str | os.PathLike) -> list[str]:
    """`rels` less the files of the index folder `out` itself (an index kept inside its catalogue folder)."""
    inside = Path(out).resolve()
    return [r for r in rels if not (root / r).absolute().is_relative_to(inside)]


def _unsupported(root: Path, others: Sequence[str]) -> list[dict]:
    """Skipped-file entries of files that are not indexed: other types, links to outside the catalogue folder."""

    def reason(rel: str) -> str:
        if rel.endswith("/"):
            return "a linked folder, not followed (links can loop); index its target separately or copy it in"
        if rel.lower().endswith(IMAGE_SUFFIXES):
            return (
                f"a link to {(root / rel).resolve()}, outside the catalogue folder {root} (copy the photo "
                "into the folder to index it)"
            )
        return "unsupported file type (not .jpg, .jpeg, .png or .webp)"

    return [{"path": p, "reason": reason(p)} for p in others]


def build(
    source: Any,
    model: Any,
    out: str | os.PathLike,
    *,
    exact_max: int = EXACT_MAX,
    approx: str = "hnsw",
    batch_size: int = 16,
    progress: bool = True,
) -> CatalogueIndex:
    """Index every photo of `source` (a folder, recursive; a CSV or DataFrame with a `path` column) into `out`.

    `model`: a saved model folder, a backbone name or a SavedEmbedder. Undecodable files and files that are not
    .jpg/.jpeg/.png/.webp are skipped and listed in manifest["skipped"]. Returns the opened index.
    """
    from . import __version__

    embedder, ref = resolve_model(model)
    src, root, images, others = _source(source)
    images, others = _without_index(root, images, out), _without_index(root, others, out)
    start = time.perf_counter()
    embeddings, entries, skipped = embed_files(embedder, root, images, batch_size, progress)
    skipped += _unsupported(root, others)
    index, info = make_faiss_index(embeddings, exact_max, approx)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fashlib": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": src,
        "model": {
            "ref": ref,
            "digest": embedder.digest(),
            "description": embedder.describe(),
            "embedding_dim": embedder.embedding_dim,
        },
        "index": {**info, "exact_max": exact_max},
        "files": entries,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "last_run": {"embedded": len(entries), "seconds": round(time.perf_counter() - start, 2)},
    }
    _write(Path(out), manifest, embeddings, index)
    return CatalogueIndex(Path(out), manifest, embeddings, index, embedder)


def _unchanged(root: Path, rel: str, entry: dict) -> bool:
    """True when root/rel still has the size, modification time and content (sha256) recorded in `entry`."""
    try:
        if {k: entry.get(k) for k in ("size", "mtime_ns")} != _stat(root / rel):
            return False
        return entry.get("sha256") == _sha256((root / rel).read_bytes())  # same size and time, other photo?
    except OSError:
        return False


def _recorded_source(manifest: dict, folder: Path) -> str:
    """The folder or CSV an index was built from; CatalogueIndexError when it has moved or gone."""
    src = manifest["source"]
    recorded = src["table"] or src["root"]
    if src["type"] == "table" and src["table"] is None:
        raise CatalogueIndexError("this index was built from an in-memory table: pass the table again as `source`")
    if not Path(recorded).exists():
        raise CatalogueIndexError(
            f"the catalogue {recorded} that index {folder} was built from no longer exists; "
            f"if it moved, give its new place: python3 -m fashlib.index update {folder} "
            "--source NEW_PLACE (unchanged photos are not embedded again)"
        )
    return recorded


def update(
    folder: str | os.PathLike, model: Any = None, source: Any = None, *, batch_size: int = 16, progress: bool = True
) -> tuple[CatalogueIndex, dict]:
    """Bring an index up to date with its catalogue: embed new or changed files only, drop deleted ones.

    A file is unchanged when its size, modification time and sha256 all equal the manifest's (a photo replaced
    by another of the same size and time is embedded again). `model` defaults to the one the index was built
    with (ModelMismatchError if another is given); `source` to the folder or CSV it was built from (pass the new
    place of a moved catalogue; paths are relative to it). Returns (index, {added, changed, removed, unchanged,
    skipped}): `removed` counts indexed photos no longer in the index, deleted or now unreadable (those are also
    in `skipped`, with the reason).
    """
    old = open_index(folder, model)
    embedder = old.require_model()
    manifest = old.manifest
    src, root, images, others = _source(source if source is not None else _recorded_source(manifest, old.folder))
    images, others = _without_index(root, images, folder), _without_index(root, others, folder)
    before = {f["path"]: (i, f) for i, f in enumerate(manifest["files"])}
    same = [p for p in images if p in before and _unchanged(root, p, before[p][1])]
    same_set = set(same)
    new, kept, skipped = embed_files(embedder, root, [p for p in images if p not in same_set], batch_size, progress)
    vectors = {p: old.embeddings[before[p][0]] for p in same} | {e["path"]: v for e, v in zip(kept, new)}
    entries = {p: before[p][1] for p in same} | {e["path"]: e for e in kept}
    order = sorted(vectors)
    embeddings = np.stack([vectors[p] for p in order]) if order else np.empty((0, embedder.embedding_dim), np.float32)
    skipped += _unsupported(root, others)
    index, info = make_faiss_index(
        embeddings,
        manifest["index"].get("exact_max", EXACT_MAX),
        manifest["index"]["type"] if manifest["index"]["type"] != "flat" else "hnsw",
    )
    report = {
        "added": sum(e["path"] not in before for e in kept),
        "changed": sum(e["path"] in before for e in kept),
        "removed": sum(p not in vectors for p in before),  # deleted, or no longer readable (then also skipped)
        "unchanged": len(same),
        "skipped": len(skipped),
    }
    manifest = {
        **manifest,
        "source": src,
        "files": [entries[p] for p in order],
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "index": {**info, "exact_max": manifest["index"].get("exact_max", EXACT_MAX)},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "last_run": {**report, "embedded": len(kept)},
    }
    _write(Path(folder), manifest, embeddings, index)
    return CatalogueIndex(Path(folder), manifest, embeddings, index, embedder), report


if __name__ == "__main__":
    from .index_cli import main

    raise SystemExit(main())

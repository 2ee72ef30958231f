"""Run folders: save a run's query/gallery embeddings and metrics, recheck them from the files alone, name
and claim a fine-tuning run's folder, and read the recorded GPU runs.

Layouts (ARCHITECTURE.md, "Run folders"): <out_dir>/<name>/embeddings.npz + metrics.json (save_run);
<out>/run.json, the settings of the run a folder holds (claim_run_folder). Every file is written with
fashlib.paths.atomic_write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data.protocols import check_embedding_rows, eval_rows
from .evaluation import KS, Retrieval
from .paths import atomic_write

EMBEDDINGS_FILE = "embeddings.npz"


METRICS_FILE = "metrics.json"


def save_run(
    out_dir: str | os.PathLike,
    name: str,
    table: pd.DataFrame,
    embeddings: np.ndarray,
    results: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a run's query/gallery embeddings and metrics so anyone can recheck the numbers.

    table: contract table of N rows (`split`, `label`, `path`); embeddings: (N, D) float array in table order
    (the callers pass L2-normalised rows; they are stored as given, cast to float32); results: the metrics
    reported for them ({"recall@K": fraction, "map@r": fraction}); config: JSON-serialisable (other values
    are stored with str). Layout: <out_dir>/<name>/embeddings.npz with arrays query_embeddings (Q, D),
    gallery_embeddings (G, D) float32, query_labels, gallery_labels, query_paths, gallery_paths (str); and
    <out_dir>/<name>/metrics.json, {"metrics": results, "config": config}. Both files are written atomically;
    an existing run of that name is replaced. Returns the folder <out_dir>/<name>. ValueError when the table
    has no query or no gallery row, or when `embeddings` is not (N, D) for the table's N rows.
    """
    check_embedding_rows(table, embeddings)
    query, gallery = eval_rows(table)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "query_embeddings": embeddings[query].astype(np.float32),
        "gallery_embeddings": embeddings[gallery].astype(np.float32),
        "query_labels": table["label"].to_numpy()[query].astype(str),
        "gallery_labels": table["label"].to_numpy()[gallery].astype(str),
        "query_paths": table["path"].to_numpy()[query].astype(str),
        "gallery_paths": table["path"].to_numpy()[gallery].astype(str),
    }
    atomic_write(folder / EMBEDDINGS_FILE, lambda handle: np.savez_compressed(handle, **arrays))
    payload = json.dumps({"metrics": results, "config": config or {}}, indent=2, default=str)
    atomic_write(folder / METRICS_FILE, lambda handle: handle.write(payload), mode="w")
    return folder


def check_run(folder: str | os.PathLike, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recompute Recall@K and mAP@R from a saved run's embeddings alone (an independent check).

    One search of the saved query embeddings against the saved gallery (evaluation.Retrieval); K larger
    than the gallery are left out silently. Returns {"recall@K": fraction in [0, 1], ..., "map@r": fraction},
    comparable with save_run's `results`. FileNotFoundError when <folder>/embeddings.npz is absent; KeyError
    when it lacks one of save_run's arrays; ValueError as Retrieval.from_arrays raises it (non-finite
    embeddings, dimension mismatch)."""
    with np.load(Path(folder) / EMBEDDINGS_FILE) as saved:
        q, g = saved["query_embeddings"], saved["gallery_embeddings"]
        ql, gl = saved["query_labels"], saved["gallery_labels"]
    ks = [k for k in ks if k <= len(g)]
    found = Retrieval.from_arrays(q, ql, g, gl, max_k=max(ks, default=1))
    return found.metrics(ks)


def run_name(*parts: Any) -> str:
    """A folder-safe run name from parts: letters, digits, '-', '_' and '.' kept, the rest become '_'."""
    text = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


RUN_CONFIG_FILE = "run.json"


class RunConfigMismatch(ValueError):
    """An output folder already holds a run with another configuration; the message lists old -> new."""


def config_hash(config: dict[str, Any], length: int = 8) -> str:
    """The first `length` hex characters of the sha256 of `config` as sorted-key JSON (key order does not
    matter; values JSON cannot hold are hashed as their str)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_folder(base: str | os.PathLike, config: dict[str, Any]) -> Path:
    """The folder that names a run: <base>/<backbone>-<loss>-<config_hash(config)>."""
    return Path(base) / run_name(config.get("backbone"), config.get("loss"), config_hash(config))


def table_digest(table: pd.DataFrame) -> str:
    """12 hex characters of sha256 over a table's rows (columns path, label, split, those present, in row
    order): two runs on other rows never share a folder."""
    cols = [c for c in ("path", "label", "split") if c in table.columns]
    text = "\n".join("\t".join(map(str, row)) for row in table[cols].itertuples(index=False))
    return config_hash({"rows": text}, 12)


def claim_run_folder(out_dir: str | os.PathLike, config: dict[str, Any]) -> bool:
    """Reserve `out_dir` for the run described by `config`; return True when it resumes an earlier run.

    A folder without <out_dir>/run.json but with a checkpoint (or run.json with another configuration)
    raises RunConfigMismatch, before anything in it is changed: the message lists every key that differs
    (old -> new) and the two ways out. A new folder gets run.json (written atomically)."""
    out_dir = Path(out_dir)
    stored_file = out_dir / RUN_CONFIG_FILE
    config = json.loads(json.dumps(config, default=str))  # the form it is stored in (tuples -> lists)
    if stored_file.exists():
        stored = json.loads(stored_file.read_text())
        diff = [
            f"{k}: {stored.get(k, '<absent>')!r} -> {config.get(k, '<absent>')!r}"
            for k in sorted(set(stored) | set(config))
            if stored.get(k) != config.get(k)
        ]
        if not diff:
            return True
        raise RunConfigMismatch(
            f"{out_dir} holds another run ({stored_file}); these settings differ (old -> new):\n  "
            + "\n  ".join(diff)
            + f"\nTo resume that run, repeat its settings; to start this one, choose another folder "
            f"(e.g. {run_folder(out_dir.parent, config)}) or leave the output folder at its default."
        )
    if any(out_dir.glob("*.pt")):
        raise RunConfigMismatch(
            f"{out_dir} holds a checkpoint but no {RUN_CONFIG_FILE}, so it cannot be told whether it is this "
            f"run: choose another folder (e.g. {run_folder(out_dir.parent, config)}) or delete {out_dir}."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=1, sort_keys=True)
    atomic_write(stored_file, lambda handle: handle.write(text), mode="w")
    return False


def load_recorded_runs(folder: str | os.PathLike) -> pd.DataFrame:
    """One row per recorded fine-tuning run (the JSON printed by `python3 -m fashlib.finetune`) in `folder`.

    Columns: run (file stem), backbone, loss, epochs, val_/test_ metrics (recall@k, map@r: fractions in
    [0, 1]), train_seconds (float seconds), device, command, data_note, history (dict of per-epoch lists).
    An empty or absent folder gives an empty table with those columns (no metric columns). ValueError naming
    the file for a JSON file that is not such a record.
    """
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            results, config = record["results"], record["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a recorded fine-tuning run ({type(err).__name__}: {err})") from err
        row = {
            "run": path.stem,
            "backbone": config.get("backbone"),
            "loss": config.get("loss"),
            "epochs": config.get("epochs"),
        }
        for split, values in results.items():
            row.update({f"{split}_{metric}": value for metric, value in values.items()})
        row.update(
            train_seconds=config.get("train_seconds"),
            device=record.get("device"),
            command=record.get("command"),
            data_note=record.get("data_note"),
            history=record.get("history", {}),
        )
        rows.append(row)
    columns = ["run", "backbone", "loss", "epochs", "train_seconds", "device", "command", "data_note", "history"]
    return pd.DataFrame(rows, columns=None if rows else columns)

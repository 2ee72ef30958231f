"""Results as a reader sees them in the book: tables in percent with one decimal, a caption saying what was
measured on which split, the best value of each column in bold; measured numbers put into prose with myst-nb
``glue``.

Tables::

    from fashlib import report
    report.percent_table(frame, report.caption("Recall@K", "test", "the CC0 clothing set", queries=503))

returns a pandas ``Styler`` (rendered as an HTML table with a ``<caption>`` in the book);
``percent_markdown`` gives the same table as Markdown text.

Numbers in prose: a notebook cell calls ``report.glue_percent("r1_test", 0.7083)`` and the markdown cell that
follows writes ``Recall@1 on test is {glue}`r1_test` %``. Jupyter Book v1 renders glued values from the
outputs stored in the executed notebook (``execute_notebooks: "off"`` in ``_config.yml``), so the number
in the sentence is the one the run measured. ``{glue:text}`r1_test:.1f``` applies a format spec instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

DECIMALS = 1


def caption(measured: str, split: str, dataset: str, queries: int | None = None, gallery: int | None = None) -> str:
    """A table caption naming what was measured on which split, e.g.
    ``"Recall@K (%) on the test split of the CC0 clothing set: 503 queries. Best value in bold."``."""
    sizes = [f"{n} {what}" for n, what in ((queries, "queries"), (gallery, "gallery images")) if n is not None]
    detail = f": {', '.join(sizes)}" if sizes else ""
    return f"{measured} (%) on the {split} split of {dataset}{detail}. Best value in bold."


def _percent_columns(frame: pd.DataFrame, columns: Sequence[str] | None) -> list[str]:
    """The columns shown in percent: the given ones, or every numeric column. Checks they hold fractions."""
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    cols = list(columns) if columns is not None else numeric
    for col in cols:
        if col not in frame.columns:
            names = ", ".join(map(str, frame.columns))
            raise KeyError(f"percent column {col!r} is not in the table (columns: {names})")
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        outside = values[np.isfinite(values) & ((values < 0) | (values > 1))]
        if outside.size:
            raise ValueError(
                f"column {col!r} holds {float(outside[0])!r}, not a fraction in [0, 1]: pass fractions "
                "(0.708, not 70.8) or leave the column out of `columns`"
            )
    return cols


def best_mask(frame: pd.DataFrame, columns: Iterable[str], lower_is_better: Iterable[str] = ()) -> pd.DataFrame:
    """Boolean frame: True where a cell holds its column's best value as displayed (ties at one decimal of a
    percent are all best). Columns in lower_is_better take the minimum; NaN is never best."""
    lower = set(lower_is_better)
    mask = pd.DataFrame(False, index=frame.index, columns=frame.columns)
    for col in columns:
        shown = (pd.to_numeric(frame[col], errors="coerce") * 100).round(DECIMALS)
        if shown.notna().any():
            best = shown.min() if col in lower else shown.max()
            mask[col] = shown == best
    return mask


def percent_table(
    frame: pd.DataFrame,
    title: str,
    columns: Sequence[str] | None = None,
    lower_is_better: Iterable[str] = (),
    hide_index: bool = False,
):
    """A pandas Styler of frame: the percent columns (default: every numeric one) as fractions x 100 with one
    decimal, the best value of each in bold, other float columns (seconds) with one decimal, other columns as
    they are, and title as the table's caption.

    frame holds fractions in [0, 1] (Recall@K, mAP@R); raises ValueError naming the column otherwise, KeyError
    for a column that is not in frame, ValueError for an empty title (say what was measured on which split)."""
    if not str(title).strip():
        raise ValueError("a results table needs a caption saying what was measured on which split (see caption())")
    cols = _percent_columns(frame, columns)
    bold = best_mask(frame, cols, lower_is_better)
    styler = frame.style.format(_percent, subset=cols, na_rep="–")
    others = [c for c in frame.select_dtypes("floating").columns if c not in cols]  # e.g. seconds
    styler = styler.format(f"{{:.{DECIMALS}f}}", subset=others, na_rep="–") if others else styler
    styler = styler.apply(lambda _: np.where(bold, "font-weight: bold", ""), axis=None)
    styler = styler.set_caption(title)
    return styler.hide(axis="index") if hide_index else styler


def paired_table(paired: pd.DataFrame, title: str):
    """A pandas Styler of a paired comparison (selection.paired_report: points, low/high (points), p_value):
    differences in percentage points with one decimal, p-values with 4, and title as the caption. Raises
    ValueError for an empty title and KeyError for a missing column."""
    if not str(title).strip():
        raise ValueError("a results table needs a caption saying what was measured on which split (see caption())")
    points = ["points", "low (points)", "high (points)"]
    missing = [c for c in [*points, "p_value"] if c not in paired]
    if missing:
        raise KeyError(f"paired comparison lacks columns {missing}; expected selection.paired_report's frame")
    return (
        paired.style.format(f"{{:+.{DECIMALS}f}}", subset=points)
        .format("{:.4f}", subset=["p_value"])
        .set_caption(title)
    )


def _percent(value) -> str:
    """0.70833 -> '70.8'; NaN or None -> '–'."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{100 * float(value):.{DECIMALS}f}"


def percent_markdown(
    frame: pd.DataFrame,
    title: str,
    columns: Sequence[str] | None = None,
    lower_is_better: Iterable[str] = (),
    index: bool = True,
) -> str:
    """The table of percent_table as Markdown: an italic caption line, then a pipe table with **bold** best
    values. Same checks and errors as percent_table."""
    if not str(title).strip():
        raise ValueError("a results table needs a caption saying what was measured on which split (see caption())")
    cols = _percent_columns(frame, columns)
    bold = best_mask(frame, cols, lower_is_better)
    header = ([str(frame.index.name or "")] if index else []) + [str(c) for c in frame.columns]
    rows = []
    for label, row in frame.iterrows():
        cells = [str(label)] if index else []
        for col in frame.columns:
            text = _percent(row[col]) if col in cols else str(row[col])
            cells.append(f"**{text}**" if bold.at[label, col] else text)
        rows.append(cells)
    align = ["---" if i == 0 and index else "---:" for i in range(len(header))]
    lines = [f"*{title}*", "", "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def percent_value(fraction: float) -> float:
    """A fraction as the percent shown in the book: 0.70833 -> 70.8 (one decimal). Raises ValueError outside [0, 1]."""
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{fraction!r} is not a fraction in [0, 1]: pass 0.708, not 70.8")
    return round(100 * fraction, DECIMALS)


def glue_percent(name: str, fraction: float, display: bool = False) -> float:
    """Glue a measured fraction as a percent with one decimal under name, for ``{glue}`name``` in the prose.

    Call it in a notebook cell; the value is stored in that cell's output (myst-nb ``glue``) and Jupyter Book
    renders it where a markdown cell names it. Returns the glued value (70.8 for 0.70833)."""
    from myst_nb import glue

    value = percent_value(fraction)
    glue(name, value, display=display)
    return value


def glue_values(values: Mapping[str, float | int], percent: Iterable[str] = (), display: bool = False) -> dict:
    """Glue several numbers at once: the names in percent as glue_percent does, the others as they are
    (counts, seconds). Returns {name: glued value}."""
    from myst_nb import glue

    percent = set(percent)
    glued = {}
    for name, value in values.items():
        value = value.item() if isinstance(value, np.generic) else value  # 70.8, not np.float64(70.8)
        glued[name] = percent_value(value) if name in percent else value
        glue(name, glued[name], display=display)
    return glued


def glue_markdown(name: str, text: str, display: bool = False) -> str:
    """Glue a sentence (Markdown) measured in the run, for ``{glue:md}`name``` in the prose. Returns text."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(text), display=display)
    return text


RECORDED_COLUMNS = {
    "backbone": "backbone",
    "loss": "loss",
    "epochs": "epochs",
    "val_recall@1": "val R@1",
    "test_recall@1": "test R@1",
    "test_map@r": "test mAP@R",
    "train_seconds": "train seconds",
}


def recorded_runs_table(recorded: pd.DataFrame) -> tuple[object, str]:
    """Recorded fine-tuning runs (runs.load_recorded_runs) as a percent table and a Markdown note.

    The table keeps backbone, loss, epochs, validation Recall@1, test Recall@1 and mAP@R (percent, one
    decimal, best in bold) and training seconds; the note lists each distinct device, command and data note
    the run files give. Raises ValueError for an empty frame (say there is no recorded run instead)."""
    if len(recorded) == 0:
        raise ValueError("no recorded run to show: check len(recorded) first")
    table = recorded[[c for c in RECORDED_COLUMNS if c in recorded]].rename(columns=RECORDED_COLUMNS)
    metrics = [c for c in ("val R@1", "test R@1", "test mAP@R") if c in table]
    table[metrics] = table[metrics].astype(float)
    title = "Recall@1 and mAP@R (%) of the recorded GPU fine-tuning runs (not executed here). Best value in bold."
    notes = [
        f"- **{field.replace('_', ' ')}:** `{value}`"
        for field in ("device", "command", "data_note")
        if field in recorded
        for value in recorded[field].dropna().unique()
    ]
    return percent_table(table, title, columns=metrics, hide_index=True), "\n".join(notes)


_EXAMPLES = re.compile(r"\s*\(e\.g\.[^)]*\)")
_ABSOLUTE = re.compile(r"(?<![\w.])(?:/[^\s,;:()'\"]+){2,}")


def warning_prose(caught: Iterable) -> str:
    """Caught warnings (warnings.catch_warnings(record=True)) as one plain sentence each, without machine paths.

    Example lists "(e.g. ...)" are dropped and any remaining absolute path becomes its file name, so
    ``"clothing: 5 of 5408 listed images are missing on disk; their rows were dropped (e.g. /data/a.jpg)"``
    reads ``"clothing: 5 of 5408 listed images are missing on disk; their rows were dropped."``.
    Repeated messages are given once. Returns "" when nothing was caught."""
    sentences: list[str] = []
    for w in caught:
        text = _EXAMPLES.sub("", str(getattr(w, "message", w)).strip())
        text = _ABSOLUTE.sub(lambda m: m.group(0).rsplit("/", 1)[-1], text).rstrip(" .;")
        sentence = text[:1].upper() + text[1:] + "."
        if text and sentence not in sentences:
            sentences.append(sentence)
    return " ".join(sentences)


def relative_path(path, root=None) -> str:
    """path relative to the repository root (or `root`) for printing; the bare name when it lies outside."""
    from pathlib import Path

    base = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    path = Path(path).resolve()
    try:
        return path.relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.name

"""fashlib.report: percent tables with a caption and the best value in bold; measured numbers glued into prose."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from fashlib import report

REPO = Path(__file__).resolve().parents[1]


def results() -> pd.DataFrame:
    return pd.DataFrame(
        {"Recall@1": [0.5, 0.70833, np.nan], "Recall@5": [0.8004, 0.79, 0.7996], "seconds": [12.0, 30.5, 8.25]},
        index=pd.Index(["lite0", "lite2", "lite1"], name="backbone"),
    )


def test_caption_names_measure_split_and_sizes():
    assert report.caption("Recall@K", "test", "the CC0 clothing set", queries=503, gallery=1200) == (
        "Recall@K (%) on the test split of the CC0 clothing set: 503 queries, 1200 gallery images. Best value in bold."
    )
    expected = "mAP@R (%) on the validation split of In-shop. Best value in bold."
    assert report.caption("mAP@R", "validation", "In-shop") == expected


def test_best_mask_max_min_ties_and_nan():
    frame = results()
    mask = report.best_mask(frame, ["Recall@1", "Recall@5", "seconds"], lower_is_better=["seconds"])
    assert mask["Recall@1"].tolist() == [False, True, False]  # NaN is never best
    assert mask["Recall@5"].tolist() == [True, False, True]  # 80.04 and 79.96 both show as 80.0: a tie
    assert mask["seconds"].tolist() == [False, False, True]  # lower is better
    assert report.best_mask(frame, ["Recall@1"])["Recall@5"].tolist() == [False] * 3  # other columns untouched


def test_percent_table_html_caption_one_decimal_and_bold():
    frame = results()
    title = report.caption("Recall@K", "test", "the CC0 clothing set", queries=503)
    html = report.percent_table(frame, title, columns=["Recall@1", "Recall@5"]).to_html()
    assert f"<caption>{title}</caption>" in html
    cells = dict(re.findall(r'<td id="(T_\w+_row\d_col\d)" class="[^"]*" >([^<]*)</td>', html))
    values = {key.split("_", 2)[2]: text for key, text in cells.items()}
    assert values == {
        "row0_col0": "50.0",
        "row0_col1": "80.0",
        "row0_col2": "12.0",
        "row1_col0": "70.8",
        "row1_col1": "79.0",
        "row1_col2": "30.5",
        "row2_col0": "–",
        "row2_col1": "80.0",
        "row2_col2": "8.2",
    }
    style = html[html.index("<style") : html.index("</style>")]
    bold = set(re.findall(r"row\d_col\d", style.split("{")[0]))
    assert bold == {"row1_col0", "row0_col1", "row2_col1"}, style
    assert "font-weight: bold" in style


def test_percent_table_rejects_percent_values_missing_columns_and_empty_caption():
    frame = results()
    with pytest.raises(ValueError, match=r"'seconds' holds 12\.0, not a fraction"):
        report.percent_table(frame, "t")  # every numeric column by default, seconds included
    with pytest.raises(KeyError, match="'mAP@R' is not in the table"):
        report.percent_table(frame, "t", columns=["mAP@R"])
    with pytest.raises(ValueError, match="caption"):
        report.percent_table(frame, "  ", columns=["Recall@1"])
    with pytest.raises(ValueError, match="not a fraction"):
        report.percent_value(70.8)


def test_percent_markdown_exact():
    frame = results()[["Recall@1", "Recall@5"]].iloc[:2]
    text = report.percent_markdown(frame, "Recall@K (%) on test.")
    assert text == (
        "*Recall@K (%) on test.*\n\n"
        "| backbone | Recall@1 | Recall@5 |\n"
        "| --- | ---: | ---: |\n"
        "| lite0 | 50.0 | **80.0** |\n"
        "| lite2 | **70.8** | 79.0 |"
    )


def test_glue_values_stored_in_the_notebook_output():
    """Run in a real kernel: the glued value is what a `{glue}` role will render (papermill record mime)."""
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "from fashlib import report\n"
            "v = report.glue_percent('r1_test', 0.70833)\n"
            "report.glue_values({'queries': 503, 'map_test': 0.41249}, percent=['map_test'])\nv"
        )
    )
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = nb.cells[0].outputs
    glued = {
        o["metadata"]["scrapbook"]["name"]: o["data"]["application/papermill.record/text/plain"]
        for o in outputs
        if "scrapbook" in o.get("metadata", {})
    }
    assert glued == {"r1_test": "70.8", "queries": "503", "map_test": "41.2"}
    assert outputs[-1]["data"]["text/plain"] == "70.8"


DEMO = """import pandas as pd
from fashlib import report
report.glue_percent("r1_test", 0.70833)
frame = pd.DataFrame({"Recall@1": [0.5, 0.70833]}, index=["lite0", "lite2"])
report.percent_table(frame, report.caption("Recall@1", "test", "the CC0 clothing set", queries=503))"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_glued_number_renders_in_the_built_page(tmp_path):
    """Jupyter Book v1 with execute_notebooks off renders `{glue}` from the executed notebook's stored outputs."""
    from fashlib import book

    root = tmp_path / "project"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("seed = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Demo"),
        params,
        nbformat.v4.new_code_cell(DEMO),
        nbformat.v4.new_markdown_cell("The answer: Recall@1 on test is {glue}`r1_test` %."),
    ]
    (root / "notebooks").mkdir(parents=True)
    nbformat.write(nb, str(root / "notebooks" / "01_demo.ipynb"))
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "book").mkdir()
    (root / "book" / "intro.md").write_text("# Demo book\n")
    (root / "_toc.yml").write_text(
        yaml.safe_dump(
            {
                "format": "jb-book",
                "root": "book/intro",
                "parts": [{"caption": "E", "chapters": [{"file": "book/notebooks/01_demo"}]}],
            }
        )
    )
    (root / "book" / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "notebooks": {"01_demo": {}}}))
    _, result = book.build("book/params.yaml", root=root, log=lambda m: None)
    assert result.warnings == 0, result.warning_lines
    html = (root / "_build" / "html" / "book" / "notebooks" / "01_demo.html").read_text()
    assert re.search(r"The answer: Recall&#64;1 on test is <span[^>]*>70\.8</span> %", html)
    assert "<caption>Recall@1 (%) on the test split of the CC0 clothing set: 503 queries." in html


def test_paired_table_has_a_caption_points_and_p_values():
    paired = pd.DataFrame(
        {
            "points": [15.54, 30.6],
            "low (points)": [11.3, 28.49],
            "high (points)": [19.5, 32.6],
            "p_value": [0.0005, 0.02],
        },
        index=["recall@1", "map@r"],
    )
    html = report.paired_table(paired, "chosen minus baseline on 503 test queries").to_html()
    assert "chosen minus baseline on 503 test queries" in html and "+15.5" in html and "0.0005" in html
    with pytest.raises(ValueError, match="caption"):
        report.paired_table(paired, " ")
    with pytest.raises(KeyError, match="p_value"):
        report.paired_table(paired.drop(columns="p_value"), "t")


def test_percent_table_shows_other_float_columns_with_one_decimal():
    frame = pd.DataFrame({"recall@1": [0.7083, 0.6], "seconds": [105.0, 92.71], "epochs": [15, 15]})
    html = report.percent_table(frame, "caption", columns=["recall@1"]).to_html()
    assert "105.0<" in html and "92.7<" in html and "105.000000" not in html and ">15<" in html

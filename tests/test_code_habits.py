"""The project's code habits that a machine can check: no function in fashlib/ longer than MAX_LINES lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fashlib"
MAX_LINES = 60


def long_functions(source: str, filename: str, max_lines: int = MAX_LINES) -> list[str]:
    """'file:line name (N lines)' for every function or method (nested ones included) in `source` longer than
    `max_lines`, counted from the ``def`` line to the last line of its body, docstring included."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > max_lines:
                found.append(f"{filename}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_length_check_counts_from_def_to_last_line():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))
    at_limit = f"def f():\n{body}\n"  # def line + 59 body lines = 60
    over = f"class C:\n    @staticmethod\n    def g():\n        '''doc'''\n{body.replace('    ', '        ')}\n"
    assert long_functions(at_limit, "a.py") == []
    assert long_functions(over, "b.py") == [f"b.py:3 g ({MAX_LINES + 1} lines)"]


def test_no_function_in_fashlib_is_longer_than_60_lines():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no Python file found under {PACKAGE}"
    found = [
        line for path in files for line in long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert not found, (
        f"{len(found)} function(s) in fashlib/ are longer than {MAX_LINES} lines (from the def line to the last line "
        "of the body, docstring included):\n  "
        + "\n  ".join(found)
        + f"\nThe project's rule (CONTRIBUTING.md, code habits): no function longer than {MAX_LINES} lines. Split each "
        "into well-named steps (e.g. check the inputs, one step of the loop, write the result), each a function "
        "with a docstring that returns data, keeping the behaviour, the errors and their messages unchanged."
    )

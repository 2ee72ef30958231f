"""The project's code habits that a machine can check: no function in fashlib/ longer than MAX_LINES lines, and
no module of fashlib/ importing one of a layer above its own (the layer table of ARCHITECTURE.md's module map)."""

from __future__ import annotations

import ast
import re
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


# ---- the layer rule (ARCHITECTURE.md, "Module map") ----

ARCHITECTURE = REPO / "ARCHITECTURE.md"
LAYERS = ("base", "data", "core", "compute", "glue", "app", "book")  # bottom to top, as ARCHITECTURE.md lists them
_ROW = re.compile(r"^\| (\w+) \| ((?:`[\w/]+\.py`(?:, )?)+) \|")


def layer_table(markdown: str) -> dict[str, str]:
    """{dotted module name under fashlib ("" for the package itself, "data.protocols"): layer} read from the rows
    ``| layer | `file.py`, `other.py` | ... |`` of the module map. A bare file name in a data row lives in
    fashlib/data/ (the map writes `data/clothing.py`, `inshop.py`). Raises ValueError for an unknown layer."""
    table = {}
    for line in markdown.splitlines():
        found = _ROW.match(line)
        if not found:
            continue
        layer, files = found.group(1), re.findall(r"`([\w/]+)\.py`", found.group(2))
        if layer not in LAYERS:
            raise ValueError(f"{ARCHITECTURE.name}: unknown layer {layer!r} in {line!r}; the layers are {LAYERS}")
        for file in files:
            if layer == "data" and "/" not in file:
                file = f"data/{file}"
            parts = file.split("/")
            table[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = layer
    return table


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name under the package ("" for its __init__.py): file} of every .py file below `package`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, dotted module under fashlib) of every fashlib import in `source`: module level and inside functions,
    relative (``from . import x``, ``from ..paths import y``) or absolute (``import fashlib.x``). A name imported
    from a package counts as its submodule when one of `known` has that name (``from . import stats``)."""
    here = module.split(".") if module else []
    package = here if is_package else here[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name.partition(".")[2])
                for alias in node.names
                if alias.name == "fashlib" or alias.name.startswith("fashlib.")
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module == "fashlib" or node.module.startswith("fashlib."):
                base = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(base)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.append((node.lineno, sub if sub in known else target))
    return found


def upward_imports(modules: dict[str, Path], layers: dict[str, str], root: Path = REPO) -> list[str]:
    """'file:line module (layer) imports other (layer)' for every import of a module from a layer above its own;
    files are named relative to `root`."""
    found = []
    for module, path in modules.items():
        for line, target in imported_modules(
            path.read_text(encoding="utf-8"), module, path.name == "__init__.py", set(modules)
        ):
            if LAYERS.index(layers[target]) > LAYERS.index(layers[module]):
                found.append(
                    f"{path.relative_to(root)}:{line} {module or 'fashlib'} ({layers[module]}) imports "
                    f"{target or 'fashlib'} ({layers[target]})"
                )
    return found


def test_the_import_reader_sees_relative_absolute_and_function_level_imports():
    known = {"", "paths", "stats", "data", "data.protocols", "evaluation"}
    source = (
        "from . import stats\nfrom .paths import REPO\nimport fashlib.evaluation\nimport numpy\n"
        "def f():\n    from ..evaluation import evaluate\n    from . import protocols\n"
    )
    assert imported_modules(source, "data.protocols", False, known) == [
        (1, "data"),  # `stats` is no submodule of fashlib.data: the name comes from the package
        (2, "data.paths"),
        (3, "evaluation"),
        (6, "evaluation"),
        (7, "data.protocols"),
    ]
    assert imported_modules("from . import stats\n", "retrieval", False, known) == [(1, "stats")]


def test_the_layer_check_finds_an_upward_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "low.py").write_text("def f():\n    from .high import g\n")
    (tmp_path / "pkg" / "high.py").write_text("from .low import f\n")
    modules = {"low": tmp_path / "pkg" / "low.py", "high": tmp_path / "pkg" / "high.py"}
    upward = upward_imports(modules, {"low": "core", "high": "glue"}, root=tmp_path)
    assert upward == ["pkg/low.py:2 low (core) imports high (glue)"]
    assert upward_imports(modules, {"low": "glue", "high": "glue"}, root=tmp_path) == []


def test_every_module_of_fashlib_is_in_the_module_map():
    layers, modules = layer_table(ARCHITECTURE.read_text(encoding="utf-8")), package_modules()
    unmapped = sorted(set(modules) - set(layers))
    absent = sorted(set(layers) - set(modules))
    assert not unmapped and not absent, (
        f"{ARCHITECTURE.name}'s module map is out of date: modules of fashlib/ without a row: "
        f"{[str(modules[m].relative_to(PACKAGE)) for m in unmapped]}; rows naming no file: {absent}. Add a row "
        "`| layer | `module.py` | what it holds |` in its layer (or remove the stale row)."
    )


def test_no_module_of_fashlib_imports_one_from_a_layer_above():
    layers, modules = layer_table(ARCHITECTURE.read_text(encoding="utf-8")), package_modules()
    missing = sorted(set(modules) - set(layers))
    assert not missing, f"modules without a layer in {ARCHITECTURE.name}: {missing}"
    found = upward_imports(modules, layers)
    assert not found, (
        f"{len(found)} import(s) in fashlib/ go up a layer ({' < '.join(LAYERS)}, from {ARCHITECTURE.name}'s module "
        "map):\n  " + "\n  ".join(found) + "\nA module imports only from its own layer or the layers below. Move "
        "the function to the lower module's layer, pass what it needs as an argument, or move the caller up."
    )

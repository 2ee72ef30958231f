"""Notebook parameters: one way to read them, one schema to check them, one way to resolve their paths.

Every notebook calls ``globals().update(params.prepare(globals()))`` right after its ``parameters`` cell:
each known parameter is checked (the error names the parameter, the bad value and what is allowed, before
any work is done) and paths are made absolute against the repository root, wherever the kernel started
(JupyterLab starts it in ``notebooks/``). ``book/params.yaml`` holds the defaults; values given on a
command line (``--set``) are read the way that file is read (:func:`parse_value`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .paths import GPU_RUNS_DIR, PROJECT_ROOT, data_root, resolve_path

# --------------------------------------------------------------------------- reading values


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader plus what a reader expects: ``1e-3`` is a float (YAML 1.2) and ``None`` is null."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])


def load_yaml(text: str) -> Any:
    """Parse YAML text with the parameter rules: ``null``/``None``/``~`` -> None, ``1e-3`` -> 0.001,
    ``[a, b]`` -> list, ``true`` -> True."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_value(raw: str) -> Any:
    """One command-line value read as the parameter file reads it; an empty string is None."""
    return load_yaml(raw) if raw.strip() else None


# --------------------------------------------------------------------------- the schema


class ParameterError(ValueError):
    """One or more notebook parameters have a wrong type or value; the message names each of them."""


@dataclass(frozen=True)
class Check:
    """How one parameter is checked: ``test(value)`` returns None when fine, else what is expected."""

    test: Callable[[Any], str | None]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(minimum: int = 1, optional: bool = False) -> Check:
    """An int >= minimum (None allowed when optional)."""
    what = f"an integer >= {minimum}" + (" or None" if optional else "")
    return Check(lambda v: None if (optional and v is None) or (_is_int(v) and v >= minimum) else what)


def number(low: float, high: float | None = None, low_open: bool = True) -> Check:
    """A float or int in (low, high] (or [low, high] when not low_open)."""
    what = f"a number {'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")

    def test(v: Any) -> str | None:
        ok = _is_number(v) and (v > low if low_open else v >= low) and (high is None or v <= high)
        return None if ok else what

    return Check(test)


def boolean() -> Check:
    return Check(lambda v: None if isinstance(v, bool) else "True or False")


def path(optional: bool = False) -> Check:
    """A non-empty path string (or None when optional)."""
    what = "a path (str)" + (" or None" if optional else "")
    return Check(lambda v: None if (optional and v is None) or (isinstance(v, (str, os.PathLike)) and str(v)) else what)


def closest_hint(value: Any, allowed: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the allowed name closest to value (difflib), or "" when none is close."""
    near = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def choice(
    allowed: Callable[[], Iterable[str]], many: bool = False, label: str = "", key: Callable[[str], str] = str
) -> Check:
    """One of allowed() (or, with many, a non-empty list of them), compared after `key`; the message lists
    them (or counts them when there are many) and names the closest."""

    def test(v: Any) -> str | None:
        names = list(allowed())
        values = v if many and isinstance(v, list) else [v]
        if many and not (isinstance(v, list) and v):
            return f"a non-empty list of {label or 'names'}"
        known = set(names)
        bad = [x for x in values if not isinstance(x, str) or key(x) not in known]
        if not bad:
            twice = [x for i, x in enumerate(values) if x in values[:i]]
            return f"a list without repeats ({twice[0]!r} is listed twice)" if twice else None
        listed = (
            f"one of {', '.join(names)}" if len(names) <= 30 else f"one of the {len(names)} known {label or 'names'}"
        )
        return f"{listed}; {bad[0]!r} is not{closest_hint(bad[0], names)}"

    return Check(test)


def int_list() -> Check:
    return Check(
        lambda v: (
            None
            if isinstance(v, list) and v and all(_is_int(x) and x >= 1 for x in v)
            else "a non-empty list of integers >= 1"
        )
    )


def _datasets() -> list[str]:
    from .data import DATASETS

    return sorted(DATASETS)


def _losses() -> list[str]:
    from .losses import LOSSES, loss_variants

    return sorted(set(loss_variants()) | set(LOSSES))


def _backbones() -> list[str]:
    import timm

    return timm.list_models()


def _model_name(name: str) -> str:
    """A timm name without its pretrained tag: resnet50.a1_in1k -> resnet50."""
    return name.split(".", 1)[0]


def _metrics() -> list[str]:
    from .evaluation import KS

    return [f"recall@{k}" for k in KS] + ["map@r"]


def _device(v: Any) -> str | None:
    ok = isinstance(v, str) and re.fullmatch(r"cpu|mps|cuda(:\d+)?", v)
    return None if ok else "'cpu', 'cuda', 'cuda:N' or 'mps'"


def _random_controls(v: Any) -> str | None:
    if isinstance(v, bool):
        return None
    problem = choice(_backbones, many=True, label="timm model names", key=_model_name).test(v)
    return None if problem is None else f"True, False or a list of timm model names ({problem})"


POSITIVE_INTS = (
    "epochs",
    "finetune_epochs",
    "embedding_dim",
    "throughput_batch_size",
    "throughput_batches",
    "n_neighbors",
    "purity_k",
    "top_k",
    "max_k",
    "max_grid_categories",
    "examples_per_category",
    "n_queries",
    "latency_queries",
)
SCHEMA: dict[str, Check] = {
    "dataset": choice(_datasets),
    "data_root": path(optional=True),
    "device": Check(_device),
    "seed": integer(0),
    "max_images": integer(1, optional=True),
    "size_sample": integer(1, optional=True),
    "image_size": integer(1, optional=True),
    "cache_dir": path(),
    "out_dir": path(),
    "gpu_runs_dir": path(optional=True),
    "model_dir": path(optional=True),
    "catalogue_folder": path(optional=True),
    "fallback_backbone": choice(_backbones, label="timm model names", key=_model_name),
    "flip_average": boolean(),
    "ensemble": boolean(),
    "finetune": boolean(),
    **{name: integer(1) for name in POSITIVE_INTS},
    # P x K batches: pair-based losses need 2 labels with 2 images each, or their loss is 0 (nothing learnt)
    "batch_p": integer(2),
    "batch_k": integer(2),
    "n_examples": integer(0),
    "n_failures": integer(0),
    "embedding_dims": int_list(),
    "ks": int_list(),
    "lr": number(0.0),
    "holdout_fraction": number(0.0, 1.0),
    "target_recall_at_1": number(0.0, 1.0, low_open=False),
    "projection": choice(lambda: ["umap", "pca"]),
    "head_type": choice(lambda: ["linear", "mlp"]),
    "sampler": choice(lambda: ["pk", "m_per_class"]),
    "qe_ks": int_list(),
    "seeds": Check(
        lambda v: (
            None
            if isinstance(v, list) and v and all(_is_int(x) and x >= 0 for x in v) and len(set(v)) == len(v)
            else "a non-empty list of distinct integers >= 0"
        )
    ),
    "head_types": choice(lambda: ["linear", "mlp"], many=True, label="head types"),
    "rerank_k1s": int_list(),
    "qe_alpha": number(0.0),
    "metric": choice(_metrics),
    "select_by": choice(_metrics),
    "loss": choice(_losses),
    "losses": choice(_losses, many=True, label="loss names"),
    "candidate_losses": choice(_losses, many=True, label="loss names"),
    "backbone": choice(_backbones, label="timm model names", key=_model_name),
    "backbones": choice(_backbones, many=True, label="timm model names", key=_model_name),
    "candidate_backbones": choice(_backbones, many=True, label="timm model names", key=_model_name),
    "random_controls": Check(_random_controls),
}
# Parameters holding paths: resolved against the repository root; None keeps its documented default.
PATH_PARAMETERS = ("data_root", "cache_dir", "out_dir", "gpu_runs_dir", "model_dir", "catalogue_folder")


def validate(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every parameter of `values` that SCHEMA knows; return them (others are left out).

    Raises ParameterError listing each bad one as ``name=value: expected ...`` (with the allowed values
    and the closest match for names)."""
    problems = []
    for name, check in SCHEMA.items():
        if name in values:
            expected = check.test(values[name])
            if expected is not None:
                problems.append(f"{name}={values[name]!r}: expected {expected}{_text_hint(name, values[name])}")
    if not problems:
        problems = _cross_problems(values)
    if problems:
        raise ParameterError("bad notebook parameter(s):\n  " + "\n  ".join(problems))
    return {k: values[k] for k in SCHEMA if k in values}


def _text_hint(name: str, value: Any) -> str:
    """How to pass a list or number that arrived as text (papermill's -p passes "[a, b]" as a string)."""
    if not isinstance(value, str):
        return ""
    try:
        parsed = load_yaml(value)
    except yaml.YAMLError:
        return ""
    if isinstance(parsed, (list, dict)) or _is_number(parsed):
        return f" (it arrived as text: with papermill pass it as YAML, -y '{name}: {value}')"
    return ""


def _cross_problems(values: Mapping[str, Any]) -> list[str]:
    """Problems between parameters: random_controls names that are not among backbones (the notebook runs a
    random-weights control only for a listed backbone, so such a name was silently left out)."""
    controls, backbones = values.get("random_controls"), values.get("backbones")
    if isinstance(controls, list) and isinstance(backbones, list):
        outside = [c for c in controls if c not in backbones]
        if outside:
            return [
                f"random_controls={controls!r}: expected names from backbones ({', '.join(backbones)}); "
                f"{outside[0]!r} is not{closest_hint(outside[0], backbones)}"
            ]
    return []


def resolve(values: Mapping[str, Any], root: str | os.PathLike = PROJECT_ROOT) -> dict[str, Any]:
    """Paths made absolute against `root` (the repository root), whatever the working directory.

    data_root None -> $FASHLIB_DATA (itself relative to root) or <root>/data; gpu_runs_dir None -> the
    repository's book/gpu-runs; relative cache_dir / out_dir / data_root -> under root. Returns a copy."""
    out = dict(values)
    for name in PATH_PARAMETERS:
        if name not in values:
            continue
        value = values[name]
        if value is None and name == "data_root":
            env = os.environ.get("FASHLIB_DATA")
            out[name] = str(resolve_path(env, root) if env else data_root(None))
        elif value is None and name == "gpu_runs_dir":
            out[name] = str(GPU_RUNS_DIR)
        elif value is not None:
            out[name] = str(resolve_path(value, root))
    return out


def prepare(namespace: Mapping[str, Any], root: str | os.PathLike = PROJECT_ROOT) -> dict[str, Any]:
    """validate() then resolve() the parameters found in `namespace` (a notebook's globals()).

    Returns only the parameters, ready for ``globals().update(...)``; raises ParameterError."""
    return resolve(validate(namespace), root)


def cell_parameters(source: str) -> dict[str, Any]:
    """The values a ``parameters`` cell assigns (the cell is executed in an empty namespace)."""
    namespace: dict[str, Any] = {}
    exec(compile(source, "<parameters cell>", "exec"), namespace)  # noqa: S102 (our own notebooks)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


def expected_parameters(params: Mapping[str, Any], notebook: str) -> dict[str, Any]:
    """What a notebook's parameters cell must hold: the file's shared keys the notebook declares, overlaid
    by its own section (all of whose keys it must declare)."""
    shared = {k: v for k, v in params.items() if k not in ("notebooks", "extends")}
    return {**shared, **((params.get("notebooks") or {}).get(notebook) or {})}


def parameter_drift(cell: Mapping[str, Any], params: Mapping[str, Any], notebook: str) -> list[str]:
    """Differences between a parameters cell and the parameter file, one line each (empty when equal).

    Every key of the cell must be in the file (shared or the notebook's section) with the same value, and
    every key of the notebook's section must be in the cell."""
    want = expected_parameters(params, notebook)
    section = (params.get("notebooks") or {}).get(notebook) or {}
    lines = [
        f"{notebook}: {k} = {cell[k]!r} in the notebook, {want[k]!r} in the parameter file"
        for k in cell
        if k in want and cell[k] != want[k]
    ]
    lines += [
        f"{notebook}: {k} is declared in the notebook but not in the parameter file" for k in cell if k not in want
    ]
    lines += [
        f"{notebook}: {k} is in its section of the parameter file but not declared in the notebook"
        for k in section
        if k not in cell
    ]
    return lines


def read_parameter_file(path: str | os.PathLike) -> dict[str, Any]:
    """A parameter file as a mapping (load_yaml rules); raises ValueError naming the file otherwise."""
    path = Path(path)
    params = load_yaml(path.read_text(encoding="utf-8")) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: a parameter file must hold a mapping, got {type(params).__name__}")
    return params

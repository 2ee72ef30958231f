"""Every command of the chapter "Rerun it yourself" (book/rerun.md) works as written: the book builds are
checked with --dry-run (every parameter validated, nothing executed), the papermill commands are checked
against the notebooks they name (declared parameters, valid values, an existing output folder) and, in
the slow test, executed on a generated DeepFashion tree with smoke-sized parameters."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fashlib import book, finetune, params

REPO = Path(__file__).resolve().parents[1]
CHAPTER = REPO / "book" / "rerun.md"
INTERACTIVE = ("jupyter lab",)


def chapter_commands() -> list[str]:
    """The shell commands of the chapter's bash blocks: continuation lines joined, comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", CHAPTER.read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def _kind(command: str) -> str:
    for prefix, kind in (
        ("python3 -m fashlib.book ", "book"),
        ("python3 -m fashlib.finetune ", "finetune"),
        ("papermill ", "papermill"),
        ("mkdir -p ", "mkdir"),
    ):
        if command.startswith(prefix):
            return kind
    assert command.startswith(INTERACTIVE), f"book/rerun.md: a command this test does not know: {command}"
    return "interactive"


def test_the_chapter_has_the_commands_this_test_checks():
    kinds = [_kind(c) for c in chapter_commands()]
    assert kinds.count("book") >= 4 and kinds.count("papermill") == 5 and kinds.count("finetune") == 1
    # every papermill command writes into a folder created before it
    assert kinds.index("mkdir") < kinds.index("papermill")


def test_every_book_build_command_passes_its_checks(capsys):
    for command in chapter_commands():
        if _kind(command) == "book":
            argv = shlex.split(command)[3:]
            assert book.main(argv + ["--dry-run"]) == 0, f"{command}\n{capsys.readouterr().err}"
            out = capsys.readouterr().out
            assert "nothing executed" in out, command


def _papermill_args(command: str) -> tuple[Path, Path, dict]:
    words = shlex.split(command)[1:]
    source, output, values = REPO / words[0], Path(words[1]), {}
    import papermill.cli

    for i, word in enumerate(words):
        if word == "-p":
            values[words[i + 1]] = papermill.cli._resolve_type(words[i + 2])
    return source, output, values


def test_every_papermill_command_names_declared_parameters_with_valid_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in chapter_commands():
        kind = _kind(command)
        if kind == "mkdir":
            for folder in shlex.split(command)[2:]:
                Path(folder).mkdir(parents=True, exist_ok=True)
        elif kind == "papermill":
            source, output, values = _papermill_args(command)
            assert source.exists(), command
            assert output.parent.is_dir(), f"{command}: the output folder {output.parent} does not exist"
            assert set(values) <= book.declared_parameters(source), command
            params.validate(values)


def test_the_finetune_command_parses_and_names_its_run():
    command = next(c for c in chapter_commands() if _kind(c) == "finetune")
    args = finetune.parse_args(shlex.split(command)[3:])
    assert Path(args.out).parent == finetune.DEFAULT_BASE
    assert Path(args.out).name.startswith(f"{args.backbone}-{args.loss}-")


def _smoke(command: str, data: Path, tmp: Path) -> list[str]:
    """The command with the data root replaced by a generated tree, cuda by cpu, and smoke sizes added."""
    words = [str(data) if w == "/data" else ("cpu" if w == "cuda" else w) for w in shlex.split(command)]
    if words[0] == "papermill":
        name = Path(words[1]).stem
        smoke = book.load_params(REPO / "book" / "params-smoke.yaml")["notebooks"][name]
        extra = {
            **smoke,
            "max_images": 24,
            "image_size": 64,
            "cache_dir": str(tmp / "cache"),
            "out_dir": str(tmp / "runs"),
            "finetune_epochs": 1,
        }
        declared = book.declared_parameters(REPO / words[1])
        return words + [
            "-y",
            yaml.safe_dump({k: v for k, v in extra.items() if k in declared}),
            "--cwd",
            str(tmp),
            "--no-progress-bar",
        ]
    return words + [
        "--max-images",
        "24",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "--p",
        "2",
        "--k",
        "2",
    ]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_papermill_and_finetune_commands_run_as_written(tmp_path):
    """Each papermill command and the fine-tuning command, executed as written (smoke-sized)."""
    from fashlib.data import synthetic

    data = tmp_path / "data"
    synthetic.make_all(data)
    (tmp_path / "notebooks").symlink_to(REPO / "notebooks")  # "from the repository root", without writing there
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shared = REPO.parent / "shared" / "data"
    if not env.get("FASHLIB_DATA") and shared.is_dir():
        env["FASHLIB_DATA"] = str(shared)
    for command in chapter_commands():
        kind = _kind(command)
        if kind == "mkdir":
            subprocess.run(shlex.split(command), cwd=tmp_path, check=True)
            continue
        if kind not in ("papermill", "finetune"):
            continue
        if kind == "finetune" and not env.get("FASHLIB_DATA"):
            continue  # the CC0 data is not here (CI provides it)
        words = _smoke(command, data, tmp_path)
        if words[0] == "papermill":
            words = [sys.executable, "-m", "papermill", *words[1:]]
        else:
            words = [sys.executable, *words[1:]]
        proc = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert len(list((tmp_path / "out").glob("*.ipynb"))) == 5
    if env.get("FASHLIB_DATA"):  # the fine-tuning run went to its default, named folder
        folders = list((tmp_path / "runs" / "finetune").iterdir())
        assert len(folders) == 1 and folders[0].name.startswith("tf_efficientnet_lite0-multi_similarity-")
        assert (folders[0] / "final_test" / "metrics.json").exists()

"""fashlib.runs: run names and the recorded fine-tuning runs (run folders: tests/test_finetune_runs.py)."""

import json

import pytest

from fashlib import runs


def test_run_name_is_folder_safe():
    assert runs.run_name("triplet_batch_hard", 256) == "triplet_batch_hard-256"
    assert runs.run_name("a/b c", None, "(x)") == "a_b_c-_x_"


def test_load_recorded_runs_reads_the_finetune_json(tmp_path):
    record = {
        "results": {"val": {"recall@1": 0.5, "map@r": 0.2}, "test": {"recall@1": 0.4, "map@r": 0.1}},
        "history": {"epoch": [1, 2], "recall@1": [0.3, 0.5]},
        "config": {"backbone": "tf_efficientnet_lite0", "loss": "triplet", "epochs": 2, "train_seconds": 9.5},
        "device": "some GPU",
        "command": "bash benchmarks/finetune_gpu.sh",
        "data_note": "note",
    }
    (tmp_path / "b.json").write_text(json.dumps(record))
    (tmp_path / "a.json").write_text(json.dumps({**record, "config": {**record["config"], "loss": "arcface"}}))
    recorded = runs.load_recorded_runs(tmp_path)
    assert recorded["run"].tolist() == ["a", "b"] and recorded["loss"].tolist() == ["arcface", "triplet"]
    assert recorded.loc[1, "test_recall@1"] == 0.4 and recorded.loc[1, "val_map@r"] == 0.2
    assert recorded.loc[1, "train_seconds"] == 9.5
    assert recorded.loc[0, "history"]["recall@1"] == [0.3, 0.5] and recorded.loc[0, "device"] == "some GPU"
    (tmp_path / "empty").mkdir()
    assert len(runs.load_recorded_runs(tmp_path / "empty")) == 0
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="c.json"):
        runs.load_recorded_runs(tmp_path)


def test_load_recorded_runs_reads_the_repository_gpu_runs():
    from pathlib import Path

    folder = Path(runs.__file__).resolve().parents[1] / "book" / "gpu-runs"
    recorded = runs.load_recorded_runs(folder)
    assert len(recorded) == len(list(folder.glob("*.json"))) >= 1
    assert recorded["test_recall@1"].between(0, 1).all() and recorded["device"].str.contains("H100").all()

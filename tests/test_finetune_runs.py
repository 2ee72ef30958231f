"""Runs never mix: `python3 -m fashlib.finetune` resumes only the same run, names its folder after the run,
and `train.fit` refuses a checkpoint of another model or configuration with a short, clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fashlib import finetune, runs
from fashlib.data import synthetic
from fashlib.train import CHECKPOINT_NAME, CheckpointMismatchError, TrainConfig, fit

HERE = Path(__file__).resolve().parent


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "consumer2shop",
        "--data-root",
        str(root),
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--p",
        "2",
        "--k",
        "2",
        "--final",
        "val",
        "--out",
        str(out),
        *extra,
    ]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, one_thread):
    """One tiny Lite0 fine-tuning run (1 epoch, 32 px) on a generated Consumer-to-shop tree."""
    tmp = tmp_path_factory.mktemp("ft")
    synthetic.make_consumer2shop(tmp, n_items=8)
    out = tmp / "run"
    results = finetune.main(_args(tmp, out))
    return tmp, out, results


def test_same_command_resumes_the_finished_run_with_the_same_numbers(finished_run):
    root, out, results = finished_run
    stored = json.loads((out / runs.RUN_CONFIG_FILE).read_text())
    assert stored["backbone"] == "tf_efficientnet_lite0" and stored["loss"] == "multi_similarity"
    assert stored["dataset"] == "consumer2shop" and stored["data_root"] == str(root.resolve())
    checkpoint = (out / CHECKPOINT_NAME).stat().st_mtime_ns
    again = finetune.main(_args(root, out, "--num-workers", "0"))  # operational arguments may differ
    assert again == results
    assert (out / CHECKPOINT_NAME).stat().st_mtime_ns == checkpoint  # finished: nothing retrained


@pytest.mark.parametrize(
    "change,old_new",
    [
        (["--loss", "triplet"], "loss: 'multi_similarity' -> 'triplet'"),
        (["--lr", "0.001"], "lr: 0.0001 -> 0.001"),
        (["--backbone", "tf_efficientnet_lite1"], "backbone: 'tf_efficientnet_lite0' -> 'tf_efficientnet_lite1'"),
        (["--max-images", "12"], "max_images: None -> 12"),
    ],
)
def test_another_run_into_the_same_folder_is_refused_before_touching_it(finished_run, capsys, change, old_new):
    root, out, _ = finished_run
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(_args(root, out, *change))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert old_new in err and "To resume that run, repeat its settings" in err and "choose another folder" in err
    assert len(err.splitlines()) < 12  # a few lines, never pages of size mismatches
    assert _snapshot(out) == before


def test_a_folder_with_a_checkpoint_but_no_run_config_is_refused(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"old")
    with pytest.raises(runs.RunConfigMismatch, match="no run.json"):
        runs.claim_run_folder(tmp_path, {"backbone": "b", "loss": "l"})
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == b"old" and not (tmp_path / "run.json").exists()


def test_default_output_folder_names_backbone_loss_and_settings_hash(tmp_path):
    base = ["--data-root", str(tmp_path)]
    a = finetune.parse_args(base)
    b = finetune.parse_args(base + ["--loss", "triplet"])
    c = finetune.parse_args(base + ["--lr", "0.001"])
    d = finetune.parse_args(base + ["--device", "cuda", "--num-workers", "8"])  # operational only
    assert Path(a.out).parent == finetune.DEFAULT_BASE
    name = Path(a.out).name
    assert name.startswith("tf_efficientnet_lite0-multi_similarity-") and len(name.rsplit("-", 1)[1]) == 8
    assert Path(b.out).name.startswith("tf_efficientnet_lite0-triplet-")
    assert len({a.out, b.out, c.out}) == 3 and d.out == a.out
    assert finetune.parse_args(base + ["--out", "x"]).out == "x"


def test_config_hash_ignores_key_order_and_sees_every_value():
    assert runs.config_hash({"a": 1, "b": [1, 2]}) == runs.config_hash({"b": [1, 2], "a": 1})
    assert runs.config_hash({"a": 1}) != runs.config_hash({"a": 1.5})


# ------------------------------------------------------------------------------------------ train.fit


def _tiny(dim: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, dim))
    loss_fn = torch.nn.Module()  # no parameters: the loss below is a function
    return model, loss_fn


class _Data(torch.utils.data.Dataset):
    def __init__(self, n_labels: int = 4, per_label: int = 4):
        g = torch.Generator().manual_seed(0)
        self.labels = [i // per_label for i in range(n_labels * per_label)]
        self.x = torch.randn(len(self.labels), 12, generator=g) + torch.tensor(self.labels)[:, None].float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i], i


class _Contrastive(torch.nn.Module):
    def forward(self, emb, labels):
        d = torch.cdist(emb, emb)
        same = labels[:, None] == labels[None]
        return d[same].pow(2).mean() + torch.relu(1 - d[~same]).pow(2).mean()


def _fit(out: Path, dim: int = 8, **config) -> dict:
    model, _ = _tiny(dim)
    base = dict(epochs=1, lr=1e-2, p=2, k=2, seed=0, warmup_steps=1, eval_every=0, device="cpu")
    return fit(
        model, _Contrastive(), _Data(), None, TrainConfig(**{**base, **config}), out, resume="auto", progress=False
    )


def test_fit_refuses_a_checkpoint_of_another_model_in_a_few_lines(tmp_path):
    _fit(tmp_path)
    with pytest.raises(CheckpointMismatchError) as err:
        _fit(tmp_path, dim=16)
    text = str(err.value)
    assert str(tmp_path / CHECKPOINT_NAME) in text and "1.weight: (8, 12) -> (16, 12)" in text
    assert "another out_dir" in text and len(text.splitlines()) < 8


def test_fit_refuses_another_configuration_but_resumes_a_longer_run(tmp_path):
    first = _fit(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"config lr: 0.01 -> 0.1"):
        _fit(tmp_path, lr=0.1)
    with pytest.raises(CheckpointMismatchError, match=r"config p: 2 -> 4"):
        _fit(tmp_path, p=4, k=2)
    longer = _fit(tmp_path, epochs=2)  # more epochs (and device, workers, eval cadence) may change
    assert longer["epoch"] == [1, 2] and longer["loss"][0] == first["loss"][0]


def test_finetune_never_monitors_or_reports_val_on_the_test_protocol(tmp_path):
    # In-shop has no validation protocol: "val" used to be the test query/gallery (final_val == final_test)
    synthetic.make_inshop(tmp_path, seed=0)
    args = finetune.parse_args(["--dataset", "inshop", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    tables, note = finetune.protocol_tables(args)
    val, test = tables["val"], tables["test"]
    test_eval = set(test.loc[test["split"].isin(["query", "gallery"]), "path"])
    val_eval = set(val.loc[val["split"].isin(["query", "gallery"]), "path"])
    assert len(val_eval) > 0 and len(test_eval) > 0
    assert not val_eval & test_eval  # validation rows are held out of the training rows
    assert val_eval <= set(test.loc[test["split"] == "train", "path"])
    assert not test_eval & set(val.loc[val["split"] == "train", "path"])  # never trained on test rows
    assert "no validation protocol" in note


@pytest.mark.parametrize("p,k", [(2, 1), (1, 2)])
def test_fit_refuses_batches_that_give_a_pair_loss_nothing_to_learn(tmp_path, p, k):
    # k=1 (or p=1): multi-similarity / triplet losses are exactly 0 with zero gradient at every step
    from fashlib import losses

    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    labels = torch.arange(4) if k == 1 else torch.zeros(4, dtype=torch.long)
    assert float(losses.create("multi_similarity")(emb, labels)) == 0.0
    with pytest.raises(ValueError, match=rf"p={p}, k={k}: .*needs at least 2 labels"):
        _fit(tmp_path, p=p, k=k)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_proxy_losses_may_train_on_one_image_per_label():
    from fashlib import losses
    from fashlib.train import check_batch_shape

    check_batch_shape(losses.create("proxy_anchor", num_classes=4, embedding_dim=8), p=4, k=1)  # no error
    with pytest.raises(ValueError, match="proxy loss"):
        check_batch_shape(losses.create("multi_similarity"), p=4, k=1)


@pytest.mark.parametrize(
    "option,value",
    [("--k", "1"), ("--p", "1"), ("--epochs", "0"), ("--lr", "nan"), ("--lr", "-1e-4"), ("--max-images", "0")],
)
def test_finetune_refuses_values_that_cannot_make_a_run_before_claiming_a_folder(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        finetune.parse_args(["--out", str(out), f"{option}={value}"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert f"{option} {float(value) if option == '--lr' else value}: must be" in message
    assert not out.exists()


def test_the_order_of_final_protocols_does_not_make_another_run():
    # "--final test val" was refused by the folder of "--final val test" (final: [...] -> [...]), and
    # "--final test test" evaluated twice
    a = finetune.parse_args(["--final", "val", "test"])
    b = finetune.parse_args(["--final", "test", "val", "test"])
    assert b.final == ["val", "test"] and a.out == b.out
    assert finetune.parse_args(["--final", "test", "test"]).final == ["test"]

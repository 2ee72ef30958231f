"""fashlib.index on a generated catalogue: build, query, update, model mismatch, corruption, the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from catalogue_photos import make_catalogue, photo
from PIL import Image

from fashlib import index as ci
from fashlib import index_cli, saved_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread) -> Path:
    """Frozen Lite0 ImageNet features (offline weights) at 96 px, saved as a model folder."""
    model = saved_model.features_embedder("tf_efficientnet_lite0", image_size=96)
    return saved_model.save_embedder(model, tmp_path_factory.mktemp("model") / "lite0-96")


@pytest.fixture()
def catalogue(tmp_path) -> Path:
    return make_catalogue(tmp_path / "catalogue")


def test_build_lists_skipped_files_and_finds_each_photo(catalogue, model_dir, tmp_path):
    idx = ci.build(catalogue, model_dir, tmp_path / "idx", progress=False)
    assert len(idx) == 12 and idx.manifest["index"]["type"] == "flat"
    assert {s["path"] for s in idx.manifest["skipped"]} == {"broken.jpg", "notes.txt"}
    assert all(not Path(p).is_absolute() for p in idx.paths) and "sub/p01.png" in idx.paths
    assert idx.manifest["model"]["digest"] == saved_model.load_embedder(model_dir).digest()
    photos = [catalogue / p for p in idx.paths]
    flipped = [Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos]
    for hits, path in zip(idx.query(photos, k=3), idx.paths):
        assert hits[0]["path"] == path and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    firsts = [hits[0]["path"] for hits in ci.open_index(tmp_path / "idx").query(flipped, k=1)]
    assert firsts == idx.paths  # a mirrored photo finds its original first


def test_update_embeds_only_new_and_changed_files(catalogue, model_dir, tmp_path):
    out = tmp_path / "idx"
    before = ci.build(catalogue, model_dir, out, progress=False)
    (catalogue / "p00.jpg").unlink()
    photo(50).save(catalogue / "sub" / "new.webp")
    photo(60).save(catalogue / "p02.webp")  # same name, new content
    idx, report = ci.update(out, progress=False)
    assert report == {"added": 1, "changed": 1, "removed": 1, "unchanged": 10, "skipped": 2}
    assert idx.manifest["last_run"]["embedded"] == 2
    assert "p00.jpg" not in idx.paths and "sub/new.webp" in idx.paths
    kept = before.paths.index("p04.jpg")
    np.testing.assert_array_equal(idx.embeddings[idx.paths.index("p04.jpg")], before.embeddings[kept])
    assert idx.query([catalogue / "p02.webp"], k=1)[0][0]["path"] == "p02.webp"
    assert len(list(out.glob("embeddings-*.npy"))) == 1  # the previous version's files are gone
    _, again = ci.update(out, progress=False)
    assert again["added"] == again["changed"] == again["removed"] == 0


def test_a_photo_that_became_unreadable_is_counted_as_removed(catalogue, model_dir, tmp_path):
    out = tmp_path / "idx"
    ci.build(catalogue, model_dir, out, progress=False)
    (catalogue / "p04.jpg").write_bytes(b"not a jpeg any more")
    idx, report = ci.update(out, progress=False)
    assert report["removed"] == 1 and report["changed"] == 0 and "p04.jpg" not in idx.paths
    assert "p04.jpg" in {s["path"] for s in idx.manifest["skipped"]}


def test_another_model_is_refused(catalogue, model_dir, tmp_path):
    ci.build(catalogue, model_dir, tmp_path / "idx", progress=False)
    other = saved_model.save_embedder(
        saved_model.features_embedder("resnet10t", pretrained=False, image_size=64), tmp_path / "other"
    )
    with pytest.raises(ci.ModelMismatchError, match="built with another model.*rebuild it: python3 -m fashlib"):
        ci.open_index(tmp_path / "idx", other)
    with pytest.raises(ci.ModelMismatchError):
        ci.update(tmp_path / "idx", other, progress=False)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete"])
def test_corrupt_index_files_are_detected(catalogue, model_dir, tmp_path, damage):
    out = tmp_path / "idx"
    ci.build(catalogue, model_dir, out, progress=False)
    target = next(out.glob("index-*.faiss") if damage != "flip_byte" else out.glob("embeddings-*.npy"))
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    else:
        raw = bytearray(target.read_bytes())
        raw[-5] ^= 0x01
        target.write_bytes(bytes(raw))
    with pytest.raises(ci.CorruptIndexError, match=f"corrupt.*Rebuild it: python3 -m fashlib.index build {catalogue}"):
        ci.open_index(out)


def test_approximate_index_reports_its_recall(catalogue, model_dir, tmp_path):
    idx = ci.build(catalogue, model_dir, tmp_path / "idx", exact_max=4, progress=False)
    info = idx.manifest["index"]
    assert info["type"] == "hnsw" and info["recall_queries"] == 12
    assert info["recall_at_10"] == pytest.approx(1.0)  # 12 photos: HNSW visits them all
    assert ci.open_index(tmp_path / "idx").query([catalogue / "p04.jpg"], k=1)[0][0]["path"] == "p04.jpg"


def test_compressed_index_finds_each_photo_with_its_cosine(catalogue, model_dir, tmp_path):
    ci.build(catalogue, model_dir, tmp_path / "idx", exact_max=4, approx="ivf-sq", progress=False)
    idx = ci.open_index(tmp_path / "idx")
    assert idx.manifest["index"]["options"]["factory"] == "PCA12,IVF1,SQ8"  # 12 photos: 12 directions, 1 cell
    hit = idx.query([catalogue / "p04.jpg"], k=1)[0][0]
    assert hit["path"] == "p04.jpg" and hit["score"] == pytest.approx(1.0, abs=0.02)  # L2 distance -> cosine


def test_compressed_index_is_small_and_its_reported_recall_holds_on_new_queries(one_thread):
    """6,000 unit vectors (128-d, 16-d latent products + photo noise): PCA64,IVF153,SQ8 stores under 128 bytes
    per vector (codes, ids, centroids, PCA matrix) and its recall@10 on new photos matches the one reported."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((128, 16)))[0].astype(np.float32)
    centres = rng.standard_normal((1000, 16)).astype(np.float32)

    def photos(n: int) -> np.ndarray:
        x = (centres[rng.integers(0, 1000, n)] + 0.3 * rng.standard_normal((n, 16))) @ basis.T
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    gallery, queries = photos(6000), photos(300)
    index, info = ci.make_faiss_index(gallery, exact_max=100, approx="ivf-sq")
    assert info["type"] == "ivf-sq" and info["options"]["factory"] == "PCA64,IVF153,SQ8"
    assert info["recall_at_10"] >= 0.95 and info["options"]["nprobe"] < 153
    assert len(faiss.serialize_index(index)) / len(gallery) < 128
    exact = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
    found = index.search(queries, 10)[1]
    recall = np.mean([len(np.intersect1d(a, e)) for a, e in zip(found, exact)]) / 10
    assert recall == pytest.approx(info["recall_at_10"], abs=0.03)


def test_build_from_a_table(catalogue, model_dir, tmp_path):
    paths = sorted(str(p) for p in catalogue.rglob("p0*.jpg"))
    idx = ci.build(pd.DataFrame({"path": paths}), model_dir, tmp_path / "idx", progress=False)
    assert sorted(idx.paths) == sorted(str(Path(p).relative_to(catalogue)) for p in paths)
    assert idx.file_path(0).is_file()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fashlib.index", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_command_line_end_to_end(catalogue, model_dir, tmp_path, capsys):
    out, sheet = tmp_path / "idx", tmp_path / "sheet.html"
    built = run_cli("build", catalogue, "--model", model_dir, "--out", out)
    assert built.returncode == 0, built.stderr
    assert "12 photos" in built.stdout and "skipped 2 files" in built.stdout and "broken.jpg" in built.stdout
    query = catalogue / "sub" / "p03.jpeg"
    table = run_cli("query", out, query, "--k", "3", "--html", sheet)
    assert table.returncode == 0, table.stderr
    first = table.stdout.splitlines()[1].split()
    assert first[1:] == ["1", "1.0000", "sub/p03.jpeg"]
    html = sheet.read_text()
    assert html.count("data:image/jpeg;base64,") == 4 and "http" not in html.replace(str(out), "")
    refused = run_cli("query", out, query, "--model", "tf_efficientnet_lite1")
    assert refused.returncode == 2 and "built with another model" in refused.stderr
    # the same entry point in-process (no interpreter start-up): --json and update
    assert index_cli.main(["query", str(out), str(query), "--k", "2", "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in as_json[0]["results"]][0] == "sub/p03.jpeg" and len(as_json[0]["results"]) == 2
    shutil.copy(catalogue / "p04.jpg", catalogue / "copy.jpg")
    assert index_cli.main(["update", str(out)]) == 0
    assert "added 1, changed 0, removed 0" in capsys.readouterr().out


def test_help_documents_every_option():
    sub = index_cli.parser()._subparsers._group_actions[0].choices
    for name, command in sub.items():
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"
                assert action.option_strings[0] in text


def test_update_sees_a_photo_replaced_with_the_same_size_and_time(catalogue, model_dir, tmp_path):
    """Size and mtime are not enough: a restored backup or `cp -p` keeps both; the content hash decides."""
    out = tmp_path / "idx"
    ci.build(catalogue, model_dir, out, progress=False)
    other, target = sorted([catalogue / "p00.jpg", catalogue / "p04.jpg"], key=lambda p: p.stat().st_size)
    st, raw = target.stat(), other.read_bytes()
    assert len(raw) < st.st_size  # pad the smaller JPEG to the larger one's size (bytes after EOI are ignored)
    target.write_bytes(raw + b"\0" * (st.st_size - len(raw)))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    idx, report = ci.update(out, progress=False)
    assert report["changed"] == 1 and report["unchanged"] == 11
    hits = idx.query([other], k=2)[0]
    assert {h["path"] for h in hits} == {other.name, target.name}
    assert hits[1]["score"] == pytest.approx(1.0, abs=1e-4)  # the replaced photo's new content, not its old one
    assert all(len(f["sha256"]) == 64 for f in idx.manifest["files"])


def test_hand_edited_manifest_is_detected(catalogue, model_dir, tmp_path):
    out = tmp_path / "idx"
    ci.build(catalogue, model_dir, out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    files = manifest["files"]
    files[0]["path"], files[1]["path"] = files[1]["path"], files[0]["path"]  # rows would name the wrong photos
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(ci.CorruptIndexError, match="manifest.json was edited.*Rebuild it: python3 -m fashlib"):
        ci.open_index(out)
    (out / "manifest.json").write_text(json.dumps({"format": "fashlib-index", "format_version": ci.FORMAT_VERSION}))
    with pytest.raises(ci.CorruptIndexError, match="was edited or damaged"):
        ci.open_index(out)
    manifest["format_version"] = 1  # written before per-file hashes: rebuilt, not half-trusted
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ci.CatalogueIndexError, match="format version 1, this fashlib reads version 2; rebuild it"):
        ci.open_index(out)


def test_links_out_of_the_catalogue_are_skipped_and_loops_ignored(catalogue, model_dir, tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes((catalogue / "p00.jpg").read_bytes())
    (catalogue / "link.jpg").symlink_to(outside)
    (catalogue / "passwd.jpg").symlink_to("/etc/passwd")
    (catalogue / "inside.jpg").symlink_to(catalogue / "p04.jpg")
    (catalogue / "sub" / "loop").symlink_to(catalogue)
    idx = ci.build(catalogue, model_dir, tmp_path / "idx", progress=False)
    assert "inside.jpg" in idx.paths and "link.jpg" not in idx.paths and "passwd.jpg" not in idx.paths
    reasons = {s["path"]: s["reason"] for s in idx.manifest["skipped"]}
    assert "outside the catalogue folder" in reasons["link.jpg"] and "outside" in reasons["passwd.jpg"]
    assert not any(p.startswith("sub/loop") for p in idx.paths)
    assert "linked folder, not followed" in reasons["sub/loop/"]  # said, not silently left out
    assert idx.query([outside], k=1)[0][0]["path"] == "p00.jpg"


def test_k_must_be_positive(catalogue, model_dir, tmp_path, capsys):
    out = tmp_path / "idx"
    idx = ci.build(catalogue, model_dir, out, progress=False)
    for k in (0, -3):
        with pytest.raises(ValueError, match=f"k must be a positive number of results, got {k}"):
            idx.query([catalogue / "p00.jpg"], k=k)
    with pytest.raises(SystemExit):
        index_cli.main(["query", str(out), str(catalogue / "p00.jpg"), "--k", "0"])
    assert "--k: must be at least 1, got 0" in capsys.readouterr().err
    assert len(idx.query([catalogue / "p00.jpg"], k=500)[0]) == 12  # more than the catalogue: all of it


def test_update_after_the_catalogue_moved(catalogue, model_dir, tmp_path, capsys):
    out = tmp_path / "idx"
    ci.build(catalogue, model_dir, out, progress=False)
    moved = catalogue.rename(tmp_path / "moved")
    with pytest.raises(ci.CatalogueIndexError, match=f"no longer exists.*update {out} --source NEW_PLACE"):
        ci.update(out, progress=False)
    assert index_cli.main(["update", str(out), "--source", str(moved)]) == 0
    assert "added 0, changed 0, removed 0, unchanged 12" in capsys.readouterr().out
    idx = ci.open_index(out)
    assert idx.root == moved.resolve() and idx.file_path(0).is_file()


def test_empty_folder_is_said(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert (
        index_cli.main(["build", str(tmp_path / "empty"), "--model", str(model_dir), "--out", str(tmp_path / "idx")])
        == 0
    )
    assert "warning: no photo of" in capsys.readouterr().out
    with pytest.raises(ci.CatalogueIndexError, match="is empty"):
        ci.open_index(tmp_path / "idx").query([photo(1)], k=1)


def test_results_changed_since_indexing_are_flagged(catalogue, model_dir, tmp_path, capsys):
    """Before update, a result whose file changed shows the new photo with the old photo's score: say so."""
    out, sheet = tmp_path / "idx", tmp_path / "sheet.html"
    ci.build(catalogue, model_dir, out, progress=False)
    query = tmp_path / "query.jpg"
    shutil.copy(catalogue / "p04.jpg", query)
    photo(77).save(catalogue / "p04.jpg", quality=95)  # replaced, index not updated
    (catalogue / "p00.jpg").unlink()  # deleted, index not updated
    hits = ci.open_index(out).query([query], k=12)[0]
    stale = {h["path"] for h in hits if h["stale"]}
    assert hits[0]["path"] == "p04.jpg" and stale == {"p04.jpg", "p00.jpg"}
    assert index_cli.main(["query", str(out), str(query), "--k", "12", "--html", str(sheet)]) == 0
    captured = capsys.readouterr()
    assert "p04.jpg  (changed since indexed: run update)" in captured.out
    assert "2 results changed or were deleted since the index was built" in captured.err
    html = sheet.read_text()
    assert "p00.jpg (changed since indexed" in html and "(file unreadable)" in html  # no crash on the deleted one
    _, report = ci.update(out, progress=False)
    assert report["changed"] == 1 and report["removed"] == 1
    assert not any(h["stale"] for h in ci.open_index(out).query([query], k=11)[0])


def test_moved_model_folder_is_named(catalogue, model_dir, tmp_path):
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    ci.build(catalogue, model, tmp_path / "idx", progress=False)
    moved = model.rename(tmp_path / "moved-model")
    with pytest.raises(ci.CatalogueIndexError, match=f"saved model {model} this index was built with is gone.*--model"):
        ci.open_index(tmp_path / "idx").query([catalogue / "p00.jpg"], k=1)
    assert ci.open_index(tmp_path / "idx", moved).query([catalogue / "p00.jpg"], k=1)[0][0]["path"] == "p00.jpg"


def test_an_index_kept_inside_its_catalogue_is_not_catalogued(catalogue, model_dir):
    out = catalogue / "index"
    idx = ci.build(catalogue, model_dir, out, progress=False)
    (out / "sheet.jpg").write_bytes((catalogue / "p00.jpg").read_bytes())  # e.g. a saved result next to it
    idx, report = ci.update(out, progress=False)
    assert report == {"added": 0, "changed": 0, "removed": 0, "unchanged": 12, "skipped": 2}
    assert not any(p.startswith("index/") for p in idx.paths + [s["path"] for s in idx.manifest["skipped"]])


def test_engine_path_embeds_as_pytorch_and_skips_the_same_files(catalogue, model_dir, monkeypatch):
    pytest.importorskip("onnxruntime")
    model = saved_model.load_embedder(model_dir)
    paths = sorted(str(p.relative_to(catalogue)) for p in catalogue.rglob("*") if p.is_file())
    slow = ci.embed_files(model, catalogue, paths, batch_size=5, progress=False, engine="torch")
    monkeypatch.setattr(ci, "ENGINE_MIN_PHOTOS", 1)
    made = []
    real = type(model).engines

    def spy(self, engine="auto", **kw):
        made.append(engine)
        return real(self, engine, **kw)

    monkeypatch.setattr(type(model), "engines", spy)
    fast = ci.embed_files(model, catalogue, paths, batch_size=5, progress=False, engine="onnx")
    assert made == ["onnx"]
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-4)
    assert fast[1] == slow[1] and fast[2] == slow[2]  # same manifest entries and skipped files, same order
    assert {s["path"] for s in fast[2]} >= {"broken.jpg"}

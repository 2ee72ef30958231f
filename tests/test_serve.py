"""The local search page: upload limits, path checks (Flask test client) and one search in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import socket
import threading

import pytest
from catalogue_photos import make_catalogue, photo

from fashlib import index as ci
from fashlib import saved_model
from fashlib.serve import create_app

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("serve")
    catalogue = make_catalogue(root / "catalogue")
    (root / "secret.jpg").write_bytes((catalogue / "p00.jpg").read_bytes())  # outside the catalogue folder
    embedder = saved_model.features_embedder("tf_efficientnet_lite0", image_size=96)
    model = saved_model.save_embedder(embedder, root / "model")
    ci.build(catalogue, model, root / "idx", progress=False)
    return root, catalogue


@pytest.fixture()
def client(built):
    root, _ = built
    app = create_app(ci.open_index(root / "idx"), k=3, max_upload_mb=0.05)
    return app.test_client()


def jpeg(i: int) -> bytes:
    out = io.BytesIO()
    photo(i).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_page_works_offline(client):
    page = client.get("/").get_data(as_text=True)
    assert 'type="file"' in page and "<style>" in page and "<script>" in page
    assert "http://" not in page and "https://" not in page  # no CDN, nothing from the network


def test_upload_finds_the_photo(client, built):
    _, catalogue = built
    data = {"photo": (io.BytesIO((catalogue / "sub" / "p03.jpeg").read_bytes()), "mine.jpg")}
    response = client.post("/search?format=json", data=data, content_type="multipart/form-data")
    results = json.loads(response.get_data())["results"]
    assert response.status_code == 200 and results[0]["path"] == "sub/p03.jpeg" and len(results) == 3
    page = client.post("/search", data={"photo": (io.BytesIO(jpeg(5)), "x.jpg")}, content_type="multipart/form-data")
    assert page.status_code == 200 and 'src="/thumb/' in page.get_data(as_text=True)


def test_not_an_image_and_too_large(client):
    bad = client.post(
        "/search", data={"photo": (io.BytesIO(b"%PDF-1.4 hello"), "doc.pdf")}, content_type="multipart/form-data"
    )
    assert bad.status_code == 400 and "is not an image" in bad.get_data(as_text=True)
    empty = client.post("/search", data={}, content_type="multipart/form-data")
    assert empty.status_code == 400 and "No photo received" in empty.get_data(as_text=True)
    big = client.post(
        "/search", data={"photo": (io.BytesIO(b"\xff" * 80_000), "big.jpg")}, content_type="multipart/form-data"
    )
    assert big.status_code == 413 and "larger than the limit of 0.05 MB" in big.get_data(as_text=True)


def test_no_path_outside_the_catalogue_can_be_read(client, built):
    root, _ = built
    assert client.get("/thumb/0").status_code == 200
    assert client.get("/thumb/0").mimetype == "image/jpeg"
    for url in (
        "/thumb/999",
        "/thumb/-1",
        "/thumb/../../secret.jpg",
        "/thumb/..%2F..%2Fsecret.jpg",
        "/thumb/%2e%2e/secret.jpg",
        "/../secret.jpg",
        "/secret.jpg",
        "/static/../secret.jpg",
        "/thumb/0/../../secret.jpg",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
    index = ci.open_index(root / "idx")
    index.manifest["files"][0]["path"] = "../secret.jpg"  # a tampered manifest must not open a way out
    tampered = create_app(index, k=3).test_client()
    assert tampered.get("/thumb/0").status_code == 403
    index.manifest["files"][0]["path"] = str(root / "secret.jpg")  # an absolute path neither
    assert tampered.get("/thumb/0").status_code == 403


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_in_headless_chromium(built, tmp_path):
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_exe = shutil.which("chromedriver")
    if chromium is None or driver_exe is None:
        message = "headless Chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium") if not IN_CI else None
    if webdriver is None:  # under CI a missing selenium is a failure, not a skip
        from selenium import webdriver
    from selenium.webdriver.common.by import By
    from werkzeug.serving import make_server

    root, catalogue = built
    server = make_server("127.0.0.1", free_port(), create_app(ci.open_index(root / "idx"), k=3), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    browser = webdriver.Chrome(service=Service(driver_exe), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        upload = tmp_path / "upload.png"
        photo(6).transpose(0).save(upload)  # the mirror image of catalogue photo p06
        browser.find_element(By.ID, "photo").send_keys(str(upload))  # choosing a file submits the form
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results figure"))
        captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]
        assert captions[0].startswith("your photo") and captions[1].endswith("p06.webp"), captions
        first = browser.find_elements(By.CSS_SELECTOR, "#results figure img")[1]
        assert browser.execute_script("return arguments[0].naturalWidth", first) > 0  # the thumbnail loaded
    finally:
        browser.quit()
        server.shutdown()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels (no pixel data: a decompression bomb's first bytes)."""
    import struct
    import zlib

    out = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (1, 1)).save(out, format="PNG")
    raw = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(raw)


def test_decompression_bomb_is_refused_before_decoding(built):
    root, _ = built
    app = create_app(ci.open_index(root / "idx"), k=3, max_upload_mb=1)
    bomb = png_header_claiming(10_000, 9_000)  # 90 MP: under PIL's own error limit (2 x 89 MP), 150 bytes
    response = app.test_client().post(
        "/search", data={"photo": (io.BytesIO(bomb), "bomb.png")}, content_type="multipart/form-data"
    )
    assert response.status_code == 413
    assert "10000 x 9000 pixels, more than the limit of 64 megapixels" in response.get_data(as_text=True)


def test_a_thin_strip_is_refused_before_it_is_blown_up(built):
    from PIL import Image

    root, _ = built
    app = create_app(ci.open_index(root / "idx"), k=3)
    out = io.BytesIO()
    Image.new("RGB", (2000, 1), (200, 30, 30)).save(out, format="PNG")  # a few hundred bytes, ~500 MB resized
    response = app.test_client().post(
        "/search", data={"photo": (io.BytesIO(out.getvalue()), "strip.png")}, content_type="multipart/form-data"
    )
    assert response.status_code == 413
    assert "2000 x 1 pixels: one side is more than 20 times the other" in response.get_data(as_text=True)


def test_uploaded_phone_photo_is_shown_and_searched_upright(client, built):
    """A photo stored sideways with an EXIF orientation tag is seen as displayed (as the catalogue photos are)."""
    import base64
    import re

    from PIL import Image

    _, catalogue = built
    exif = Image.Exif()
    exif[0x0112] = 6  # display: rotate 90 degrees clockwise
    out = io.BytesIO()
    Image.open(catalogue / "sub" / "p03.jpeg").transpose(Image.Transpose.ROTATE_90).save(
        out, format="PNG", exif=exif
    )  # lossless: the upright pixels are exactly the catalogue photo's
    page = client.post(
        "/search", data={"photo": (io.BytesIO(out.getvalue()), "phone.png")}, content_type="multipart/form-data"
    ).get_data(as_text=True)
    shown = re.search(r'src="data:image/jpeg;base64,([^"]+)"', page).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(shown))).size == (96, 80)  # landscape, as p03 is displayed
    hits = client.post(
        "/search?format=json",
        data={"photo": (io.BytesIO(out.getvalue()), "phone.png")},
        content_type="multipart/form-data",
    ).get_json()["results"]
    assert hits[0]["path"] == "sub/p03.jpeg" and hits[0]["score"] > 0.99

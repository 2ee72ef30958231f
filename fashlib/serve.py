"""A local web page to search a catalogue index by photo (Flask), and the self-contained HTML contact sheet.

`create_app(index)` serves, on 127.0.0.1 by default (`python3 -m fashlib.index serve INDEX`):
    GET  /                the page: choose or drop a photo (inline CSS and JS, nothing from the network)
    POST /search          multipart field "photo" -> the page with the top-k catalogue photos and their scores
                          (JSON with ?format=json); 400 with a message for a file that is not an image,
                          413 for an upload above `max_upload_mb`
    GET  /thumb/<id>      a JPEG thumbnail of catalogue photo <id> (an integer row of the index; no path is
                          ever taken from the request, and a manifest path resolving outside the catalogue
                          folder is refused with 403)
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

THUMB_SIZE = 256
# largest upload decoded, in pixels (read from the header before decoding): 64 MP covers phone photos, while a
# small PNG of 150 MP (under PIL's own bomb limit of 2 x 89 MP) would cost ~0.5 GB and seconds of CPU per request
MAX_UPLOAD_PIXELS = 64_000_000
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem} .drop{border:2px dashed #888;border-radius:8px;padding:1.5rem;text-align:center;background:#fff}
.drop.over{border-color:#06c;background:#eef5ff} .grid{display:flex;flex-wrap:wrap;gap:.8rem;margin-top:1rem}
figure{margin:0;width:170px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem}
figure img{width:160px;height:160px;object-fit:contain;display:block;margin:auto}
figcaption{font-size:.75rem;word-break:break-all} .error{color:#b00020;font-weight:bold} .query{border-color:#06c}
"""
SCRIPT = """
const zone=document.getElementById('drop'), input=document.getElementById('photo'),
  form=document.getElementById('form');
['dragenter','dragover'].forEach(e=>zone.addEventListener(e,ev=>{ev.preventDefault();zone.classList.add('over');}));
['dragleave','drop'].forEach(e=>zone.addEventListener(e,ev=>{ev.preventDefault();zone.classList.remove('over');}));
zone.addEventListener('drop',ev=>{if(ev.dataTransfer.files.length){input.files=ev.dataTransfer.files;form.submit();}});
input.addEventListener('change',()=>{if(input.files.length){form.submit();}});
"""


def thumbnail_jpeg(image: Image.Image | Any, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of an image (PIL or path) fitted into size x size."""
    from .saved_model import open_rgb

    img = open_rgb(image)
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def figure(src: str, caption: str, cls: str = "") -> str:
    """An HTML figure: the image at `src` (none when empty) above its caption, both escaped."""
    img = f'<img src="{html.escape(src)}" alt="{html.escape(caption)}">' if src else ""
    return f'<figure class="{cls}">{img}<figcaption>{html.escape(caption)}</figcaption></figure>'


def page(title: str, body: str, script: str = "") -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}{f'<script>{script}</script>' if script else ''}</body></html>"
    )


STALE_NOTE = " (changed since indexed: the score is the old photo's; run update)"


def _result_figure(index: Any, hit: dict) -> str:
    """A contact-sheet cell: the result's thumbnail inlined, or its caption alone when the file is unreadable."""
    caption = f"#{hit['rank']} {hit['score']:.3f} {hit['path']}" + (STALE_NOTE if hit.get("stale") else "")
    try:
        return figure(data_uri(thumbnail_jpeg(index.file_path(hit["id"]))), caption)
    except OSError:  # deleted since indexed, or a path outside the catalogue (PermissionError)
        return figure("", caption + " (file unreadable)")


def contact_sheet(index: Any, photos: Sequence[str], results: Sequence[Sequence[dict]]) -> str:
    """Self-contained HTML (thumbnails inlined as base64) of each query photo followed by its results."""
    rows = []
    for photo, hits in zip(photos, results):
        cells = [figure(data_uri(thumbnail_jpeg(photo)), f"query: {photo}", "query")]
        cells += [_result_figure(index, h) for h in hits]
        rows.append(f'<div class="grid">{"".join(cells)}</div>')
    return page("fashlib: query results", f"<h1>Query results ({html.escape(str(index.folder))})</h1>" + "".join(rows))


def _form(k: int) -> str:
    return (
        '<form id="form" method="post" action="/search" enctype="multipart/form-data">'
        '<div class="drop" id="drop"><p>Drop a photo here, or choose one:</p>'
        '<input type="file" id="photo" name="photo" accept="image/*"> '
        f'<button type="submit" id="go">Search the top {k}</button></div></form>'
    )


class _Refused(Exception):
    """An upload the search page refuses: the HTTP status and the sentence shown to the user."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


MAX_ASPECT = 20  # longer / shorter side of an upload: a 2000 x 1 PNG of a few bytes would need ~500 MB to resize


def _decode_upload(upload: Any, max_pixels: int) -> Image.Image:
    """The uploaded photo in RGB (EXIF orientation, transparency on white), as the catalogue photos are read.

    `upload` is the werkzeug FileStorage of the form field "photo", or None. Raises _Refused(400) when no file
    was sent or PIL cannot read it, _Refused(413) above `max_pixels` (width x height, from the header, before
    any decoding: decompression bombs) or when one side exceeds MAX_ASPECT times the other (the evaluation
    transform scales the shorter side up to the model's input size, so a thin strip would need gigabytes)."""
    from .saved_model import open_rgb

    if upload is None or upload.filename == "":
        raise _Refused(400, "No photo received: choose an image file (JPEG, PNG or WebP).")
    not_image = f"{upload.filename!r} is not an image this server can read (JPEG, PNG or WebP)."
    try:
        image = Image.open(io.BytesIO(upload.read()))
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is "not an image"
        raise _Refused(400, not_image) from None
    if image.width * image.height > max_pixels:
        raise _Refused(
            413,
            f"{upload.filename!r} is {image.width} x {image.height} pixels, more than the limit "
            f"of {max_pixels / 1e6:g} megapixels; choose a smaller photo.",
        )
    if max(image.size) > MAX_ASPECT * max(1, min(image.size)):  # the shorter side is scaled up to the model's size
        raise _Refused(
            413,
            f"{upload.filename!r} is {image.width} x {image.height} pixels: one side is more than {MAX_ASPECT} "
            "times the other, and resizing its shorter side for the model would blow it up; choose a photo.",
        )
    try:
        image.load()
        return open_rgb(image)  # EXIF orientation, transparency on white: as the catalogue photos
    except Exception:  # noqa: BLE001 - anything PIL cannot decode is "not an image"
        raise _Refused(400, not_image) from None


def _results_grid(image: Image.Image, filename: str, results: Sequence[dict]) -> str:
    """HTML grid of the query photo (inlined) followed by its top-k results (thumbnails served by /thumb/<id>)."""
    cells = [figure(data_uri(thumbnail_jpeg(image)), f"your photo: {filename}", "query")]
    cells += [
        figure(f"/thumb/{r['id']}", f"#{r['rank']} {r['score']:.3f} {r['path']}" + (STALE_NOTE if r["stale"] else ""))
        for r in results
    ]
    return f'<div class="grid" id="results">{"".join(cells)}</div>'


def _thumb_response(index: Any, item: int) -> Any:
    """The JPEG thumbnail of catalogue row `item`: 404 for no such row or an unreadable file, 403 for a manifest
    path resolving outside the catalogue folder."""
    from flask import Response, abort

    try:
        path = index.file_path(item)
    except IndexError:
        abort(404)
    except PermissionError:
        abort(403)
    try:
        return Response(thumbnail_jpeg(path), mimetype="image/jpeg")
    except OSError:
        abort(404)


def create_app(index: Any, k: int = 10, max_upload_mb: float = 10.0, max_pixels: int = MAX_UPLOAD_PIXELS):
    """Flask app over an opened CatalogueIndex (fashlib.index.open_index); see the module docstring.

    Uploads above `max_upload_mb` megabytes or `max_pixels` pixels (width x height, read from the header before
    any decoding: decompression bombs) are refused with 413 and a message.
    """
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import RequestEntityTooLarge

    from .index import CatalogueIndexError

    app = Flask("fashlib.serve")
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    model = index.require_model()
    header = (
        f"<h1>Search the catalogue by photo</h1><p>{len(index)} photos in {html.escape(str(index.root))}; "
        f"model: {html.escape(model.describe())}</p>"
    )

    def message(status: int, text: str):
        if request.args.get("format") == "json":
            return jsonify(error=text), status
        return Response(
            page("fashlib search", header + _form(k) + f'<p class="error" id="error">{html.escape(text)}</p>', SCRIPT),
            status=status,
            mimetype="text/html",
        )

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_err):
        return message(413, f"The upload is larger than the limit of {max_upload_mb:g} MB; choose a smaller photo.")

    @app.get("/")
    def home():
        return Response(page("fashlib search", header + _form(k), SCRIPT), mimetype="text/html")

    @app.post("/search")
    def search():
        upload = request.files.get("photo")
        try:
            image = _decode_upload(upload, max_pixels)
        except _Refused as refused:
            return message(refused.status, refused.text)
        try:
            results = index.query([image], k=k)[0]
        except CatalogueIndexError as err:  # e.g. an empty index: say so, not "not an image"
            return message(500, str(err))
        if request.args.get("format") == "json":
            return jsonify(results=results)
        grid = _results_grid(image, upload.filename, results)
        return Response(page("fashlib search results", header + _form(k) + grid, SCRIPT), mimetype="text/html")

    @app.get("/thumb/<int:item>")
    def thumb(item: int):
        return _thumb_response(index, item)

    return app

"""A small web demo: upload an image, type class names, get an overlay (standard library only).

``tag2mask serve`` starts it. The page posts a form to ``/segment`` and shows the image and its
overlay; ``/api/segment`` answers the same request with JSON (a base64 palette PNG, class names,
classes present). Open-vocabulary methods only (no labels needed). The model loads once; a
segmenter is cached per (classes, method, mode).
"""

from __future__ import annotations

import base64
import html
import io
import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tag2mask.data.images import to_rgb

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 16_000_000
METHODS = ("naclip", "sclip", "clearclip", "maskclip")
DEFAULT_CLASSES = "star, ring, cross, heart; background: grass, water, sky, sand"

_PAGE = """<!DOCTYPE html><html><head><meta charset='utf-8'><title>tag2mask</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}img{{max-width:100%}}
.row{{display:flex;gap:1em}}.row div{{flex:1}}.err{{color:#b00}}label{{display:block;margin:.5em 0}}</style>
</head><body><h1>tag2mask: segment an image with class names</h1>
<form method='post' action='/segment' enctype='multipart/form-data'>
<label>Image <input type='file' name='image' accept='image/*' required></label>
<label>Classes <input type='text' name='classes' size='80' value='{classes}'></label>
<label>Method <select name='method'>{methods}</select>
 Mode <select name='mode'><option>whole</option><option>slide</option></select></label>
<button type='submit'>Segment</button></form>{body}
<p>Model: {model}. Classes: comma-separated, synonyms with <code>|</code>, background words after
<code>; background:</code>.</p></body></html>"""


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and this message."""


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Form fields of a ``multipart/form-data`` body: text fields as str, files as bytes."""
    if not content_type.startswith("multipart/form-data"):
        raise RequestError("expected a multipart/form-data form (fields 'image', 'classes', 'method')")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        fields[name] = payload if part.get_filename() is not None else payload.decode("utf-8", "replace")
    return fields


def decode_upload(data: bytes) -> Image.Image:
    """Uploaded bytes -> RGB image, with the library's decoding policy (EXIF applied)."""
    if not data:
        raise RequestError("no image was uploaded")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise RequestError(f"image is {img.width}x{img.height}; at most {MAX_IMAGE_PIXELS:,} pixels are accepted")
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(f"the upload is not a readable image ({e})") from e
    return to_rgb(ImageOps.exif_transpose(img))


class SegmentService:
    """Holds the model and a cache of segmenters; thread-safe (one request computes at a time)."""

    def __init__(self, model, description: str):
        self.model = model
        self.description = description
        self._cache: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()

    def segmenter(self, classes: str, method: str, mode: str):
        from tag2mask.methods.ovss.segmenter import OpenVocabSegmenter

        if method not in METHODS:
            raise RequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if mode not in ("whole", "slide"):
            raise RequestError(f"unknown mode {mode!r}; choose whole or slide")
        if not classes.strip():
            raise RequestError("the class list is empty; type e.g. 'cat, dog; background: sky'")
        key = (classes.strip(), method, mode)
        if key not in self._cache:
            try:
                self._cache[key] = OpenVocabSegmenter(self.model, classes, method, mode=mode, short_side=448)
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise RequestError(f"bad class list: {e}") from e
            if len(self._cache) > 16:  # keep memory bounded: forget the oldest vocabulary
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def segment(self, fields: dict[str, Any]) -> tuple[Image.Image, Any]:
        image = decode_upload(fields.get("image") or b"")
        seg = self.segmenter(str(fields.get("classes", "")), str(fields.get("method", "naclip")), str(fields.get("mode", "whole")))
        with self._lock:
            return image, seg.predict(image)


def _overlay(image: Image.Image, result) -> Image.Image:
    from tag2mask.io.visualize import overlay_image

    label, names = result.label, list(result.class_names)
    if result.has_background:
        names = names[1:]
    else:  # the overlay names label k by names[k - 1]; shift background-free maps by one
        label = (label.astype(np.uint16) + 1).astype(np.uint8)
    return overlay_image(np.asarray(image), label, names)


def make_handler(service: SegmentService) -> Callable[..., BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tag2mask"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the server quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _page(self, body: str = "", classes: str = DEFAULT_CLASSES, method: str = "naclip") -> bytes:
            opts = "".join(f"<option{' selected' if m == method else ''}>{m}</option>" for m in METHODS)
            return _PAGE.format(classes=html.escape(classes, quote=True), methods=opts, body=body,
                                model=html.escape(service.description)).encode()

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path not in ("/", "/index.html"):
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            self._send(HTTPStatus.OK, self._page(), "text/html; charset=utf-8")

        def do_POST(self) -> None:  # noqa: N802
            api = self.path == "/api/segment"
            if self.path not in ("/segment", "/api/segment"):
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            fields: dict[str, Any] = {}
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_UPLOAD_BYTES:
                    raise RequestError(f"upload of {length:,} bytes is larger than {MAX_UPLOAD_BYTES:,}")
                fields = parse_multipart(self.headers.get("Content-Type", ""), self.rfile.read(length))
                image, result = service.segment(fields)
            except RequestError as e:
                if api:
                    self._send(HTTPStatus.BAD_REQUEST, json.dumps({"error": str(e)}).encode(), "application/json")
                else:
                    body = f"<p class='err'>{html.escape(str(e))}</p>"
                    self._send(HTTPStatus.BAD_REQUEST, self._page(body, str(fields.get("classes", DEFAULT_CLASSES))),
                               "text/html; charset=utf-8")
                return
            present = [result.class_names[v] for v in result.present()]
            if api:
                png = io.BytesIO()
                Image.fromarray(result.label).save(png, format="PNG")
                payload = {"label_png": base64.b64encode(png.getvalue()).decode(), "class_names": list(result.class_names),
                           "present": present, "size": [image.height, image.width]}
                self._send(HTTPStatus.OK, json.dumps(payload).encode(), "application/json")
                return
            body = (f"<h2>Result</h2><p>Classes found: {html.escape(', '.join(present) or 'none')}</p>"
                    f"<div class='row'><div><img src='{_data_uri(image)}' alt='image'></div>"
                    f"<div><img src='{_data_uri(_overlay(image, result))}' alt='overlay'></div></div>")
            self._send(HTTPStatus.OK, self._page(body, str(fields.get("classes")), str(fields.get("method"))),
                       "text/html; charset=utf-8")

    return Handler


def make_server(model, host: str = "127.0.0.1", port: int = 7860, description: Optional[str] = None) -> ThreadingHTTPServer:
    """A ready (not yet serving) HTTP server; ``port=0`` picks a free port (``server.server_address``)."""
    service = SegmentService(model, description or getattr(model, "source_path", "CLIP"))
    return ThreadingHTTPServer((host, port), make_handler(service))

"""The web demo answers real HTTP requests on the loopback interface, within limits, and never reads files.

Every request here goes to 127.0.0.1 (servers started by the tests themselves); request loops are
bounded in count and time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tag2mask.cmdline.options import shipped_weights_path

from web_client import multipart, raw_request

SYNTH_CLASSES = "star, ring, cross, heart; background: grass, water, sky"


@pytest.fixture(scope="module")
def model():
    from tag2mask.clip.loading import load_clip

    return load_clip(shipped_weights_path())


class _Running:
    def __init__(self, model, **kwargs):
        from tag2mask.web.server import make_server

        self.server = make_server(model, "127.0.0.1", 0, short_side=224, **kwargs)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def running(model, tmp_path_factory):
    old = os.environ.get("TAG2MASK_CACHE")
    os.environ["TAG2MASK_CACHE"] = str(tmp_path_factory.mktemp("web_cache"))
    srv = _Running(model)
    yield srv
    srv.close()
    if old is None:
        os.environ.pop("TAG2MASK_CACHE", None)
    else:
        os.environ["TAG2MASK_CACHE"] = old


@pytest.fixture(scope="module")
def server_url(running):
    return running.url


def _post(url: str, fields: dict[str, object], headers: dict[str, str] | None = None):
    body, ctype = multipart(fields)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype, **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def _png(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width x height`` (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _scene_png() -> tuple[bytes, np.ndarray]:
    from tag2mask.synth.splits import SyntheticDataset

    scene = SyntheticDataset("test", 1, 224)[0]
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    return buf.getvalue(), scene.mask


def _labels(payload_png: str) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(base64.b64decode(payload_png))) as im:
        return np.asarray(im), im.mode


# ---------------------------------------------------------------------------------------------------
# what works


def test_page_and_json_api(server_url, model):
    with urllib.request.urlopen(server_url + "/", timeout=30) as resp:
        page = resp.read()
        assert resp.status == 200 and b"<form" in page
    # the shipped tiny CLIP is announced, and no server path is shown
    assert b"knows only the synthetic shapes world; pass --weights ViT-B-16.pt for real images" in page
    assert str(shipped_weights_path()).encode() not in page and b"/assets/" not in page
    png, gt = _scene_png()
    status, body, ctype = _post(server_url + "/api/segment", {"image": png, "classes": SYNTH_CLASSES,
                                                              "method": "sclip", "mode": "whole"})
    assert status == 200 and ctype == "application/json"
    payload = json.loads(body)
    label, mode = _labels(payload["label_png"])
    assert mode == "P", "the API promises a palette PNG"
    assert label.shape == gt.shape and payload["class_names"][0] == "background"
    assert set(np.unique(label)) <= set(range(5))
    assert payload["toy_model"] is True and "synthetic shapes" in payload["note"]
    assert [r["method"] for r in payload["results"]] == ["sclip"]
    status, body, ctype = _post(server_url + "/segment", {"image": png, "classes": "star, ring; background: grass",
                                                          "method": "naclip", "mode": "slide"})
    assert status == 200 and ctype.startswith("text/html")
    assert b"<canvas id='overlay-naclip'" in body and b"id='opacity'" in body
    assert body.count(b"class='class-toggle'") == 3  # background, star, ring
    assert b"download='image_naclip_mask.png'" in body and b"BytesIO" not in body


def test_compare_runs_every_method(server_url, running):
    methods = running.server.service.methods  # the methods offered for this model
    png, gt = _scene_png()
    status, body, _ = _post(server_url + "/api/segment", {"image": png, "classes": "star, ring; background: grass",
                                                          "compare": "1"})
    assert status == 200
    payload = json.loads(body)
    assert [r["method"] for r in payload["results"]] == list(methods)
    for r in payload["results"]:
        assert _labels(r["label_png"])[0].shape == gt.shape
    status, page, _ = _post(server_url + "/segment", {"image": png, "classes": "star; background: grass", "compare": "on"})
    assert status == 200 and all(f"id='overlay-{m}'".encode() in page for m in methods)


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (2, 20000)], ids=["1x300", "300x1", "2x20000"])
def test_thin_images_are_segmented(server_url, size):
    h, w = size
    status, body, _ = _post(server_url + "/api/segment", {"image": _png(h, w), "classes": "star, ring; background: grass"})
    assert status == 200, body
    assert _labels(json.loads(body)["label_png"])[0].shape == (h, w)


def test_large_image_is_segmented_at_a_bounded_size(model, tmp_path):
    srv = _Running(model)
    srv.server.service.max_work_pixels = 4096
    try:
        status, body, _ = _post(srv.url + "/api/segment", {"image": _png(100, 160), "classes": "star; background: grass"})
    finally:
        srv.close()
    assert status == 200
    payload = json.loads(body)
    assert payload["size"] == [100, 160] and payload["processed_size"][0] * payload["processed_size"][1] <= 4096
    assert _labels(payload["label_png"])[0].shape == (100, 160)


# ---------------------------------------------------------------------------------------------------
# bad requests: a status and a JSON error (API) or an HTML error (page), never a dropped connection


@pytest.mark.parametrize(
    "fields, status, message",
    [
        ({"image": b"not an image at all", "classes": "cat"}, 400, "not an image"),
        ({"image": b"this is text\n" * 50, "classes": "cat"}, 400, "not an image"),
        ({"image": _png(20, 20)[:60], "classes": "cat"}, 400, "corrupt or truncated"),
        ({"image": b"", "classes": "cat", "method": "naclip"}, 400, "no image"),
        ({"classes": "", "method": "naclip"}, 400, "no image"),
        ({"image": None, "classes": " ", "method": "naclip"}, 400, "class list is empty"),
        ({"image": None, "classes": "cat", "method": "segformer"}, 400, "unknown method"),
        ({"image": None, "classes": "cat", "mode": "tiles"}, 400, "unknown mode"),
        ({"image": _png_claiming(100_000, 100_000), "classes": "cat"}, 413, "at most 16,000,000 pixels"),
        ({"image": _png_claiming(5000, 5000), "classes": "cat"}, 413, "5000x5000"),
        ({"image": None, "classes": "c" * 2001}, 400, "at most 2,000"),
        ({"image": None, "classes": ", ".join(f"class{i}" for i in range(65))}, 400, "at most 64"),
        ({"image": None, "classes": "cat, cat"}, 400, "duplicate"),
        ({"image": None, "classes": "background, cat"}, 400, "reserved"),
    ],
    ids=["garbage", "text_as_image", "truncated_png", "empty_image", "no_image", "empty_classes", "unknown_method",
         "unknown_mode", "bomb_header", "over_pixel_limit", "class_text_too_long", "too_many_classes", "duplicate_class",
         "background_class"],
)
def test_bad_requests_get_clear_errors(server_url, fields, status, message):
    if fields.get("image", 0) is None:
        fields["image"] = _png(16, 16)
    got, body, ctype = _post(server_url + "/api/segment", fields)
    assert got == status and ctype == "application/json"
    error = json.loads(body)["error"]
    assert message in error and "BytesIO" not in error and "Traceback" not in error


def test_long_inline_class_list_is_not_taken_for_a_path(server_url):
    classes = ", ".join(f"a shape with the rather long name number {i}" for i in range(7))
    assert len(classes) > 255  # the CLI and the old server took this for a path: "File name too long"
    status, body, _ = _post(server_url + "/api/segment", {"image": _png(24, 24), "classes": classes})
    assert status == 200, body
    assert len(json.loads(body)["class_names"]) == 7


def test_class_paths_are_never_read(server_url, tmp_path):
    secret = tmp_path / "secret_classes.txt"
    secret.write_text("topsecret_alpha\ntopsecret_beta\n")
    for classes in (str(secret), "/etc/passwd", "~/.bashrc", "../classes.txt", "cls_voc21.txt", "C:\\names.txt"):
        status, body, _ = _post(server_url + "/api/segment", {"image": _png(16, 16), "classes": classes})
        assert status == 400, (classes, body)
        assert b"never reads files" in body and b"topsecret" not in body and b"root:" not in body
    # a preset name is not a path: it is accepted
    status, body, _ = _post(server_url + "/api/segment", {"image": _png(16, 16), "classes": "synth"})
    assert status == 200 and "star" in json.loads(body)["class_names"]


def test_page_errors_are_html(server_url):
    status, body, ctype = _post(server_url + "/segment", {"image": b"\x89PNG garbage", "classes": "<b>cat</b>"})
    assert status == 400 and ctype.startswith("text/html")
    assert b"id='error'" in body and b"<form" in body
    assert b"<b>cat</b>" not in body and b"&lt;b&gt;cat&lt;/b&gt;" in body  # the user's input comes back escaped


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "+5", " ", "99999999999999999999999"],
                         ids=["negative", "text", "exponent", "plus_sign", "blank", "huge"])
def test_bad_content_length(running, length):
    body = b"x" * 200
    req = (f"POST /api/segment HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\nContent-Type: multipart/form-data; "
           f"boundary=b\r\nContent-Length: {length}\r\n\r\n").encode() + body
    status, headers, answer = raw_request(running.port, req)
    assert status in (400, 413) and headers["content-type"] == "application/json"
    assert "Content-Length" in json.loads(answer)["error"] or "at most" in json.loads(answer)["error"]
    if length != "99999999999999999999999":
        assert status == 400


def test_missing_content_length_and_chunked(running):
    head = f"POST /api/segment HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    status, _, answer = raw_request(running.port, (head + "\r\n").encode())
    assert status == 400 and "no Content-Length" in json.loads(answer)["error"]
    status, _, answer = raw_request(running.port, (head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode())
    assert status == 400 and "chunked" in json.loads(answer)["error"]


def test_oversized_upload_gets_413_not_a_reset(running):
    limit = running.server.limits.max_upload_bytes
    body = b"x" * (limit + 1024)
    req = (f"POST /api/segment HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\nContent-Type: multipart/form-data; "
           f"boundary=b\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    status, _, answer = raw_request(running.port, req)
    assert status == 413 and "at most" in json.loads(answer)["error"]


def test_unknown_paths_and_methods(running):
    status, headers, body = raw_request(running.port, f"GET /api/nothing HTTP/1.1\r\nHost: localhost:{running.port}\r\n\r\n".encode())
    assert status == 404 and headers["content-type"] == "application/json" and json.loads(body)["error"]
    status, headers, body = raw_request(running.port, b"GET /etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 404 and headers["content-type"].startswith("text/html") and b"root:" not in body
    status, headers, body = raw_request(running.port, b"DELETE /api/segment HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 405 and headers["allow"] == "POST" and json.loads(body)["error"]
    status, headers, body = raw_request(running.port, b"NONSENSE\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]


# ---------------------------------------------------------------------------------------------------
# DNS rebinding and cross-site requests


def test_host_header_and_origin_checks(running):
    png = _png(16, 16)
    port = running.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}"):
        status, body, _ = _post(running.url + "/api/segment", {"image": png, "classes": "star"}, {"Host": host})
        assert status == 403 and "Host" in json.loads(body)["error"], host
    status, _, _ = raw_request(port, f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode())
    assert status == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        status, _, _ = _post(running.url + "/api/segment", {"image": png, "classes": "star"}, {"Host": host})
        assert status == 200, host
    for headers in ({"Origin": "http://evil.example"}, {"Origin": f"http://localhost:{port + 1}"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        status, body, _ = _post(running.url + "/segment", {"image": png, "classes": "star"}, headers)
        assert status == 403 and b"refused" in body, headers
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Origin": f"http://localhost:{port}", "Sec-Fetch-Site": "same-origin"}):
        status, _, _ = _post(running.url + "/segment", {"image": png, "classes": "star"}, headers)
        assert status == 200, headers


def test_allowed_host_option(model):
    srv = _Running(model, allowed_hosts=["demo.lab.internal"])
    try:
        status, _, _ = raw_request(srv.port, f"GET / HTTP/1.1\r\nHost: demo.lab.internal:{srv.port}\r\n\r\n".encode())
        assert status == 200
        status, _, _ = raw_request(srv.port, f"GET / HTTP/1.1\r\nHost: other.lab.internal:{srv.port}\r\n\r\n".encode())
        assert status == 403
    finally:
        srv.close()


# ---------------------------------------------------------------------------------------------------
# load: parallel clients, slow clients, a full queue


def test_twenty_parallel_requests_all_get_answers(server_url):
    png = _png(32, 32)

    def one(i: int) -> int:
        return _post(server_url + "/api/segment", {"image": png, "classes": "star, ring; background: grass"})[0]

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    assert statuses == [200] * 20


def test_slow_header_clients_are_cut_off(model):
    from tag2mask.web.server import ServerLimits

    srv = _Running(model, limits=ServerLimits(header_timeout_s=1.0, workers=2))
    socks = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never finishes the headers
            socks.append(s)
        start = time.monotonic()
        # a normal client is still served while they hang
        with urllib.request.urlopen(srv.url + "/", timeout=30) as resp:
            assert resp.status == 200
        assert time.monotonic() - start < 1.0, "a normal client waited for the slow ones"
        answers = []
        for s in socks:
            s.settimeout(max(0.1, 10 - (time.monotonic() - start)))
            data = b""
            while True:  # the server answers 408 and closes; recv returns b"" at the end
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            answers.append(data.split(b" ", 2)[1] if data else b"")
        assert time.monotonic() - start < 10, "slow connections were held open"
        assert answers == [b"408"] * 50
    finally:
        for s in socks:
            s.close()
        srv.close()


def test_full_queue_gets_503(model):
    from tag2mask.web.server import ServerLimits

    srv = _Running(model, limits=ServerLimits(workers=1, max_pending=0, request_timeout_s=3.0))
    hog = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        # a complete head, then a body that never comes: holds the only worker until its deadline
        hog.sendall(b"POST /api/segment HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                    b"boundary=b\r\nContent-Length: 1000\r\n\r\n")
        time.sleep(0.3)
        status, headers, body = raw_request(srv.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 503 and "busy" in json.loads(body)["error"] and headers["retry-after"]
        hog.settimeout(10)
        assert hog.recv(100).startswith(b"HTTP/1.0 408"), "the stalled upload is answered at its deadline"
    finally:
        hog.close()
        srv.close()


def test_first_page_shows_a_sample_scene(server_url):
    """`serve` opens on a segmented sample scene, said to be one, not on a bare form."""
    from tag2mask.web.page import FormState

    with urllib.request.urlopen(server_url + "/", timeout=60) as resp:
        page = resp.read()
    assert resp.status == 200 and b"id='sample-note'" in page
    assert f"<canvas id='overlay-{FormState().method}'".encode() in page and b"download='sample_" in page


def test_background_words_without_semicolon(server_url):
    """What `curl -F "classes=star, ring, background: grass"` sends: the same three labels as with ';'."""
    png, _ = _scene_png()
    for classes in ("star, ring, background: grass", "star, ring; background: grass"):
        status, body, _ = _post(server_url + "/api/segment", {"image": png, "classes": classes, "method": "sclip",
                                                              "mode": "whole"})
        assert status == 200
        assert json.loads(body)["class_names"] == ["background", "star", "ring"]

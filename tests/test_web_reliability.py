"""The web server's status codes for odd requests (issue #30): 405 with Allow, bounded multipart, bad Origin.

Requests go to a server on 127.0.0.1 started here; every answer is read completely.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tag2mask.cmdline.options import shipped_weights_path
from tag2mask.web.multipart import MAX_PARTS, MAX_TEXT_FIELD_BYTES, parse_multipart
from tag2mask.web.service import RequestError

from web_client import raw_request


@pytest.fixture(scope="module")
def port():
    from tag2mask.clip.loading import load_clip
    from tag2mask.web.server import make_server

    server = make_server(load_clip(shipped_weights_path()), "127.0.0.1", 0, short_side=224)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _request(port: int, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, dict, bytes]:
    head = (f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n{headers}\r\n")
    return raw_request(port, head.encode("latin-1") + body, timeout=60.0)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
@pytest.mark.parametrize("path", ["/", "/api/segment", "/segment"])
def test_unknown_methods_get_405_json_with_allow(port, method, path):
    status, headers, body = _request(port, method, path)
    assert status == 405, (status, body[:200])
    assert headers["content-type"] == "application/json" and "error" in json.loads(body)
    assert set(headers["allow"].replace(" ", "").split(",")) <= {"GET", "HEAD", "POST"}
    assert "POST" in headers["allow"]


def test_get_on_the_api_is_405_with_allow_post(port):
    status, headers, body = _request(port, "GET", "/api/segment")
    assert status == 405 and headers["allow"] == "POST" and "error" in json.loads(body)


def test_300000_empty_parts_are_answered_quickly(port):
    boundary = "b0undary"
    body = (f"--{boundary}\r\n\r\n\r\n" * 300_000).encode() + f"--{boundary}--\r\n".encode()
    assert len(body) < 20 * 1024 * 1024
    t0 = time.monotonic()
    status, _, answer = _request(port, "POST", "/api/segment", body,
                                 f"Content-Type: multipart/form-data; boundary={boundary}\r\n")
    assert status == 413 and "parts" in json.loads(answer)["error"]
    assert time.monotonic() - t0 < 30  # was ~60 s of CPU and no answer in 120 s


@pytest.mark.parametrize("origin", ["http://[::1", "http://127.0.0.1:99999", "http://\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "::::", "http://[zz]:80"])
def test_malformed_origin_is_answered_403(port, origin):
    status, _, body = _request(port, "POST", "/api/segment", b"x", f"Origin: {origin}\r\n"
                               "Content-Type: multipart/form-data; boundary=x\r\n")
    assert status == 403, (status, body[:200])
    assert "error" in json.loads(body)


def test_oversized_text_field_is_413(port):
    boundary = "bb"
    big = "a" * (MAX_TEXT_FIELD_BYTES + 1)
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="classes"\r\n\r\n{big}\r\n--{boundary}--\r\n').encode()
    status, _, answer = _request(port, "POST", "/api/segment", body,
                                 f"Content-Type: multipart/form-data; boundary={boundary}\r\n")
    assert status == 413 and "classes" in json.loads(answer)["error"]


def test_parser_fields_and_limits():
    b = "XyZ"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="classes"\r\n\r\ncat, dog\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode() + b"\x89PNG\r\n--not-it\r\n" + f"\r\n--{b}--\r\n".encode()
    fields = parse_multipart(f'multipart/form-data; boundary="{b}"', body)
    assert fields == {"classes": "cat, dog", "image": b"\x89PNG\r\n--not-it\r\n", "image.filename": "a.png"}
    many = "".join(f'--{b}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(MAX_PARTS + 1))
    with pytest.raises(RequestError) as info:
        parse_multipart(f"multipart/form-data; boundary={b}", (many + f"--{b}--\r\n").encode())
    assert info.value.status == 413
    for bad_type, bad_body in [("text/plain", b""), ("multipart/form-data", b""),
                               (f"multipart/form-data; boundary={b}", b"no boundary here"),
                               (f"multipart/form-data; boundary={b}", f"--{b}\r\nname\r\n\r\nunclosed".encode())]:
        with pytest.raises(RequestError) as info:
            parse_multipart(bad_type, bad_body)
        assert info.value.status == 400

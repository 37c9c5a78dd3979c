"""The web demo answers real HTTP requests on the loopback interface."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from tag2mask.cli.common import shipped_weights_path


def _multipart(fields: dict[str, object]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\nContent-Type: image/png'
            parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server_url():
    from tag2mask.clip.loading import load_clip
    from tag2mask.web.server import make_server

    server = make_server(load_clip(shipped_weights_path()), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def _post(url: str, fields: dict[str, object]):
    body, ctype = _multipart(fields)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _scene_png() -> tuple[bytes, np.ndarray]:
    from tag2mask.synth.splits import SyntheticDataset

    scene = SyntheticDataset("test", 1, 224)[0]
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    return buf.getvalue(), scene.mask


def test_page_and_json_api(server_url):
    with urllib.request.urlopen(server_url + "/", timeout=30) as resp:
        assert resp.status == 200 and b"<form" in resp.read()
    png, gt = _scene_png()
    status, body = _post(server_url + "/api/segment", {"image": png, "classes": "star, ring, cross, heart, triangle, "
                         "square, disk, crescent, diamond, arrow, hexagon, bolt; background: grass, water, sky, brick, "
                         "sand, wood", "method": "sclip", "mode": "whole"})
    assert status == 200
    payload = json.loads(body)
    label = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["label_png"]))))
    assert label.shape == gt.shape and payload["class_names"][0] == "background"
    assert set(np.unique(label)) <= set(range(13))
    status, body = _post(server_url + "/segment", {"image": png, "classes": "star, ring; background: grass",
                                                   "method": "naclip", "mode": "slide"})
    assert status == 200 and body.count(b"data:image/png;base64,") == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image": b"not an image at all", "classes": "cat", "method": "naclip"}, "not a readable image"),
        ({"image": b"", "classes": "cat", "method": "naclip"}, "no image"),
        ({"classes": "", "method": "naclip"}, "no image"),
        ({"image": None, "classes": " ", "method": "naclip"}, "class list is empty"),
        ({"image": None, "classes": "cat", "method": "segformer"}, "unknown method"),
    ],
)
def test_bad_requests_get_clear_400s(server_url, fields, message):
    if fields.get("image", 0) is None:
        fields["image"] = _scene_png()[0]
    status, body = _post(server_url + "/api/segment", fields)
    assert status == 400
    assert message in json.loads(body)["error"]

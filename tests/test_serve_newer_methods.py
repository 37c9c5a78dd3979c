"""`tag2mask serve` and `tag2mask demo` offer SC-CLIP and CorrCLIP exactly when they can run.

SC-CLIP: when the loaded CLIP passes the registry's ``supports`` check (the shipped 6-block tiny CLIP
does not; a random 12-block one built here does). CorrCLIP: when ``--regions slic|felzenszwalb|sam`` (and
``--dino``) are given at start-up; otherwise both are listed as unavailable with the registry's reason.
Servers run in-process on 127.0.0.1 (as tests/test_web.py); the DINO is the one of tests/data/ovss2.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tag2mask.methods import registry

from web_client import multipart

OVSS2 = Path(__file__).resolve().parent / "data" / "ovss2"
INDEX = json.loads((OVSS2 / "index.json").read_text())
CLASSES = "star, ring, cross; background: grass, sky"


def _post(url: str, fields: dict[str, object]) -> tuple[int, dict]:
    body, ctype = multipart(fields)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as resp:
        assert resp.status == 200
        return resp.read()


def _png(h: int, w: int) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _label(payload_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload_png))))


@contextlib.contextmanager
def _serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _serve_args(*extra: str):
    from tag2mask.cli.main import build_parser

    return build_parser().parse_args(["serve", "--port", "0", "--device", "cpu", *extra])


def _deep_tiny_clip():
    """A random ViT CLIP with 12 blocks of width 64: deep enough for SC-CLIP's fixed block indices."""
    from tag2mask.clip.model import CLIP, CLIPConfig, TextConfig, VisionConfig

    torch.manual_seed(0)
    config = CLIPConfig(embed_dim=32, vision=VisionConfig(width=64, layers=12, heads=2, image_size=64, patch_size=16),
                        text=TextConfig(width=32, layers=1, heads=1))
    return CLIP(config).eval()


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> Path:
    """The set's tiny DINO (``index.json`` ``dino``) as Meta's layout: a ``.pth`` state dict of tensors."""
    with np.load(OVSS2 / INDEX["dino"]["file"]) as z:
        sd = {k: torch.from_numpy(z[k]) for k in z.files}
    path = tmp_path_factory.mktemp("dino") / "dino_meta.pth"
    torch.save(sd, path)
    return path


def test_shipped_tiny_clip_lists_neither_and_says_why():
    from tag2mask.cli.serve_cmd import build_server

    server = build_server(_serve_args(), short_side=224)
    model = server.service.model
    scclip_reason = registry.load(registry.get("scclip").supports)(model)
    assert scclip_reason  # the shipped CLIP has 6 blocks
    with _serving(server) as url:
        listed = json.loads(_get(url + "/api/methods"))
        assert "scclip" not in listed["methods"] and "corrclip" not in listed["methods"]
        assert listed["methods"][0] == listed["default"] and "pearl" in listed["methods"]
        assert listed["unavailable"]["scclip"] == scclip_reason
        assert all(need in listed["unavailable"]["corrclip"] for need in registry.get("corrclip").needs)
        page = _get(url + "/").decode()
        assert "<option>scclip</option>" not in page and "<option>pearl</option>" in page
        shown = page[page.index("id='unavailable'"):]
        assert "data-method='scclip'" in shown and "at least 11 blocks" in shown and "--dino" in shown
        status, payload = _post(url + "/api/segment", {"image": _png(40, 56), "classes": CLASSES, "method": "scclip"})
        assert status == 400 and "not offered" in payload["error"] and scclip_reason in payload["error"]
        status, payload = _post(url + "/api/segment", {"image": _png(40, 56), "classes": CLASSES, "compare": "1"})
        assert status == 200 and [r["method"] for r in payload["results"]] == listed["methods"]
        assert payload["unavailable"] == listed["unavailable"]


def test_deeper_clip_lists_scclip_and_segments_through_http():
    from tag2mask.web.server import make_server

    model = _deep_tiny_clip()
    assert registry.load(registry.get("scclip").supports)(model) is None
    with _serving(make_server(model, "127.0.0.1", 0, short_side=224)) as url:
        listed = json.loads(_get(url + "/api/methods"))
        assert "scclip" in listed["methods"] and "scclip" not in listed["unavailable"]
        assert "corrclip" in listed["unavailable"]  # no DINO given
        status, payload = _post(url + "/api/segment", {"image": _png(40, 56), "classes": CLASSES, "method": "scclip"})
    assert status == 200, payload
    label = _label(payload["label_png"])
    assert label.shape == (40, 56) and payload["method"] == "scclip"
    assert label.max() < len(payload["class_names"]) == 4


def test_deeper_clip_runs_scclip_in_the_demo():
    from tag2mask.cli.demo_scenes import evaluate_methods

    seen = []
    # 112 px: 7x7 tokens (SC-CLIP's LOF needs 31+)
    scores = evaluate_methods(_deep_tiny_clip(), 1, ["scclip"], size=112,
                              on_image=lambda i, image, gt, outputs, tags: seen.append((gt, outputs)))
    assert list(scores) == ["scclip"] and len(scores["scclip"].per_image) == 1
    gt, outputs = seen[0]
    assert outputs["scclip"].shape == gt.shape and outputs["scclip"].dtype == np.uint8
    assert scores["scclip"].confusion.mat.sum() == (gt != 255).sum()


def test_serve_with_dino_and_slic_lists_corrclip_and_segments(dino_file):
    pytest.importorskip("skimage")
    from tag2mask.cli.serve_cmd import build_server

    server = build_server(_serve_args("--dino", str(dino_file), "--dino-heads", str(INDEX["dino"]["num_heads"]),
                                      "--regions", "slic"), short_side=224)
    with _serving(server) as url:
        body = _get(url + "/api/methods")
        listed = json.loads(body)
        assert "corrclip" in listed["methods"] and "corrclip" not in listed["unavailable"]
        assert str(dino_file).encode() not in body and str(dino_file) not in _get(url + "/").decode()
        for mode in ("whole", "slide"):
            status, payload = _post(url + "/api/segment", {"image": _png(40, 56), "classes": CLASSES,
                                                           "method": "corrclip", "mode": mode})
            assert status == 200, payload
            label = _label(payload["label_png"])
            assert label.shape == (40, 56) and label.max() < len(payload["class_names"])


def test_serve_refuses_region_folders_and_dino_without_regions(tmp_path, capsys):
    from tag2mask.cli.main import main

    assert main(["serve", "--port", "0", "--regions", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "serve --regions takes" in err and "segment --regions DIR" in err
    assert main(["serve", "--port", "0", "--dino", str(tmp_path / "d.pth")]) == 2
    assert "--dino does not apply without --regions" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--regions", "sam"]) == 2
    assert "--sam-weights" in capsys.readouterr().err


def test_demo_corrclip_needs_dino_and_regions(tmp_path, capsys):
    from tag2mask.cli.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "1", "--methods", "corrclip", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "corrclip cannot run here" in err and all(n in err for n in registry.get("corrclip").needs)
    assert not out.exists()  # nothing written: a retry with --dino starts clean
    assert main(["demo", "--out", str(out), "--n", "1", "--methods", "scclip", "--device", "cpu"]) == 2
    assert "scclip cannot run here" in capsys.readouterr().err


def test_demo_all_skips_with_reasons_and_runs_corrclip_when_configured(tmp_path, capsys, dino_file):
    pytest.importorskip("skimage")
    from tag2mask.cli.main import main

    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--n", "1", "--size", "64", "--device", "cpu", "--dino", str(dino_file),
            "--dino-heads", str(INDEX["dino"]["num_heads"]), "--regions", "slic"]
    assert main(argv + ["--methods", "corrclip", "pearl"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"corrclip", "pearl"} and all(0.0 <= v <= 1.0 for v in results.values())
    assert len(list((out / "masks" / "corrclip").glob("*.png"))) == 1
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "all"), "--n", "1", "--size", "64", "--device", "cpu",
                 "--methods", "all"]) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("demo: skipping")]
    assert len(skipped) == 2 and any("scclip" in s and "at least 11 blocks" in s for s in skipped)
    assert any("corrclip" in s and "--dino" in s for s in skipped)
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert "scclip" not in results and "corrclip" not in results and "pearl" in results

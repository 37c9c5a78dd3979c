"""The web page in a real browser: headless Chromium uploads an image, types class names, sees the overlay.

Chromium (Debian package ``chromium``; ``.ci/run`` installs it) is driven over the DevTools protocol
on a pipe (``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3
and 4), so no driver package is needed. Without Chromium the test is skipped, except under CI
(``CI=true``), where it fails. Everything stays on 127.0.0.1; the browser runs with networking
features off and a fresh profile. Set ``TAG2MASK_BROWSER_SHOTS=<folder>`` to keep screenshots.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from PIL import Image

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--window-size=1280,1600",
]


def _chromium() -> Optional[str]:
    for name in (os.environ.get("TAG2MASK_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _move_above_10(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the browser expects its command pipe on fd 3 and its answer pipe on fd 4; the child's ends are
        # first moved above 10 so that the shell's redirections cannot overwrite one with the other
        to_chrome_r, from_chrome_w = (_move_above_10(fd) for fd in (to_chrome_r, from_chrome_w))
        wrapper = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", wrapper, binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._buffer = b""
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.session: Optional[str] = None

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5, session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read_messages(self, deadline: float) -> None:
        import select

        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from Chromium in time")
        ready, _, _ = select.select([self._from_chrome], [], [], min(left, 0.5))
        if not ready:
            return
        chunk = os.read(self._from_chrome, 1 << 20)
        if not chunk:
            raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
        self._buffer += chunk
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            msg = json.loads(raw)
            if "id" in msg:
                self._replies[msg["id"]] = msg
            else:
                self.events.append(msg)

    def call(self, method: str, params: Optional[dict] = None, timeout: float = 60.0, session: bool = True) -> dict:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while self._next_id not in self._replies:
            self._read_messages(deadline)
        reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self._read_messages(deadline)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression!r}")

    def open_page(self) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("DOM.enable")

    def navigate(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = _chromium()
    if binary is None:
        message = "Chromium is not installed (apt-get install chromium); the browser test of the web page cannot run"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " -- .ci/run must install it")
        pytest.skip(message)
    tools = DevTools(binary, tmp_path_factory.mktemp("chromium_profile"))
    try:
        tools.call("Browser.getVersion", timeout=60, session=False)
        tools.open_page()
        yield tools
    finally:
        tools.close()


@pytest.fixture(scope="module")
def web_url(tmp_path_factory):
    from tag2mask.cmdline.options import shipped_weights_path
    from tag2mask.clip.loading import load_clip
    from tag2mask.web.server import make_server

    old = os.environ.get("TAG2MASK_CACHE")
    os.environ["TAG2MASK_CACHE"] = str(tmp_path_factory.mktemp("browser_cache"))
    server = make_server(load_clip(shipped_weights_path()), "127.0.0.1", 0, short_side=224)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    if old is None:
        os.environ.pop("TAG2MASK_CACHE", None)
    else:
        os.environ["TAG2MASK_CACHE"] = old


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory) -> Path:
    from tag2mask.synth.splits import SyntheticDataset

    scene = SyntheticDataset("test", 1, 224)[0]
    path = tmp_path_factory.mktemp("upload") / "scene.png"
    Image.fromarray(scene.image).save(path)
    return path


# how many overlay pixels differ from the photo (the photo is redrawn from the page's own data)
_DIFFERING_PIXELS = """
(async () => {
  const data = JSON.parse(document.getElementById('t2m-data').textContent);
  const im = new Image(); im.src = data.image; await im.decode();
  const c = document.createElement('canvas'); c.width = data.width; c.height = data.height;
  const ctx = c.getContext('2d'); ctx.drawImage(im, 0, 0, data.width, data.height);
  const photo = ctx.getImageData(0, 0, data.width, data.height).data;
  const out = {};
  for (const r of data.results) {
    const o = document.getElementById('overlay-' + r.method);
    const px = o.getContext('2d').getImageData(0, 0, o.width, o.height).data;
    let n = 0;
    for (let i = 0; i < px.length; i += 4) {
      if (Math.abs(px[i] - photo[i]) + Math.abs(px[i + 1] - photo[i + 1]) + Math.abs(px[i + 2] - photo[i + 2]) > 6) n++;
    }
    out[r.method] = n;
  }
  return out;
})()
"""


def _set(browser: DevTools, script: str) -> None:
    before = int(browser.evaluate("Number(document.body.dataset.renders || 0)"))
    browser.evaluate(script)
    browser.wait_for(f"Number(document.body.dataset.renders || 0) > {before}")


def _shot(browser: DevTools, name: str) -> None:
    folder = os.environ.get("TAG2MASK_BROWSER_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.screenshot(Path(folder) / name)


def _submit(browser: DevTools, scene_file: Path, classes: str, compare: bool = False) -> None:
    document = browser.call("DOM.getDocument")["root"]["nodeId"]
    node = browser.call("DOM.querySelector", {"nodeId": document, "selector": "#image"})["nodeId"]
    browser.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(scene_file)]})
    browser.evaluate(f"document.getElementById('classes').value = {json.dumps(classes)}; "
                     f"document.getElementById('compare').checked = {'true' if compare else 'false'}; true")
    browser.events.clear()
    browser.evaluate("document.getElementById('submit').click(); true")
    browser.wait_event("Page.loadEventFired", timeout=120)


def test_upload_type_classes_and_see_the_overlay(browser, web_url, scene_file):
    browser.navigate(web_url + "/")
    assert "synthetic shapes world" in browser.evaluate("document.getElementById('toy-note').textContent")
    _submit(browser, scene_file, "star, ring, cross, heart, triangle, square; background: grass, water, sky")
    browser.wait_for("Number(document.body.dataset.renders || 0) >= 1")
    assert browser.evaluate("document.body.dataset.renderError || ''") == ""
    _shot(browser, "overlay.png")
    size = browser.evaluate("[document.getElementById('overlay-naclip').width, document.getElementById('overlay-naclip').height]")
    assert size == [224, 224]
    shown = browser.evaluate("document.getElementById('overlay-naclip').getBoundingClientRect().width")
    assert shown >= 400, f"the overlay is shown {shown}px wide: not a useful size"
    coloured = browser.evaluate(_DIFFERING_PIXELS)["naclip"]
    assert coloured > 0.05 * 224 * 224, "the overlay colours (almost) nothing"

    # the download is the full-size palette PNG (here the display size too: the scene is 224x224)
    href = browser.evaluate("document.querySelector('a.download').href")
    assert href.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))) as mask:
        assert mask.mode == "P" and mask.size == (224, 224)
        label = np.asarray(mask)
    assert int(label.max()) <= 6

    # every class switched off: the photo alone
    _set(browser, "document.querySelectorAll('input.class-toggle').forEach(t => { t.checked = false; "
                  "t.dispatchEvent(new Event('change')); }); true")
    assert browser.evaluate(_DIFFERING_PIXELS)["naclip"] == 0
    # only the largest class back on: exactly its pixels are coloured (a few may match the photo's colour)
    values, counts = np.unique(label[label > 0], return_counts=True)
    k, n_k = int(values[counts.argmax()]), int(counts.max())
    _set(browser, f"const t = document.querySelector('input.class-toggle[data-index=\"{k}\"]'); t.checked = true; "
                  "t.dispatchEvent(new Event('change')); true")
    one = browser.evaluate(_DIFFERING_PIXELS)["naclip"]
    assert 0.9 * n_k <= one <= n_k
    # opacity 0: the photo again, whatever is switched on
    _set(browser, "document.querySelectorAll('input.class-toggle').forEach(t => { t.checked = true; "
                  "t.dispatchEvent(new Event('change')); }); true")
    _set(browser, "const o = document.getElementById('opacity'); o.value = 0; o.dispatchEvent(new Event('input')); true")
    assert browser.evaluate(_DIFFERING_PIXELS)["naclip"] == 0

    page = browser.evaluate("document.documentElement.outerHTML")
    assert "/assets/" not in page and "safetensors" not in page and "BytesIO" not in page


def test_all_methods_side_by_side(browser, web_url, scene_file):
    import json
    import urllib.request

    with urllib.request.urlopen(web_url + "/api/methods", timeout=30) as resp:
        methods = json.loads(resp.read())["methods"]  # those this server offers for its model
    browser.navigate(web_url + "/")
    _submit(browser, scene_file, "star, ring; background: grass", compare=True)
    browser.wait_for("Number(document.body.dataset.renders || 0) >= 1")
    _shot(browser, "compare.png")
    assert sorted(browser.evaluate(_DIFFERING_PIXELS)) == sorted(methods)
    # with the background switched on too, every pixel of every panel is coloured by some class
    _set(browser, "const t = document.querySelector('input.class-toggle[data-index=\"0\"]'); t.checked = true; "
                  "t.dispatchEvent(new Event('change')); true")
    counts = browser.evaluate(_DIFFERING_PIXELS)
    assert all(n > 0.5 * 224 * 224 for n in counts.values()), counts
    # the panels are laid out side by side (at least two in the first row)
    tops = browser.evaluate("Array.from(document.querySelectorAll('.panel')).map(p => p.getBoundingClientRect().top)")
    assert len(tops) == len(methods) and tops[0] == tops[1]


def test_bad_upload_shows_an_error_on_the_page(browser, web_url, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    browser.navigate(web_url + "/")
    _submit(browser, text, "star")
    message = browser.evaluate("document.getElementById('error') && document.getElementById('error').textContent")
    assert message and "not an image" in message
    assert browser.evaluate("document.getElementById('classes').value") == "star"  # the form keeps the input

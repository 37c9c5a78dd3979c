"""The web page: a form, and the result as an overlay the user can tune (opacity, class toggles).

The overlay is drawn in the browser: the page carries the photo and the label map (a grey PNG
whose values are class indices) at display size, the class colours, and a little script that
blends them on a ``<canvas>``, so moving the opacity slider or switching a class off is instant.
The full-size mask (VOC-palette PNG, as ``tag2mask segment`` writes) is a download link.
All user text is escaped; the embedded data is JSON with ``<`` escaped, read with ``JSON.parse``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from PIL import Image

from tag2mask.io.palette import encode_label_png, voc_palette

__all__ = ["FormState", "render_page", "DISPLAY_LONG_SIDE"]

#: the overlay is shown at most this many pixels wide/high (the download is full size)
DISPLAY_LONG_SIDE = 960
DEFAULT_CLASSES = "star, ring, cross, heart; background: grass, water, sky, sand"

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1400px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}form{background:#f4f4f6;padding:1em;border-radius:6px}
label{display:inline-block;margin:.3em 1.2em .3em 0}#classes{width:min(60em,80vw)}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.5em 1em}
.err{background:#fde8e8;border-left:4px solid #c00;padding:.5em 1em;color:#900}
.controls{margin:1em 0;display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center}
.swatch{display:inline-block;width:1em;height:1em;border:1px solid #555;vertical-align:middle;margin-right:.3em}
.panels{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1em}
.panel canvas{width:100%;max-width:960px;height:auto;border:1px solid #ccc}
.panel h3{margin:.2em 0}.muted{color:#666;font-size:.9em}
"""

# blends the photo with the class colours of the enabled classes; re-run on every control change
_SCRIPT = """
(function () {
  var dataEl = document.getElementById('t2m-data');
  if (!dataEl) { return; }
  var data = JSON.parse(dataEl.textContent);
  var opacity = document.getElementById('opacity');
  var toggles = Array.prototype.slice.call(document.querySelectorAll('input.class-toggle'));
  var panels = [];
  function load(src) {
    return new Promise(function (ok, fail) { var im = new Image(); im.onload = function () { ok(im); }; im.onerror = fail; im.src = src; });
  }
  function render(p) {
    var a = Number(opacity.value) / 100, on = [];
    toggles.forEach(function (t) { on[Number(t.dataset.index)] = t.checked; });
    var out = p.ctx.createImageData(p.w, p.h), o = out.data, photo = p.photo, lab = p.labels;
    for (var i = 0, n = p.w * p.h; i < n; i++) {
      var k = lab[i], j = 4 * i, c = on[k] ? data.colors[k] : null;
      o[j] = c ? photo[j] * (1 - a) + c[0] * a : photo[j];
      o[j + 1] = c ? photo[j + 1] * (1 - a) + c[1] * a : photo[j + 1];
      o[j + 2] = c ? photo[j + 2] * (1 - a) + c[2] * a : photo[j + 2];
      o[j + 3] = 255;
    }
    p.ctx.putImageData(out, 0, 0);
  }
  function renderAll() {
    panels.forEach(render);
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
  }
  Promise.all([load(data.image)].concat(data.results.map(function (r) { return load(r.labels); }))).then(function (ims) {
    var w = data.width, h = data.height;
    var scratch = document.createElement('canvas');
    scratch.width = w; scratch.height = h;
    var s = scratch.getContext('2d', {willReadFrequently: true});
    s.imageSmoothingEnabled = false;
    s.drawImage(ims[0], 0, 0, w, h);
    var photo = s.getImageData(0, 0, w, h).data;
    data.results.forEach(function (r, idx) {
      s.clearRect(0, 0, w, h);
      s.drawImage(ims[idx + 1], 0, 0, w, h);
      var rgba = s.getImageData(0, 0, w, h).data, labels = new Uint8Array(w * h);
      for (var i = 0; i < w * h; i++) { labels[i] = rgba[4 * i]; }
      var canvas = document.getElementById('overlay-' + r.method);
      canvas.width = w; canvas.height = h;
      panels.push({ctx: canvas.getContext('2d'), w: w, h: h, photo: photo, labels: labels});
    });
    renderAll();
  }).catch(function (e) { document.body.dataset.renderError = String(e); });
  opacity.addEventListener('input', renderAll);
  toggles.forEach(function (t) { t.addEventListener('change', renderAll); });
})();
"""


@dataclass
class FormState:
    """What the form shows (the user's last input)."""

    classes: str = DEFAULT_CLASSES
    method: str = "naclip"
    mode: str = "whole"
    compare: bool = False


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _jpeg_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _json_for_script(obj: object) -> str:
    """JSON safe inside ``<script>``: no ``</script>`` or HTML comment can be formed by user text."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _display_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, DISPLAY_LONG_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _form(state: FormState, methods: Sequence[str]) -> str:
    e = lambda s: html.escape(s, quote=True)  # noqa: E731
    method_opts = "".join(f"<option{' selected' if m == state.method else ''}>{e(m)}</option>" for m in methods)
    mode_opts = "".join(f"<option{' selected' if m == state.mode else ''}>{m}</option>" for m in ("whole", "slide"))
    return (
        "<form method='post' action='/segment' enctype='multipart/form-data' id='segment-form'>"
        "<label>Image <input type='file' id='image' name='image' accept='image/*' required></label><br>"
        f"<label>Classes <input type='text' id='classes' name='classes' value='{e(state.classes)}'></label><br>"
        f"<label>Method <select id='method' name='method'>{method_opts}</select></label>"
        f"<label>Mode <select id='mode' name='mode'>{mode_opts}</select></label>"
        f"<label><input type='checkbox' id='compare' name='compare' value='1'{' checked' if state.compare else ''}>"
        " all methods side by side</label>"
        "<button type='submit' id='submit'>Segment</button>"
        "<p class='muted'>Classes: comma-separated; synonyms of one class with <code>|</code>; background words "
        "after <code>; background:</code> or <code>, background:</code> (e.g. <code>cat, person|people; background: sky, "
        "grass</code>). "
        "Names only: the server never reads files.</p></form>"
    )


def _results(image: Image.Image, results: Sequence, processed_size: Optional[tuple[int, int]], stem: str) -> str:
    e = html.escape
    first = results[0]
    names = list(first.class_names)
    width, height = _display_size(*image.size)
    shown = image.resize((width, height), Image.BILINEAR) if (width, height) != image.size else image
    palette = voc_palette(256)
    data = {"width": width, "height": height, "image": _jpeg_uri(shown), "colors": palette[: len(names)].tolist(),
            "results": []}
    panels = []
    for r in results:
        small = Image.fromarray(r.label).resize((width, height), Image.NEAREST)
        grey = io.BytesIO()
        small.convert("L").save(grey, format="PNG")  # values = class indices (no palette: the script reads them)
        data["results"].append({"method": r.method, "labels": _png_uri(grey.getvalue())})
        found = ", ".join(r.present) or "none"
        panels.append(
            f"<div class='panel' data-method='{e(r.method)}'><h3>{e(r.method)}</h3>"
            f"<canvas id='overlay-{e(r.method)}' width='{width}' height='{height}' role='img' "
            f"aria-label='overlay of the {e(r.method)} segmentation'></canvas>"
            f"<p>Classes found: <span class='found'>{e(found)}</span> <span class='muted'>({r.seconds:.2f} s)</span><br>"
            f"<a class='download' download='{e(stem)}_{e(r.method)}_mask.png' href='{_png_uri(encode_label_png(r.label))}'>"
            f"download the mask PNG</a> <span class='muted'>({image.size[0]}x{image.size[1]}, VOC palette, "
            "pixel value = class index below)</span></p></div>"
        )
    toggles = []
    for k, name in enumerate(names):
        colour = "#%02x%02x%02x" % tuple(int(c) for c in palette[k])
        checked = "" if (first.has_background and k == 0) else " checked"
        toggles.append(
            f"<label><input type='checkbox' class='class-toggle' data-index='{k}'{checked}>"
            f"<span class='swatch' style='background:{colour}'></span>{k}: {e(name)}</label>"
        )
    scaled = ""
    if processed_size is not None:
        scaled = (f"<p class='muted'>Segmented at {processed_size[1]}x{processed_size[0]} (the image has more pixels "
                  "than the server's working limit); the mask is scaled back to full size.</p>")
    return (
        "<h2>Result</h2>"
        "<div class='controls'><label>Opacity <input type='range' id='opacity' min='0' max='100' value='60'></label>"
        + "".join(toggles) + "</div>" + scaled
        + f"<div class='panels'>{''.join(panels)}</div>"
        + f"<script type='application/json' id='t2m-data'>{_json_for_script(data)}</script>"
        + f"<script>{_SCRIPT}</script>"
    )


def _unavailable(unavailable: Mapping[str, str]) -> str:
    """One line per method the server does not offer, with the reason (e.g. too shallow a CLIP)."""
    e = lambda s: html.escape(s, quote=True)  # noqa: E731
    items = "".join(f"<li data-method='{e(m)}'><b>{e(m)}</b>: {e(why)}</li>" for m, why in unavailable.items())
    return f"<div class='muted' id='unavailable'>Not offered by this server:<ul>{items}</ul></div>"


def render_page(state: FormState, methods: Sequence[str], model: str, note: Optional[str] = None,
                error: Optional[str] = None, image: Optional[Image.Image] = None, results: Sequence = (),
                processed_size: Optional[tuple[int, int]] = None, stem: str = "image", sample: bool = False,
                unavailable: Optional[Mapping[str, str]] = None) -> bytes:
    """The whole page as UTF-8 bytes: the form, a note, an error, and the results when there are some.

    ``sample``: the results are the built-in sample scene's (the page as first opened), and it says so.
    ``unavailable``: ``{method: why it is not offered}``, listed under the form.
    """
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>tag2mask</title>"
        f"<style>{_STYLE}</style></head><body><h1>tag2mask: segment an image with class names</h1>"
    ]
    if note:
        parts.append(f"<p class='note' id='toy-note'>{html.escape(note)}</p>")
    parts.append(_form(state, methods))
    if unavailable:
        parts.append(_unavailable(unavailable))
    if error:
        parts.append(f"<p class='err' id='error' role='alert'>{html.escape(error)}</p>")
    if image is not None and results:
        if sample:
            parts.append("<p class='muted' id='sample-note'>Sample: a synthetic scene segmented with the classes "
                         "above. Choose an image and press Segment to segment your own.</p>")
        parts.append(_results(image, results, processed_size, stem))
    parts.append(f"<p class='muted'>Model: {html.escape(model)}.</p></body></html>")
    return "".join(parts).encode("utf-8")


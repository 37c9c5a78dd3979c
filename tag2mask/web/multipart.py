"""A bounded ``multipart/form-data`` parser for the demo server.

The standard library's ``email`` parser builds an object per part and re-scans the body; one
request of ~300,000 empty parts kept a worker busy for a minute. This parser makes one forward pass
with ``bytes.find`` and stops at the first limit: at most :data:`MAX_PARTS` parts, part headers of
at most :data:`MAX_PART_HEADER_BYTES`, text fields of at most :data:`MAX_TEXT_FIELD_BYTES`. Time is
linear in the body (itself capped by the upload limit), whatever the body holds.
"""

from __future__ import annotations

import re
from typing import Any

from tag2mask.web.service import RequestError

__all__ = ["parse_multipart", "MAX_PARTS", "MAX_PART_HEADER_BYTES", "MAX_TEXT_FIELD_BYTES"]

#: the form has five fields (image, classes, method, mode, compare); a few more are tolerated
MAX_PARTS = 32
#: headers of one part (Content-Disposition and Content-Type)
MAX_PART_HEADER_BYTES = 8 * 1024
#: one text field (the class list is limited to 2,000 characters further on)
MAX_TEXT_FIELD_BYTES = 64 * 1024

_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^;\s"]{1,70}))', re.I)
_PARAM = re.compile(rb'(?<![\w*])(name|filename)="([^"]*)"|(?<![\w*])(name|filename)=([^;\s"]+)', re.I)


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Form fields of a ``multipart/form-data`` body: text fields as str, files as bytes.

    A file field's name is also given as ``<field>.filename``.

    Raises:
        RequestError: not multipart, no boundary, malformed (400); too many parts, part headers
            or a text field too large (413).
    """
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError("expected a multipart/form-data form (fields 'image', 'classes', 'method')")
    m = _BOUNDARY.search(content_type)
    if not m:
        raise RequestError("the form could not be parsed (multipart boundary missing)")
    delimiter = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    pos = body.find(delimiter)
    if pos < 0:
        raise RequestError("the form could not be parsed (no part starts with its boundary)")
    fields: dict[str, Any] = {}
    parts = 0
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):  # the closing delimiter
            return fields
        parts += 1
        if parts > MAX_PARTS:
            raise RequestError(f"the form has more than {MAX_PARTS} parts", status=413)
        head_end = body.find(b"\r\n\r\n", pos, pos + MAX_PART_HEADER_BYTES + 4)
        if head_end < 0:
            raise RequestError(f"a form part has no end of headers within {MAX_PART_HEADER_BYTES:,} bytes",
                               status=413 if len(body) - pos > MAX_PART_HEADER_BYTES else 400)
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            raise RequestError("the form could not be parsed (a part is not closed by its boundary)")
        _store(fields, body[pos:head_end], body[head_end + 4:end])
        pos = end + 2


def _store(fields: dict[str, Any], head: bytes, payload: bytes) -> None:
    params: dict[str, str] = {}
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-disposition:"):
            for q_key, q_val, t_key, t_val in _PARAM.findall(line):
                key = (q_key or t_key).lower().decode("latin-1")
                params.setdefault(key, (q_val or t_val).decode("utf-8", "replace"))
    name = params.get("name")
    if not name:
        return
    if "filename" in params:
        fields[name] = payload
        fields[f"{name}.filename"] = params["filename"]
        return
    if len(payload) > MAX_TEXT_FIELD_BYTES:
        raise RequestError(f"form field {name[:40]!r} has {len(payload):,} bytes; at most "
                           f"{MAX_TEXT_FIELD_BYTES:,} are accepted", status=413)
    fields[name] = payload.decode("utf-8", "replace")

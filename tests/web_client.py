"""Request bodies the web tests send (a helper, not a test module)."""

from __future__ import annotations

import uuid


def multipart(fields: dict[str, object]) -> tuple[bytes, str]:
    """``(body, content_type)`` of a ``multipart/form-data`` request: ``bytes`` values are sent as PNG files
    named ``<field>.png``, anything else as a text field."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\nContent-Type: image/png'
            parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"

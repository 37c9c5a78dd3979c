"""JSON read from a user's file: every failure is one line naming the file.

``json.loads`` can fail in ways its callers rarely catch: a ``RecursionError`` for deeply nested
arrays, Python's "Exceeds the limit (4300 digits)" ``ValueError`` for huge integers, a
``UnicodeDecodeError``. :func:`loads_named` and :func:`read_json` turn each into
:class:`JSONFileError` (a ``ValueError``) whose message starts with the file's name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

__all__ = ["JSONFileError", "loads_named", "read_json", "MAX_JSON_BYTES"]

#: largest JSON file read whole (labels files of a million images fit many times over)
MAX_JSON_BYTES = 512 * 1024 * 1024


class JSONFileError(ValueError):
    """A JSON file (or JSON text inside a file) that cannot be read; the message names the file."""


def loads_named(text: Union[str, bytes], where: Union[str, Path], **kwargs: Any) -> Any:
    """``json.loads(text, **kwargs)``; any failure raises :class:`JSONFileError` naming ``where``."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise JSONFileError(f"{where}: invalid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise JSONFileError(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError:
        raise JSONFileError(f"{where}: invalid JSON: not UTF-8 text") from None
    except ValueError as exc:  # e.g. int("9" * 5000): Python's integer digit limit
        if "digits" in str(exc):
            raise JSONFileError(f"{where}: invalid JSON: a number with too many digits") from None
        raise JSONFileError(f"{where}: invalid JSON ({str(exc).splitlines()[0][:200]})") from None


def read_json(path: Union[str, Path], **kwargs: Any) -> Any:
    """Parse the JSON file ``path`` (UTF-8, at most :data:`MAX_JSON_BYTES`); errors name the file."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_JSON_BYTES:
        raise JSONFileError(f"{p}: {size} bytes is too large for a JSON file here (at most {MAX_JSON_BYTES})")
    return loads_named(p.read_bytes(), p, **kwargs)

"""Reading a user's ``.pt`` / ``.pth`` / ``.bin`` file: data only, and one clean line when refused.

Every ``torch.load`` of a file a user passes goes through :func:`safe_torch_load`:
``weights_only=True`` (tensors and plain containers, never an arbitrary Python object), TorchScript
archives recognised *before* ``torch.load`` (which would otherwise try to dispatch to
``torch.jit.load``), and every failure turned into one line saying what is wrong with the file.
torch's own messages are not shown: they advise turning the safety off or allow-listing globals,
which tag2mask never does and never tells anyone to do.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional, Union

__all__ = ["UnsafeFileError", "UnreadableFileError", "safe_torch_load", "is_torchscript_zip", "clean_message"]


class UnsafeFileError(ValueError):
    """The file stores Python objects besides tensors and plain data: it is refused, never unpickled."""


class UnreadableFileError(ValueError):
    """The file is not a readable PyTorch file at all (text, truncated, another format)."""


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: phrases of torch's (and pickle's) advice that must never reach a user
_ADVICE = re.compile(r"weights_only|add_safe_globals|safe_globals|allowlist|torch\.load|trusted source", re.I)


def is_torchscript_zip(path: Union[str, Path]) -> bool:
    """True for a zip archive shaped like a TorchScript module (``constants.pkl`` or ``code/`` entries)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def clean_message(text: str, limit: int = 200) -> str:
    """The first line of ``text`` unless it carries torch's advice (then an empty string)."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    first = first.split(". ")[0]  # torch appends guesses and advice as further sentences
    return "" if _ADVICE.search(first) else first[:limit]


def safe_torch_load(path: Union[str, Path], what: str = "checkpoint", map_location: Any = "cpu",
                    extra_globals: Optional[Iterable[Any]] = None, hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors.

    Args:
        path: the file.
        what: what the file was given as (``"checkpoint"``, ``"CLIP checkpoint"``), used in messages.
        map_location: as for ``torch.load``.
        extra_globals: classes/functions ``weights_only`` may additionally rebuild (NumPy arrays for
            old checkpoints); nothing that can run code.
        hint: what to do instead, appended to the refusal of a file holding Python objects.

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: pickled Python objects, or a TorchScript archive (code).
        UnreadableFileError: anything else (text, truncated zip, a foreign format).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    if is_torchscript_zip(p):
        raise UnsafeFileError(
            f"{p}: refused: a TorchScript archive (compiled code), not a {what}; tag2mask never runs a "
            "file's code")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if extra_globals:
                with torch.serialization.safe_globals(list(extra_globals)):
                    return torch.load(p, map_location=map_location, weights_only=True)
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None:  # not a pickle torch can read at all (text, a plain pickle, another format)
            raise UnreadableFileError(
                f"{p}: not a readable {what}: not a PyTorch file of tensors (text, a plain pickle or another "
                "format); nothing in it was run") from None
        raise UnsafeFileError(
            f"{p}: refused: the file stores Python objects besides tensors and plain data (found "
            f"{found.group(1)}); "
            f"tag2mask never unpickles them (unpickling can run code), so it is not a usable {what}"
            + (f"; {hint}" if hint else "")) from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # text, truncated zip, foreign pickle: torch raises many kinds
        detail = clean_message(str(exc))
        raise UnreadableFileError(
            f"{p}: not a readable {what} (not a PyTorch file, or truncated"
            + (f": {type(exc).__name__}: {detail}" if detail and not isinstance(exc, KeyError) else "") + ")") from None

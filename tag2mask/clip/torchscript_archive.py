"""Read the weights out of a TorchScript archive (OpenAI's ``ViT-B-16.pt``) without running it.

``torch.jit.load`` compiles the archive's code and calls its ``__setstate__`` methods, so a crafted
``.pt`` can write files or do anything else TorchScript can. Here the archive is only *read*:

* the zip holds ``<name>/data.pkl`` (the module tree, pickled), ``<name>/data/<key>`` (raw tensor
  storages, little-endian) and ``<name>/code/**.py`` (the compiled source, used only as text);
* ``data.pkl`` is unpickled with :class:`_ArchiveUnpickler`, which maps every ``__torch__.*`` class
  to an inert record (its pickled state is stored, no method of the archive is ever called) and
  rebuilds tensors itself from the storages; any other global (``os.system``, ``builtins.eval``,
  ``torch.load`` ...) is refused;
* which tensors are parameters/buffers (what ``state_dict()`` would list) is read from each
  class's ``__parameters__`` / ``__buffers__`` line in the source text.

The result equals the state dict TorchScript's own loader would give for OpenAI's archives (traced modules whose
state is a plain attribute dict) and for scripted modules without custom ``__getstate__``.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tag2mask.io.budget import BudgetError, check_zip_member

__all__ = ["TorchScriptArchiveError", "ArchiveObject", "read_torchscript_state_dict"]

# ``torch.<Name>Storage`` globals in the persistent ids -> the element type of the storage
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_MAX_DEPTH = 64  # a module tree deeper than this is not a CLIP (and guards against recursion tricks)
_MAX_COMPRESSION_RATIO = 100  # storages are stored uncompressed by torch; refuse zip bombs
#: the module tree of a CLIP archive is tens of kilobytes; its source files are too
_MAX_PICKLE_BYTES = 64 << 20
_MAX_CODE_BYTES = 16 << 20
_CLASS_LINE = re.compile(r"^class\s+(\w+)\s*\(")
_LIST_LINE = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*\[(.*)\]\s*$")


class TorchScriptArchiveError(ValueError):
    """The archive cannot be read safely (unexpected object, bad tensor record, unknown layout)."""


class ArchiveObject:
    """An object of an archive class (``__torch__.…``), kept as data: its type name and pickled state.

    Subclasses are made per type name by the unpickler; none of them has behaviour beyond storing.
    """

    type_name = "?"

    def __setstate__(self, state: Any) -> None:  # what BUILD calls: store, never interpret
        self.state = state

    def __repr__(self) -> str:
        return f"ArchiveObject({self.type_name})"


class _StorageType:
    """Stands for a ``torch.<Name>Storage`` global inside a persistent id (only its dtype is used)."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


class _ArchiveUnpickler(pickle._Unpickler):  # the Python implementation: its opcode table can be narrowed
    """Unpickles ``data.pkl`` with a closed list of globals; storages come from the zip.

    ``BUILD`` is restricted to archive records: the stock opcode would call ``__setstate__`` of any
    object on the stack (a tensor's, for instance) with data from the file.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: "_Archive") -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (ArchiveObject,), {"type_name": qualname, "__slots__": ()})
            return self._classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise TorchScriptArchiveError(
            f"refusing to load the global {module}.{name}: a weights archive needs only tensors and module "
            "records (the file may be crafted to run code)"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptArchiveError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise TorchScriptArchiveError(f"malformed storage record {pid!r:.80}")
        return self.archive.storage(key, storage_type.dtype, numel)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                        hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
            raise TorchScriptArchiveError("a tensor record does not point at a storage")
        if not (_int_tuple(size) and _int_tuple(stride) and len(size) == len(stride) and isinstance(offset, int)
                and offset >= 0):
            raise TorchScriptArchiveError(f"malformed tensor record (size {size!r:.60}, stride {stride!r:.60})")
        if any(n == 0 for n in size):
            return storage.new_empty(size)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise TorchScriptArchiveError(f"a tensor of size {tuple(size)} reaches past its storage ({storage.numel()})")
        return storage.as_strided(size, stride, offset).clone()


def _load_build(self: _ArchiveUnpickler) -> None:
    state = self.stack.pop()
    inst = self.stack[-1]
    if not isinstance(inst, ArchiveObject):
        raise TorchScriptArchiveError(f"refusing to set the state of a {type(inst).__name__} (only module records have one)")
    inst.__setstate__(state)


_ArchiveUnpickler.dispatch[pickle.BUILD[0]] = _load_build


def _int_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(v, int) and v >= 0 for v in x)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise TorchScriptArchiveError("a parameter record does not hold a tensor")
    return data


class _Archive:
    """The zip: storages read on demand (each once), and the parameter/buffer names of each class."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str) -> None:
        self.zf, self.prefix = zf, prefix
        self._storages: dict[str, torch.Tensor] = {}
        byteorder = self._read_optional("byteorder")
        self.swap_bytes = byteorder is not None and byteorder.decode(errors="replace").strip() != sys.byteorder

    def _read_optional(self, name: str) -> Optional[bytes]:
        try:
            self.check_member(self.prefix + name, _MAX_CODE_BYTES)
            return self.zf.read(self.prefix + name)
        except KeyError:
            return None

    def check_member(self, name: str, max_bytes: int) -> None:
        """Size and compression ratio of a non-storage member, before it is read (KeyError if absent)."""
        try:
            check_zip_member(self.zf.getinfo(name), self.zf.filename or "archive", max_bytes)
        except BudgetError as exc:
            raise TorchScriptArchiveError(str(exc)) from None

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key in self._storages:
            return self._storages[key]
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise TorchScriptArchiveError(f"storage {name!r} is missing from the archive") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        needed = numel * itemsize
        if numel < 0 or info.file_size < needed:
            raise TorchScriptArchiveError(f"storage {name!r} holds {info.file_size} bytes, {needed} expected")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise TorchScriptArchiveError(f"storage {name!r} is compressed more than {_MAX_COMPRESSION_RATIO}x (a zip bomb?)")
        with self.zf.open(info) as f:
            raw = bytearray(f.read(needed))
        if self.swap_bytes:
            raw = _swapped(raw, itemsize)
        # bool and bfloat16 have no numpy-free byte view everywhere: read raw bytes, then reinterpret
        tensor = torch.frombuffer(raw, dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
        self._storages[key] = tensor
        return tensor

    def state_names(self) -> dict[str, set[str]]:
        """Class qualname -> names listed in its ``__parameters__`` and ``__buffers__`` (source as text)."""
        names: dict[str, set[str]] = {}
        code = self.prefix + "code/"
        for entry in self.zf.namelist():
            if not (entry.startswith(code) and entry.endswith(".py")):
                continue
            module = entry[len(code):-len(".py")].replace("/", ".")
            current: Optional[str] = None
            self.check_member(entry, _MAX_CODE_BYTES)
            for line in self.zf.read(entry).decode("utf-8", "replace").splitlines():
                m = _CLASS_LINE.match(line)
                if m:
                    current = f"{module}.{m.group(1)}"
                    names.setdefault(current, set())
                    continue
                m = _LIST_LINE.match(line)
                if m and current is not None:
                    names[current].update(re.findall(r'"([^"]*)"', m.group(2)))
        return names


def _swapped(raw: bytearray, itemsize: int) -> bytearray:
    if itemsize == 1:
        return raw
    return bytearray(np.frombuffer(bytes(raw), dtype=f"u{itemsize}").byteswap().tobytes())


def _find_prefix(zf: zipfile.ZipFile) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if not pickles:
        raise TorchScriptArchiveError("no data.pkl in the archive (a TorchScript file from before PyTorch 1.4?)")
    return pickles[0][: -len("data.pkl")]


def _collect(obj: ArchiveObject, prefix: str, names: dict[str, set[str]], out: dict[str, torch.Tensor],
             seen: set[int], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise TorchScriptArchiveError(f"module tree deeper than {_MAX_DEPTH} levels at {prefix or '<root>'}")
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise TorchScriptArchiveError(
            f"module {prefix.rstrip('.') or '<root>'} ({obj.type_name}) stores a custom state "
            f"({type(state).__name__}), not attributes; this is not a plain weights archive"
        )
    declared = names.get(obj.type_name)
    for attr, value in state.items():
        if not isinstance(attr, str):
            continue
        if isinstance(value, torch.Tensor):
            if declared is None or attr in declared:
                out[prefix + attr] = value
        elif isinstance(value, ArchiveObject):
            _collect(value, f"{prefix}{attr}.", names, out, seen, depth + 1)


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, by ``state_dict()`` name, without executing it.

    Raises:
        TorchScriptArchiveError: the archive holds something other than modules and tensors, a
            tensor record is inconsistent, or the layout is unknown.
        zipfile.BadZipFile, OSError: not a readable zip.
    """
    with zipfile.ZipFile(path) as zf:
        prefix = _find_prefix(zf)
        archive = _Archive(zf, prefix)
        try:
            archive.check_member(prefix + "data.pkl", _MAX_PICKLE_BYTES)
            root = _ArchiveUnpickler(zf.read(prefix + "data.pkl"), archive).load()
        except TorchScriptArchiveError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
            raise TorchScriptArchiveError(f"data.pkl is not a readable module record ({type(e).__name__}: {e})") from e
        if not isinstance(root, ArchiveObject):
            raise TorchScriptArchiveError(f"data.pkl holds a {type(root).__name__}, not a module")
        out: dict[str, torch.Tensor] = {}
        _collect(root, "", archive.state_names(), out, set(), 0)
    return out

"""The one config mechanism: dataclass recipes read from and written to JSON-able dicts.

Every recipe of the library (CLIP's shape, a segmenter run, WeCLIP, CLIP-ZSS, FMA prompt training, a
model's options) is a dataclass that inherits :class:`DictConfig` (or is read with
:func:`config_from_dict`). The rules are the same for all of them:

- an unknown key is an error that names the valid ones (a typo never passes silently);
- a missing key takes the field's default (so a recipe stored before a field was added still loads);
- values are converted by the field's type hint: a JSON list becomes a tuple where the field is a tuple
  (element by element, so tuples of tuples come back whole), a dict becomes the nested dataclass where the
  field is one (``Optional[...]`` included); ``dict``, ``list`` and ``Any`` fields are kept as given;
- :func:`config_to_dict` is the inverse: tuples become lists and nested dataclasses dicts.

This module imports nothing from the rest of the package, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

__all__ = ["DictConfig", "config_from_dict", "config_to_dict", "json_ready", "changed_keys"]

T = TypeVar("T")


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from ``values`` (see the module docstring for the rules).

    Raises:
        ValueError: a key of ``values`` is not a field of ``cls`` (the message lists the valid ones).
        TypeError: ``values`` is not a dict or ``cls`` is not a dataclass.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(values, dict):
        raise TypeError(f"{cls.__name__} is read from a dict, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _convert(hints.get(key, Any), value) for key, value in values.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly dict of a dataclass config (tuples become lists, nested dataclasses dicts)."""
    return json_ready(dataclasses.asdict(config))


def json_ready(value: Any) -> Any:
    """``value`` with every tuple turned into a list, inside dicts and lists too."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Sorted dotted keys (``stage.augment.long_side``) whose values differ between two nested dicts."""
    flat_before, flat_after = _flatten(before), _flatten(after)
    return sorted(k for k in set(flat_before) | set(flat_after) if flat_before.get(k) != flat_after.get(k))


class DictConfig:
    """Mixin of a dataclass config: ``to_dict`` / ``from_dict`` by the rules of :mod:`tag2mask.config`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists, nested dataclasses dicts)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        """Inverse of :meth:`to_dict`; an unknown key is an error naming the valid ones."""
        return config_from_dict(cls, values)


def _convert(hint: Any, value: Any) -> Any:
    """``value`` read from JSON, shaped by the type hint of its field."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        for option in args:
            if option is not type(None) and _accepts(option, value):
                return _convert(option, value)
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return config_from_dict(hint, value)
    if (hint is tuple or origin is tuple) and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_convert(a, v) for a, v in zip(args, value))
        return tuple(value)
    return value


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON ``value`` should be read as ``hint`` (one option of a ``Union``)."""
    origin = typing.get_origin(hint) or hint
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if hint is Any:
        return True
    return isinstance(origin, type) and isinstance(value, origin)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

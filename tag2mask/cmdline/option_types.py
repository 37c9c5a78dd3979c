"""Typed argparse options: every number a sub-command takes is checked here, with one clear line.

Each helper is an argparse ``type=`` callable that refuses NaN, infinities, out-of-range values and
non-numbers with an :class:`argparse.ArgumentTypeError` (argparse then exits with code 2), so no bad
number reaches the code as a silent switch or a traceback. The helpers say which values are valid
(:meth:`Number.accepts`), so a test can walk every option of every sub-command.

The documented maxima (``docs/security.md``) keep a typo from allocating gigabytes:
:data:`MAX_SIDE` for image sizes, :data:`MAX_PIXELS` for pixel counts, :data:`MAX_ITERS` for
iteration counts, :data:`MAX_COUNT` for item counts.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import NoReturn, Optional, Union

__all__ = ["Number", "positive_int", "non_negative_int", "int_in", "finite_float", "device", "auto_or", "list_of",
           "OneLineParser", "MAX_SIDE", "MAX_PIXELS", "MAX_ITERS", "MAX_COUNT", "MAX_BATCH", "MAX_WORKERS"]

#: largest image side (pixels) for --short-side, --size, --crop, --synth-size ...: 8192 x 8192 RGB float
#: working copies already take ~0.8 GB
MAX_SIDE = 8192
#: largest pixel count for --max-pixels / --max-decode-pixels (1 gigapixel)
MAX_PIXELS = 1_000_000_000
#: largest iteration count (--iters, --stop-at, --ckpt-every ...)
MAX_ITERS = 100_000_000
#: largest item count (--limit, --n, --synth-n, --val ...)
MAX_COUNT = 1_000_000_000
#: largest batch size
MAX_BATCH = 4096
#: largest number of worker processes
MAX_WORKERS = 256


class Number:
    """An argparse type: an ``int`` or a finite ``float`` within ``[lo, hi]`` (ends open when asked)."""

    def __init__(self, kind: type, lo: Optional[float] = None, hi: Optional[float] = None, *,
                 lo_open: bool = False, hi_open: bool = False, note: str = "") -> None:
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open, self.note = kind, lo, hi, lo_open, hi_open, note
        self.__name__ = self.describe()  # argparse names the type in some messages

    def describe(self) -> str:
        noun = "a whole number" if self.kind is int else "a finite number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}")
        return noun + (" " + " and ".join(parts) if parts else "") + (f" ({self.note})" if self.note else "")

    def accepts(self, value: float) -> bool:
        """Whether ``value`` is valid (what the option walker test asks)."""
        if not math.isfinite(value) or (self.kind is int and value != int(value)):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __call__(self, text: str) -> Union[int, float]:
        value = _parse(text, self.kind)
        if value is None or not self.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}")
        return self.kind(value)


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 10_000 else f"{x:g}"


def _parse(text: str, kind: type) -> Optional[float]:
    try:
        if kind is int:
            # whole numbers, also written 4e6 (read exactly: no float rounding of large values)
            if re.fullmatch(r"\s*[-+]?\d+\s*", text):
                return int(text)
            value = float(text)
            return int(value) if math.isfinite(value) and value == int(value) else None
        return float(text)
    except (ValueError, OverflowError):
        return None


def positive_int(hi: float = MAX_COUNT, note: str = "") -> Number:
    """A whole number from 1 to ``hi`` (0 is not valid)."""
    return Number(int, 1, hi, note=note)


def non_negative_int(hi: float = MAX_COUNT, note: str = "") -> Number:
    """A whole number from 0 to ``hi``: for options where 0 is valid (say what it means in ``note``)."""
    return Number(int, 0, hi, note=note)


def int_in(lo: int, hi: int, note: str = "") -> Number:
    return Number(int, lo, hi, note=note)


def finite_float(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
                 hi_open: bool = False, note: str = "") -> Number:
    """A finite float in the range (NaN and infinities are always refused)."""
    return Number(float, lo, hi, lo_open=lo_open, hi_open=hi_open, note=note)


class _AutoOr:
    """``auto`` or a number checked by ``number``."""

    def __init__(self, number: Number) -> None:
        self.number = number
        self.__name__ = f"'auto' or {number.describe()}"

    def accepts(self, value: float) -> bool:
        return self.number.accepts(value)

    def __call__(self, text: str) -> Union[int, float, str]:
        if text == "auto":
            return "auto"
        try:
            return self.number(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {self.number.describe()}, got {text!r}") from None


def auto_or(number: Number) -> _AutoOr:
    return _AutoOr(number)


class _ListOf:
    """A comma-separated list (``"8,16"``) of numbers each checked by ``number``; returned as a tuple."""

    def __init__(self, number: Number) -> None:
        self.number = number
        self.__name__ = f"comma-separated {number.describe()}"

    def accepts(self, value: float) -> bool:
        return self.number.accepts(value)

    def __call__(self, text: str) -> tuple:
        parts = [t for t in text.split(",") if t.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected {self.__name__}, got {text!r}")
        try:
            return tuple(self.number(t) for t in parts)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected {self.__name__}, got {text!r}") from None


def list_of(number: Number) -> _ListOf:
    return _ListOf(number)


_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d{1,3})?)$")


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (other accelerators are not supported)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")
    return text


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``tag2mask segment: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

"""CorrCLIP's official name-set files: one class per line, synonyms separated by ``"; "``.

The official files give synonyms to the background line (line 1) only; the official decision pools
the first ``Q - C + 1`` queries as background, which equals "max over each class's synonyms" (what
this package computes) exactly for such files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from tag2mask.vocab.vocabulary import Vocabulary

__all__ = ["read_corrclip_names", "is_corrclip_nameset"]


def is_corrclip_nameset(path: Union[str, Path]) -> bool:
    """Whether a name-set file uses CorrCLIP's ``"; "`` synonym separator."""
    p = Path(path)
    return p.is_file() and any("; " in line for line in p.read_text(encoding="utf-8").splitlines())


def read_corrclip_names(path: Union[str, Path], first_line_background: bool = True) -> Vocabulary:
    """Read a CorrCLIP name-set file as it is: line = class, ``"; "`` = synonyms, line 1 = background
    (``first_line_background``; the official VOC21 / Context60 / Object files)."""
    lines = [line.rstrip("\r") for line in Path(path).read_text(encoding="utf-8").split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    groups = [tuple(" ".join(w.split()) for w in line.split("; ")) for line in lines]
    if any(not all(g) for g in groups):
        raise ValueError(f"{path}: empty class name or synonym")
    background = groups[0] if first_line_background else ()
    classes = groups[1:] if first_line_background else groups
    if not classes:
        raise ValueError(f"{path}: no classes besides the background line")
    return Vocabulary(names=tuple(g[0] for g in classes), synonyms=classes, background=background,
                      allow_background_overlap=True)

"""tag2mask: turn a frozen CLIP into a semantic segmenter without pixel labels."""

from typing import Any

from tag2mask.version import __version__  # noqa: F401  (the public tag2mask.__version__)

#: the folder API (:mod:`tag2mask.api`), imported on first use so ``tag2mask --help`` stays fast
_LAZY = {"label_folder", "segment_folder", "FolderRun"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from tag2mask import api

        return getattr(api, name)
    raise AttributeError(f"module 'tag2mask' has no attribute {name!r}")

"""Python API for folders: :func:`label_folder` and :func:`segment_folder`.

Each call runs the ``tag2mask label`` / ``tag2mask segment`` command itself (same batch machinery:
manifest, ``resume``, settings guard, bad inputs recorded and skipped, torchrun sharding), with
keyword arguments in place of the command-line options: ``refine="crf"`` is ``--refine crf``,
``save_arrays=True`` is ``--save-arrays``, ``compat=False`` is ``--no-compat``, a list gives several
values (``scales=[1.0, 0.5]``). An argument the command does not have raises ``TypeError``; a bad
value raises ``ValueError`` (what the command would print as its one-line error).

    import tag2mask
    run = tag2mask.label_folder("photos/", "seeds/", labels="tags.json", classes="voc", refine="crf")
    print(run.written, run.failed)   # items written now, items that failed (with their errors)
"""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = ["FolderRun", "label_folder", "segment_folder"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class FolderRun:
    """What a folder run left in ``out``, read from its manifest.

    Attributes:
        out: the output folder (``masks/<stem>.png``, ``run.json``, ``manifest.jsonl``, ...).
        exit_code: the command's exit code (0: every item done, 1: some failed).
        done: item names whose outputs are complete (written now or by an earlier run).
        failed: ``{item: error}`` of the items that failed (bad image, unreadable file, ...).
    """

    out: Path
    exit_code: int
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _argv(parser: argparse.ArgumentParser, command: list[str], options: dict[str, Any]) -> list[str]:
    """Command-line tokens for keyword ``options`` (``None`` values are left out: the command's default)."""
    known = parser._option_string_actions  # noqa: SLF001 - argparse has no public map of option strings
    argv = list(command)
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            negative = "--no-" + key.replace("_", "-")
            if value and flag in known:
                argv.append(flag)
            elif not value and negative in known:
                argv.append(negative)
            elif not value and flag in known:
                pass  # a switch that is off unless given: False is its default
            else:
                raise TypeError(f"{command[0]} has no option {key!r}")
            continue
        if flag not in known:
            raise TypeError(f"{command[0]} has no option {key!r}")
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [flag, *(str(v) for v in values)]
    return argv


def _run_command(command: list[str], options: dict[str, Any], out: PathLike) -> FolderRun:
    from tag2mask.cli.main import build_parser
    from tag2mask.io.manifest import MANIFEST_NAME, latest_records, rank_manifest_paths

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]  # noqa: SLF001 - the sub-command's parser
    argv = _argv(sub, command, {"out": str(out), **options})
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit:  # argparse reports a bad value on stderr and exits; an API raises instead
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else
                         f"bad arguments for {command[0]}") from None
    exit_code = int(args.func(args) or 0)
    out = Path(out)
    records = latest_records([out / MANIFEST_NAME, *rank_manifest_paths(out)])
    done = sorted(k for k, r in records.items() if r.get("status") == "ok")
    failed = {k: str(r.get("error", r.get("status"))) for k, r in records.items() if r.get("status") != "ok"}
    return FolderRun(out, exit_code, done, failed)


def label_folder(images: PathLike, out: PathLike, *, classes: str = "voc", labels: PathLike | None = None,
                 refine: str | None = None, weights: PathLike | None = None, resume: bool = False,
                 device: str = "auto", quiet: bool = True, **options: Any) -> FolderRun:
    """``tag2mask label IMAGES --out OUT ...``: CLIP-ES pseudo-masks for a folder (or VOC/COCO root).

    Args:
        images: image folder, or a VOC/COCO root (then e.g. ``split="train"``).
        out: output folder: ``masks/<stem>.png`` (palette PNG, ``(H, W)`` uint8: 0 background, class
            id + 1, 255 not confident), ``run.json``, ``manifest.jsonl``.
        classes: ``voc``, ``coco``, ``synth``, a class-name file or an inline list.
        labels: tags per image (``tags.json``) for an image folder.
        refine: ``crf``, ``pamr`` or ``none`` (default: the command's).
        weights: CLIP weights (default: the shipped tiny CLIP).
        resume: continue an interrupted run (items already written are kept).
        device: ``cpu``, ``cuda`` or ``auto``.
        quiet: no progress bar.
        options: any other ``label`` option by its long name (``save_arrays=True``, ``split="train"``).
    """
    return _run_command(["label", str(images)], {"classes": classes, "labels": labels, "refine": refine,
                                                  "weights": weights, "resume": resume or None, "device": device,
                                                  "quiet": quiet or None, **options}, out)


def segment_folder(images: PathLike, out: PathLike, *, classes: str | None = None, method: str | None = None,
                   checkpoint: PathLike | None = None, weights: PathLike | None = None, resume: bool = False,
                   device: str = "auto", quiet: bool = True, **options: Any) -> FolderRun:
    """``tag2mask segment IMAGES --out OUT ...``: open-vocabulary masks, or a trained run's (``checkpoint``).

    Args:
        images: image folder.
        out: output folder: ``masks/<stem>.png`` (``(H, W)`` uint8 label maps), ``run.json``, ``manifest.jsonl``.
        classes: ``"cat, dog; background: sky, grass"`` (also ``|`` between the parts), ``voc``,
            ``coco``, ``synth`` or a class-name file; a trained WeCLIP run brings its own.
        method: ``naclip``, ``sclip``, ``clearclip``, ``maskclip`` (default: the command's).
        checkpoint: a ``train weclip`` / ``train segmenter`` / ``train clip-zss`` run folder.
        weights: CLIP weights (default: the shipped tiny CLIP).
        resume: continue an interrupted run.
        device: ``cpu``, ``cuda`` or ``auto``.
        quiet: no progress bar.
        options: any other ``segment`` option by its long name (``overlay=True``, ``pamr=True``).
    """
    return _run_command(["segment", str(images)], {"classes": classes, "method": method, "checkpoint": checkpoint,
                                                    "weights": weights, "resume": resume or None, "device": device,
                                                    "quiet": quiet or None, **options}, out)

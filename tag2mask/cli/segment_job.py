"""The per-image work and the batch job of ``tag2mask segment`` (open-vocabulary methods, trained runs,
exported graphs alike): the input listing, one image -> mask (+ overlay, + logits) written atomically, and
the run on the batch runner (manifest, ``--resume``, torchrun, ``--engine ray``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from tag2mask.cli.segment_records import write_outputs

__all__ = ["IMAGE_SUFFIXES", "DEFAULT_MAX_PIXELS", "MAX_DECODE_PIXELS", "list_images", "output_stems",
           "ImageSegmenter", "run_segment_job"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: default --max-pixels: 4 MP. The working resolution is bounded anyway (--short-side); what grows with
#: the image is the full-size logits (prompts x H x W float32, several copies): 95 MP took 13 GB
DEFAULT_MAX_PIXELS = 4_000_000
MAX_DECODE_PIXELS = 100_000_000


def list_images(path: "str | Path") -> list:
    """The image files to process: ``path`` itself, or the image-suffixed entries of a folder, sorted.

    Entries that only look like images (a broken symlink, a folder named ``x.jpg``) are listed too:
    the job reports them as bad items, as ``label`` does, instead of skipping them silently. A URI
    (``s3://bucket/prefix``, ``file:///...``) lists its objects the same way, as
    :class:`~tag2mask.io.uri_inputs.RemoteFile` items.
    """
    from tag2mask.io.uri_inputs import is_uri, list_uri

    if is_uri(path):
        files = list_uri(str(path), IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) under this prefix")
        return files
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such image or folder")
    return [path]


def output_stems(files: list) -> dict:
    """File stems, disambiguated when two inputs share one (``a.jpg`` and ``a.png`` -> ``a_jpg``, ``a_png``)."""
    counts: dict[str, int] = {}
    for f in files:
        counts[f.stem] = counts.get(f.stem, 0) + 1
    return {f: (f.stem if counts[f.stem] == 1 else f.name.replace(".", "_")) for f in files}


class ImageSegmenter:
    """``process_fn`` of the runner: one image path -> mask (+ overlay, + logits), written atomically."""

    def __init__(self, segmenter, args: argparse.Namespace, out: Path, stems: dict[Path, str]) -> None:
        self.segmenter, self.args, self.out, self.stems = segmenter, args, out, stems

    def __call__(self, path, data: Optional[bytes] = None):
        """``path``: a local path or a :class:`~tag2mask.io.uri_inputs.RemoteFile`; ``data``: the file's
        bytes when already read (the Ray engine), decoded by the same rules."""
        import numpy as np
        from PIL import Image

        from tag2mask.data.images import fit_max_pixels, load_image
        from tag2mask.jobs.runner import ItemError, ItemOutput

        args = self.args
        # ImageDecodeError (unreadable, truncated, a folder, a broken link, a bomb; an object that cannot be
        # read) -> a "decode" error record
        image = load_image(path, max_pixels=getattr(args, "max_decode_pixels", MAX_DECODE_PIXELS), data=data)
        full = image
        width, height = image.size
        info = {"input": str(path), "size": [height, width]}
        max_pixels = getattr(args, "max_pixels", DEFAULT_MAX_PIXELS)
        w, h = fit_max_pixels(width, height, max_pixels)
        if (w, h) != (width, height):
            if getattr(args, "max_pixels_policy", "downscale") == "refuse":
                raise ItemError("too_large", f"{path}: image is {width}x{height} = {width * height:,} pixels, more than "
                                f"--max-pixels {max_pixels:,}; raise --max-pixels or use --max-pixels-policy downscale")
            image = image.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
            info["processed_size"] = [h, w]
        # region maps of a folder are keyed by the file stem (CorrCLIP)
        wants_key = getattr(self.segmenter, "wants_key", False)
        res = self.segmenter.predict(image, key=path.stem) if wants_key else self.segmenter.predict(image)
        rgb = np.asarray(image, dtype=np.uint8)
        if (w, h) != (width, height):
            # the mask (and overlay) align with the original image; the logits stay at the processed size
            res.label = np.asarray(Image.fromarray(res.label).resize((width, height), Image.NEAREST))
            # the overlay's full-size photo: the decoded bytes in hand, else decoded again from the file if needed
            rgb = np.asarray(full, dtype=np.uint8) if data is not None and args.overlay else None
        written = write_outputs(self.out, self.stems[path], rgb, res, args, original=path)
        info["present"] = [res.class_names[v] for v in res.present()]
        return ItemOutput(list(written.values()), info)


def run_segment_job(args: argparse.Namespace, files: list, stems: dict, out: Path, segmenter,
                    settings: dict, record: dict, engine=None) -> int:
    """Run ``segmenter`` over ``files`` on the batch runner (manifest, resume, torchrun); exit code."""
    from tag2mask.jobs.runner import JobOptions, print_summary, process_exit_code, run_items
    from tag2mask.io.uri_inputs import input_state

    def finalize(run_dir: Path, summary) -> None:
        from tag2mask.cli.segment_records import image_records

        record["images"] = image_records(run_dir, files, stems)

    options = JobOptions(resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, verbose=args.verbose,
                         limit=args.limit, desc="segment", unit="img")
    summary = run_items(files, ImageSegmenter(segmenter, args, out, stems), out, settings, options,
                        keys=[stems[f] for f in files], describe=lambda i: str(files[i]),
                        run_record=record, finalize=finalize, source_of=lambda i: input_state(files[i]), engine=engine)
    if not args.quiet or summary.failed:
        print_summary(summary, out, "segment")
    return process_exit_code(summary)

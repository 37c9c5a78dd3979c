"""``tag2mask export``: a trained run out of tag2mask, as an ONNX graph + sidecar or a hub-style folder.

The run's engine task picks its export hook in :data:`tag2mask.methods.registry.RUN_EXPORTERS`; this module
names no method.
"""

from __future__ import annotations

import argparse
import json

from tag2mask.cmdline import option_types as ot

__all__ = ["add_parser"]

DESCRIPTION = """Export a trained run (train segmenter, train weclip, train clip-zss).

--onnx OUT.onnx writes the network as an ONNX graph (normalised image (1, 3, H, W) -> logits (1, C, H, W) at
the input size, the run's test scales and flip inside) and OUT.onnx.json (classes, palette, mean/std,
input size, test resize, opset). The same run and options give byte-identical files. Before the file is
written, onnxruntime runs the graph against torch on one input (two sizes with --dynamic): a graph that
fails is not written (error), the largest differences are printed and kept in the sidecar.
--hub DIR writes a hub-style folder: model.safetensors, config.json and a model card (README.md).

examples:
  tag2mask export runs/seg --onnx seg.onnx --dynamic
  tag2mask segment photos/ --onnx seg.onnx --out masks_onnx
  tag2mask export runs/zss --onnx zss.onnx --classes "cat, dog, tree" --size 320 320
  tag2mask export runs/seg --hub hub/seg
See docs/export.md.
"""


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a trained run as ONNX (+ sidecar) or as a hub-style folder",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run folder or checkpoint file of train segmenter | weclip | clip-zss, "
                                              "or hf://USER/REPO[@REV] (a hub-style folder; extra 'hub')")
    p.add_argument("--onnx", default=None, metavar="OUT.onnx", help="write the ONNX graph here (extra 'onnx')")
    p.add_argument("--size", nargs=2, type=ot.positive_int(ot.MAX_SIDE), default=None, metavar=("H", "W"),
                   help="the graph's input size (default: the run's training crop; WeCLIP: its test long side); "
                        "with --dynamic the example the exporter traces")
    p.add_argument("--dynamic", action="store_true", help="symbolic height and width (any image size)")
    p.add_argument("--opset", type=ot.positive_int(100), default=18, help="ONNX opset (14..20, default 18)")
    p.add_argument("--hub", default=None, metavar="DIR", help="write a hub-style folder here")
    p.add_argument("--weights", default=None, help="WeCLIP / CLIP-ZSS runs: the CLIP they were trained with "
                                                   "(default: the recorded path)")
    p.add_argument("--classes", default=None, help="CLIP-ZSS runs: plain class names 'a, b, c' for the text head "
                                                   "(default: the classes of its training data)")
    p.add_argument("--allow-download", action="store_true",
                   help="RUN hf://USER/REPO[@REV] only: fetch it when the local Hugging Face cache lacks it "
                        "(without it: the cache only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tag2mask.export.onnx_graph import export_onnx, require_onnx, sidecar_path
    from tag2mask.jobs.checkpoint import is_hf_name, resolve_checkpoint
    from tag2mask.methods import registry
    from tag2mask.runs.layout import read_run_checkpoint

    if not args.onnx and not args.hub:
        raise ValueError("nothing to do: give --onnx OUT.onnx and/or --hub DIR")
    if not args.onnx and (args.size or args.dynamic or args.opset != 18):
        raise ValueError("--size, --dynamic and --opset apply to --onnx")
    if args.allow_download and not is_hf_name(args.run):
        raise ValueError("--allow-download applies to hf://USER/REPO run names (a local run is read as it is)")
    report: dict = {"run": str(args.run)}
    ckpt = resolve_checkpoint(args.run, True if args.allow_download else None)
    task = read_run_checkpoint(ckpt)["task"]
    if args.onnx:
        out = Path(args.onnx)
        if not args.overwrite and (out.exists() or sidecar_path(out).exists()):
            raise ValueError(f"{out} (or its sidecar) exists; pass --overwrite to replace it")
        require_onnx()  # before the run's network is built
        spec = registry.run_exporter(task)(ckpt, weights=args.weights, classes=args.classes)
        sidecar = export_onnx(spec, out, tuple(args.size) if args.size else None, args.dynamic, args.opset)
        report.update(onnx=str(out), sidecar=str(sidecar_path(out)), kind=task, classes=sidecar["classes"],
                      input=sidecar["input"], notes=sidecar["notes"], check=sidecar["check"])
    if args.hub:
        from tag2mask.runs.hub import write_hub_folder

        if args.weights or args.classes:
            raise ValueError("--weights and --classes apply to --onnx (a hub folder keeps the run's own references)")
        run_dir = Path(args.run) if Path(args.run).is_dir() else ckpt.parent
        report["hub"] = str(write_hub_folder(read_run_checkpoint(ckpt), Path(args.hub), run_dir, args.overwrite))
    print(json.dumps(report))
    return 0

"""``tag2mask serve``: the web demo (upload an image, type class names, see the segmentation)."""

from __future__ import annotations

import argparse
import textwrap
import sys

from tag2mask.cmdline.options import add_device_option, add_weights_options, record_given_options
from tag2mask.cmdline import option_types as ot
from tag2mask.methods import registry


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="web demo: upload an image and class names, get the segmentation (open-vocabulary methods)",
        description=textwrap.fill(
            "Start a small web server (standard library, no extra packages). Open http://HOST:PORT/ in a "
            "browser, or POST a multipart form (image, classes, method, mode, compare) to /api/segment for JSON. "
            "Binds to 127.0.0.1 (this machine only) unless --host says otherwise. Requests take class names "
            "typed inline only (never a file), uploads up to 20 MiB and 16 megapixels; see docs/security.md. "
            "The methods offered are those the loaded CLIP can run (SC-CLIP: 11+ blocks) and whose inputs are given "
            "at start-up (CorrCLIP: --regions, --dino); the others are listed, with the reason, on the page and at "
            "GET /api/methods.", 100)
        + "\n\ncurl (its -F reads ';' as its own syntax: use --form-string, or ', background:' without ';'):\n"
            "  curl -F image=@photo.jpg --form-string 'classes=cat, dog; background: sky' "
            "http://127.0.0.1:7860/api/segment",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the demo to the network)")
    p.add_argument("--port", type=ot.int_in(0, 65535, note="0 picks a free port"), default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host header is NAME (e.g. the machine's DNS name when binding "
                        "0.0.0.0); the bound address and localhost are always accepted. Repeatable")
    add_weights_options(p)
    add_device_option(p)
    registry.add_input_options(p)  # the inputs some methods need (CorrCLIP: --dino, --regions)
    p.set_defaults(func=run)
    record_given_options(p)
    return p


def build_server(args: argparse.Namespace, short_side: int = 448):
    """The server of ``args`` (not yet serving): the model loaded, the methods' inputs built once
    (e.g. CorrCLIP's DINO), the methods offered decided for that model (``server.service.methods``)."""
    from tag2mask.cmdline.options import load_model_from_args
    from tag2mask.web.server import make_server

    registry.check_input_options(args, "serve")  # before the model loads: a misuse fails fast
    model = load_model_from_args(args)
    inputs = registry.method_inputs(registry.serve_methods(), model, args)
    return make_server(model, args.host, args.port, allowed_hosts=args.allow_host, short_side=short_side,
                       inputs=inputs)


def run(args: argparse.Namespace) -> int:
    from tag2mask.web.server import LOOPBACK_NAMES

    server = build_server(args)
    host, port = server.server_address[:2]
    print(f"tag2mask serve: http://{host}:{port}/  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    if args.host not in LOOPBACK_NAMES:
        print(f"tag2mask serve: warning: bound to {args.host}, so other machines can use this demo; it has no "
              "authentication (see docs/security.md)", file=sys.stderr, flush=True)
    print(f"tag2mask serve: methods: {', '.join(server.service.methods)}", file=sys.stderr, flush=True)
    for method, why in server.service.unavailable.items():
        print(f"tag2mask serve: {method} is not offered: {why}", file=sys.stderr, flush=True)
    if server.service.toy_model:
        print("tag2mask serve: note: the shipped tiny CLIP knows only the synthetic shapes world; pass --weights "
              "ViT-B-16.pt for real images", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

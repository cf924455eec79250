"""``python -m fastmeta info``: what is active; ``python -m fastmeta train ...``: the CLI."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m fastmeta")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, extension build and Triton mode")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--no-build", action="store_true", help="do not build the extension")
    sub.add_parser("train", help="train teacher and student (see python -m fastmeta.train -h)")
    args = parser.parse_args(argv)
    from .backends import backends, format_backends

    try:
        report = backends(build_extension=not args.no_build)
        failure = None
    except RuntimeError as exc:  # FASTMETA_REQUIRE_CUDA_EXTENSION=1 and no CUDA build
        report = backends(build_extension=False)
        failure = report["required_extension_error"] = str(exc)
    print(json.dumps(report, indent=2) if args.json else format_backends(report))
    if failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

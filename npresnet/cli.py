"""The ``npresnet`` command: a thin layer over the public API."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .backends import BackendUnavailable
from .hub import fetch
from .manifest import DEFAULT
from .model import build, load
from .specs import ARCHITECTURES
from .weights import WeightsError, convert


def cmd_info(args) -> int:
    if args.model in ARCHITECTURES:
        model = build(args.model, backend="numpy")
    else:
        model = load(args.model, backend="numpy")
    spec = model.spec
    print(f"architecture: {spec.name}")
    print(f"block: {spec.block}, layers: {spec.layers}, groups: {spec.groups}, width_per_group: {spec.width_per_group}")
    print(f"stem: {spec.stem}, num_classes: {spec.num_classes}")
    print(f"parameters: {model.num_params:,}")
    return 0


def cmd_convert(args) -> int:
    meta = convert(args.src, args.dst)
    known = f", crop {meta['crop_size']}, resize {meta['resize_size']}" if "crop_size" in meta else ""
    print(f"{args.dst}: {meta['arch']}, num_classes {meta['num_classes']}, stem {meta['stem']}{known}")
    if "source_sha256" in meta:
        print(f"source sha256: {meta['source_sha256']}")
    return 0


def cmd_fetch(args) -> int:
    print(fetch(args.arch, args.weights))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npresnet",
        description="Run TorchVision ResNets (resnet18 ... wide_resnet101_2) in NumPy, without PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"npresnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="describe an architecture or a weights file")
    info.add_argument("model", help="an architecture name (e.g. resnet50) or a weights file (.npz)")
    info.set_defaults(run=cmd_info)
    convert_ = commands.add_parser(
        "convert", help="convert a PyTorch checkpoint (.pth) or .safetensors file to an .npz (no torch needed)"
    )
    convert_.add_argument("src", help="the weights file to read (.pth, .pt, .safetensors, .npz)")
    convert_.add_argument("dst", help="the .npz to write (atomically)")
    convert_.set_defaults(run=cmd_convert)
    fetch_ = commands.add_parser(
        "fetch", help="download TorchVision's official weights, verify their sha256, convert and cache them"
    )
    fetch_.add_argument("arch", choices=list(ARCHITECTURES), metavar="ARCH", help="e.g. resnet50")
    fetch_.add_argument("--weights", default=DEFAULT, help="IMAGENET1K_V1, IMAGENET1K_V2 or DEFAULT (default)")
    fetch_.set_defaults(run=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (WeightsError, BackendUnavailable, ValueError, OSError) as exc:
        print(f"npresnet: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

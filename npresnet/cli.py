"""The ``npresnet`` command: a thin layer over the public API.

Each subcommand is one ``cmd_*`` function and one block in ``build_parser``.
User mistakes (a missing file, an unreadable image, weights that do not fit)
end as one ``npresnet: error: ...`` line on stderr and a non-zero exit, never a
traceback; a bad image among many is reported and the rest are still processed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from . import __version__
from .backends import BackendUnavailable
from .hub import FetchError, fetch, is_weights_name
from .model import ResNet, build, load
from .predict import labels_for, save_embeddings, top_k
from .progress import Progress
from .preprocess import ImageClassification, ImageError, preset_for
from .specs import ARCHITECTURES, count_macs
from .weights import WeightsError, convert, read_weights

DEFAULT_ARCH = "resnet50"
GLOB_CHARACTERS = "*?["
SHORT_RUN_IMAGES = 16  # up to this many images, --backend auto runs on NumPy (see backend_for)


# --- helpers shared by the subcommands ---------------------------------------------------------------------------


def error(message: str) -> None:
    print(f"npresnet: error: {message}", file=sys.stderr)


def warning(message: str) -> None:
    print(f"npresnet: warning: {message}", file=sys.stderr)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 embedding', '2 embeddings'; nouns for an irregular plural ('1 class', '3 classes')."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


class CommandError(Exception):
    """A mistake in the command's arguments or inputs, found by the command itself: one error line, exit 1."""


def image_extensions() -> set[str]:
    """File name extensions PIL can open (.jpg, .png, .webp, ...), lower case."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """IMAGE|DIR|GLOB arguments -> (image paths in order, (argument, error message) pairs).

    A directory gives its files whose extension PIL can open (not recursing, hidden files skipped);
    a file named on the command line is always tried, whatever its extension.
    """
    extensions = image_extensions()
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            entries = sorted((e for e in os.scandir(item) if e.is_file() and not e.name.startswith(".")), key=lambda e: e.name)
            images = [e.path for e in entries if Path(e.name).suffix.lower() in extensions]
            if not images:
                problems.append((item, f"{item}: no image files in this directory ({plural(len(entries), 'other file')})"))
            paths.extend(images)
        elif os.path.exists(item):
            paths.append(item)
        elif any(c in item for c in GLOB_CHARACTERS):
            matches = sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not matches:
                problems.append((item, f"{item}: no files match this pattern"))
            paths.extend(matches)
        else:
            problems.append((item, f"{item}: no such file or directory"))
    return paths, problems


class ImageErrors:
    """Reports each image that could not be read (one stderr line; a JSON line too with --json) and counts them."""

    def __init__(self, progress: Progress, already: int = 0, json_lines: bool = False):
        self.progress = progress
        self.count = already  # problems found before any image was read (missing files, empty patterns)
        self.json_lines = json_lines

    def report(self, path: str, message: str) -> None:
        self.count += 1
        self.progress.message(f"npresnet: error: {message}")
        if self.json_lines:
            print(json.dumps({"file": path, "error": message}), flush=True)


def preprocessed_batches(
    paths: list[str], preset: ImageClassification, batch_size: int, progress: Progress, on_error
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(paths, (B, 3, crop, crop) batch) for the readable images; on_error(path, message) for the others."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    progress.advance(0)  # draw the empty bar while the first batch runs
    for path in paths:
        try:
            arrays.append(preset(path))
            names.append(path)
        except ImageError as exc:
            on_error(path, str(exc))
            progress.advance()
        if len(arrays) == batch_size:
            yield names, np.stack(arrays)
            progress.advance(len(names))
            names, arrays = [], []
    if arrays:
        yield names, np.stack(arrays)
        progress.advance(len(names))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        metavar="ARCH",
        help=f"architecture: {', '.join(ARCHITECTURES)} (default: read from --weights, else {DEFAULT_ARCH})",
    )
    group.add_argument(
        "--weights",
        metavar="WEIGHTS",
        help="a weights file (.npz, .pth, .safetensors) or the name of official weights of --arch "
        "(DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2: fetched once, then cached); without it the parameters are random",
    )
    group.add_argument(
        "--backend",
        default="auto",
        help=f"numpy, numba, cuda, or auto (default): the fastest here; NumPy for runs of up to "
        f"{SHORT_RUN_IMAGES} images, where Numba's start-up outweighs its speed",
    )
    group.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for the compiled backends")
    group.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (default 16)")
    group.add_argument(
        "--exif-transpose",
        action="store_true",
        help="turn photos upright by their EXIF orientation first (TorchVision does not, so answers may then differ)",
    )
    group.add_argument(
        "--resize",
        type=height_by_width,
        metavar="HxW",
        help="squash each whole image to HEIGHTxWIDTH (e.g. 224x224), no crop, as TorchVision's Resize((H, W)): "
        "for models fine-tuned that way (default: the weights' own resize-and-center-crop)",
    )


def height_by_width(text: str) -> tuple[int, int]:
    """'224x224' -> (224, 224); 'HEIGHTxWIDTH', both positive."""
    height, sep, width = text.lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 224x224, not {text!r}")
    return int(height), int(width)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def backend_for(requested: str, num_images: int) -> str:
    """The backend a command uses: `auto` means NumPy for short runs.

    Starting Numba (import, loading cached kernels) costs more in a fresh process than it saves on a
    few images (bench/results/notes.md), so a short run is fastest on NumPy; a long one gets what
    backends.get_backend("auto") picks.
    """
    if requested == "auto" and num_images <= SHORT_RUN_IMAGES:
        return "numpy"
    return requested


def model_from_args(args, num_images: int | None = None) -> ResNet:
    backend = args.backend if num_images is None else backend_for(args.backend, num_images)
    options = {"backend": backend, "threads": args.threads}
    try:
        if args.weights is None:
            arch = args.arch or DEFAULT_ARCH
            warning(f"no --weights given: {arch} has random parameters, so its answers are meaningless")
            return build(arch, **options)
        if is_weights_name(args.weights):  # "DEFAULT", "IMAGENET1K_V2": official weights of --arch
            return build(args.arch or DEFAULT_ARCH, args.weights, **options)
        model = load(args.weights, **options)
    except WeightsError:
        raise
    except ValueError as exc:  # an unknown weights name, a bad $NPRESNET_NUM_THREADS
        raise CommandError(str(exc)) from None
    if args.arch is not None and model.arch != args.arch:
        raise CommandError(
            f"{args.weights} holds weights for {model.arch}, not {args.arch}: leave out --arch, "
            "which a weights file does not need (the architecture is read from it)"
        )
    return model


def images_and_model(args) -> tuple[list[str], list[tuple[str, str]], ResNet, ImageClassification]:
    """The images the arguments name and the model and preset to run on them. Arguments that name no
    image are reported here (and, with --json, as {"file", "error"} lines too); the caller counts them."""
    paths, problems = expand_inputs(args.images)
    for item, message in problems:
        error(message)
        if getattr(args, "json", False):
            print(json.dumps({"file": item, "error": message}), flush=True)
    model = model_from_args(args, num_images=len(paths))
    preset = preset_for(model, exif_transpose=args.exif_transpose, squash_size=args.resize)
    return paths, problems, model, preset


# --- subcommands -------------------------------------------------------------------------------------------------


def cmd_classify(args) -> int:
    paths, problems, model, preset = images_and_model(args)
    try:
        labels = labels_for(model, args.labels)
    except ValueError as exc:  # a labels file that is missing or names another number of classes
        raise CommandError(str(exc)) from None
    if args.topk > model.num_classes:
        classes = plural(model.num_classes, "class", "classes")
        warning(f"--topk {args.topk} is more than the model's {classes}: showing {model.num_classes}")
        args.topk = model.num_classes
    progress = Progress(len(paths))
    errors = ImageErrors(progress, already=len(problems), json_lines=args.json)
    for names, batch in preprocessed_batches(paths, preset, args.batch_size, progress, errors.report):
        for name, predictions in zip(names, top_k(model(batch), labels, args.topk)):
            if args.json:
                top = [{"index": p.index, "label": p.label, "probability": p.probability} for p in predictions]
                print(json.dumps({"file": name, "top": top}), flush=True)
            else:
                progress.clear()
                print(name)
                for p in predictions:
                    print(f"  {p.probability:7.2%}  {p.label} ({p.index})")
                sys.stdout.flush()
    progress.close()
    return 1 if errors.count else 0


def cmd_embed(args) -> int:
    paths, problems, model, preset = images_and_model(args)
    progress = Progress(len(paths))
    errors = ImageErrors(progress, already=len(problems))
    names: list[str] = []
    vectors: list[np.ndarray] = []
    for batch_names, batch in preprocessed_batches(paths, preset, args.batch_size, progress, errors.report):
        names.extend(batch_names)
        vectors.append(model.features(batch)["pool"])  # (B, num_features)
    progress.close()
    if not names:
        error(f"no image could be read; {args.output} not written")
        return 1
    meta = {"arch": model.arch, "weights": args.weights, "preprocessing": repr(preset)}
    embeddings = np.concatenate(vectors)
    save_embeddings(args.output, names, embeddings, meta)
    print(f"wrote {plural(len(names), 'embedding')} of width {embeddings.shape[1]} to {args.output}")
    return 1 if errors.count else 0


def cmd_info(args) -> int:
    if args.model in ARCHITECTURES:
        model = build(args.model, backend="numpy")
        state = None
    else:
        if not os.path.exists(args.model) and not Path(args.model).suffix:
            raise CommandError(f"{args.model}: not an architecture ({', '.join(ARCHITECTURES)}) nor a weights file")
        state, _ = read_weights(args.model)
        model = load(args.model, backend="numpy")
    spec = model.spec
    print(f"architecture: {spec.name}")
    print(f"block: {spec.block}, layers: {spec.layers}, groups: {spec.groups}, width_per_group: {spec.width_per_group}")
    print(f"stem: {spec.stem}, num_classes: {spec.num_classes}, embedding width: {spec.num_features}")
    print(f"parameters: {model.num_params:,}")
    preset = preset_for(model)
    size = preset.crop_size if spec.stem == "imagenet" else 32
    print(f"GFLOPs: {count_macs(spec, size, size) / 1e9:.3f} (multiply-adds at {size}x{size}, as TorchVision counts them)")
    print(f"preprocessing: {preset}")
    if state is not None:
        dtypes = sorted({str(v.dtype) for v in state.values()})
        values = sum(int(v.size) for v in state.values())
        print(f"file: {args.model} ({os.path.getsize(args.model) / 1e6:.1f} MB)")
        print(f"tensors: {len(state)} ({', '.join(dtypes)}), {values:,} values including batch-norm statistics")
        print("metadata:")
        for key, value in sorted(model.meta.items()):
            print(f"  {key}: {value}")
    return 0


# --- the parser --------------------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  npresnet info resnet50                              what resnet50 is: layers, parameters, GFLOPs
  npresnet classify --weights resnet50.npz cat.jpg    the 5 most likely ImageNet classes of a photo
  npresnet classify --weights resnet50.npz photos/ --json > answers.jsonl
  npresnet embed --weights resnet50.npz "photos/**/*.jpg" -o vectors.npz

A weights file holds the trained parameters; without one the network is random and
its answers mean nothing. Images are read with Pillow (JPEG, PNG, WebP, TIFF, ...)
and prepared exactly as TorchVision prepares them for its ResNet weights.
"""


def cmd_convert(args) -> int:
    meta = convert(args.src, args.dst)
    known = f", crop {meta['crop_size']}, resize {meta['resize_size']}" if "crop_size" in meta else ""
    print(f"{args.dst}: {meta['arch']}, num_classes {meta['num_classes']}, stem {meta['stem']}{known}")
    if "source_sha256" in meta:
        print(f"source sha256: {meta['source_sha256']}")
    return 0


def cmd_fetch(args) -> int:
    try:
        print(fetch(args.arch, args.weights, from_file=args.from_file))
    except FetchError:
        raise
    except ValueError as exc:  # no official weights of that name
        raise CommandError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npresnet",
        description="Run TorchVision ResNets (resnet18 ... wide_resnet101_2) in NumPy, without PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"npresnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    classify = commands.add_parser(
        "classify",
        help="name what is in photos: the top ImageNet classes with their probabilities",
        description="Print each image's most likely classes, most likely first.",
    )
    classify.add_argument("images", nargs="+", metavar="IMAGE|DIR|GLOB", help="image files, folders of them, or patterns")
    classify.add_argument("--topk", type=positive_int, default=5, metavar="K", help="classes to show per image (default 5)")
    classify.add_argument("--json", action="store_true", help="one JSON object per image and line, for scripts")
    classify.add_argument("--labels", metavar="FILE", help="class names, one a line, for a model with its own head")
    add_model_options(classify)
    classify.set_defaults(run=cmd_classify)

    embed = commands.add_parser(
        "embed",
        help="write the pooled features of images to one .npz, for similarity search",
        description="Write each image's pooled features (the input to the final fc layer) to one .npz: "
        "'embeddings' (N, D) float32, 'names' (N,) file names, 'meta' JSON; np.load reads it without pickle.",
    )
    embed.add_argument("images", nargs="+", metavar="IMAGE|DIR|GLOB", help="image files, folders of them, or patterns")
    embed.add_argument("-o", "--output", default="embeddings.npz", help="the .npz to write (default embeddings.npz)")
    add_model_options(embed)
    embed.set_defaults(run=cmd_embed)

    info = commands.add_parser("info", help="describe an architecture or a weights file")
    info.add_argument("model", help="an architecture name (e.g. resnet50) or a weights file (.npz, .pth, .safetensors)")
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
    fetch_.add_argument(
        "--weights",
        help="IMAGENET1K_V1, IMAGENET1K_V2 or DEFAULT (the default; with --from-file: whichever the file is)",
    )
    fetch_.add_argument(
        "--from-file",
        metavar="FILE",
        help="the official .pth downloaded by hand (e.g. resnet50-11ad3fa6.pth): checked against TorchVision's "
        "sha256 and cached instead of downloaded, so that --weights DEFAULT works offline",
    )
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
    except BrokenPipeError:
        # The reader went away (`npresnet classify ... | head -1`): stop quietly, as cat does, and point
        # stdout at /dev/null so that Python's own flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell shows for a writer its reader left
    except (WeightsError, ImageError, BackendUnavailable, CommandError) as exc:
        error(str(exc))
        return 1
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named: a bug or the machine, shown in full
            raise
        error(f"{exc.filename}: {exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

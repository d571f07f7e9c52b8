"""The ``npresnet`` command: a thin layer over the public API.

Each subcommand is one ``cmd_*`` function and one block in ``build_parser``.
User mistakes (a missing file, an unreadable image, weights that do not fit)
end as one ``npresnet: error: ...`` line on stderr and a non-zero exit, never a
traceback; a bad image among many is reported and the rest are still processed.
"""
from __future__ import annotations

import _thread
import argparse
import glob
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from . import __version__
from .backends import default_threads
from .datasets import train_val_folders
from .backends import choose_backend
from .errors import BackendUnavailable, DataError, FetchError, ImageError, WeightsError
from .explain import explain, image_format, save_image
from .formats import convert, read_weights
from .hub import fetch, is_weights_name
from .model import ResNet, build, load, save
from .predict import labels_for, save_embeddings, top_k
from .preprocess import IMAGE_FORMATS, ImageClassification, preset_for
from .progress import Progress
from .specs import ARCHITECTURES, CIFAR_STEM, count_macs
from .training import EpochResult, StepInfo, TrainConfig, TrainingInterrupted, fit, output_paths, resume_model

DEFAULT_ARCH = "resnet50"
GLOB_CHARACTERS = "*?["


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
    """File name extensions of the formats npresnet reads (.jpg, .png, .webp, ...), lower case."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS and fmt in Image.OPEN}


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
        help="numpy, numba, cuda, or auto (default): the one expected to finish these images first here, "
        "start-up and kernel compilation included",
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


def backend_for(model: ResNet, num_images: int, batch_size: int, size: tuple[int, int]) -> str:
    """What --backend auto runs `num_images` images on: backends.choose_backend (the Python API's rule) for this
    job: the model's architecture at `size` and the batches it will run (start-up outweighs speed on short runs)."""
    return choose_backend(model.spec, num_images, min(batch_size, num_images), size)


def model_from_args(args, num_images: int | None = None) -> ResNet:
    """The model the arguments name; with --backend auto and a known number of images, on backend_for's choice
    (built on NumPy first: the choice needs its architecture, and NumPy costs nothing to start)."""
    job = args.backend == "auto" and num_images is not None
    options = {"backend": "numpy" if job else args.backend, "threads": args.threads}
    try:
        if args.weights is None:
            arch = args.arch or DEFAULT_ARCH
            warning(f"no --weights given: {arch} has random parameters, so its answers are meaningless")
            model = build(arch, **options)
        elif is_weights_name(args.weights):  # "DEFAULT", "IMAGENET1K_V2": official weights of --arch
            model = build(args.arch or DEFAULT_ARCH, args.weights, **options)
        else:
            model = load(args.weights, **options)
        if job and isinstance(model, ResNet):  # an int8 model runs on NumPy only
            size = preset_for(model, squash_size=getattr(args, "resize", None)).output_size
            model.use_backend(backend_for(model, num_images, getattr(args, "batch_size", 1), size), args.threads)
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


class TrainReport:
    """What `npresnet train` shows: a bar per epoch on a terminal (a plain line a minute when piped),
    a line per epoch on stdout, notes and skipped images on stderr. fit's Reporter."""

    PLAIN_INTERVAL_S = 60.0

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.progress = Progress(0, stream=self.stream)
        self.last_plain = time.monotonic()

    def note(self, message: str) -> None:
        self.progress.message(f"npresnet: {message}")

    def bad_image(self, path: str, message: str) -> None:
        self.progress.message(f"npresnet: warning: skipped (and will skip) {message}")

    def step(self, info: StepInfo) -> None:
        status = (
            f"  loss {info.loss:.4f}  acc {info.accuracy:.1%}  {info.images_per_second:.1f} images/s  lr {info.lr:.3g}"
        )
        prefix = f"epoch {info.epoch + 1}/{info.epochs} "
        if self.progress.label != prefix.strip():
            self.progress.close()
            self.progress = Progress(info.steps, "steps", label=prefix.strip(), stream=self.stream)
            self.progress.done = info.step - 1  # a resumed epoch starts part way
        self.progress.advance(1, status)
        if not self.progress.enabled and time.monotonic() - self.last_plain >= self.PLAIN_INTERVAL_S:
            self.last_plain = time.monotonic()
            print(f"{prefix}step {info.step}/{info.steps}{status}", file=self.stream, flush=True)

    def epoch(self, result: EpochResult) -> None:
        self.progress.close()
        self.progress = Progress(0, stream=self.stream)
        print(
            f"epoch {result.epoch + 1}: train loss {result.train_loss:.4f} acc {result.train_accuracy:.1%} "
            f"({result.train_images} images, {result.images_per_second:.1f}/s, {result.seconds:.1f} s)  "
            f"val loss {result.val_loss:.4f} top-1 {result.val_top1:.1%} top-5 {result.val_top5:.1%}"
            + ("  (best so far)" if result.best else ""),
            flush=True,
        )

    def close(self) -> None:
        self.progress.close()


def cmd_train(args) -> int:
    output_paths(args.output)  # the user's mistakes first, before any weights are loaded
    folders = train_val_folders(args.data)
    if args.resume is not None:
        model = resume_model(args.resume, backend=args.backend, threads=args.threads)
    elif args.weights is None:
        arch = args.arch or "resnet18"
        print(f"npresnet: no --weights given: training {arch} from random parameters", file=sys.stderr)
        classes = len(folders[0].classes)
        model = build(arch, num_classes=classes, stem=args.stem, backend=args.backend, threads=args.threads)
    elif is_weights_name(args.weights):
        model = build(args.arch or DEFAULT_ARCH, args.weights, stem=args.stem, backend=args.backend, threads=args.threads)
    elif args.arch is None:
        model = load(args.weights, backend=args.backend, threads=args.threads)
    else:
        model = build(args.arch, args.weights, stem=args.stem, backend=args.backend, threads=args.threads)
    lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 0.001)
    image_size = args.image_size or (32 if model.spec.stem == CIFAR_STEM else 224)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer, momentum=args.momentum,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, freeze=args.freeze,
        backbone_lr=args.backbone_lr, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        image_size=image_size, hflip=not args.no_hflip, seed=args.seed,
    )
    report = TrainReport()
    try:
        result = fit(model, folders, config, args.output, resume=args.resume, reporter=report, workers=args.workers)
    except TrainingInterrupted as stopped:
        report.close()
        print(
            f"npresnet: interrupted at epoch {stopped.epoch + 1}, step {stopped.step}: checkpoint written to "
            f"{stopped.checkpoint}; run the same command with --resume {stopped.checkpoint} to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        report.close()
    best = max(result.history, key=lambda h: h.val_top1)
    print(f"wrote {result.output} (last epoch), {result.best} (epoch {best.epoch + 1}, val top-1 {best.val_top1:.1%}), "
          f"{result.checkpoint} (resumable)")
    return 0


# --- the parser --------------------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  npresnet info resnet50                              what resnet50 is: layers, parameters, GFLOPs
  npresnet classify --weights resnet50.npz cat.jpg    the 5 most likely ImageNet classes of a photo
  npresnet classify --weights resnet50.npz photos/ --json > answers.jsonl
  npresnet embed --weights resnet50.npz "photos/**/*.jpg" -o vectors.npz
  npresnet train pets/ --arch resnet18 --weights IMAGENET1K_V1 --freeze layer2 -o pets.npz

A weights file holds the trained parameters; without one the network is random and
its answers mean nothing. Images are read with Pillow (JPEG, PNG, WebP, TIFF, ...)
and prepared exactly as TorchVision prepares them for its ResNet weights.
"""


def cmd_convert(args) -> int:
    meta = convert(args.src, args.dst, dtype=args.dtype)
    known = f", crop {meta['crop_size']}, resize {meta['resize_size']}" if "crop_size" in meta else ""
    print(f"{args.dst}: {meta['arch']}, num_classes {meta['num_classes']}, stem {meta['stem']}{known}")
    if "source_sha256" in meta:
        print(f"source sha256: {meta['source_sha256']}")
    if args.dtype:
        print(f"weights stored as {args.dtype} ({os.path.getsize(args.dst) / 1e6:.1f} MB); they load as float32")
    return 0


def cmd_fetch(args) -> int:
    try:
        print(fetch(args.arch, args.weights, from_file=args.from_file))
    except FetchError:
        raise
    except ValueError as exc:  # no official weights of that name
        raise CommandError(str(exc)) from None
    return 0


def cmd_explain(args) -> int:
    image_format(args.output)  # a bad -o fails before any work
    model = model_from_args(args, num_images=1)
    preset = preset_for(model, exif_transpose=args.exif_transpose)
    result = explain(model, args.image, args.class_index, labels=args.labels, preset=preset)
    top, shown = result.top, result.prediction
    print(args.image)
    print(f"  {top.probability:7.2%}  {top.label} ({top.index})  top class")
    if shown.index != top.index:
        print(f"  {shown.probability:7.2%}  {shown.label} ({shown.index})  the class the heatmap explains")
    save_image(args.output, result.render())
    height, width = result.heatmap.shape
    print(f"wrote {args.output}: the {width}x{height} crop the network saw, Grad-CAM on layer4 over it")
    return 0


def cmd_export(args) -> int:
    from .onnx_export import DYNAMIC, FEATURE_OUTPUTS, LOGITS_NAME, export_onnx

    if args.size == [DYNAMIC]:
        size = DYNAMIC
    elif len(args.size) == 2 and all(v.isdigit() and int(v) > 0 for v in args.size):
        size = (int(args.size[0]), int(args.size[1]))
    else:
        raise CommandError(f"--size takes HEIGHT WIDTH (two positive integers) or {DYNAMIC}, not {' '.join(args.size)!r}")
    model = model_from_args(args)
    try:
        export_onnx(model, args.output, features=args.features, opset=args.opset, batch=args.batch, size=size)
    except ImportError as exc:
        error(str(exc))
        return 1
    shape = ", ".join(map(str, ["batch" if args.batch == DYNAMIC else args.batch, 3, *(("height", "width") if size == DYNAMIC else size)]))
    outputs = [LOGITS_NAME, *(FEATURE_OUTPUTS if args.features else ())]
    if getattr(model, "quantized", False):  # an int8 file has no batch norm left: it was folded when quantizing
        graph = "int8 QDQ (QuantizeLinear/DequantizeLinear around each Conv and Gemm)"
    else:
        graph = "batch norm folded"
    print(
        f"{args.output}: {model.arch}, {os.path.getsize(args.output) / 1e6:.1f} MB, opset {args.opset}, "
        f"input 'input' ({shape}), outputs {', '.join(outputs)}; {graph}"
    )
    return 0


def batch_or_dynamic(text: str) -> int | str:
    return text if text == "dynamic" else positive_int(text)


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, image_folder, interleave_classes, read_class_map

    if args.labels_deprecated:
        if args.class_map:
            raise CommandError("give --class-map once (--labels is its old name)")
        print("npresnet: warning: evaluate's --labels is now --class-map (classify's --labels is class names to print)",
              file=sys.stderr)
    class_map = args.class_map or args.labels_deprecated
    class_to_idx = read_class_map(class_map) if class_map else None
    folder = image_folder(args.data, class_to_idx)
    num_images = len(interleave_classes(folder.samples, args.limit))
    model = model_from_args(args, num_images)
    compare = None
    if args.compare:
        # The second file's own architecture (fine-tuned, quantized, another model), unless it is a weights name.
        arch = args.arch if is_weights_name(args.compare) else None
        compare = model_from_args(argparse.Namespace(**{**vars(args), "weights": args.compare, "arch": arch}), num_images)
    progress = Progress(num_images)
    errors = ImageErrors(progress)
    result = evaluate(
        model, folder, topk=args.topk, limit=args.limit, class_to_idx=class_to_idx, batch_size=args.batch_size,
        compare=compare, exif_transpose=args.exif_transpose, on_error=errors.report, on_progress=progress.advance,
    )
    progress.close()
    for warning in result.warnings:
        print(f"npresnet: warning: {warning}", file=sys.stderr)
    k = result.topk

    def figures(r, weights, arch) -> dict:
        return {"weights": weights, "arch": arch, "top1": r.top1, f"top{k}": r.topk_accuracy, "loss": r.loss}

    if args.json:
        out = {
            "data": args.data, "images": result.images, "skipped": [p for p, _ in result.skipped], "topk": k,
            **figures(result, args.weights, model.arch),
            "classes": [
                {"name": c.name, "index": c.index, "images": c.count, "top1": c.top1, f"top{k}": c.topk_accuracy}
                for c in result.per_class
            ],
        }
        if compare is not None:
            out["compare"] = {**figures(result.compared, args.compare, compare.arch), "agreement": result.agreement}
        print(json.dumps(out))
        return 1 if result.skipped else 0
    skipped = f" ({len(result.skipped)} unreadable, left out)" if result.skipped else ""
    print(f"{args.data}: {result.images} images in {len(result.per_class)} classes{skipped}; {model.arch}, weights {args.weights}")
    hits = int(round(result.top1 * result.images)), int(round(result.topk_accuracy * result.images))
    print(f"top-1 accuracy  {result.top1:8.2%}  ({hits[0]}/{result.images})")
    print(f"top-{k} accuracy  {result.topk_accuracy:8.2%}  ({hits[1]}/{result.images})")
    print(f"loss            {result.loss:8.4f}  (mean cross-entropy)")
    width = max(len("class"), *(len(c.name) for c in result.per_class))
    print()
    print(f"{'class':<{width}}  index  images    top-1    top-{k}")
    for c in result.per_class:
        accuracy = f"{c.top1:8.2%} {c.topk_accuracy:8.2%}" if c.count else f"{'-':>8} {'-':>8}"
        print(f"{c.name:<{width}}  {c.index:5d}  {c.count:6d} {accuracy}")
    if compare is not None:
        other = result.compared
        agree = int(round(result.agreement * result.images))
        print()
        print(f"compared with {args.compare} ({compare.arch}): top-1 {other.top1:.2%}, top-{k} {other.topk_accuracy:.2%}, "
              f"loss {other.loss:.4f}")
        print(f"top-1 agreement {result.agreement:8.2%}  ({agree}/{result.images} images get the same class from both)")
    return 1 if result.skipped else 0
def cmd_serve(args) -> int:
    try:
        from . import serve
    except ImportError as exc:
        error(str(exc))
        return 1
    model = model_from_args(args)
    app = serve.create_app(
        model,
        topk=args.topk,
        workers=args.workers,
        queue_limit=args.queue_limit,
        max_upload_mb=args.max_upload_mb,
        batch_size=args.batch_size,
        exif_transpose=args.exif_transpose,
        weights=os.path.basename(args.weights) if args.weights else None,
    )
    try:
        server = serve.create_server(app, host=args.host, port=args.port)
    except OSError as exc:
        error(f"cannot listen on {args.host} port {args.port}: {exc.strerror or exc}")
        return 1
    host = f"[{server.effective_host}]" if ":" in str(server.effective_host) else server.effective_host
    url = f"http://{host}:{server.effective_port}/"
    print(f"npresnet: serving {model.arch} ({model.backend.name} backend) at {url}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"npresnet: warning: listening on {args.host}: other machines can reach this page", file=sys.stderr)
    classifier = app.extensions["npresnet"]
    failed = []

    def warm_up():
        try:
            seconds = classifier.warm_up()
        except Exception as exc:  # shown on /healthz too; the server stops
            failed.append(exc)
            error(f"warm-up forward pass failed: {classifier.warm_up_error}")
            _thread.interrupt_main()
            return
        print(f"npresnet: ready (warm-up {seconds:.1f} s); Ctrl+C stops", flush=True)

    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 1 if failed else 0


def calibration_paths(directory: str, samples: int) -> tuple[list[str], int]:
    """(up to `samples` image paths found under `directory`, recursing, and how many there are in all).

    More than `samples`: a fixed pseudo-random choice (seed 0), kept in name order, so that every
    class folder of an ImageFolder layout is likely represented and the same files are chosen each time.
    """
    if not os.path.isdir(directory):
        raise CommandError(f"{directory}: not a directory (--calibrate takes a folder of images)")
    extensions = image_extensions()
    found = sorted(
        os.path.join(root, name)
        for root, dirs, files in os.walk(directory)
        for name in files
        if not name.startswith(".") and Path(name).suffix.lower() in extensions
    )
    if len(found) > samples:
        chosen = np.random.default_rng(0).choice(len(found), size=samples, replace=False)
        return [found[i] for i in sorted(chosen)], len(found)
    return found, len(found)


def cmd_quantize(args) -> int:
    from .quantization import quantize

    if Path(args.output).suffix != ".npz":
        raise CommandError(f"{args.output}: the quantized file must end in .npz")
    if is_weights_name(args.weights):
        model = build(args.arch or DEFAULT_ARCH, args.weights, backend="numpy")
    elif args.arch:
        model = build(args.arch, args.weights, backend="numpy")
    else:
        model = load(args.weights, backend="numpy")
    if getattr(model, "quantized", False):
        raise CommandError(f"{args.weights} is already quantized (int8); quantize the float weights it was made from")
    paths, available = calibration_paths(args.calibrate, args.samples)
    if not paths:
        raise CommandError(f"{args.calibrate}: no image files to calibrate on (searched its subfolders too)")
    if available < args.samples:
        print(f"npresnet: warning: {args.calibrate} has {available} images, fewer than --samples {args.samples}; "
              f"calibrating on {available}", file=sys.stderr)
    progress = Progress(len(paths))
    errors = ImageErrors(progress)
    reader = preprocessed_batches(paths, preset_for(model), args.batch_size, progress, errors.report)
    batches = (batch for _, batch in reader)  # (B, 3, crop, crop), bad images reported and skipped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            int8 = quantize(model, batches, method=args.method, samples=len(paths), percentile=args.percentile)
        except ValueError:
            progress.close()
            if errors.count:
                raise CommandError(f"no image in {args.calibrate} could be read; {args.output} not written") from None
            raise
    progress.close()
    for warning in caught:
        print(f"npresnet: warning: {warning.message}", file=sys.stderr)
    save(int8, args.output)
    size = os.path.getsize(args.output)
    print(f"{args.output}: {int8.arch} int8 ({size / 1e6:.1f} MB), activations calibrated on "
          f"{int8.meta['samples']} images ({args.method})")
    return 1 if errors.count else 0


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
        "convert",
        help="convert weights between .pth, .safetensors and .npz (no torch needed), e.g. a trained .npz back to PyTorch",
    )
    convert_.add_argument("src", help="the weights file to read (.pth, .pt, .safetensors, .npz)")
    convert_.add_argument(
        "dst", help="the file to write (atomically), its format by suffix: .npz, or .pth/.pt/.safetensors for torch"
    )
    convert_.add_argument("--dtype", choices=["float16", "float32"], help="store the conv and fc weights in this "
                          "dtype: float16 halves the file (batch norm stays float32; models compute in float32)")
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

    explain_ = commands.add_parser(
        "explain",
        help="show where in a photo the network found its answer (Grad-CAM heatmap over the photo)",
        description="Write the preprocessed crop of IMAGE with the Grad-CAM heatmap of layer4 over it "
        "(red: strongest evidence) and the class named below it; print the top class.",
    )
    explain_.add_argument("image", metavar="IMAGE", help="an image file")
    explain_.add_argument(
        "--class", dest="class_index", type=int, metavar="INDEX", help="the class to explain (default: the top class)"
    )
    explain_.add_argument("--labels", metavar="FILE", help="class names, one a line, for a model with its own head")
    explain_.add_argument("-o", "--output", default="cam.png", help="the image to write (default cam.png; .png or .jpg)")
    add_model_options(explain_)
    explain_.set_defaults(run=cmd_explain)
    export = commands.add_parser(
        "export",
        help="write a model as ONNX (standard operators, batch norm folded), for ONNX Runtime and other runtimes",
        description="Write the network of a weights file as an ONNX model, from npresnet's own architecture table "
        "(no torch): input 'input' (N, 3, H, W), output 'logits'; the preprocessing and the class names are in its "
        "metadata. Needs the onnx package: pip install \"npresnet[onnx]\".",
    )
    export.add_argument("weights", metavar="WEIGHTS", help="a weights file (.npz, .pth, .safetensors) or official "
                        "weights of --arch by name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2)")
    export.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write (atomically)")
    export.add_argument("--arch", choices=list(ARCHITECTURES), metavar="ARCH",
                        help=f"architecture (default: read from the weights; {DEFAULT_ARCH} for a weights name)")
    export.add_argument("--features", action="store_true",
                        help="also output layer1..layer4 (C2-C5, strides 4-32), for detection and FPN backbones")
    export.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset, 13 or newer (default 17)")
    export.add_argument("--batch", type=batch_or_dynamic, default="dynamic", metavar="N|dynamic",
                        help="a fixed batch size, or dynamic (default)")
    export.add_argument("--size", nargs="+", default=["dynamic"], metavar="SIZE",
                        help="a fixed input size, HEIGHT WIDTH (e.g. --size 800 800), or dynamic (default)")
    export.set_defaults(run=cmd_export, backend="numpy", threads=None)

    evaluate_ = commands.add_parser(
        "evaluate",
        help="top-1/top-5 accuracy and loss on a labelled folder (DATA/<class>/*.jpg); --compare two weights files",
        description="Accuracy and mean cross-entropy on a folder in TorchVision's ImageFolder layout: one sub-folder "
        "per class, classes in sorted order of the folder names (or as --class-map maps them), with a per-class table.",
    )
    evaluate_.add_argument("data", metavar="DATA", help="the folder: DATA/<class>/<image> (sub-folders searched)")
    evaluate_.add_argument("--topk", type=positive_int, default=5, metavar="K", help="also report top-K accuracy (default 5)")
    evaluate_.add_argument("--limit", type=positive_int, metavar="N",
                           help="evaluate N images, taken in turn from each class (a quick check)")
    evaluate_.add_argument("--class-map", metavar="FILE", help="folder name -> class index: lines 'FOLDER INDEX', or "
                           "folder names in index order, one a line (e.g. ImageNet's LOC_synset_mapping.txt); default: "
                           "sorted folder i is class i")
    evaluate_.add_argument("--labels", dest="labels_deprecated", metavar="FILE",
                           help="deprecated: the old name of --class-map (classify's --labels is class names to print)")
    evaluate_.add_argument("--compare", metavar="WEIGHTS2", help="a second weights file run on the same images: its "
                           "figures, and how often its top-1 class equals the first's")
    evaluate_.add_argument("--json", action="store_true", help="one JSON object with every figure, for scripts")
    add_model_options(evaluate_)
    evaluate_.set_defaults(run=cmd_evaluate)
    serve_ = commands.add_parser(
        "serve",
        help="a web page and JSON API that classify uploaded photos (needs: pip install 'npresnet[web]')",
        description="Serve a page where photos are chosen or dropped and classified, and a JSON API beside it: "
        "POST /api/classify (multipart field 'file'), GET /api/info, GET /healthz. Uploads stay in memory.",
    )
    serve_.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: all)"
    )
    serve_.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free one)")
    serve_.add_argument("--topk", type=positive_int, default=3, metavar="K", help="classes shown per photo (default 3)")
    serve_.add_argument(
        "--workers", type=positive_int, default=2, metavar="N", help="requests classified at once (default 2)"
    )
    serve_.add_argument(
        "--queue-limit",
        type=int,
        default=16,
        metavar="N",
        help="requests that may wait for a worker; past them the server answers 503 at once (default 16)",
    )
    serve_.add_argument(
        "--max-upload-mb",
        type=float,
        default=20.0,
        metavar="MB",
        help="largest request body, all its files together (default 20); a larger one gets 413",
    )
    add_model_options(serve_)
    serve_.set_defaults(run=cmd_serve)
    train = commands.add_parser(
        "train",
        help="fine-tune on your own images: DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg",
        description="Fine-tune (or train) a ResNet on an ImageFolder tree, validating every epoch. Writes OUT.npz "
        "(last weights, with your class names), OUT.best.npz (best validation top-1) and OUT.ckpt.npz (resumable: "
        "Ctrl-C writes it too; continue with --resume).",
    )
    train.add_argument("data", metavar="DATA", help="a folder holding train/<class>/ and val/<class>/ image folders")
    train.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="the weights file to write")
    train.add_argument("--arch", choices=list(ARCHITECTURES), metavar="ARCH", help="architecture (default: from --weights, else resnet18)")
    train.add_argument("--weights", metavar="WEIGHTS", help="weights to start from (a file, or DEFAULT / IMAGENET1K_V1 / IMAGENET1K_V2); without it, random")
    train.add_argument("--stem", choices=["imagenet", "cifar"], help="cifar: 3x3 stride-1 conv1 and no max pool, for small images (without --weights)")
    train.add_argument("--epochs", type=positive_int, default=10, metavar="N", help="default 10")
    train.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="default 32")
    train.add_argument("--lr", type=float, metavar="LR", help="learning rate of fc (default 0.01 for sgd, 0.001 for adamw)")
    train.add_argument("--backbone-lr", type=float, metavar="LR", help="learning rate below fc (default: --lr)")
    train.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="default sgd")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, AdamW beta1 (default 0.9)")
    train.add_argument("--weight-decay", type=float, default=0.0, metavar="WD", help="default 0")
    train.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS", help="default 0")
    train.add_argument("--freeze", choices=["stem", "layer1", "layer2", "layer3", "layer4"], metavar="STAGE",
                       help="keep the stem through STAGE (stem, layer1..layer4) as they are; their batch norms stay in eval mode")
    train.add_argument("--schedule", choices=["cosine", "step", "none"], default="cosine",
                       help="learning rate over the run, stepped every batch: cosine (default), step (x0.1 at 1/3 and 2/3), none")
    train.add_argument("--warmup-epochs", type=int, default=0, metavar="N", help="linear warm-up first (default 0)")
    train.add_argument("--image-size", type=positive_int, metavar="PX", help="training crop (default 224; 32 for the cifar stem)")
    train.add_argument("--no-hflip", action="store_true", help="no random horizontal flips (for text, digits, ...)")
    train.add_argument("--seed", type=int, default=0, help="every random draw follows from it (default 0)")
    train.add_argument("--resume", metavar="CKPT", help="continue the run that wrote this OUT.ckpt.npz (same settings)")
    train.add_argument("--backend", default="auto", help="numpy, numba, cuda or auto (default)")
    train.add_argument("--threads", type=int, metavar="N", help="CPU threads for the compiled backends")
    train.add_argument("--workers", type=positive_int, metavar="N", help="threads decoding images ahead of training (default: up to 4)")
    train.set_defaults(run=cmd_train)

    quantize_ = commands.add_parser(
        "quantize",
        help="int8 weights and calibrated activation scales: a file about 4x smaller (see README, INT8)",
        description="Fold batch norm, quantize every conv and fc weight to int8 per output channel, and "
        "calibrate per-tensor activation scales on images preprocessed as at inference. npresnet runs the "
        "file (numpy backend) and `npresnet export` writes it as an ONNX QDQ model.",
    )
    quantize_.add_argument("weights", metavar="WEIGHTS", help="float weights (.npz, .pth, .safetensors) or official weights of --arch")
    quantize_.add_argument("--calibrate", required=True, metavar="DIR", help="a folder of images (subfolders searched too)")
    quantize_.add_argument("--samples", type=positive_int, default=256, metavar="N",
                           help="calibration images to use (default 256; fewer is a warning)")
    quantize_.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax",
                           help="how an activation's range is chosen: its largest value (default), a percentile "
                           "of its magnitudes, or the KL-divergence threshold TensorRT uses")
    quantize_.add_argument("--percentile", type=float, default=99.99, metavar="P", help="for --method percentile (default 99.99)")
    quantize_.add_argument("--arch", choices=list(ARCHITECTURES), metavar="ARCH", help="architecture (default: read from the file)")
    quantize_.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (default 16)")
    quantize_.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="the int8 .npz to write (atomically)")
    quantize_.set_defaults(run=cmd_quantize)
    return parser


def check_environment() -> None:
    """The variables npresnet reads, checked before a command runs: a bad value is the user's mistake, one line."""
    try:
        default_threads()  # $NPRESNET_NUM_THREADS
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        check_environment()
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`npresnet classify ... | head -1`): stop quietly, as cat does, and point
        # stdout at /dev/null so that Python's own flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell shows for a writer its reader left
    except (WeightsError, ImageError, DataError, BackendUnavailable, CommandError) as exc:
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

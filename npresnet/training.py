"""Fine-tuning on an ImageFolder: the loop that ties data, model, optimizer and schedule together.

``fit(model, "DATA", TrainConfig(...), "out.npz")`` trains on DATA/train, validates on
DATA/val after every epoch, and writes three files, each atomically:

* ``out.npz``: the last weights, loadable by ``npresnet.load`` and ``npresnet classify``,
  with the class names in its metadata (``meta["classes"]``) and the crop the model
  was trained for;
* ``out.best.npz``: the weights of the epoch with the best validation top-1;
* ``out.ckpt.npz``: a resumable checkpoint (weights, optimizer state, scheduler state,
  epoch and step, the seed that defines every random draw, the run's settings, and the
  history so far), written at the end of every epoch and when the run is interrupted.
  JSON metadata plus plain arrays: ``np.load(path, allow_pickle=False)`` reads it.

Because every random draw derives from (seed, epoch, sample) (``datasets.py``) and the
new head from the seed, a run interrupted at any step and resumed from its checkpoint
ends with the same weights as a run that was never interrupted.

Schedules step once per training step (not per epoch), so a short run still anneals
smoothly; ``--warmup-epochs`` ramps the learning rate up linearly first.

Reference: TorchVision ``references/classification/train.py`` (``train_one_epoch``,
``evaluate``, its checkpoint of model, optimizer, lr_scheduler, epoch and args).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np

from . import functional as F
from .autograd import value_and_grad
from .datasets import BatchLoader, ImageFolder, TrainTransform, train_val_folders
from .errors import DataError
from .model import ResNet
from .optim import SGD, AdamW, LinearWarmup, Optimizer, SequentialLR, StepLR, param_groups, warmup_cosine
from .weights import META_KEY, WeightsError, atomic_write, infer_spec_from_state, load_npz, save_npz

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "none")
FREEZE_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
CHECKPOINT_FORMAT = "npresnet-train-checkpoint"
CHECKPOINT_VERSION = 1
MODEL_PREFIX = "model."


class TrainingDiverged(DataError):
    """The loss became NaN or infinite; the message names the step and what to try."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped at a step boundary and left a resumable checkpoint."""

    def __init__(self, checkpoint: str, epoch: int, step: int):
        super().__init__(checkpoint)
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


@dataclass(frozen=True)
class TrainConfig:
    """The settings that define a run; a checkpoint keeps them, and resuming requires the same."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9  # SGD's momentum; AdamW's beta1
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    freeze: str | None = None  # the last frozen stage: the stem through it keep their weights
    backbone_lr: float | None = None  # the learning rate below fc (default: lr)
    schedule: str = "cosine"
    warmup_epochs: int = 0
    image_size: int = 224
    hflip: bool = True  # RandomHorizontalFlip; off where mirroring changes the class (text, digits)
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise DataError(f"epochs and batch_size must be at least 1, not {self.epochs}, {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DataError(f"lr must be a positive number, not {self.lr}")
        if self.backbone_lr is not None and not (self.backbone_lr >= 0 and math.isfinite(self.backbone_lr)):
            raise DataError(f"backbone_lr must be a non-negative number, not {self.backbone_lr}")
        if self.optimizer not in OPTIMIZERS:
            raise DataError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise DataError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.freeze is not None and self.freeze not in FREEZE_STAGES:
            raise DataError(f"freeze must be one of {', '.join(FREEZE_STAGES)}, not {self.freeze!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise DataError(f"warmup_epochs must be at least 0 and below epochs ({self.epochs}), not {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise DataError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.image_size < 1 or self.seed < 0:
            raise DataError(f"image_size must be positive and seed non-negative, not {self.image_size}, {self.seed}")


@dataclass
class StepInfo:
    """What the progress display shows during an epoch."""

    epoch: int  # 0-based
    epochs: int
    step: int  # batches done in this epoch
    steps: int  # batches per epoch
    images: int  # images done in this epoch
    total_images: int
    loss: float  # mean training loss over this epoch so far
    accuracy: float  # training top-1 over this epoch so far
    images_per_second: float
    lr: float


@dataclass
class EpochResult:
    epoch: int  # 0-based
    train_loss: float
    train_accuracy: float
    train_images: int
    images_per_second: float
    seconds: float
    val_loss: float
    val_top1: float
    val_top5: float
    best: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Reporter(Protocol):
    """Where fit sends what a user should see; the CLI draws it, a library caller may ignore it."""

    def note(self, message: str) -> None: ...
    def bad_image(self, path: str, message: str) -> None: ...
    def step(self, info: StepInfo) -> None: ...
    def epoch(self, result: EpochResult) -> None: ...


class SilentReporter:
    def note(self, message: str) -> None:
        pass

    def bad_image(self, path: str, message: str) -> None:
        pass

    def step(self, info: StepInfo) -> None:
        pass

    def epoch(self, result: EpochResult) -> None:
        pass


@dataclass
class FitResult:
    model: ResNet
    classes: tuple[str, ...]
    history: list[EpochResult]
    output: str
    best: str
    checkpoint: str


def output_paths(output: str | os.PathLike) -> tuple[str, str, str]:
    """(last weights, best weights, checkpoint) for -o OUT.npz: OUT.npz, OUT.best.npz, OUT.ckpt.npz."""
    output = os.fspath(output)
    if not output.endswith(".npz"):
        raise DataError(f"{output}: the output file must end in .npz")
    stem = output[: -len(".npz")]
    return output, f"{stem}.best.npz", f"{stem}.ckpt.npz"


# --- the checkpoint ----------------------------------------------------------------------------------------------


def pack_tree(tree: Any, arrays: dict[str, np.ndarray], prefix: str) -> Any:
    """A nest of dicts, lists, tuples, numbers, strings and arrays -> JSON, its arrays moved into `arrays`.

    An array becomes {"__array__": its key in `arrays`}; a tuple {"__tuple__": [...]}; a dict whose
    keys are not all plain strings (an optimizer's state by parameter index) {"__items__": [[key, value], ...]}.
    """
    if isinstance(tree, (np.ndarray, np.generic)):
        array = np.asarray(tree)
        if array.dtype.hasobject:
            raise TypeError(f"{prefix}: an array of Python objects cannot be stored without pickle")
        key = f"{prefix}{len(arrays)}"
        arrays[key] = array
        return {"__array__": key, "scalar": isinstance(tree, np.generic)}
    if isinstance(tree, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: pack_tree(v, arrays, prefix) for k, v in tree.items()}
        return {"__items__": [[pack_tree(k, arrays, prefix), pack_tree(v, arrays, prefix)] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [pack_tree(v, arrays, prefix) for v in tree]}
    if isinstance(tree, list):
        return [pack_tree(v, arrays, prefix) for v in tree]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"{prefix}: a {type(tree).__name__} cannot be stored in a checkpoint")


def unpack_tree(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The inverse of pack_tree."""
    if isinstance(tree, dict):
        if "__array__" in tree:
            array = np.array(arrays[tree["__array__"]])
            return array[()] if tree.get("scalar") else array
        if "__tuple__" in tree:
            return tuple(unpack_tree(v, arrays) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {unpack_tree(k, arrays): unpack_tree(v, arrays) for k, v in tree["__items__"]}
        return {k: unpack_tree(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack_tree(v, arrays) for v in tree]
    return tree


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly where it stopped."""

    config: TrainConfig
    classes: tuple[str, ...]
    num_train: int  # training images when the run started: resuming on other data is refused
    model_state: dict[str, np.ndarray]
    model_meta: dict[str, Any]
    optimizer: Any
    scheduler: Any
    epoch: int  # the epoch to continue (0-based)
    step: int  # the next batch of that epoch
    running: dict[str, float] = field(default_factory=dict)  # this epoch's training sums so far
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> None:
        arrays: dict[str, np.ndarray] = {f"{MODEL_PREFIX}{k}": np.ascontiguousarray(v) for k, v in self.model_state.items()}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": dataclasses.asdict(self.config),
            "classes": list(self.classes),
            "num_train": self.num_train,
            "model_meta": self.model_meta,
            "optimizer": pack_tree(self.optimizer, arrays, "optimizer."),
            "scheduler": pack_tree(self.scheduler, arrays, "scheduler."),
            # Every random draw is a function of (seed, epoch, sample): this is the whole RNG state.
            "rng": {"seed": self.config.seed, "epoch": self.epoch, "step": self.step},
            "epoch": self.epoch,
            "step": self.step,
            "running": self.running,
            "best_top1": self.best_top1,
            "history": self.history,
        }
        arrays[META_KEY] = np.array(json.dumps(meta))
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Checkpoint":
        arrays, meta = load_npz(path, weights_meta=False)  # no pickle; the fields are checked below
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise WeightsError(f"{path}: not a training checkpoint (weights files cannot be resumed from; "
                               f"use the .ckpt.npz that npresnet train wrote)")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise WeightsError(f"{path}: checkpoint version {meta.get('version')}, this npresnet reads {CHECKPOINT_VERSION}")
        try:
            return cls(
                config=TrainConfig(**meta["config"]),
                classes=tuple(meta["classes"]),
                num_train=int(meta["num_train"]),
                model_state={k[len(MODEL_PREFIX):]: v for k, v in arrays.items() if k.startswith(MODEL_PREFIX)},
                model_meta=dict(meta["model_meta"]),
                optimizer=unpack_tree(meta["optimizer"], arrays),
                scheduler=unpack_tree(meta["scheduler"], arrays),
                epoch=int(meta["epoch"]),
                step=int(meta["step"]),
                running=dict(meta["running"]),
                best_top1=float(meta["best_top1"]),
                history=list(meta["history"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: damaged training checkpoint ({type(exc).__name__}: {exc})") from None


# --- optimizer and schedule --------------------------------------------------------------------------------------


def make_optimizer(model: ResNet, config: TrainConfig) -> Optimizer:
    groups = param_groups(model, config.lr, backbone_lr=config.backbone_lr)
    if config.optimizer == "sgd":
        return SGD(groups, config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return AdamW(groups, config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)


def make_schedule(optimizer: Optimizer, config: TrainConfig, steps_per_epoch: int):
    """The learning-rate schedule, stepped once per training step; None for a constant rate."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    if config.schedule == "cosine":
        return warmup_cosine(optimizer, warmup, total)
    if config.schedule == "step":
        # Decay by 10 at a third and two thirds of the run (TorchVision's recipe: every 30 of 90 epochs).
        step_size = max(1, (total - warmup) // 3)
        if warmup == 0:
            return StepLR(optimizer, step_size=step_size, gamma=0.1)
        return SequentialLR(
            optimizer, [LinearWarmup(optimizer, warmup), StepLR(optimizer, step_size=step_size, gamma=0.1)], [warmup]
        )
    return LinearWarmup(optimizer, warmup) if warmup else None


# --- evaluation --------------------------------------------------------------------------------------------------


def top_k_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the k largest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]  # (N, k), unordered
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(model: ResNet, loader: BatchLoader, reporter: Reporter | None = None) -> tuple[float, float, float]:
    """(mean loss, top-1, top-5) over the loader's folder, in eval mode; unreadable images go to reporter.bad_image."""
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0, 0, 0
    try:
        for _, batch in loader.epoch(0):
            for path, message in batch.errors:
                if reporter is not None:
                    reporter.bad_image(path, message)
            if not len(batch.labels):
                continue
            logits = model(batch.images)  # (B, num_classes)
            loss_sum += F.cross_entropy(logits, batch.labels)[0] * len(batch.labels)
            top1 += top_k_correct(logits, batch.labels, 1)
            top5 += top_k_correct(logits, batch.labels, 5)
            count += len(batch.labels)
    finally:
        if was_training:
            model.train()
    if count == 0:
        raise DataError(f"{loader.folder.root}: no image could be read")
    return loss_sum / count, top1 / count, top5 / count


# --- the loop ----------------------------------------------------------------------------------------------------


class _StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self, reporter: Reporter):
        self.requested = False
        self.reporter = reporter
        self.previous = None

    def __enter__(self) -> "_StopRequest":
        # Only where Ctrl-C can be handled: the main thread, and not a process started with SIGINT ignored
        # (a background job, nohup), which a Ctrl-C is not meant to reach.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.reporter.note("stopping after this step to write a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def weights_meta(model: ResNet, classes: tuple[str, ...], transform: TrainTransform, base: Mapping[str, Any]) -> dict:
    """The metadata of a written weights file: what classify needs (classes, crop) and where it came from."""
    preset = transform.eval_preset
    meta = {
        "arch": model.spec.name,
        "num_classes": model.num_classes,
        "stem": model.spec.stem,
        "classes": list(classes),
        "crop_size": preset.crop_size,
        "resize_size": preset.resize_size,
    }
    origin = base.get("weights") or base.get("source") or base.get("fine_tuned_from")
    if origin:
        meta["fine_tuned_from"] = origin
    return meta


def fit(
    model: ResNet,
    data: str | os.PathLike | tuple[ImageFolder, ImageFolder],
    config: TrainConfig,
    output: str | os.PathLike,
    *,
    resume: str | os.PathLike | None = None,
    reporter: Reporter | None = None,
    workers: int | None = None,
    transform: TrainTransform | None = None,
) -> FitResult:
    """Train `model` on DATA/train, validating on DATA/val every epoch; write OUT.npz, OUT.best.npz, OUT.ckpt.npz.

    data: the DATA folder, or its (train, val) ImageFolders as train_val_folders returns them.
    transform: the training augmentation (default: TrainTransform for the model's stem at
    config.image_size, flipping when config.hflip); validation uses its eval_preset. A transform
    given here is not part of the checkpoint: pass the same one again to resume.
    workers: threads decoding and augmenting images ahead of the training step.

    A new head (seeded by config.seed) replaces fc when the data's class count differs from
    num_classes. With `resume`, the checkpoint's weights, optimizer, schedule and position replace
    the model's and the run continues; its settings, classes and image count must match.
    Raises TrainingDiverged on a NaN or infinite loss (the last checkpoint is kept), and
    TrainingInterrupted after Ctrl-C, once a checkpoint of the current step is written.
    A training batch left with a single image is skipped (batch norm's batch statistics need two).
    """
    reporter = reporter or SilentReporter()
    last_path, best_path, checkpoint_path = output_paths(output)
    train_folder, val_folder = data if isinstance(data, tuple) else train_val_folders(data)
    classes = train_folder.classes
    checkpoint = Checkpoint.load(resume) if resume is not None else None
    if checkpoint is not None:
        _check_resumable(checkpoint, config, train_folder, resume)
        spec = infer_spec_from_state(checkpoint.model_state, os.fspath(resume))
        model = ResNet(spec, checkpoint.model_state, backend=model.backend, meta=checkpoint.model_meta)
        base_meta = checkpoint.model_meta
    else:
        base_meta = dict(model.meta)
        if model.num_classes != len(classes):
            reporter.note(
                f"new head: the weights have {model.num_classes} classes, {train_folder.root} has {len(classes)}; "
                f"fc initialised afresh (seed {config.seed})"
            )
            model.replace_head(len(classes), seed=config.seed)
    model.freeze(config.freeze)
    model.train()

    if transform is None:
        transform = TrainTransform(size=config.image_size, stem=model.spec.stem, hflip_prob=0.5 if config.hflip else 0.0)
    train_loader = BatchLoader(train_folder, transform, config.batch_size, shuffle=True, seed=config.seed, workers=workers)
    val_loader = BatchLoader(val_folder, transform.eval_preset, config.batch_size, shuffle=False, workers=workers)
    steps_per_epoch = len(train_loader)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, steps_per_epoch)
    history: list[EpochResult] = []
    start_epoch, start_step, running, best_top1 = 0, 0, {}, -1.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
        if schedule is not None:
            schedule.load_state_dict(checkpoint.scheduler)
        start_epoch, start_step = checkpoint.epoch, checkpoint.step
        running, best_top1 = dict(checkpoint.running), checkpoint.best_top1
        history = [EpochResult(**h) for h in checkpoint.history]
        reporter.note(f"resuming {resume} at epoch {start_epoch + 1}, step {start_step + 1} of {steps_per_epoch}")
    meta = weights_meta(model, classes, transform, base_meta)

    def snapshot(epoch: int, step: int, sums: dict[str, float]) -> Checkpoint:
        return Checkpoint(
            config=config,
            classes=classes,
            num_train=len(train_folder),
            model_state=model.state_dict(),
            model_meta=meta,
            optimizer=optimizer.state_dict(),
            scheduler=schedule.state_dict() if schedule is not None else None,
            epoch=epoch,
            step=step,
            running=dict(sums),
            best_top1=best_top1,
            history=[h.as_dict() for h in history],
        )

    class ReportOnce:
        """A bad file is bad every epoch: say so once."""

        def __init__(self):
            self.reported: set[str] = set()

        def bad_image(self, path: str, message: str) -> None:
            if path not in self.reported:
                self.reported.add(path)
                reporter.bad_image(path, message)

    once = ReportOnce()
    lonely_noted = False

    try:
        with _StopRequest(reporter) as stop:
            for epoch in range(start_epoch, config.epochs):
                sums = {"loss": 0.0, "correct": 0.0, "images": 0.0, "seconds": 0.0}
                if epoch == start_epoch:
                    sums.update(running)
                first = start_step if epoch == start_epoch else 0
                started = time.perf_counter() - sums["seconds"]
                for number, batch in train_loader.epoch(epoch, first):
                    for path, message in batch.errors:
                        once.bad_image(path, message)
                    if len(batch.labels) == 1 and not lonely_noted:
                        # torch refuses it too: batch statistics of one image at 1x1 (layer4 of a small input).
                        lonely_noted = True
                        reporter.note("a batch of one image is skipped (batch norm in training mode needs two; "
                                      "a batch size that does not leave one image over avoids it)")
                    if len(batch.labels) > 1:
                        lr = optimizer.param_groups[-1]["lr"]  # fc's: --lr
                        loss, grads, logits = value_and_grad(
                            model, batch.images, batch.labels, label_smoothing=config.label_smoothing, return_logits=True
                        )
                        if not math.isfinite(loss):
                            raise TrainingDiverged(
                                f"the training loss became {loss} at epoch {epoch + 1}, step {number + 1} "
                                f"(step {epoch * steps_per_epoch + number + 1} of the run, learning rate {lr:.3g}); "
                                f"try a lower --lr. The weights of the last good epoch are kept "
                                f"(the last checkpoint: {checkpoint_path if os.path.exists(checkpoint_path) else 'none yet'})"
                            )
                        optimizer.step(grads)
                        sums["loss"] += float(loss) * len(batch.labels)
                        sums["correct"] += top_k_correct(logits, batch.labels, 1)
                        sums["images"] += len(batch.labels)
                    if schedule is not None:
                        schedule.step()
                    sums["seconds"] = time.perf_counter() - started
                    images = max(sums["images"], 1)
                    reporter.step(
                        StepInfo(
                            epoch, config.epochs, number + 1, steps_per_epoch, int(sums["images"]), len(train_folder),
                            sums["loss"] / images, sums["correct"] / images,
                            sums["images"] / max(sums["seconds"], 1e-9), optimizer.param_groups[-1]["lr"],
                        )
                    )
                    if stop.requested and number + 1 < steps_per_epoch:
                        snapshot(epoch, number + 1, sums).save(checkpoint_path)
                        raise TrainingInterrupted(checkpoint_path, epoch, number + 1)
                val_loss, top1, top5 = evaluate(model, val_loader, once)
                images = max(sums["images"], 1)
                is_best = top1 > best_top1
                result = EpochResult(
                    epoch, sums["loss"] / images, sums["correct"] / images, int(sums["images"]),
                    sums["images"] / max(sums["seconds"], 1e-9), sums["seconds"], val_loss, top1, top5, is_best,
                )
                history.append(result)
                epoch_meta = {**meta, "epoch": epoch + 1, "val_top1": top1, "val_top5": top5}
                save_npz(last_path, model.state_dict(), epoch_meta)
                if is_best:
                    best_top1 = top1
                    save_npz(best_path, model.state_dict(), epoch_meta)
                snapshot(epoch + 1, 0, {}).save(checkpoint_path)
                reporter.epoch(result)
                if stop.requested and epoch + 1 < config.epochs:
                    raise TrainingInterrupted(checkpoint_path, epoch + 1, 0)
    finally:
        train_loader.close()
        val_loader.close()
    return FitResult(model, classes, history, last_path, best_path, checkpoint_path)


def resume_model(path: str | os.PathLike, **options) -> ResNet:
    """The model a checkpoint holds (its architecture inferred from the weights), to pass to fit(resume=path)."""
    checkpoint = Checkpoint.load(path)
    return ResNet.from_state_dict(checkpoint.model_state, source=os.fspath(path), meta=checkpoint.model_meta, **options)


def _check_resumable(checkpoint: Checkpoint, config: TrainConfig, train: ImageFolder, path) -> None:
    saved = dataclasses.asdict(checkpoint.config)
    differences = [f"{k}={v!r} (the checkpoint has {saved[k]!r})" for k, v in dataclasses.asdict(config).items() if saved[k] != v]
    if differences:
        raise DataError(f"{path}: resuming needs the run's own settings; different: {', '.join(differences)}")
    if checkpoint.classes != train.classes:
        raise DataError(
            f"{path}: the checkpoint was trained on classes {', '.join(checkpoint.classes)}, "
            f"but {train.root} has {', '.join(train.classes)}"
        )
    if checkpoint.num_train != len(train):
        raise DataError(f"{path}: the checkpoint's run had {checkpoint.num_train} training images, {train.root} has {len(train)}")
    if checkpoint.epoch >= config.epochs:
        raise DataError(f"{path}: that run already finished its {config.epochs} epochs")

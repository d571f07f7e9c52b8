"""fit() and `npresnet train` on tiny data: resume equals never stopping, NaN stops cleanly, the files it writes."""
import dataclasses
import signal

import numpy as np
import pytest
from PIL import Image

import npresnet
from helpers import run_cli
from npresnet import training
from npresnet.training import SilentReporter, TrainConfig, TrainingDiverged, TrainingInterrupted, fit

CLASSES = ("ant", "bee", "cat")
TINY = TrainConfig(epochs=2, batch_size=6, lr=0.05, weight_decay=1e-4, warmup_epochs=1, image_size=8, seed=1)


def write_data(root, train_per_class=4, val_per_class=2):
    """Noise images whose mean colour depends on the class: learnable, and quick."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (10, 12, 3)) + 60 * np.eye(3, dtype=np.int64)[c]
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


# resnet18's blocks at an eighth of its widths: the loop, not the network, is under test here.
TINY_SPEC = npresnet.get_spec("resnet18", stem="cifar").replace(name="custom", planes=(8, 16, 32, 64))


def tiny_model():
    return npresnet.build(TINY_SPEC, backend="numpy")  # 1000 classes: fit makes a new head


class Recorder(SilentReporter):
    def __init__(self, interrupt_at=None):
        self.notes, self.bad, self.steps = [], [], 0
        self.interrupt_at = interrupt_at

    def note(self, message):
        self.notes.append(message)

    def bad_image(self, path, message):
        self.bad.append(path)

    def step(self, info):
        self.steps += 1
        if self.steps == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: handled at the end of this step


def arrays(path):
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


@pytest.fixture
def interactive_sigint():
    """SIGINT as in a terminal (Python's default handler), also where pytest runs as a background job,
    which starts with SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, interactive_sigint):
    data = write_data(tmp_path / "data")
    straight = fit(tiny_model(), data, TINY, tmp_path / "a" / "out.npz", reporter=Recorder())
    assert [h.epoch for h in straight.history] == [0, 1]

    out = tmp_path / "b" / "out.npz"
    stopper = Recorder(interrupt_at=3)  # 2 steps per epoch: the first step of epoch 2
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_model(), data, TINY, out, reporter=stopper)
    assert (info.value.epoch, info.value.step) == (1, 1)
    assert any("new head" in note and "3" in note for note in stopper.notes)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed = fit(training.resume_model(info.value.checkpoint, backend="numpy"), data, TINY, out,
                  resume=info.value.checkpoint, reporter=Recorder())

    want, got = arrays(tmp_path / "a" / "out.npz"), arrays(out)
    assert want.keys() == got.keys() and "layer1.0.bn1.num_batches_tracked" in got
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    untimed = [{k: v for k, v in h.as_dict().items() if k not in ("seconds", "images_per_second")} for h in straight.history]
    assert [{k: v for k, v in h.as_dict().items() if k not in ("seconds", "images_per_second")} for h in resumed.history] == untimed
    assert arrays(tmp_path / "a" / "out.ckpt.npz").keys() == arrays(tmp_path / "b" / "out.ckpt.npz").keys()
    with pytest.raises(ValueError, match="already finished"):
        fit(tiny_model(), data, TINY, out, resume=tmp_path / "b" / "out.ckpt.npz")
    with pytest.raises(ValueError, match="lr=0.1 \\(the checkpoint has 0.05\\)"):
        fit(tiny_model(), data, dataclasses.replace(TINY, lr=0.1), out, resume=info.value.checkpoint)


def test_a_job_started_with_sigint_ignored_is_not_stopped_by_it(tmp_path):
    """nohup and background jobs start with SIGINT ignored: training leaves it so, and runs to the end."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        done = fit(tiny_model(), write_data(tmp_path / "data"), TINY, tmp_path / "out.npz", reporter=Recorder(interrupt_at=1))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert [h.epoch for h in done.history] == [0, 1]


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_files(tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    real = training.value_and_grad
    calls = []
    poison_at = [4]  # epoch 2, step 2

    def poisoned(model, x, labels, **options):
        calls.append(1)
        loss, grads, logits = real(model, x, labels, **options)
        return (float("nan") if len(calls) == poison_at[0] else loss), grads, logits

    monkeypatch.setattr(training, "value_and_grad", poisoned)  # the loss only: the loop is what is tested
    out = tmp_path / "out.npz"
    before = {}

    class Snapshot(SilentReporter):
        def epoch(self, result):
            before.update(weights=arrays(out), checkpoint=arrays(tmp_path / "out.ckpt.npz"))

    with pytest.raises(TrainingDiverged) as info:
        fit(tiny_model(), data, TINY, out, reporter=Snapshot())
    message = str(info.value)
    assert "became nan at epoch 2, step 2 (step 4 of the run" in message and "lower --lr" in message
    assert str(tmp_path / "out.ckpt.npz") in message
    for name, path in (("weights", out), ("checkpoint", tmp_path / "out.ckpt.npz")):
        for key, value in arrays(path).items():
            np.testing.assert_array_equal(value, before[name][key], err_msg=f"{name} {key}")

    # The command says the same in one error line and exits 1.
    calls.clear()
    poison_at[0] = 1
    result = run_cli("train", data, "--arch", "resnet18", "--stem", "cifar", "--epochs", 2, "--batch-size", 6,
                 "--image-size", 8, "-o", tmp_path / "cli.npz")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("npresnet: error:")]
    assert len(errors) == 1 and "became nan" in errors[0] and "Traceback" not in result.stderr


def test_train_command_writes_weights_that_classify_reads_with_their_class_names(tmp_path):
    data = write_data(tmp_path / "data")
    (data / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (data / "val" / "ant" / "empty.png").write_bytes(b"")
    start = tmp_path / "start.npz"
    npresnet.save(npresnet.build(TINY_SPEC.replace(num_classes=3), backend="numpy"), start)
    out = tmp_path / "runs" / "pets.npz"
    result = run_cli("train", data, "--weights", start, "--epochs", 2, "--batch-size", 6, "--image-size", 8,
                 "--freeze", "layer2", "--backbone-lr", 0.01, "--lr", 0.05, "--optimizer", "adamw", "-o", out)
    assert result.returncode == 0, result.stderr
    for name in ("broken.jpg", "empty.png"):
        skipped = [line for line in result.stderr.splitlines() if name in line]
        assert len(skipped) == 1 and skipped[0].startswith("npresnet: warning:")  # named once, not every epoch
    assert "new head" not in result.stderr  # the start weights already have 3 classes
    lines = result.stdout.splitlines()
    assert lines[0].startswith("epoch 1: train loss") and "val loss" in lines[0] and "top-5 100.0%" in lines[0]
    assert lines[1].startswith("epoch 2:") and lines[2].startswith(f"wrote {out}")

    written, first = arrays(out), arrays(start)
    for key in first:
        if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.")):  # frozen: as they were
            np.testing.assert_array_equal(written[key], first[key], err_msg=key)
    assert not np.array_equal(written["layer3.0.conv1.weight"], first["layer3.0.conv1.weight"])
    model = npresnet.load(out, backend="numpy")
    assert model.meta["classes"] == list(CLASSES) and model.meta["crop_size"] == 8
    assert (tmp_path / "runs" / "pets.best.npz").exists() and (tmp_path / "runs" / "pets.ckpt.npz").exists()

    shown = run_cli("classify", "--weights", out, "--topk", 3, data / "val" / "cat")
    assert shown.returncode == 0, shown.stderr
    names = {line.split("%", 1)[1].rsplit("(", 1)[0].strip() for line in shown.stdout.splitlines() if "%" in line}
    assert names == set(CLASSES)

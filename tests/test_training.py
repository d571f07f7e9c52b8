"""npresnet train's parts that stand alone: the checkpoint format, the settings, the metrics, the display, the errors."""
import io
import json

import numpy as np
import pytest
import torch

import npresnet
from helpers import run_cli
from npresnet.cli import Progress, TrainReport
from npresnet.predict import labels_for
from npresnet.training import (
    Checkpoint,
    EpochResult,
    StepInfo,
    TrainConfig,
    output_paths,
    pack_tree,
    top_k_correct,
    unpack_tree,
)
from npresnet.weights import WeightsError, save_npz


class Terminal(io.StringIO):
    def isatty(self):
        return True


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("npresnet: error:")]


def test_pack_tree_round_trips_an_optimizer_state_through_a_pickle_free_npz(tmp_path):
    state = {
        "state": {0: {"momentum_buffer": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.float64(3.0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "nesterov": False, "name": None}],
        "__private": float("nan"),
        "ints": np.array([1, 2], dtype=np.int64),
    }
    arrays = {}
    packed = pack_tree(state, arrays, "optimizer.")
    path = tmp_path / "tree.npz"
    np.savez(path, tree=np.array(json.dumps(packed)), **arrays)
    with np.load(path, allow_pickle=False) as archive:
        back = unpack_tree(json.loads(str(archive["tree"])), {k: archive[k] for k in archive.files})
    buffer = back["state"][0]["momentum_buffer"]
    assert buffer.dtype == np.float32 and np.array_equal(buffer, state["state"][0]["momentum_buffer"])
    assert isinstance(back["state"][0]["step"], np.float64) and back["state"][0]["step"] == 3.0
    assert back["param_groups"] == state["param_groups"]  # the tuple comes back a tuple, the int keys ints
    assert np.isnan(back["__private"]) and back["ints"].dtype == np.int64
    with pytest.raises(TypeError, match="cannot be stored"):
        pack_tree({"bad": object()}, {}, "x.")
    with pytest.raises(TypeError, match="without pickle"):
        pack_tree({"bad": np.array([None])}, {}, "x.")


def test_checkpoint_round_trip_and_a_weights_file_is_not_one(tmp_path):
    config = TrainConfig(epochs=3, batch_size=4, lr=0.05, freeze="layer2", image_size=32, seed=7)
    state = {"fc.weight": np.ones((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}
    checkpoint = Checkpoint(
        config=config, classes=("cat", "dog"), num_train=10, model_state=state, model_meta={"arch": "resnet18"},
        optimizer={"state": {0: {"exp_avg": np.full(3, 0.5)}}}, scheduler={"last_epoch": 5}, epoch=1, step=2,
        running={"loss": 1.5, "images": 8.0}, best_top1=0.5, history=[{"epoch": 0, "val_top1": 0.5}],
    )
    path = tmp_path / "run.ckpt.npz"
    checkpoint.save(path)
    with np.load(path, allow_pickle=False) as archive:  # readable without pickle
        assert "model.fc.weight" in archive.files
    back = Checkpoint.load(path)
    assert back.config == config and back.classes == ("cat", "dog") and (back.epoch, back.step) == (1, 2)
    assert np.array_equal(back.model_state["fc.weight"], state["fc.weight"])
    assert np.array_equal(back.optimizer["state"][0]["exp_avg"], np.full(3, 0.5))
    assert back.scheduler == {"last_epoch": 5} and back.running == {"loss": 1.5, "images": 8.0}
    weights = tmp_path / "plain.npz"
    save_npz(weights, state, {"arch": "resnet18"})
    with pytest.raises(WeightsError, match="not a training checkpoint"):
        Checkpoint.load(weights)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"optimizer": "adam"}, "optimizer must be one of sgd, adamw"),
        ({"schedule": "linear"}, "schedule must be one of cosine, step, none"),
        ({"freeze": "layer5"}, "freeze must be one of stem, layer1"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"warmup_epochs": 10}, "warmup_epochs must be at least 0 and below epochs (10)"),
        ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)"),
    ],
)
def test_train_config_names_a_bad_setting(changes, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(**changes)
    assert words in str(info.value)


def test_output_paths():
    assert output_paths("runs/pets.npz") == ("runs/pets.npz", "runs/pets.best.npz", "runs/pets.ckpt.npz")
    with pytest.raises(ValueError, match="must end in .npz"):
        output_paths("runs/pets.pth")


def test_top_k_correct_equals_torch_topk():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 7)) * 4
    labels = rng.integers(0, 7, 50)
    for k in (1, 5, 9):
        top = torch.from_numpy(logits).topk(min(k, 7), dim=1).indices.numpy()
        want = int((top == labels[:, None]).any(axis=1).sum())
        assert top_k_correct(logits, labels, k) == want and 0 < want <= 50


def test_classify_names_the_classes_a_trained_file_carries(tmp_path):
    model = npresnet.build("resnet18", num_classes=3, backend="numpy")
    assert labels_for(model) == ["0", "1", "2"]
    model.meta["classes"] = ["cat", "dog", "owl"]
    assert labels_for(model) == ["cat", "dog", "owl"]
    assert labels_for(model, ["a", "b", "c"]) == ["a", "b", "c"]  # an explicit list still wins
    path = tmp_path / "pets.npz"
    npresnet.save(model, path)
    result = run_cli("classify", "--weights", path, "--topk", 3, "tests/data/")
    assert result.returncode == 0, result.stderr
    named = [line.split("%", 1)[1].rsplit("(", 1)[0].strip() for line in result.stdout.splitlines() if "%" in line]
    assert named and set(named) == {"cat", "dog", "owl"}


def test_train_progress_is_a_bar_on_a_terminal_and_quiet_when_piped():
    info = StepInfo(epoch=0, epochs=2, step=1, steps=4, images=8, total_images=30, loss=1.25, accuracy=0.5,
                    images_per_second=40.0, lr=0.1)
    result = EpochResult(0, 1.0, 0.6, 30, 40.0, 0.75, 0.9, 0.7, 1.0, True)
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        report = TrainReport(stream)
        report.step(info)
        report.bad_image("x.jpg", "x.jpg: empty file (0 bytes)")
        report.epoch(result)
        report.close()
    assert "\repoch 1/2 [#######.......................] 1/4 steps  loss 1.2500  acc 50.0%" in tty.getvalue()
    assert pipe.getvalue() == "npresnet: warning: skipped (and will skip) x.jpg: empty file (0 bytes)\n"
    progress = Progress(4, stream=Terminal())
    progress.advance(2)
    assert progress.stream.getvalue() == "\r[###############...............] 2/4 images"  # classify's bar is unchanged


def test_cli_names_a_bad_data_folder(tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    out = tmp_path / "out.npz"
    result = run_cli("train", tmp_path / "data", "--arch", "resnet18", "--stem", "cifar", "-o", out)
    assert result.returncode == 1 and not out.exists()
    assert error_lines(result.stderr) == [f"npresnet: error: {tmp_path / 'data'}: no val/ folder in it "
                                          f"(expected {tmp_path / 'data'}/train/<class>/*.jpg and {tmp_path / 'data'}/val/<class>/*.jpg)"]
    result = run_cli("train", tmp_path / "data", "-o", tmp_path / "out.pth")
    assert result.returncode == 1 and error_lines(result.stderr) == [
        f"npresnet: error: {tmp_path / 'out.pth'}: the output file must end in .npz"]

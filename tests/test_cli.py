"""The `npresnet` command on good photos and on every kind of bad input: mostly main(argv) in this process,
and as a user runs it, in a process of its own, where that is the point (end to end, pipes, exit status)."""
import io
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

import npresnet
from helpers import run_python
from image_files import encode, photos, write_bad_files
from npresnet.cli import main
from npresnet.progress import BYTES, MIB, Progress
from PIL import Image

NUM_CLASSES = 10  # a small head keeps the weights file small; the body is a full resnet18


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18_10.npz"
    npresnet.save(npresnet.build("resnet18", num_classes=NUM_CLASSES, backend="numpy"), path)
    return path


def run(*args, cwd=None, **options):
    """The command as a user runs it, in a process of its own."""
    result = run_python(["-m", "npresnet", *args], cwd=cwd, timeout=120, **options)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("npresnet: error:")]


def test_classify_json(weights):
    paths = photos()[:2]
    result = run("classify", "--weights", weights, "--json", "--topk", 3, "--batch-size", 1, *paths)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(p) for p in paths]
    model = npresnet.load(weights, backend="numpy")
    for row, path in zip(rows, paths):
        want = npresnet.classify(path, model, topk=3)[0]
        assert [t["index"] for t in row["top"]] == [p.index for p in want]
        assert [t["label"] for t in row["top"]] == [str(p.index) for p in want]
        np.testing.assert_allclose([t["probability"] for t in row["top"]], [p.probability for p in want], rtol=1e-6)
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal


def test_classify_text_and_random_weights_warning(cli, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"thing{i}\n" for i in range(NUM_CLASSES)))
    image = tmp_path / "one.png"
    shutil.copy(photos()[0], image)
    result = cli("classify", "--arch", "resnet18", "--topk", 2, image)
    assert result.returncode == 0, result.stderr
    assert "random parameters" in result.stderr and "--weights" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 3
    assert lines[1].strip().endswith(")") and "%" in lines[1]
    assert all(label in npresnet.load_labels() for label in (line.split("%", 1)[1].rsplit("(", 1)[0].strip() for line in lines[1:]))


def test_labels_file_that_does_not_fit(cli, weights, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    result = cli("classify", "--weights", weights, "--labels", labels, photos()[0])
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"npresnet: error: {labels} name 2 classes, but the model's head has num_classes=10"]


BAD_FILES = ["empty.jpg", "truncated.jpg", "notes.png", "bomb.png", "bomb_warning.png"]


@pytest.mark.parametrize("name", BAD_FILES)
def test_each_bad_file_beside_a_good_one(cli, weights, tmp_path, name):
    words = write_bad_files(tmp_path)[name]
    good = photos()[0]
    result = cli("classify", "--weights", weights, "--json", tmp_path / name, good)
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and str(tmp_path / name) in lines[0] and words in lines[0], result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["file"] == str(tmp_path / name) and words in rows[0]["error"]
    assert rows[1]["file"] == str(good) and len(rows[1]["top"]) == 5


def test_missing_file_and_unmatched_pattern(cli, weights, tmp_path):
    good = photos()[0]
    result = cli("classify", "--weights", weights, tmp_path / "nope.jpg", str(tmp_path / "*.webp"), good)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"npresnet: error: {tmp_path / 'nope.jpg'}: no such file or directory",
        f"npresnet: error: {tmp_path / '*.webp'}: no files match this pattern",
    ]
    assert result.stdout.splitlines()[0] == str(good)


def test_directory_of_non_images(cli, weights, tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "data.csv").write_text("1,2")
    result = cli("classify", "--weights", weights, tmp_path)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"npresnet: error: {tmp_path}: no image files in this directory (2 other files)"]


def test_folder_mixing_good_and_bad_files(weights, tmp_path):
    expected = write_bad_files(tmp_path)
    goods = photos()[:2]
    for photo in goods:
        shutil.copy(photo, tmp_path / photo.name)
    (tmp_path / "tiny.png").write_bytes(encode(Image.new("RGB", (1, 1), (10, 200, 30))))  # 1x1 is an image
    (tmp_path / "readme.txt").write_text("not looked at: not an image extension")
    result = run("classify", "--weights", weights, "--json", "--batch-size", 2, tmp_path)
    assert result.returncode == 1
    rows = {row["file"]: row for row in map(json.loads, result.stdout.splitlines())}
    lines = error_lines(result.stderr)
    assert len(lines) == len(expected)
    for name, words in expected.items():
        assert words in rows[str(tmp_path / name)]["error"]
        assert any(str(tmp_path / name) in line and words in line for line in lines)
    for name in [p.name for p in goods] + ["tiny.png"]:
        assert len(rows[str(tmp_path / name)]["top"]) == 5
    assert str(tmp_path / "readme.txt") not in rows
    assert len(rows) == len(expected) + len(goods) + 1


def test_weights_for_another_architecture(weights, capsys):
    assert main(["classify", "--arch", "resnet34", "--weights", str(weights), str(photos()[0])]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"npresnet: error: {weights} holds weights for resnet18, not resnet34: leave out --arch, "
        "which a weights file does not need (the architecture is read from it)"
    ]


def test_unreadable_weights_file(cli, tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip")
    result = cli("classify", "--weights", bad, photos()[0])
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert str(bad) in line and "not a valid weights file" in line and "pickle" not in line


def test_embed(cli, weights, tmp_path):
    write_bad_files(tmp_path / "in")
    good = photos()[:2]
    out = tmp_path / "out" / "vectors.npz"
    result = cli("embed", "--weights", weights, "-o", out, *good, tmp_path / "in" / "empty.jpg")
    assert result.returncode == 1  # one image failed; the others are still written
    assert len(error_lines(result.stderr)) == 1
    assert "wrote 2 embeddings of width 512" in result.stdout
    names, vectors, meta = npresnet.load_embeddings(out)
    assert names == [str(p) for p in good] and meta["arch"] == "resnet18"
    model = npresnet.load(weights, backend="numpy")
    np.testing.assert_allclose(vectors, npresnet.embed(good, model), rtol=1e-5, atol=1e-6)


def test_embed_writes_nothing_when_every_image_fails(cli, weights, tmp_path):
    write_bad_files(tmp_path)
    out = tmp_path / "vectors.npz"
    result = cli("embed", "--weights", weights, "-o", out, tmp_path / "empty.jpg", tmp_path / "notes.png")
    assert result.returncode == 1 and not out.exists()
    assert len(error_lines(result.stderr)) == 3


def test_info_architecture(cli):
    result = cli("info", "resnet18")
    assert result.returncode == 0, result.stderr
    assert "parameters: 11,689,512" in result.stdout  # TorchVision's documented count
    assert "GFLOPs: 1.814" in result.stdout  # TorchVision's documented figure


def test_info_weights_file(cli, weights):
    result = cli("info", weights)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "architecture: resnet18" in out and "num_classes: 10" in out
    # resnet18: 20 conv weights, 20 batch norms x 4 (+ num_batches_tracked, int64), fc weight and bias
    assert "tensors: 122 (float32, int64)" in out
    assert f"file: {weights}" in out and "arch: resnet18" in out


def test_version_help_and_usage_errors(cli):
    assert cli("--version").stdout.strip() == f"npresnet {npresnet.__version__}"
    help_text = cli("--help").stdout
    for word in ("classify", "embed", "info", "examples:", "random"):
        assert word in help_text
    assert "--topk" in cli("classify", "--help").stdout
    for option in ("--topk", "--threads", "--batch-size"):
        bad = cli("classify", option, "0", "x.jpg")
        assert bad.returncode == 2 and f"argument {option}: must be at least 1" in bad.stderr, bad.stderr
    bad = cli("classify", "--resize", "224", "x.jpg")
    assert bad.returncode == 2 and "expected HEIGHTxWIDTH" in bad.stderr
    assert cli().returncode == 2


def test_info_missing_file_or_unknown_architecture(cli, tmp_path):
    result = cli("info", tmp_path / "missing.npz")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"npresnet: error: {tmp_path / 'missing.npz'}: no such file"]
    result = cli("info", "resnet19")
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith("npresnet: error: resnet19: not an architecture (resnet18, resnet34,")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5"])
def test_bad_thread_count_variable_is_one_error_line(cli, monkeypatch, value):
    monkeypatch.setenv("NPRESNET_NUM_THREADS", value)
    result = cli("info", "resnet18")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"npresnet: error: NPRESNET_NUM_THREADS must be a positive integer, not {value!r}"]
    monkeypatch.setenv("NPRESNET_NUM_THREADS", "1")
    assert cli("info", "resnet18").returncode == 0


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        progress = Progress(4, stream=stream)
        progress.advance(2)
        progress.message("npresnet: error: x.jpg: empty file (0 bytes)")
        progress.advance(2)
        progress.close()
    assert "\r[###############...............] 2/4 images" in tty.getvalue()
    assert "4/4 images" in tty.getvalue()
    assert pipe.getvalue() == "npresnet: error: x.jpg: empty file (0 bytes)\n"
    one = Terminal()
    Progress(1, stream=one).advance()  # a bar for a single image says nothing
    assert one.getvalue() == ""


def test_the_same_bar_counts_bytes_for_downloads():
    tty = Terminal()
    bar = Progress(4 * MIB, BYTES, label="resnet18-f37072fd.pth", stream=tty)
    bar.update(MIB)
    assert tty.getvalue() == "\rresnet18-f37072fd.pth [#######.......................]  25% 1.0 MiB"
    unknown = Terminal()
    Progress(None, BYTES, label="x.pth", stream=unknown).update(3 * MIB)
    assert unknown.getvalue() == "\rx.pth 3.0 MiB"


def test_broken_pipe_exits_quietly(weights, tmp_path):
    """`npresnet classify ... | head -1`: the reader leaves; no "Broken pipe" error, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that has gone: the first write fails, as after head -1 exits
    try:
        result = run("classify", "--weights", weights, photos()[0], stdout=write_end)
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 141, (result.returncode, result.stderr)
    shell = subprocess.run(
        f"{sys.executable} -m npresnet classify --weights {weights} --batch-size 1 {' '.join(map(str, photos()[:2]))} | head -1",
        shell=True, capture_output=True, text=True, timeout=120,
    )
    assert shell.stdout == f"{photos()[0]}\n" and shell.stderr == "", shell.stderr


def test_json_reports_missing_inputs_too(weights, tmp_path, capsys):
    good = photos()[0]
    missing = tmp_path / "nope.jpg"
    assert main(["classify", "--weights", str(weights), "--json", str(missing), str(good)]) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows[0] == {"file": str(missing), "error": f"{missing}: no such file or directory"}
    assert rows[1]["file"] == str(good) and len(rows[1]["top"]) == 5
    assert error_lines(captured.err) == [f"npresnet: error: {missing}: no such file or directory"]


def test_topk_above_the_class_count_says_it_was_clamped(weights, capsys):
    assert main(["classify", "--weights", str(weights), "--json", "--topk", "50", str(photos()[0])]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["top"]) == NUM_CLASSES
    assert captured.err == f"npresnet: warning: --topk 50 is more than the model's {NUM_CLASSES} classes: showing {NUM_CLASSES}\n"


def test_resize_squashes_as_the_python_api_does(weights, capsys):
    image = photos()[0]
    assert main(["classify", "--weights", str(weights), "--json", "--topk", "3", "--resize", "48x64", str(image)]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    model = npresnet.load(weights, backend="numpy")
    squashed = npresnet.ImageClassification(squash_size=(48, 64))
    want = npresnet.classify(image, model, topk=3, preset=squashed)[0]
    cropped = npresnet.classify(image, model, topk=3)[0]
    assert [t["index"] for t in top] == [p.index for p in want]
    np.testing.assert_allclose([t["probability"] for t in top], [p.probability for p in want], rtol=1e-6)
    assert [p.probability for p in want] != [p.probability for p in cropped]  # the option changed the input


def test_written_files_get_the_usual_permissions(weights, tmp_path, capsys):
    """save, convert and embed write through a private temporary file; the result follows the umask, not 0600."""
    previous = os.umask(0o027)
    try:
        npresnet.save(npresnet.build("resnet18", num_classes=2, backend="numpy"), tmp_path / "saved.npz")
        assert main(["convert", str(tmp_path / "saved.npz"), str(tmp_path / "converted.npz")]) == 0
        assert main(["embed", "--weights", str(weights), "-o", str(tmp_path / "vectors.npz"), str(photos()[0])]) == 0
    finally:
        os.umask(previous)
    assert "wrote 1 embedding of width 512" in capsys.readouterr().out
    for name in ("saved.npz", "converted.npz", "vectors.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_auto_backend_is_numpy_for_one_image():
    """One image never repays a compiled backend's start-up (the costs: backends.AUTO_COSTS); an explicit choice is kept."""
    from npresnet.cli import backend_for

    model = npresnet.build("resnet18", num_classes=2, backend="numpy")
    assert backend_for(model, 1, 16, (224, 224)) == "numpy"

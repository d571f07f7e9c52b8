"""`evaluate` on a tiny ImageFolder: every figure recomputed here another way (classify per image, torch's cross-entropy)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import npresnet  # noqa: E402
from npresnet.evaluation import evaluate, image_folder, read_class_map  # noqa: E402
from npresnet.specs import get_spec  # noqa: E402
from PIL import Image  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402

CLASSES = ["apple", "banana", "cherry"]  # sorted: indices 0, 1, 2
PER_CLASS = 3
# Small crops keep the forward passes cheap; evaluate must use the preprocessing the weights ask for.
PREPROCESSING = {"crop_size": 48, "resize_size": 56}


def make_model(num_classes: int, seed: int):
    state = numpy_state_dict(randomise(torch_resnet(get_spec("resnet18", num_classes=num_classes)), seed))
    model = npresnet.build("resnet18", state, backend="numpy")
    model.meta.update(PREPROCESSING)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DATA/<class>/<i>.png (and one .JPG), coloured noise, different per image."""
    root = tmp_path_factory.mktemp("fruit")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (40 + 8 * i, 52, 3), dtype=np.uint8)
            pixels[..., c] = 255 - 40 * i  # a class-coloured tint, so the images differ by class
            Image.fromarray(pixels).save(root / name / (f"{i}.png" if i < 2 else f"{i}.JPG"))
    (root / "banana" / "notes.txt").write_text("not an image, and not an image extension either")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    paths = []
    for seed in (0, 1):
        paths.append(folder / f"model{seed}.npz")
        npresnet.save(make_model(len(CLASSES), seed), paths[-1])
    return paths


def expected_samples(root) -> list[tuple[str, int]]:
    """The listing written out: sorted class folders, sorted files, image extensions only."""
    return [(str(root / name / f), c) for c, name in enumerate(CLASSES) for f in ("0.png", "1.png", "2.JPG")]


def independent_figures(model, samples, k):
    """(top-1, top-k, loss, top-1 predictions) from npresnet.classify per image and torch's cross-entropy."""
    targets = np.array([t for _, t in samples])
    tops = [npresnet.classify(path, model, topk=k)[0] for path, _ in samples]
    top1 = np.array([top[0].index for top in tops])
    topk = np.array([t in [p.index for p in top] for top, t in zip(tops, targets)])
    logits = model(npresnet.preprocess([p for p, _ in samples], npresnet.preset_for(model)))
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(targets)).item()
    return float(np.mean(top1 == targets)), float(np.mean(topk)), loss, top1


def test_listing_is_imagefolders(data):
    folder = image_folder(data)
    assert folder.classes == CLASSES
    assert folder.samples == expected_samples(data)


def test_figures_match_an_independent_computation(data, models):
    model = npresnet.load(models[0], backend="numpy")
    result = evaluate(model, data, topk=2, batch_size=2)  # batches that straddle classes
    samples = expected_samples(data)
    top1, top2, loss, predictions = independent_figures(model, samples, 2)
    assert result.images == len(samples) and result.topk == 2
    assert result.top1 == pytest.approx(top1) and result.topk_accuracy == pytest.approx(top2)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert 0 < result.loss  # a real cross-entropy, not a placeholder
    np.testing.assert_array_equal(result.predictions, predictions)
    targets = np.array([t for _, t in samples])
    for c, row in enumerate(result.per_class):
        assert (row.name, row.index, row.count) == (CLASSES[c], c, PER_CLASS)
        assert row.top1_correct == int(np.sum((predictions == c) & (targets == c)))
    assert result.skipped == [] and result.compared is None


def test_compare_agreement(data, models):
    a, b = (npresnet.load(p, backend="numpy") for p in models)
    samples = expected_samples(data)
    itself = evaluate(a, data, compare=npresnet.load(models[0], backend="numpy"))
    assert itself.agreement == 1.0 and itself.compared.top1 == itself.top1
    other = evaluate(a, data, compare=b)
    *_, pa = independent_figures(a, samples, 1)
    top1_b, _, loss_b, pb = independent_figures(b, samples, 1)
    assert other.agreement == pytest.approx(np.mean(pa == pb))
    assert other.compared.top1 == pytest.approx(top1_b) and other.compared.loss == pytest.approx(loss_b, rel=1e-6)


def test_limit_takes_the_classes_in_turn(data, models):
    result = evaluate(npresnet.load(models[0], backend="numpy"), data, limit=4)
    names = [p.split(str(data))[1].strip("/\\") for p in result.files]
    assert [n.replace("\\", "/") for n in names] == ["apple/0.png", "banana/0.png", "cherry/0.png", "apple/1.png"]
    assert [row.count for row in result.per_class] == [2, 1, 1]


def test_class_maps(data, tmp_path):
    pairs = tmp_path / "map.txt"
    pairs.write_text("# folder index\ncherry 0\napple 3\nbanana 1\n")
    assert read_class_map(pairs) == {"cherry": 0, "apple": 3, "banana": 1}
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("n00000001 zero, nothing\ncherry red fruit\nbanana\napple 4 apples\n")
    assert read_class_map(synsets) == {"n00000001": 0, "cherry": 1, "banana": 2, "apple": 3}

    model = make_model(4, seed=2)
    result = evaluate(model, data, class_to_idx=read_class_map(pairs), topk=1)
    assert [(row.name, row.index) for row in result.per_class] == [("apple", 3), ("banana", 1), ("cherry", 0)]
    samples = [(p, {0: 3, 1: 1, 2: 0}[t]) for p, t in expected_samples(data)]
    assert result.top1 == pytest.approx(independent_figures(model, samples, 1)[0])
    assert result.warnings == []
    # Without a map, 3 folders for a 4-class head is allowed, with a warning.
    assert any("3 class folders for a model with 4 classes" in w for w in evaluate(model, data, limit=1).warnings)

    with pytest.raises(ValueError, match="class folders not in the class map: banana"):
        image_folder(data, {"apple": 0, "cherry": 2})
    with pytest.raises(ValueError, match=r"class index 3 is beyond the model's head \(num_classes=3\)"):
        evaluate(make_model(3, seed=0), data, class_to_idx=read_class_map(pairs))


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        image_folder(tmp_path)


# --- the command --------------------------------------------------------------------------------------------------


def test_cli_json(data, models, cli):
    result = cli("evaluate", data, "--weights", models[0], "--compare", models[1], "--json", "--topk", 2)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"data", "images", "skipped", "topk", "weights", "arch", "top1", "top2", "loss", "classes", "compare"}
    assert out["images"] == 9 and out["topk"] == 2 and out["skipped"] == []
    assert [c["name"] for c in out["classes"]] == CLASSES and [c["images"] for c in out["classes"]] == [3, 3, 3]
    a, b = (npresnet.load(p, backend="numpy") for p in models)
    samples = expected_samples(data)
    top1_a, top2_a, loss_a, pa = independent_figures(a, samples, 2)
    *_, pb = independent_figures(b, samples, 2)
    assert out["top1"] == pytest.approx(top1_a) and out["top2"] == pytest.approx(top2_a)
    assert out["loss"] == pytest.approx(loss_a, rel=1e-6)
    assert set(out["compare"]) == {"weights", "arch", "top1", "top2", "loss", "agreement"}
    assert out["compare"]["agreement"] == pytest.approx(np.mean(pa == pb))


def test_cli_text_with_a_bad_image(data, models, tmp_path, cli):
    import shutil

    copy = tmp_path / "fruit"
    shutil.copytree(data, copy)
    (copy / "cherry" / "broken.jpg").write_bytes(b"")
    result = cli("evaluate", copy, "--weights", models[0], "--limit", 100)
    assert result.returncode == 1
    assert f"npresnet: error: {copy / 'cherry' / 'broken.jpg'}: empty file (0 bytes)" in result.stderr.splitlines()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{copy}: 9 images in 3 classes (1 unreadable, left out); resnet18")
    assert lines[1].startswith("top-1 accuracy") and lines[2].startswith("top-3 accuracy") and lines[3].startswith("loss")
    table = lines[5:]
    assert table[0].split() == ["class", "index", "images", "top-1", "top-3"]
    assert [row.split()[:3] for row in table[1:]] == [[name, str(i), "3"] for i, name in enumerate(CLASSES)]


def test_cli_class_map_and_its_deprecated_name(data, models, tmp_path, cli):
    """--class-map FILE maps folders to indices; --labels, its old name (classify's --labels is class names
    to print), still works with a warning; giving both is an error."""
    class_map = tmp_path / "map.txt"
    class_map.write_text("cherry 0\napple 2\nbanana 1\n")
    result = cli("evaluate", data, "--weights", models[0], "--class-map", class_map, "--limit", 3, "--json", "--topk", 1)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = json.loads(result.stdout)
    assert [(c["name"], c["index"]) for c in out["classes"]] == [("apple", 2), ("banana", 1), ("cherry", 0)]
    old = cli("evaluate", data, "--weights", models[0], "--labels", class_map, "--limit", 3, "--json", "--topk", 1)
    assert old.returncode == 0 and old.stdout == result.stdout
    assert old.stderr == "npresnet: warning: evaluate's --labels is now --class-map (classify's --labels is class names to print)\n"
    both = cli("evaluate", data, "--weights", models[0], "--labels", class_map, "--class-map", class_map)
    assert both.returncode != 0 and both.stderr.startswith("npresnet: error: give --class-map once")
    help_text = " ".join(cli("evaluate", "--help").stdout.split())
    assert "--class-map FILE folder name -> class index" in help_text
    assert "--labels FILE deprecated: the old name of --class-map" in help_text


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: None, "no class folders"),
        (lambda root: (root / "a").mkdir(), "no image files"),
    ],
    ids=["no-class-folders", "no-images"],
)
def test_cli_empty_folder(tmp_path, models, make, words, cli):
    make(tmp_path)
    result = cli("evaluate", tmp_path, "--weights", models[0])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"npresnet: error: {tmp_path}: ") and words in lines[0]

"""The training data pipeline: the ImageFolder tree, the transforms' geometry and statistics, the threaded loader."""
import math

import numpy as np
import pytest
from PIL import Image

from image_files import encode
from npresnet.datasets import (
    IMG_EXTENSIONS,
    BatchLoader,
    DataError,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    TrainTransform,
    image_folder,
    sample_rng,
    train_val_folders,
)
from npresnet.preprocess import ImageClassification


def noise_image(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_tree(root, classes, per_class=3, size=(12, 10)):
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise_image(*size, seed=100 * c + i).save(folder / f"{i}.png")


# --- the folder tree ---------------------------------------------------------------------------------------------


def test_image_folder_orders_classes_and_files_as_torchvision(tmp_path):
    for name in ("zebra", "Apple", "mango"):  # sorted by code point: uppercase first
        (tmp_path / name).mkdir()
    png = encode(noise_image(4, 4))
    (tmp_path / "mango" / "b.PNG").write_bytes(png)  # extensions match in any case
    (tmp_path / "mango" / "a.jpeg").write_bytes(png)  # content is not checked here, only names
    (tmp_path / "mango" / "notes.txt").write_text("not an image extension")
    (tmp_path / "mango" / "deeper").mkdir()
    (tmp_path / "mango" / "deeper" / "c.webp").write_bytes(png)
    (tmp_path / "zebra" / "z.bmp").write_bytes(png)
    (tmp_path / "Apple" / "x.tif").write_bytes(png)
    (tmp_path / "stray.png").write_bytes(png)  # a file at the top is not a class
    folder = image_folder(tmp_path)
    assert folder.classes == ("Apple", "mango", "zebra")
    relative = [(str(p.relative_to(tmp_path)), label) for p, label in ((tmp_path.joinpath(s), y) for s, y in folder.samples)]
    assert relative == [
        ("Apple/x.tif", 0),
        ("mango/a.jpeg", 1),
        ("mango/b.PNG", 1),
        ("mango/deeper/c.webp", 1),
        ("zebra/z.bmp", 2),
    ]
    assert folder.class_counts() == [1, 3, 1]
    assert ".jpg" in IMG_EXTENSIONS and ".webp" in IMG_EXTENSIONS


def test_train_val_folders_number_val_by_train_classes(tmp_path):
    write_tree(tmp_path / "train", ["cat", "dog", "owl"], per_class=1)
    write_tree(tmp_path / "val", ["owl"], per_class=2)  # a class may be absent from val
    train, val = train_val_folders(tmp_path)
    assert train.classes == val.classes == ("cat", "dog", "owl")
    assert [label for _, label in val.samples] == [2, 2]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: None, "no such folder"),
        (lambda root: root.mkdir(), "no train/ folder"),
        (lambda root: write_tree(root / "train", ["a"]), "no val/ folder"),
        (lambda root: ((root / "train").mkdir(parents=True), (root / "val").mkdir()), "no class folders"),
        (lambda root: (write_tree(root / "train", ["a"]), (root / "train" / "b").mkdir(), write_tree(root / "val", ["a"])),
         "no image files in class folder(s) b"),
        (lambda root: (write_tree(root / "train", ["a", "b"]), write_tree(root / "val", ["a", "c"])),
         "class folders not among the training classes: c"),
    ],
    ids=["missing", "no-train", "no-val", "no-classes", "empty-class", "val-class-not-in-train"],
)
def test_bad_data_folders_are_named(tmp_path, make, words):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError) as info:
        train_val_folders(root)
    assert words in str(info.value) and str(root) in str(info.value)


# --- transforms --------------------------------------------------------------------------------------------------


def test_random_resized_crop_boxes_stay_inside_and_within_scale_and_ratio():
    crop = RandomResizedCrop(32)
    width, height = 300, 200
    rng = np.random.default_rng(0)
    fractions, log_ratios = [], []
    for _ in range(3000):
        top, left, h, w = crop.get_params(width, height, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        # w and h are rounded from the drawn area and ratio: allow half a pixel on each side.
        assert (w - 0.5) * (h - 0.5) <= width * height
        assert (w + 0.5) * (h + 0.5) >= 0.08 * width * height
        assert 3 / 4 * (h - 0.5) / (h + 0.5) <= w / h <= 4 / 3 * (h + 0.5) / (h - 0.5)
        fractions.append(w * h / (width * height))
        log_ratios.append(math.log(w / h))
    # The draws cover the ranges: small and large boxes, both extreme ratios, offsets everywhere.
    assert min(fractions) < 0.1 and max(fractions) > 0.85  # at most 4/3 x 200 by 200 fits in 300 x 200: 0.89
    assert min(log_ratios) < math.log(0.8) and max(log_ratios) > math.log(1.25)
    # Area uniform in [0.08, 1] but boxes too large for a 3:2 frame are redrawn: the mean falls below 0.54.
    assert 0.35 < np.mean(fractions) < 0.54


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (1000, 10, (0, (1000 - 13) // 2, 10, 13)),  # wider than 4:3: full height, width at ratio 4/3
        (10, 1000, ((1000 - 13) // 2, 0, 13, 10)),  # taller than 3:4: full width, height at ratio 3/4
    ],
    ids=["wide", "tall"],
)
def test_random_resized_crop_falls_back_to_the_central_crop(width, height, expected):
    # No box of at least 8% of the area fits in a 10-pixel-wide strip, so all 10 tries fail.
    for seed in range(20):
        assert RandomResizedCrop(8).get_params(width, height, np.random.default_rng(seed)) == expected


def test_random_resized_crop_fallback_takes_the_whole_image_at_an_allowed_ratio():
    crop = RandomResizedCrop(8, scale=(2.0, 3.0))  # every try is larger than the image
    assert crop.get_params(90, 80, np.random.default_rng(0)) == (0, 0, 80, 90)


def test_random_resized_crop_output_is_pil_bilinear_resize_of_the_box():
    image = noise_image(97, 61)
    crop = RandomResizedCrop(24)
    for seed in range(5):
        top, left, h, w = crop.get_params(97, 61, np.random.default_rng(seed))
        out = crop(image, np.random.default_rng(seed))
        # TorchVision's resized_crop crops, then resizes: the box alone is resampled (PIL's resize(box=...)
        # would also weigh pixels just outside it).
        box = Image.fromarray(np.asarray(image)[top : top + h, left : left + w])
        want = box.resize((24, 24), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_random_crop_pads_with_zeros_and_reaches_every_offset():
    image = noise_image(32, 32)
    crop = RandomCrop(32, padding=4)
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = np.asarray(image)
    offsets = set()
    for seed in range(1500):
        top, left = crop.get_params(40, 40, np.random.default_rng(seed))
        out = np.asarray(crop(image, np.random.default_rng(seed)))
        np.testing.assert_array_equal(out, padded[top : top + 32, left : left + 32])
        offsets.add((top, left))
    assert offsets == {(t, l) for t in range(9) for l in range(9)}


def test_horizontal_flip_is_exact_and_half_the_time():
    image = noise_image(9, 5)
    flips = 0
    for seed in range(2000):
        out = np.asarray(RandomHorizontalFlip()(image, np.random.default_rng(seed)))
        if np.array_equal(out, np.asarray(image)[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, np.asarray(image))
    assert abs(flips - 1000) < 100  # 4.5 standard deviations


def test_train_transform_without_randomness_is_the_eval_preset():
    square = noise_image(40, 40)
    # A box that must cover the whole square image: RandomResizedCrop is then a plain resize.
    whole = RandomResizedCrop(20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    pixels = np.asarray(whole(square, np.random.default_rng(0)))
    np.testing.assert_array_equal(pixels, ImageClassification(20, 20).resize_and_crop(square))
    # The cifar path with no padding and no flip is exactly the eval preset, normalisation included.
    small = noise_image(32, 32, seed=3)
    cifar = TrainTransform(size=32, stem="cifar", padding=0, hflip_prob=0.0)
    np.testing.assert_array_equal(cifar(small, np.random.default_rng(1)), ImageClassification(32, 32)(small))


def test_train_transform_is_reproducible_by_seed_and_varies_without_it():
    image = noise_image(64, 48)
    transform = TrainTransform(size=16)
    a = transform(image, sample_rng(7, 2, 5))
    b = transform(image, sample_rng(7, 2, 5))
    assert a.shape == (3, 16, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    others = [transform(image, sample_rng(*key)) for key in [(8, 2, 5), (7, 3, 5), (7, 2, 6)]]
    assert all(not np.array_equal(a, other) for other in others)
    cifar = TrainTransform(size=16, stem="cifar")
    assert cifar(image, sample_rng(0, 0, 0)).shape == (3, 16, 16)  # resized and center cropped first


# --- batches -----------------------------------------------------------------------------------------------------


def test_loader_batches_do_not_depend_on_threads_and_resume_mid_epoch(tmp_path):
    write_tree(tmp_path, ["a", "b", "c"], per_class=5, size=(20, 14))
    folder = image_folder(tmp_path)
    transform = TrainTransform(size=8)
    runs = []
    for workers in (1, 3):
        with BatchLoader(folder, transform, 4, shuffle=True, seed=3, workers=workers) as loader:
            assert len(loader) == 4
            runs.append([(n, b.images, b.labels) for n, b in loader.epoch(1)])
    assert [n for n, _, _ in runs[0]] == [0, 1, 2, 3]
    assert [len(labels) for _, _, labels in runs[0]] == [4, 4, 4, 3]
    for (_, x1, y1), (_, x3, y3) in zip(*runs):
        np.testing.assert_array_equal(x1, x3)
        np.testing.assert_array_equal(y1, y3)
    with BatchLoader(folder, transform, 4, shuffle=True, seed=3, workers=2) as loader:
        tail = list(loader.epoch(1, start=2))
        other_epoch = next(loader.epoch(2))[1]
    assert [n for n, _ in tail] == [2, 3]
    np.testing.assert_array_equal(tail[0][1].images, runs[0][2][1])
    assert not np.array_equal(other_epoch.images, runs[0][0][1])
    labels = np.concatenate([y for _, _, y in runs[0]])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5 and labels.tolist() != sorted(labels.tolist())


def test_loader_leaves_bad_images_out_and_says_which(tmp_path):
    write_tree(tmp_path, ["a", "b"], per_class=2)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    folder = image_folder(tmp_path)
    with BatchLoader(folder, ImageClassification(8, 8), 3, shuffle=False, workers=2) as loader:
        batches = [b for _, b in loader.epoch(0)]
    assert [len(b.labels) for b in batches] == [2, 2]  # a/0, a/1, a/broken | b/0, b/1, b/empty
    assert batches[0].images.shape == (2, 3, 8, 8)
    errors = [e for b in batches for e in b.errors]
    assert [path for path, _ in errors] == [str(tmp_path / "a" / "broken.png"), str(tmp_path / "b" / "empty.jpg")]
    assert "not an image" in errors[0][1] and "empty file" in errors[1][1]
    # The eval preset (no randomness) gives the same arrays as preprocessing each file.
    np.testing.assert_array_equal(batches[0].images[1], ImageClassification(8, 8)(tmp_path / "a" / "1.png"))

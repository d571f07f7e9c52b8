"""Preprocessing: TorchVision's resize/crop arithmetic, its normalisation in torch, every input kind and image mode."""
import io

import numpy as np
import pytest
from PIL import Image, features

from image_files import EPS, encode, photos, png_header_only
from npresnet.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageClassification, ImageError, load_image, preprocess, preset_for


def gradient_image(width, height, seed=0):
    """A smooth RGB image with noise, so that resampling and cropping errors show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-20, 21, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


# --- resize and crop arithmetic: expected values worked out by hand ------------------------------------------

# (width, height, resize_size) -> resized (width, height); the longer side is int(resize * long / short).
RESIZED = [
    ((640, 427, 256), (383, 256)),  # 256 * 640 / 427 = 383.70
    ((451, 300, 256), (384, 256)),  # 384.85
    ((451, 300, 232), (348, 232)),  # 348.77 (the IMAGENET1K_V2 preset)
    ((300, 451, 256), (256, 384)),  # portrait: the width is the short side
    ((768, 512, 256), (384, 256)),  # exactly 384
    ((333, 333, 256), (256, 256)),
    ((1, 1, 256), (256, 256)),
    ((3, 2, 256), (384, 256)),
    ((2, 3, 256), (256, 384)),
    ((7, 1000, 256), (256, 36571)),  # 36571.43
    ((1000, 3, 232), (77333, 232)),  # 77333.33
]


@pytest.mark.parametrize("size,expected", RESIZED, ids=lambda v: "x".join(map(str, v)))
def test_resized_size(size, expected):
    width, height, resize_size = size
    assert ImageClassification(resize_size=resize_size).resized_size(width, height) == expected
    # The same rule in integer arithmetic, as a second, independent computation.
    short, long = min(width, height), max(width, height)
    new_long = resize_size * long // short
    assert max(expected) == new_long and min(expected) == resize_size


# height (or width) -> crop offset for crop 224: round((h - 224) / 2) with halves to the even integer.
CROP_OFFSETS = [(224, 0), (225, 0), (226, 1), (227, 2), (229, 2), (256, 16), (257, 16), (259, 18), (383, 80), (384, 80)]


@pytest.mark.parametrize("side,offset", CROP_OFFSETS, ids=lambda v: str(v))
def test_crop_offsets(side, offset):
    preset = ImageClassification()
    assert preset.crop_box(side, 256) == (offset, 16, offset + 224, 16 + 224)
    assert preset.crop_box(300, side)[1] == offset


def centre_offset(excess):
    """Half of `excess`; an odd excess's half (q + 0.5) goes to the even one of q and q + 1, as Python's round."""
    q = excess // 2
    return q if excess % 2 == 0 or q % 2 == 0 else q + 1


def test_centre_offset_agrees_with_the_table():
    assert all(centre_offset(side - 224) == offset for side, offset in CROP_OFFSETS)


@pytest.mark.parametrize(
    "width,height", [(640, 427), (451, 300), (257, 259), (1, 1), (2, 3), (5, 300), (300, 229)], ids=lambda v: str(v)
)
def test_crop_takes_the_right_pixels(width, height):
    image = gradient_image(width, height)
    preset = ImageClassification()
    got = preset.resize_and_crop(image)
    new_w, new_h = preset.resized_size(width, height)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    top, left = centre_offset(new_h - 224), centre_offset(new_w - 224)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, resized[top : top + 224, left : left + 224])


@pytest.mark.parametrize("crop_size", [300, 301])
def test_padding_when_the_image_is_smaller_than_the_crop(crop_size):
    # 451x300 resizes to 384x256; a 300 crop needs 44 rows of zeros (22 + 22), a 301 crop 45 (22 + 23).
    image = gradient_image(451, 300)
    preset = ImageClassification(crop_size=crop_size, resize_size=256)
    got = preset.resize_and_crop(image)
    resized = np.asarray(image.resize((384, 256), Image.Resampling.BILINEAR))
    left = {300: 42, 301: 42}[crop_size]  # round(84 / 2) = 42, round(83 / 2) = round(41.5) = 42
    assert got.shape == (crop_size, crop_size, 3)
    assert not got[:22].any() and not got[22 + 256 :].any()
    assert got.shape[0] - 22 - 256 == {300: 22, 301: 23}[crop_size]
    np.testing.assert_array_equal(got[22 : 22 + 256], resized[:, left : left + crop_size])


# --- normalisation and the whole preset against torch ---------------------------------------------------------


def torchvision_preset(image: Image.Image, crop_size=224, resize_size=256):
    """TorchVision's ImageClassification preset in torch ops (PIL resize; pad, crop, scale, normalise in torch)."""
    torch = pytest.importorskip("torch")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = resize_size, int(resize_size * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    t = torch.from_numpy(np.array(image.resize(size, Image.Resampling.BILINEAR))).permute(2, 0, 1)  # (3, H, W) uint8
    _, h, w = t.shape
    if crop_size > h or crop_size > w:
        pw, ph = max(crop_size - w, 0), max(crop_size - h, 0)
        t = torch.nn.functional.pad(t, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        _, h, w = t.shape
    top, left = int(round((h - crop_size) / 2.0)), int(round((w - crop_size) / 2.0))
    t = t[:, top : top + crop_size, left : left + crop_size]
    t = t.to(torch.float32).div(255)
    t = t.sub(torch.tensor(IMAGENET_MEAN)[:, None, None]).div(torch.tensor(IMAGENET_STD)[:, None, None])
    return t.numpy()


@pytest.mark.parametrize("size", [(640, 427), (224, 224), (97, 131), (1, 1), (300, 2)], ids=lambda s: "%dx%d" % s)
@pytest.mark.parametrize("preset_sizes", [(224, 256), (224, 232), (256, 200)], ids=lambda s: "crop%d_resize%d" % s)
def test_preset_matches_torch_bit_for_bit(size, preset_sizes):
    crop_size, resize_size = preset_sizes
    image = gradient_image(*size, seed=size[0])
    got = ImageClassification(crop_size=crop_size, resize_size=resize_size)(image)
    want = torchvision_preset(image, crop_size, resize_size)
    assert got.dtype == np.float32 and got.shape == (3, crop_size, crop_size)
    np.testing.assert_array_equal(got, want)


def torchvision_squash(image: Image.Image, height: int, width: int):
    """TorchVision's Resize((height, width)) on a PIL image (PIL bilinear; antialias is PIL's own), then
    ToTensor and Normalize in torch: what a model fine-tuned with that plain pipeline saw."""
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.array(image.resize((width, height), Image.Resampling.BILINEAR))).permute(2, 0, 1)
    t = t.to(torch.float32).div(255)
    return t.sub(torch.tensor(IMAGENET_MEAN)[:, None, None]).div(torch.tensor(IMAGENET_STD)[:, None, None]).numpy()


@pytest.mark.parametrize("size", [(640, 427), (97, 131), (300, 2), (1, 1)], ids=lambda s: "%dx%d" % s)
@pytest.mark.parametrize("squash", [(224, 224), (48, 80)], ids=lambda s: "squash%dx%d" % s)
def test_squash_matches_torch_bit_for_bit(size, squash):
    image = gradient_image(*size, seed=size[1])
    got = ImageClassification(squash_size=squash)(image)
    assert got.dtype == np.float32 and got.shape == (3, *squash)
    np.testing.assert_array_equal(got, torchvision_squash(image, *squash))
    # The whole image, aspect ratio not kept: no crop, so the corners of the input are the corners of the output.
    pixels = ImageClassification(squash_size=squash).resize_and_crop(image)
    assert pixels.shape == (*squash, 3)
    np.testing.assert_array_equal(pixels, np.asarray(image.resize(squash[::-1], Image.Resampling.BILINEAR)))


def test_squash_size_is_checked():
    with pytest.raises(ValueError, match="squash_size must be"):
        ImageClassification(squash_size=(224, 0))
    assert ImageClassification(squash_size=[32, 48]).squash_size == (32, 48)
    assert preprocess([], ImageClassification(squash_size=(32, 48))).shape == (0, 3, 32, 48)


@pytest.mark.parametrize("path", photos(), ids=lambda p: p.name)
def test_photos_match_torch_bit_for_bit(path):
    with Image.open(path) as image:
        want = torchvision_preset(image.convert("RGB"))
    np.testing.assert_array_equal(preprocess([path])[0], want)


# --- inputs and modes ------------------------------------------------------------------------------------------


def test_every_input_kind_gives_the_same_tensor(tmp_path):
    image = gradient_image(120, 90)
    path = tmp_path / "x.png"
    image.save(path)
    want = ImageClassification()(image)
    for source in (path, str(path), path.read_bytes(), np.asarray(image)):
        np.testing.assert_array_equal(ImageClassification()(source), want)
    batch = preprocess([path, image, np.asarray(image)])
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32


MODES = ["L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "1", "I", "F", "HSV"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_become_rgb_as_pil_converts_them(mode):
    image = gradient_image(80, 60).convert(mode)
    got = load_image(image)
    assert got.mode == "RGB"
    if mode == "I":  # treated as 16-bit data; these values are all below 256, so >> 8 makes them black
        assert not np.asarray(got).any()
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(image.convert("RGB")))


def test_palette_with_transparency_bytes_quietly(recwarn):
    image = gradient_image(40, 30).convert("P")
    image.info["transparency"] = bytes(range(256))
    got = load_image(image)
    assert not [w for w in recwarn if "Palette" in str(w.message)]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(image.convert("RGBA").convert("RGB")))


def test_alpha_is_dropped_not_composited():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    assert np.asarray(load_image(Image.fromarray(rgba)))[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_images_are_scaled_not_clipped(mode):
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    image = Image.fromarray(values).convert(mode) if mode != "I;16" else Image.fromarray(values)
    if mode == "I;16B":
        image = Image.frombytes("I;16B", (64, 48), values.astype(">u2").tobytes())
    assert image.mode == mode
    got = np.asarray(load_image(image))
    want = (values >> 8).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], want)
    assert (got < 255).mean() > 0.9  # PIL's own convert("RGB") makes nearly all of it 255


def test_sixteen_bit_png_file():
    values = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    data = encode(Image.fromarray(values))
    np.testing.assert_array_equal(np.asarray(load_image(data))[..., 1], (values >> 8).astype(np.uint8))


def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 clockwise to view), and the upright image."""
    upright = gradient_image(60, 40)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes: pixels on their side
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), stored


def test_exif_orientation_ignored_by_default_as_torchvision_does():
    data, stored = exif_rotated_jpeg()
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    assert load_image(data).size == stored.size == (40, 60)
    np.testing.assert_array_equal(ImageClassification()(data), ImageClassification()(decoded))


def test_exif_orientation_applied_on_request():
    data, _ = exif_rotated_jpeg()
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    upright = decoded.transpose(Image.Transpose.ROTATE_270)
    assert load_image(data, exif_transpose=True).size == (60, 40)
    np.testing.assert_array_equal(ImageClassification(exif_transpose=True)(data), ImageClassification()(upright))


# --- presets and bad input -------------------------------------------------------------------------------------


def test_preset_for_reads_the_model_metadata():
    class Model:
        meta = {"crop_size": 224, "resize_size": 232}

    assert preset_for(Model()) == ImageClassification(crop_size=224, resize_size=232)
    Model.meta = {}
    assert preset_for(Model()) == ImageClassification(crop_size=224, resize_size=256)
    assert "resize_size=256" in repr(preset_for(Model()))
    assert preset_for(Model(), exif_transpose=True).exif_transpose


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_bytes(b"hello"), p)[1], "not an image"),
        (lambda p: (p.write_bytes(encode(gradient_image(64, 64), "JPEG")[:300]), p)[1], "truncated"),
        (lambda p: (p.write_bytes(png_header_only(20_000, 20_000)), p)[1], "decompression bomb"),
        (lambda p: (p.write_bytes(png_header_only(10_000, 10_000)), p)[1], "decompression bomb"),
        (lambda p: p.parent, "is a directory"),
    ],
    ids=["missing", "empty", "text", "truncated", "bomb", "bomb_warning", "directory"],
)
def test_bad_input_names_the_file(tmp_path, make, words):
    path = make(tmp_path / "bad.jpg")
    with pytest.raises(ImageError) as info:
        preprocess([path])
    message = str(info.value)
    assert message.startswith(str(path)) and words in message, message


@pytest.mark.parametrize("array", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros(4, np.uint8)])
def test_bad_arrays(array):
    with pytest.raises(ImageError, match="array"):
        preprocess([array])


def test_a_one_pixel_image_is_an_image():
    got = ImageClassification()(np.full((1, 1, 3), 255, np.uint8))
    want = (1.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(got[:, 0, 0], want, rtol=1e-6)
    assert np.ptp(got, axis=(1, 2)).max() == 0


def test_postscript_never_reaches_ghostscript(tmp_path):
    """Pillow identifies EPS (and would run Ghostscript to decode it); npresnet opens only its allowlisted formats."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    assert Image.open(path).format == "EPS"  # the control: unrestricted Pillow takes it
    with pytest.raises(ImageError, match=r"photo.jpg: not an image in a format npresnet reads \(JPEG, PNG"):
        preprocess([path])


@pytest.mark.skipif(not features.check("avif"), reason="Pillow without AVIF (Pillow's wheels since 11.3 have it)")
def test_decoder_runtime_errors_are_image_errors(tmp_path):
    """A corrupt AVIF makes Pillow's decoder raise RuntimeError; that, too, is an ImageError naming the file."""
    avif = encode(Image.new("RGB", (16, 16)), "AVIF")
    path = tmp_path / "corrupt.avif"
    path.write_bytes(avif[:-40] + b"\0" * 40)
    with pytest.raises(RuntimeError):
        Image.open(path).load()  # the control
    with pytest.raises(ImageError, match=r"corrupt.avif: cannot read image \(RuntimeError"):
        preprocess([path])

"""Grad-CAM on layer4 against torch autograd (float64 and float32), and `npresnet explain` end to end.

The torch side computes Grad-CAM the general way: the gradient of the class logit
with respect to layer4's output by autograd, its spatial mean as channel weights,
relu of the weighted sum, torch's bilinear interpolate, divided by the maximum.
npresnet uses the closed form of that gradient for a ResNet; they must agree.
"""
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from image_files import photos  # noqa: E402
from npresnet.cli import main  # noqa: E402
from npresnet.explain import CAPTION_HEIGHT, OVERLAY_ALPHA, resize_bilinear  # noqa: E402
from npresnet.preprocess import ImageClassification, load_image  # noqa: E402
from npresnet.specs import BOTTLENECK, ResNetSpec, get_spec  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402

R18_10 = get_spec("resnet18").replace(num_classes=10)
BOTTLENECK_10 = ResNetSpec("custom", BOTTLENECK, (1, 1, 1, 1), groups=32, width_per_group=4, num_classes=10)
SMALL = ImageClassification(crop_size=96, resize_size=110)


def torch_gradcam(model, x: np.ndarray) -> tuple[int, list[np.ndarray]]:
    """(top class, Grad-CAM of every class) by autograd on layer4's output (a forward hook keeps it), x (1, 3, H, W).

    A class with no positive evidence anywhere gets an all-zero map (torch would divide 0 by 0).
    """
    kept = {}
    hook = model.layer4.register_forward_hook(lambda module, inputs, output: kept.update(layer4=output))
    logits = model(torch.from_numpy(x))
    hook.remove()
    cams = []
    for c in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[0, c], kept["layer4"], retain_graph=True)  # (1, K, h, w)
        alpha = grad[0].mean(dim=(1, 2))  # (K,)
        cam = torch.relu((alpha[:, None, None] * kept["layer4"][0]).sum(0))  # (h, w)
        cam = torch.nn.functional.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
        cams.append((cam / cam.max() if cam.max() > 0 else cam).detach().numpy())
    return int(logits[0].argmax()), cams


def models(spec, seed, torch_dtype):
    oracle = randomise(torch_resnet(spec), seed).to(torch_dtype)
    return oracle, npresnet.ResNet.from_state_dict(numpy_state_dict(oracle), backend="numpy")


@pytest.mark.parametrize("spec", [R18_10, BOTTLENECK_10], ids=["resnet18", "bottleneck"])
def test_gradcam_float64_equals_torch_autograd(spec):
    oracle, model = models(spec, seed=11, torch_dtype=torch.float64)
    x = np.random.default_rng(1).standard_normal((1, 3, 96, 96))  # layer4 is 3x3
    top, want = torch_gradcam(oracle, x)
    assert_close(npresnet.gradcam(model, x[0]), want[top])  # class_index None: the top class
    kinds = set()
    for class_index, cam in enumerate(want):
        got = npresnet.gradcam(model, x[0], class_index)
        assert_close(got, cam)
        kinds.add("empty" if cam.max() == 0 else "partial" if cam.min() == 0 else "everywhere")
    assert kinds >= {"partial", "empty"}  # the relu matters for some classes, and some have no evidence at all


def test_gradcam_of_an_image_float32_any_input_form():
    oracle, model = models(R18_10, seed=12, torch_dtype=torch.float32)
    photo = photos()[0]
    got = npresnet.gradcam(model, photo, preset=SMALL)
    assert got.shape == (96, 96) and got.dtype == np.float32 and got.min() >= 0 and got.max() == 1
    top, want = torch_gradcam(oracle, SMALL(photo)[None])
    assert_close(got, want[top])
    pil = Image.open(photo)
    for same in (photo.read_bytes(), pil, np.asarray(pil.convert("RGB"))):
        np.testing.assert_array_equal(npresnet.gradcam(model, same, preset=SMALL), got)


def test_gradcam_errors():
    model = npresnet.build(R18_10.name, num_classes=10, backend="numpy")
    x = np.zeros((3, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="class index 10 is out of range.*10 classes"):
        npresnet.gradcam(model, x, class_index=10)
    with pytest.raises(npresnet.ImageError, match="not an image"):
        npresnet.gradcam(model, b"not an image")
    with pytest.raises(TypeError, match="float32 array"):
        npresnet.explain(model, x)


@pytest.mark.parametrize("size_in, size_out", [((3, 3), (96, 96)), ((2, 5), (7, 3)), ((7, 7), (224, 200))])
def test_resize_bilinear_equals_torch_interpolate(size_in, size_out):
    maps = np.random.default_rng(2).standard_normal((2, *size_in))
    want = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=size_out, mode="bilinear", align_corners=False)
    assert_close(resize_bilinear(maps, *size_out), want[0].numpy())


# --- npresnet explain ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18_10.npz"
    oracle = randomise(torch_resnet(R18_10), 13)
    npresnet.save(npresnet.ResNet.from_state_dict(numpy_state_dict(oracle), backend="numpy"), path)
    return path


def redness(png: Image.Image, crop: np.ndarray) -> np.ndarray:
    """Per pixel, the distance of the heatmap colour (the blend undone) from pure red: 0 at the ramp's hot end."""
    rendered = np.asarray(png.convert("RGB"), dtype=np.float64)[: crop.shape[0]]
    colour = (rendered - (1 - OVERLAY_ALPHA) * crop) / OVERLAY_ALPHA  # (H, W, 3)
    return np.linalg.norm(colour - [255, 0, 0], axis=-1)


def test_explain_command(tmp_path, capsys, weights):
    photo = photos()[0]
    out = tmp_path / "cam.png"
    assert main(["explain", "--weights", str(weights), str(photo), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    model = npresnet.load(weights, backend="numpy")
    top = npresnet.classify(photo, model, topk=1)[0][0]
    assert re.search(rf"\s{top.probability:.2%}\s+{top.label} \({top.index}\)\s+top class", printed), printed
    assert "the class the heatmap explains" not in printed

    png = Image.open(out)
    assert png.format == "PNG" and png.size == (224, 224 + CAPTION_HEIGHT)
    crop = ImageClassification().resize_and_crop(load_image(photo)).astype(np.float64)  # (224, 224, 3)
    heat = npresnet.gradcam(model, photo)
    distance = redness(png, crop)
    assert heat.flat[np.argmin(distance)] > 0.9  # the reddest pixel is where the cam is (nearly) maximal
    assert distance.flat[np.argmax(heat)] < 5  # and where the cam is maximal, the colour is red
    assert distance.flat[np.argmin(heat)] > 150  # the coldest place is far from red
    assert np.asarray(png)[224:].max() > 200  # the caption is drawn (white on black)

    other = (top.index + 1) % 10
    out2 = tmp_path / "cam_other.png"
    assert main(["explain", "--weights", str(weights), "--class", str(other), str(photo), "-o", str(out2)]) == 0
    assert re.search(rf"\({other}\)\s+the class the heatmap explains", capsys.readouterr().out)
    other_heat = npresnet.gradcam(model, photo, class_index=other)
    assert other_heat.flat[np.argmin(redness(Image.open(out2), crop))] > 0.9


def test_explain_bad_input(tmp_path, weights):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "cam.png"
    result = subprocess.run(
        [sys.executable, "-m", "npresnet", "explain", "--weights", str(weights), str(bad), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"npresnet: error: {bad}: ")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken.jpg"]


def test_explain_bad_output_suffix(tmp_path, capsys, weights):
    assert main(["explain", "--weights", str(weights), str(photos()[0]), "-o", str(tmp_path / "cam.xyz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'.xyz'" in err
    assert list(tmp_path.iterdir()) == []

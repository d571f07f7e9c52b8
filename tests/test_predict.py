"""Classification and embeddings: photos through npresnet against the same tensor through a torch ResNet."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import npresnet  # noqa: E402
from helpers import assert_close  # noqa: E402
from image_files import photos  # noqa: E402
from npresnet.predict import softmax, top_k  # noqa: E402
from npresnet.specs import get_spec  # noqa: E402
from torch_resnet import numpy_state_dict, randomise, torch_resnet  # noqa: E402


@functools.lru_cache(maxsize=2)
def models(num_classes=1000):
    """(torch resnet18 with random weights and statistics, npresnet's resnet18 with the same parameters)."""
    tmodel = randomise(torch_resnet(get_spec("resnet18", num_classes=num_classes)), seed=4)
    return tmodel, npresnet.build("resnet18", numpy_state_dict(tmodel), backend="numpy")


def test_imagenet_labels_ship_with_the_package():
    labels = npresnet.load_labels()
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[0] == "tench" and labels[281] == "tabby" and labels[999] == "toilet tissue"


def test_softmax_is_stable_and_matches_torch():
    logits = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0], [-1e4, -1e4 + 1, -2e4]])
    got = softmax(logits)
    assert np.all(np.isfinite(got))
    assert_close(got, torch.softmax(torch.from_numpy(logits), dim=1).numpy())


def test_top_k_matches_torch():
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    labels = [f"class{i}" for i in range(50)]
    got = top_k(logits, labels, k=7)
    values, indices = torch.topk(torch.softmax(torch.from_numpy(logits).double(), dim=1), 7)
    for row, want_i, want_p in zip(got, indices.numpy(), values.numpy()):
        assert [p.index for p in row] == want_i.tolist()
        assert [p.label for p in row] == [f"class{i}" for i in want_i]
        np.testing.assert_allclose([p.probability for p in row], want_p, rtol=1e-12)
    assert len(top_k(logits, labels, k=500)[0]) == 50


def test_classify_photos_matches_torch():
    tmodel, model = models()
    paths = photos()
    x = npresnet.preprocess(paths)  # (N, 3, 224, 224), bit-exact to TorchVision's preset (test_preprocess)
    with torch.no_grad():
        probabilities = torch.softmax(tmodel(torch.from_numpy(x)).double(), dim=1)
    values, indices = torch.topk(probabilities, 5)
    got = npresnet.classify(paths, model, topk=5, batch_size=2)
    labels = npresnet.load_labels()
    assert len(got) == len(paths)
    for row, want_i, want_p in zip(got, indices.numpy(), values.numpy()):
        assert [p.index for p in row] == want_i.tolist()
        assert [p.label for p in row] == [labels[i] for i in want_i]
        assert_close(np.array([p.probability for p in row]), want_p, tol=1e-4)


def test_prediction_unpacks_as_a_tuple():
    (prediction,) = top_k(np.array([[0.0, 2.0, 1.0]]), ["a", "b", "c"], k=1)[0]
    index, label, probability = prediction
    assert (index, label) == (1, "b") and probability == prediction.probability
    assert prediction == (prediction.index, prediction.label, prediction.probability)


def test_classify_one_image_and_a_preprocessed_batch():
    _, model = models()
    path = photos()[0]
    one = npresnet.classify(path, model, topk=3)
    assert len(one) == 1 and len(one[0]) == 3
    batch = npresnet.classify(npresnet.preprocess([path]), model, topk=3)
    assert [p.index for p in batch[0]] == [p.index for p in one[0]]


def test_a_custom_head_takes_its_own_labels(tmp_path):
    _, model = models(num_classes=10)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"kind {i}" for i in range(10)) + "\n\n")
    got = npresnet.classify(photos()[:1], model, topk=10, labels=labels)[0]
    assert sorted(p.label for p in got) == sorted(f"kind {i}" for i in range(10))
    assert all(p.label == f"kind {p.index}" for p in got)
    assert abs(sum(p.probability for p in got) - 1.0) < 1e-9
    # Without a labels file a custom head's classes are named by their index.
    assert all(p.label == str(p.index) for p in npresnet.classify(photos()[:1], model, topk=3)[0])
    labels.write_text("\n".join(f"kind {i}" for i in range(9)))
    with pytest.raises(ValueError, match=r"labels.txt name 9 classes, but the model's head has num_classes=10"):
        npresnet.classify(photos()[:1], model, labels=labels)


def test_embeddings_match_torch_and_round_trip_without_pickle(tmp_path):
    tmodel, model = models()
    paths = photos()
    vectors = npresnet.embed(paths, model, batch_size=3)
    with torch.no_grad():
        want = tmodel.features(torch.from_numpy(npresnet.preprocess(paths)))["pool"].numpy()
    assert_close(vectors, want)
    out = tmp_path / "sub" / "embeddings.npz"
    npresnet.save_embeddings(out, [str(p) for p in paths], vectors, {"arch": "resnet18"})
    assert [p.name for p in out.parent.iterdir()] == ["embeddings.npz"]  # no temporary file left behind
    with np.load(out, allow_pickle=False) as archive:
        assert archive["names"].tolist() == [str(p) for p in paths]
        np.testing.assert_array_equal(archive["embeddings"], vectors)
    names, loaded, meta = npresnet.load_embeddings(out)
    assert names == [str(p) for p in paths] and meta == {"arch": "resnet18"}
    np.testing.assert_array_equal(loaded, vectors)


def test_preset_comes_from_the_model_metadata():
    _, model = models()
    path = photos()[0]
    model.meta["resize_size"] = 232
    try:
        want = npresnet.embed(npresnet.preprocess([path], npresnet.ImageClassification(resize_size=232)), model)
        other = npresnet.embed(npresnet.preprocess([path]), model)
        got = npresnet.embed([path], model)
    finally:
        del model.meta["resize_size"]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, other)

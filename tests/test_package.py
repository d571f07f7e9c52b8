"""The package runs with only numpy and pillow: torch and numba are never needed to import or run it."""
import subprocess
import textwrap

from helpers import run_python

BLOCK_IMPORTS = textwrap.dedent(
    """
    import sys
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "numba", "torchvision"}:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run code where importing torch, numba or torchvision fails, as on a machine without them."""
    return run_python(BLOCK_IMPORTS + textwrap.dedent(code))


def test_import_and_forward_without_torch_or_numba():
    result = run_blocked(
        """
        import numpy as np
        import npresnet
        model = npresnet.resnet18(num_classes=3)
        assert model.backend.name == "numpy", model.backend.name
        out = model(np.zeros((1, 3, 32, 32), dtype=np.float32))
        assert out.shape == (1, 3)
        assert "torch" not in sys.modules and "numba" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_asking_for_numba_without_it_is_a_clear_error():
    result = run_blocked(
        """
        import npresnet
        try:
            npresnet.resnet18(num_classes=3, backend="numba")
        except npresnet.BackendUnavailable as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "backend 'numba' is not available" in result.stdout
    assert "pip install 'npresnet[numba]'" in result.stdout


def test_core_runs_without_pillow():
    """Only the image functions need Pillow: the model, the weights and preprocessed arrays run without it."""
    result = run_blocked(
        """
        sys.modules["PIL"] = None  # import PIL now fails, as where Pillow is not installed
        import numpy as np
        import npresnet
        model = npresnet.resnet18(num_classes=3)
        x = np.zeros((1, 3, 32, 32), dtype=np.float32)
        top = npresnet.classify(x, model, topk=2)[0]
        assert len(top) == 2 and npresnet.embed(x, model).shape == (1, 512)
        assert npresnet.ResNet50_Weights.DEFAULT.transforms().resize_size == 232
        try:
            npresnet.preprocess(["photo.jpg"])
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "reading images needs Pillow" in result.stdout and "pip install pillow" in result.stdout


def test_cli_version():
    result = run_python(["-m", "npresnet", "--version"])
    assert result.returncode == 0
    import npresnet

    assert result.stdout.strip() == f"npresnet {npresnet.__version__}"


def test_quantize_is_the_function_and_quantization_its_module():
    """`npresnet.quantize` is one thing, the function: its module is `npresnet.quantization`, so that
    `import npresnet.quantize as q` cannot give the function while `from npresnet.quantize import X`
    gives the module's names."""
    result = run_python(
        """
        import importlib.util
        import npresnet
        import npresnet.quantization
        assert npresnet.quantize is npresnet.quantization.quantize, npresnet.quantize
        assert npresnet.QuantizedResNet is npresnet.quantization.QuantizedResNet
        print(importlib.util.find_spec("npresnet.quantize"))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"  # no submodule of that name

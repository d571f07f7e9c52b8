"""Image files for the preprocessing and command-line tests: the shared photos, and bad files made on the spot."""
import io
import struct
import zlib
from pathlib import Path

from PIL import Image, features

REPO = Path(__file__).resolve().parents[1]
# CI keeps ../shared beside the clone; a worktree keeps it two levels up. tests/data/ always holds one photo.
SHARED_IMAGES = next(
    (p for p in (REPO.parent / "shared" / "data" / "images", REPO.parents[1] / "shared" / "data" / "images") if p.is_dir()),
    None,
)
LOCAL_IMAGES = REPO / "tests" / "data"


def photos() -> list[Path]:
    """The sample photographs: the shared set where present, else the small copy in tests/data."""
    folder = SHARED_IMAGES or LOCAL_IMAGES
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(run by Ghostscript) print quit\n%%EOF\n"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data: a decompression bomb costs nothing to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_bad_files(folder: Path) -> dict[str, str]:
    """Write one file per kind of bad input; return {file name: words its error line must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG", quality=90)
    files = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "notes.png": (b"these are not pixels\n", "not an image"),
        "bomb.png": (png_header_only(20_000, 20_000), "decompression bomb"),
        "bomb_warning.png": (png_header_only(10_000, 10_000), "decompression bomb"),
        "postscript.jpg": (EPS, "not an image in a format npresnet reads"),  # Pillow would hand EPS to Ghostscript
        "claims_8000x9000.png": (png_header_only(8000, 9000), "decompression bomb"),  # 72 MB of pixels from 45 bytes
    }
    if features.check("avif"):  # a corrupt AVIF makes Pillow's decoder raise RuntimeError
        avif = encode(Image.new("RGB", (16, 16), (5, 5, 5)), "AVIF")
        files["corrupt.avif"] = (avif[:-40] + b"\0" * 40, "cannot read image")
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: words for name, (_, words) in files.items()}


def write_digits_folder(root: Path, size: int = 16, val_every: int = 5) -> Path:
    """scikit-learn's handwritten digits (1797 8x8 grayscale scans, values 0..16) as an ImageFolder tree:
    root/train/<digit>/NNNN.png and root/val/<digit>/NNNN.png (every val_every-th image), upscaled to
    size x size RGB with nearest-neighbour (the pixels stay square). Returns root."""
    images, targets = load_digits()
    for index, (image, label) in enumerate(zip(images, targets)):
        folder = root / ("val" if index % val_every == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).round().astype("uint8")  # (8, 8)
        Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).convert("RGB").save(folder / f"{index:04d}.png")
    return root


def load_digits():
    """(images (1797, 8, 8) float, labels (1797,) int) as sklearn.datasets.load_digits gives them.

    Read straight from the file scikit-learn ships (digits.csv.gz: 64 pixels and the label per row):
    importing sklearn.datasets takes seconds, the file a fraction of one.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sklearn_load_digits

        digits = sklearn_load_digits()
        return digits.images, digits.target
    rows = np.loadtxt(path, delimiter=",")  # (1797, 65)
    return rows[:, :64].reshape(-1, 8, 8), rows[:, 64].astype(np.int64)

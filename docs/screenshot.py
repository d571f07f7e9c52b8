"""Make docs/web-page.png: `npresnet serve` answering real photos, in headless Chromium (Debian's package).

    python docs/screenshot.py [PHOTO ...]     # default: the cat and the rocket of ../shared/data/images

It starts `npresnet serve --arch resnet18` WITHOUT weights (no trained weights can be fetched offline), so
the answers come from random parameters and mean nothing; the page itself says so above the results.
The server and client helpers are the tests' (tests/serve_client.py). Needs Playwright and /usr/bin/chromium.
"""
import io
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from image_files import photos  # noqa: E402
from serve_client import running_server  # noqa: E402

OUTPUT = ROOT / "docs" / "web-page.png"


def main(paths: list[str]) -> None:
    chosen = [Path(p) for p in paths] or [p for p in photos() if p.stem.startswith(("chelsea", "rocket"))]
    server_options = ["--arch", "resnet18", "--backend", "numpy"]  # no --weights: random parameters
    with tempfile.TemporaryDirectory() as folder, running_server(Path(folder), *server_options) as server:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 860, "height": 600}, device_scale_factor=1)
            page.goto(server.url)
            page.locator("#model", has_text="resnet18").wait_for()  # the page's CSP forbids wait_for_function's eval
            page.set_input_files("#file", [str(p) for p in chosen])
            page.locator(".result .time").nth(len(chosen) - 1).wait_for(timeout=120_000)
            png = page.screenshot(full_page=True)
            browser.close()
    # 256 colours keep the picture small and the text sharp.
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    image.save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1024:.0f} KB, {image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main(sys.argv[1:])

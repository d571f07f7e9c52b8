"""The page in a real browser: headless Chromium (Debian's `chromium` package) driven by Playwright.

CI installs it with `apt-get install chromium` and `pip install -e ".[test]"` (Playwright's Python package;
no browser download: Playwright is pointed at /usr/bin/chromium).
"""
import base64
import re
import shutil
from importlib.util import find_spec

import pytest

import npresnet
from image_files import LOCAL_IMAGES, photos
from serve_client import post, running_server

CHROMIUM = shutil.which("chromium")
WEB = find_spec("flask") is not None and find_spec("waitress") is not None
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(find_spec("playwright") is None, reason="Playwright is not installed (pip install playwright)"),
    pytest.mark.skipif(not WEB, reason="npresnet serve needs the web extra: pip install 'npresnet[web]'"),
]
TIMEOUT_MS = 120_000
TOPK = 3
DROP = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const files = new DataTransfer();
  files.items.add(new File([bytes], name, { type: "image/jpeg" }));
  document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true }));
}"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18_64.npz"
    model = npresnet.build("resnet18", backend="numpy")
    model.meta.update(crop_size=64, resize_size=72)
    npresnet.save(model, path)
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def shown_predictions(card):
    """[(label, percent)] as the page shows them in one result card."""
    labels = card.locator(".prediction .label").all_text_contents()
    percents = card.locator(".prediction .percent").all_text_contents()
    assert all(re.fullmatch(r"\d+\.\d\d%", p) for p in percents), percents
    return [(label, float(p.rstrip("%"))) for label, p in zip(labels, percents)]


def test_a_photo_through_the_page(weights, tmp_path, browser):
    photo = photos()[0]
    with running_server(tmp_path, "--weights", weights, "--backend", "numpy", "--topk", TOPK) as server:
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url)
        page.locator("#model", has_text="resnet18").wait_for()  # the page's CSP forbids wait_for_function's eval

        # The keyboard reaches the real file input first.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "file"

        page.set_input_files("#file", str(photo))
        card = page.locator(".result").first
        card.locator(".prediction").nth(TOPK - 1).wait_for()
        assert card.locator(".name").text_content() == photo.name
        assert page.evaluate("document.querySelector('.result img').naturalWidth") > 0  # the preview
        assert re.fullmatch(r"server: \d+(\.\d)? ms", card.locator(".time").text_content())

        status, api = post(server.url + "api/classify", [(photo.name, photo.read_bytes())])
        assert status == 200
        top = api["results"][0]["top"]
        shown = shown_predictions(card)
        assert [label for label, _ in shown] == [t["label"] for t in top]
        for (_, percent), t in zip(shown, top):
            assert abs(percent - 100 * t["probability"]) <= 0.005 + 1e-9
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert (tmp_path / "page.png").stat().st_size > 10_000

        # Not an image: said at once by the page (by its type), or by the server (by its bytes).
        page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
        page.locator(".result").first.locator(".status.error").wait_for()
        assert "Not an image" in page.locator(".result").first.locator(".status").text_content()
        page.set_input_files("#file", files=[{"name": "fake.png", "mimeType": "image/png", "buffer": b"not pixels"}])
        page.locator(".result").first.locator(".status.error").wait_for()
        assert page.locator(".result").first.locator(".status").text_content().startswith("fake.png: not an image in a format npresnet reads")

        # Dropped on the page (a drop event carrying the file, as a browser makes it) rather than chosen.
        dropped = LOCAL_IMAGES / "rocket_small.jpg"
        page.evaluate(DROP, [dropped.name, base64.b64encode(dropped.read_bytes()).decode()])
        card = page.locator(".result").first
        card.locator(".prediction").nth(TOPK - 1).wait_for()
        assert card.locator(".name").text_content() == dropped.name

        # A phone-sized screen: nothing wider than the screen.
        page.set_viewport_size({"width": 360, "height": 740})
        assert page.evaluate("document.documentElement.scrollWidth") <= 360

        # The server goes away: the page says so.
        server.process.terminate()
        server.process.wait(timeout=10)
        page.set_input_files("#file", str(photo))
        page.locator(".result").first.locator(".status.error").wait_for()
        assert "Cannot reach the server" in page.locator(".result").first.locator(".status").text_content()
        page.close()

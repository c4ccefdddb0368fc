"""The rating app in a real browser (headless Chromium via playwright): sign in, rate, see the model.

Needs Debian's chromium (``apt-get install -y --no-install-recommends chromium``); playwright's
own browser download (``playwright install``) is not used.
"""

import shutil
import time

import pytest

from test_app import _start, adapter_dir  # noqa: F401  (module-scoped fixture shared with test_app)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (CI: apt-get install -y --no-install-recommends chromium)",
)


@pytest.fixture()
def browser_app(tmp_path, tiny_sd15_dir, adapter_dir):  # noqa: F811
    service, demo, url, _ = _start(tmp_path, tiny_sd15_dir, adapter_dir, pair_images="render")
    yield service, url
    demo.close()
    service.close()


def test_rate_three_pairs_and_see_the_personalized_model(browser_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    service, url = browser_app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.locator("#user-name textarea, #user-name input").first.fill("carol")
            page.locator("#start").click()
            status = page.locator("#rate-status")
            expect(page.locator("#pair-prompt")).not_to_be_empty(timeout=30_000)
            expect(page.locator("#pair-left img")).to_be_visible(timeout=30_000)
            expect(status).to_contain_text("0 ratings stored", timeout=30_000)

            # Rate three pairs: a keyboard shortcut, a button, and an arrow key.
            first_pair = page.locator("#pair-left img").get_attribute("src")
            page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a text box
            page.keyboard.press("1")
            expect(status).to_contain_text("1 ratings stored", timeout=30_000)
            assert page.locator("#pair-left img").get_attribute("src") != first_pair
            page.locator("#rate-right").click()
            expect(status).to_contain_text("2 ratings stored", timeout=30_000)
            page.keyboard.press("ArrowLeft")
            expect(status).to_contain_text("3 ratings stored", timeout=30_000)
            page.screenshot(path=str(tmp_path / "rate.png"), full_page=True)
            rated = service.store.ratings_for("carol")
            assert [r["choice"] for r in rated] == ["left", "right", "left"]

            # The model panel follows the ratings: base and personalized images of the same prompt.
            page.get_by_role("tab", name="Your model").click()
            expect(page.locator("#model-status")).to_contain_text("Personalized from your 3", timeout=60_000)
            expect(page.locator("#model-personalized img")).to_be_visible(timeout=30_000)
            expect(page.locator("#model-base img")).to_be_visible()
            expect(page.locator("#recent img").first).to_be_visible(timeout=30_000)
            page.get_by_text("What your model favours").click()  # open the accordion
            page.locator("#profile").click()
            expect(page.get_by_text("world-attributes")).to_be_visible(timeout=60_000)
            time.sleep(0.5)  # let the images paint before the screenshot
            page.screenshot(path=str(tmp_path / "model.png"), full_page=True)
        finally:
            browser.close()
    print(f"\nscreenshots: {tmp_path / 'rate.png'} {tmp_path / 'model.png'}")
    assert (tmp_path / "rate.png").stat().st_size > 10_000

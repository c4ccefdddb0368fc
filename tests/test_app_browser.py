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
            expect(page.locator("#model-status")).to_contain_text("from your 3 most recent choices", timeout=60_000)
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


def test_a_person_walks_every_path_without_a_dead_end(browser_app, capfd):
    """Bad names then a good one, 10 fast ratings, the slider, a prompt, the profile, a reload: the page stays
    usable throughout, messages sit next to their field, and the server logs no traceback."""
    from playwright.sync_api import expect, sync_playwright

    service, url = browser_app
    name_box = "#user-name textarea, #user-name input"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            message = page.locator("#name-message")
            for bad, says in (("", "enter your name first"), ("../etc", "names are 1-64 characters")):
                page.locator(name_box).first.fill(bad)
                page.locator("#start").click()
                expect(message).to_contain_text(says, timeout=15_000)
                expect(page.locator("#start")).to_be_enabled()  # no overlay: the box and Start still work
            page.locator(name_box).first.fill("erin")
            page.locator("#start").click()
            status = page.locator("#rate-status")
            expect(status).to_contain_text("0 ratings stored", timeout=30_000)
            expect(message).to_be_hidden()

            page.locator("body").click(position={"x": 5, "y": 5})
            for k in range(10):  # as fast as the page answers
                page.keyboard.press("1" if k % 2 == 0 else "2")
                expect(status).to_contain_text(f"{k + 1} ratings stored", timeout=15_000)
            assert service.store.count_ratings("erin") == 10

            page.get_by_role("tab", name="Your model").click()
            model_status = page.locator("#model-status")
            expect(model_status).to_contain_text("your model at user scale 1", timeout=30_000)
            scale = page.locator("#user-scale input[type=range]")
            scale.fill("1.5")
            scale.dispatch_event("pointerup")  # the end of a drag: the slider's release
            expect(model_status).to_contain_text("user scale 1.5", timeout=30_000)
            expect(page.locator("#model-personalized")).to_contain_text("scale 1.5")
            page.locator("#model-prompt textarea, #model-prompt input").first.fill("a red circle")
            page.locator("#model-prompt textarea, #model-prompt input").first.press("Enter")
            expect(page.locator("#recent")).to_contain_text("a red circle", timeout=30_000)

            page.get_by_text("What your model favours").click()
            started = time.perf_counter()
            page.locator("#profile").click()
            expect(page.locator("#profile-text")).to_contain_text("world-attributes", timeout=30_000)
            profile_s = time.perf_counter() - started

            page.reload()
            page.locator(name_box).first.fill("erin")
            page.locator("#start").click()
            expect(status).to_contain_text("10 ratings stored", timeout=30_000)
        finally:
            browser.close()
    logged = capfd.readouterr()
    assert "Traceback" not in logged.out + logged.err
    print(f"\nprofile shown {profile_s:.2f} s after the click")

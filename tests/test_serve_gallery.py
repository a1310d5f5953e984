"""The gallery page (`GET /`) in headless chromium: Debian's /usr/bin/chromium driven by playwright.

Playwright's own browser download cannot be fetched here, so the test uses the system's chromium
(.ci/run installs it with apt) and skips, saying why, where there is none.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = os.environ.get("GENKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "gallery-key"


@pytest.fixture(scope="module")
def server(tiny_mini, tmp_path_factory):
    import genkit
    from genkit.serve import create_app
    from genkit.serve.runner import Background

    app = create_app([genkit.load(str(tiny_mini), device="cpu")], out=tmp_path_factory.mktemp("gallery"),
                     api_key=KEY)
    background = Background(app)
    yield background.start()
    background.stop()


def make(url: str, prompt: str, seed: int) -> str:
    response = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed, "steps": 4},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])["files"][0]


def test_gallery_lists_filters_shows_the_record_and_makes_a_new_seed(server):
    if not CHROMIUM:
        print("SKIP reason: no chromium on this machine (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run does)")
    make(server, "a red circle", 1)
    newest = make(server, "a blue square", 2)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_selector("#keyform", state="visible")  # the key is set: the page asks for it
            page.fill("#key", KEY)
            page.click("#keyform button")
            page.wait_for_function("document.querySelectorAll('.card').length === 2")
            cards = page.locator(".card")
            assert cards.first.get_attribute("data-file") == newest  # newest first
            assert cards.first.locator(".prompt").text_content() == "a blue square"
            assert "seed 2" in cards.first.locator(".meta").text_content()
            page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && "
                                   "i.naturalWidth === 16)")  # thumbnails loaded (with the key)

            page.fill("#filter", "red")
            assert page.locator(".card").count() == 1
            assert page.locator(".card .prompt").text_content() == "a red circle"
            page.fill("#filter", "")
            assert page.locator(".card").count() == 2

            page.locator(".card").nth(1).click()
            page.wait_for_selector("#detail", state="visible")
            assert "a red circle\nSteps: 4" in page.text_content("#detail-infotext")
            record = json.loads(page.text_content("#detail-record"))
            assert (record["prompt"], record["seed"], record["num_inference_steps"]) == ("a red circle", 1, 4)

            page.click("#vary")  # same settings, new seed
            page.wait_for_function("document.querySelectorAll('.card').length === 3", timeout=60000)
            made = json.loads(page.text_content("#detail-record"))
            assert made["prompt"] == "a red circle" and made["seed"] != 1 and made["num_inference_steps"] == 4
            assert page.locator(".card").first.locator(".prompt").text_content() == "a red circle"
        finally:
            browser.close()

"""The gallery in real headless Chromium on a real `appliance serve`: the grid at a phone's
and a laptop's width, the large view with its keyboard, the filter, and the page without
a script. Screenshots go to tests/artifacts/console/gallery-*.png."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from appliance.accounts import accounts, audit, keys
from appliance.core.config import load_config
from appliance.core.database import ConnectionPool

from .browser_helpers import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    sign_in,
    sync_playwright,
    wait_until,
)
from .console_helpers import PASSWORD

pytestmark = pytest.mark.system

EMAIL = "gallery@example.com"
# Two keys, three jobs, ten images; the grid shows the newest job first.
JOBS = [("Studio", ["A lighthouse at dusk", "A red bicycle in the rain", "A teapot on a shelf",
                    "A fox in the snow"]),
        ("Batch <script>", ["A desert at noon", "A paper boat", "A violin on a chair"]),
        ("Studio", ["A green door", "A harbour at night", "A stack of books"])]
FITS = "document.documentElement.scrollWidth <= window.innerWidth"
IMAGES_LOADED = "[...document.querySelectorAll('.image-grid img')].every(i => i.complete)"


def make_images(base: str, config) -> list[str]:
    """The account, its two keys, and the jobs made through the API; the prompts newest first."""
    database = ConnectionPool(load_config(config).storage.database)
    db = database.db()
    account = accounts.create_account(db, EMAIL, PASSWORD, audit.Actor.cli(), credits=10)
    raw = {name: keys.create_key(db, account.id, name, audit.Actor.cli())[1]
           for name in dict.fromkeys(name for name, _ in JOBS)}
    database.close()
    made = []
    for name, prompts in JOBS:
        headers = {"Authorization": f"Bearer {raw[name]}"}
        answer = httpx.post(f"{base}/api/playground/images", headers=headers, timeout=30,
                            json={"prompts": prompts})
        assert answer.status_code == 200, answer.text
        made.append((headers, answer.json()["jobId"]))
    deadline = time.monotonic() + 120
    for headers, job_id in made:
        while httpx.get(f"{base}/api/playground/images/{job_id}", headers=headers,
                        timeout=30).json()["status"] != "completed":
            assert time.monotonic() < deadline, job_id
            time.sleep(0.2)
    return [prompt for _, prompts in reversed(JOBS) for prompt in prompts]


def shoot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"gallery-{name}.png"), full_page=True)


def large_view(page) -> dict:
    dialog = page.locator("dialog.lightbox")
    return {"open": page.evaluate("document.querySelector('dialog.lightbox').open"),
            "title": dialog.locator("#lightbox-title").inner_text(),
            "prompt": dialog.locator("[data-field=prompt]").inner_text(),
            "seed": dialog.locator("[data-field=seed]").inner_text(),
            "download": dialog.locator("[data-field=download]").get_attribute("href"),
            "image": dialog.locator("img").get_attribute("src")}


def test_the_gallery_grid_large_view_and_filters_in_a_browser(forked_server):
    base, config, _, _ = forked_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("gallery-*.png"):
        old.unlink()
    prompts = make_images(base, config)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 800})
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        page.on("console", lambda message: message.type == "error"
                and problems.append(message.text))
        sign_in(page, base, EMAIL)

        for width, height in ((1280, 800), (390, 844)):
            page.set_viewport_size({"width": width, "height": height})
            page.goto("/console/jobs")
            thumbs = page.locator(".image-grid a.thumb")
            assert [t.get_attribute("title") for t in thumbs.all()] == prompts
            wait_until(page, IMAGES_LOADED)
            assert page.evaluate(FITS), width
            shoot(page, f"grid-{width}")

            # The large view of the first image: its prompt, seed and download link.
            thumbs.nth(0).click()
            view = large_view(page)
            assert view["open"] and view["title"] == f"Image 1 of {len(prompts)}"
            assert view["prompt"] == prompts[0] and view["seed"].isdigit()
            assert view["download"].endswith("/images/0?download=1")
            labelled = page.evaluate("document.getElementById(document.querySelector("
                                     "'dialog.lightbox').getAttribute('aria-labelledby'))"
                                     ".textContent")
            assert labelled == view["title"]
            assert page.evaluate(FITS), width
            wait_until(page, "document.querySelector('dialog.lightbox img').complete")
            shoot(page, f"large-{width}")

            # The arrow keys move along the grid; Escape closes and gives focus back.
            page.keyboard.press("ArrowRight")
            assert large_view(page)["prompt"] == prompts[1]
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowLeft")
            assert large_view(page)["title"] == f"Image 2 of {len(prompts)}"
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("ArrowLeft")  # the first image has none before it
            assert large_view(page)["prompt"] == prompts[0]
            page.keyboard.press("ArrowRight")
            page.keyboard.press("Escape")
            assert not large_view(page)["open"]
            # The dialog's close event moves the focus after the key's own handling.
            wait_until(page, f"document.activeElement.title === {json.dumps(prompts[1])}", 5)

        # The filter by key: the deleted-or-not keys are offered by name.
        page.set_viewport_size({"width": 1280, "height": 800})
        page.select_option("select[name=key]", label=page.locator(
            "select[name=key] option", has_text="Batch <script>").inner_text())
        page.click("button:has-text('Filter')")
        page.wait_for_url(re.compile(r"/console/jobs\?.*key=\d+"))
        assert [t.get_attribute("title") for t in page.locator(".image-grid a.thumb").all()] \
            == JOBS[1][1]
        wait_until(page, IMAGES_LOADED)
        shoot(page, "filtered-1280")

        # The job page opens the same large view, over that job's images.
        job_id = page.locator(".image-grid li").nth(0).get_attribute("data-job-id")
        page.goto(f"/console/jobs/{job_id}")
        page.locator("figure#image-1 a.thumb").click()
        view = large_view(page)
        assert view["open"] and view["title"] == "Image 2 of 3"
        assert view["prompt"] == JOBS[1][1][1]
        page.keyboard.press("ArrowRight")
        assert large_view(page)["prompt"] == JOBS[1][1][2]
        wait_until(page, "document.querySelector('dialog.lightbox img').complete")
        shoot(page, "job-large-1280")
        page.keyboard.press("Escape")
        wait_until(page, "document.activeElement.closest('figure')?.id === 'image-2'", 5)
        assert problems == []

        # Without a script a thumbnail is a link to its job's page, where the image is.
        plain = browser.new_context(base_url=base, java_script_enabled=False,
                                    storage_state=context.storage_state())
        no_script = plain.new_page()
        no_script.goto("/console/jobs")
        no_script.locator(".image-grid a.thumb").nth(1).click()
        no_script.wait_for_url(re.compile(r"/console/jobs/[0-9a-f-]{36}#image-1$"))
        assert no_script.locator("figure#image-1 img").count() == 1
        plain.close()
        context.close()
        browser.close()

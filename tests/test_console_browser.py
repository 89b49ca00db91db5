"""A new user's path through the console in real headless Chromium, on a real `appliance serve`.

Debian's chromium (installed by `install.sh --test`) is driven with Playwright;
no browser is ever downloaded. Screenshots of every page are kept under
tests/artifacts/console/ for a person to look at.
"""

from __future__ import annotations

import httpx
import pytest

from appliance.accounts import accounts, audit
from appliance.core.config import load_config
from appliance.core.database import ConnectionPool

from .browser_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, shoot, sync_playwright, wait_until
from .console_helpers import PASSWORD

pytestmark = pytest.mark.system


@pytest.fixture
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_a_new_user_signs_in_makes_a_key_uses_it_and_revokes_it(forked_server, browser):
    base, config, _, log_path = forked_server
    # Only this test's own screenshots: other browser tests keep theirs here too.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("[0-9][0-9]-*.png"):
        old.unlink()
    # What `appliance accounts create` does, without starting two more processes.
    database = ConnectionPool(load_config(config).storage.database)
    accounts.create_account(database.db(), "new@example.com", PASSWORD, audit.Actor.cli(),
                            credits=4)
    accounts.create_account(database.db(), "admin@example.com", PASSWORD, audit.Actor.cli(),
                            is_admin=True)
    database.close()
    context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 800},
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    problems: list[str] = []
    # A console page must load without a script error or a resource the policy blocks.
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))

    # Sign in: the console sends a stranger to /login first.
    page.goto("/console")
    assert page.url.startswith(f"{base}/login")
    shoot(page, "01-login")
    page.fill("input[name=email]", "new@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base}/console")
    assert page.inner_text("[data-testid=balance]") == "4"
    shoot(page, "02-dashboard-new")

    # API Keys -> Add Key -> a descriptive name -> Create Key -> copy it.
    page.click("nav >> text=API Keys")
    page.wait_for_url(f"{base}/console/api-keys")
    shoot(page, "03-keys-empty")
    page.fill("input[name=name]", "Development")
    page.click("button:has-text('Create Key')")
    key = page.input_value("#new-key")
    assert key.startswith("wi_live_") and len(key) == 72
    assert "will not be shown again" in page.inner_text(".new-key")
    page.click("button[data-copy]")
    page.wait_for_selector("button[data-copy]:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == key
    shoot(page, "04-key-created")

    # The copied key calls the API.
    headers = {"Authorization": f"Bearer {key}"}
    created = httpx.post(f"{base}/api/playground/images", headers=headers, timeout=30,
                         json={"prompts": ["A beautiful sunset over the ocean",
                                           "A futuristic cityscape"]})
    assert created.status_code == 200, created.text
    job_id = created.json()["jobId"]

    # The job shows up in the gallery (in progress, then reloaded when its images are there).
    page.click("nav >> text=Gallery")
    page.wait_for_selector(f"li[data-job-id='{job_id}'] img", timeout=90_000)
    wait_until(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(f"li[data-job-id='{job_id}'] img").count() == 2
    shoot(page, "05-gallery")
    page.goto(f"/console/jobs/{job_id}")
    assert page.locator("figure img").count() == 2
    assert page.inner_text("[data-field=status]") == "completed"
    shoot(page, "06-job")

    # The playground: images appear on the job page without a reload.
    page.click("nav >> text=Playground")
    page.fill("textarea[name=prompts]", "A red bicycle\nA lighthouse at dusk")
    shoot(page, "07-playground")
    page.click("button:has-text('Generate')")
    page.wait_for_url(f"{base}/console/jobs/*")
    page.evaluate("window.notReloaded = true")
    page.wait_for_selector("figure[data-status=completed] >> nth=1", timeout=90_000)
    wait_until(page, "[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("figcaption a:has-text('Download')").count() == 2
    shoot(page, "08-playground-job")
    page.click("nav >> text=Dashboard")
    assert page.inner_text("[data-testid=balance]") == "0"
    shoot(page, "09-dashboard-used")

    # Delete the key, with its confirmation; the API refuses it at once.
    page.click("nav >> text=API Keys")
    page.click("tr[data-key-prefix] summary:has-text('Delete')")
    shoot(page, "10-key-delete-confirm")
    page.click("tr[data-key-prefix] button:has-text('Delete key')")
    page.wait_for_selector("text=It is refused from now on")
    assert page.locator("tr[data-key-prefix]").count() == 0
    shoot(page, "11-key-deleted")
    refused = httpx.get(f"{base}/api/playground/images/{job_id}", headers=headers, timeout=30)
    assert refused.status_code == 401
    assert refused.json() == {"error": "Invalid API key"}

    # The same pages fit a phone.
    page.set_viewport_size({"width": 390, "height": 844})
    page.click("button.menu-toggle")  # the top bar folds its links into a menu
    page.click("nav >> text=Gallery")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shoot(page, "12-phone-gallery")
    page.set_viewport_size({"width": 1280, "height": 800})

    # Sign out ends the session: the console is closed again.
    page.click("button:has-text('Sign out')")
    page.wait_for_url(f"{base}/login")
    page.goto("/console/api-keys")
    assert page.url.startswith(f"{base}/login")

    # An admin's pages, to look at.
    page.fill("input[name=email]", "admin@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base}/console/api-keys")
    page.click("nav >> text=Accounts")
    assert page.locator("tr[data-email='new@example.com']").count() == 1
    shoot(page, "13-admin-accounts")
    page.click("nav >> text=Audit log")
    page.select_option("select[name=action]", "key.delete")
    page.click("button:has-text('Filter')")
    assert page.locator("table.audit tbody tr").count() == 1
    assert "127.0.0.1" in page.inner_text("table.audit tbody")
    shoot(page, "14-admin-audit")
    assert problems == []

    # What a person sees for a job that is not theirs (or does not exist).
    missing = page.goto("/console/jobs/00000000-0000-0000-0000-000000000000")
    assert missing.status == 404 and "Job not found" in page.inner_text("main")
    shoot(page, "15-not-found")
    context.close()
    print(f"\nscreenshots: {ARTIFACTS}")
    assert key not in log_path.read_text() and key[12:] not in log_path.read_text()

"""Every console page at a phone's width and a laptop's, with data on it, in real Chromium.

A real `appliance serve` holds a few accounts (one of them throttled), keys, finished
jobs with images and audit rows. Each page must fit its window (no sideways scroll of
the page itself), the top bar must fold into a menu that opens at 390 px, and Add Key
must only ever open its form. Full-page screenshots go to tests/artifacts/console/.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from appliance.accounts import accounts, audit
from appliance.accounts.service import SignInService
from appliance.accounts.signin import SignInLimits
from appliance.core.config import load_config
from appliance.core.database import ConnectionPool
from appliance.core.errors import ApplianceError

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

WIDTHS = {390: 844, 1280: 800}
ADMIN, USER, LOCKED = "admin@example.com", "user@example.com", "locked-out@example.com"
# The README's pictures of the console, made here so that they show the console as it is.
README_SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
FITS = "[document.documentElement.scrollWidth, window.innerWidth]"
IMAGES_LOADED = "[...document.images].every(i => i.complete)"
# What sticks out past the window's right edge, to say why a page is too wide.
STICKING_OUT = """[...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .filter(e => !e.closest('.table-wrap') || e.classList.contains('table-wrap')
                 || getComputedStyle(e).position === 'absolute')
    .slice(0, 6).map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '')
                          + ' ' + Math.round(e.getBoundingClientRect().right))"""


def seed_accounts(config) -> None:
    """Accounts as `appliance accounts create` makes them, and one whose sign-in is
    throttled by wrong passwords from an address of its own."""
    loaded = load_config(config)
    database = ConnectionPool(loaded.storage.database)
    db = database.db()
    accounts.create_account(db, ADMIN, PASSWORD, audit.Actor.cli(), is_admin=True, credits=40)
    accounts.create_account(db, USER, PASSWORD, audit.Actor.cli(), credits=5)
    accounts.create_account(db, LOCKED, PASSWORD, audit.Actor.cli())
    signin = SignInService(database, SignInLimits.from_config(loaded.console))
    guesser = audit.Actor(ip_address="203.0.113.9", user_agent="guesser")
    for _ in range(loaded.console.max_failed_signins_per_account_and_address + 1):
        with pytest.raises(ApplianceError):
            signin.sign_in(LOCKED, "wrong password", guesser)
    assert LOCKED in signin.throttled_emails()
    database.close()


def make_jobs(base: str, key: str, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    job_ids = []
    for number in range(count):
        answer = httpx.post(f"{base}/api/playground/images", headers=headers, timeout=30,
                            json={"prompts": [f"A lighthouse at dusk, take {number}",
                                              f"A red bicycle in the rain, take {number}"]})
        assert answer.status_code == 200, answer.text
        job_ids.append(answer.json()["jobId"])
    deadline = time.monotonic() + 90
    for job_id in job_ids:
        while True:
            job = httpx.get(f"{base}/api/playground/images/{job_id}", headers=headers,
                            timeout=30).json()
            if job["status"] == "completed":
                break
            assert job["status"] in ("queued", "processing"), job
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
    return job_ids


class Widths:
    """Measures and photographs pages; collects every page that scrolls sideways."""

    def __init__(self, page):
        self.page = page
        self.figures: list[str] = []
        self.too_wide: list[str] = []

    def check(self, name: str) -> None:
        """The page as it stands, at each width (a resize does not reload it)."""
        for width, height in WIDTHS.items():
            self.page.set_viewport_size({"width": width, "height": height})
            wait_until(self.page, IMAGES_LOADED)
            scroll_width, inner_width = self.page.evaluate(FITS)
            self.figures.append(f"{name} @{width}: scrollWidth {scroll_width}"
                                f" / innerWidth {inner_width}")
            if scroll_width > inner_width:
                self.too_wide.append(f"{self.figures[-1]}: {self.page.evaluate(STICKING_OUT)}")
            self.page.screenshot(path=str(ARTIFACTS / f"layout-{name}-{width}.png"),
                                 full_page=True)

    def visit(self, name: str, path: str, status: int = 200) -> None:
        answer = self.page.goto(path)
        assert answer is not None and answer.status == status, (name, path)
        self.check(name)


def nav_links_reachable(page, shot: str = "") -> list[str]:
    """Opens the menu at 390 px as a person would, and returns the links it shows, each
    checked to lie wholly inside the window."""
    page.set_viewport_size({"width": 390, "height": 844})
    toggle = page.locator(".menu-toggle")
    nav = page.locator("#console-nav")
    assert toggle.is_visible() and toggle.get_attribute("aria-expanded") == "false"
    assert not nav.is_visible()
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true" and nav.is_visible()
    labels = []
    for link in nav.locator("a").all():
        box = link.bounding_box()
        assert link.is_visible() and box is not None
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (link.inner_text(), box)
        labels.append(link.inner_text())
    if shot:
        page.screenshot(path=str(ARTIFACTS / f"layout-{shot}-390.png"), full_page=True)
    # The keyboard closes it (Escape) and opens it again (Enter on the button).
    page.keyboard.press("Escape")
    assert toggle.get_attribute("aria-expanded") == "false" and not nav.is_visible()
    assert page.evaluate("document.activeElement.classList.contains('menu-toggle')")
    page.keyboard.press("Enter")
    assert toggle.get_attribute("aria-expanded") == "true" and nav.is_visible()
    return labels


# Where the README's pictures say the checkout is, in place of the test's temporary folder.
SHOWN_CHECKOUT = "/srv/ai-media-maker"


def readme_shot(page, name: str, folder: Path) -> None:
    """The page as it stands, 1280 px wide, as the README shows it: paths in the test's
    `folder` are shown in SHOWN_CHECKOUT."""
    README_SHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 800})
    wait_until(page, IMAGES_LOADED)
    page.evaluate("""([folder, shown]) => {
        const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            node.textContent = node.textContent.split(folder).join(shown);
        }
    }""", [str(folder), SHOWN_CHECKOUT])
    page.screenshot(path=str(README_SHOTS / f"{name}.png"), full_page=True)


def test_every_console_page_fits_390_and_1280_pixels(forked_server):
    base, config, _, _ = forked_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("layout-*.png"):
        old.unlink()
    seed_accounts(config)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 800})
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        # (The 404 page's own status is reported as a failed load; that one is meant.)
        page.on("console", lambda message: message.type == "error"
                and "status of 404" not in message.text and problems.append(message.text))
        widths = Widths(page)

        page.goto("/login")
        widths.check("login")
        sign_in(page, base, ADMIN)

        # No keys yet: the form is open, and Add Key leaves it open.
        page.goto("/console/api-keys")
        form = page.locator("form#add-key")
        assert form.is_visible()
        page.click("a:has-text('Add Key')")
        assert form.is_visible()
        assert page.evaluate("document.activeElement.name") == "name"
        page.fill("input[name=name]", "Layout")
        page.click("button:has-text('Create Key')")
        key = page.input_value("#new-key")
        assert key.startswith("wi_live_")
        # The new key's panel sits in the keys card, above the list, its row marked.
        assert page.locator(".keys-card .new-key + .table-wrap tr.just-made").count() == 1
        assert not form.is_visible()
        widths.check("api-keys-created")
        # Not even a test server's key goes into the README's picture.
        page.evaluate("document.querySelector('#new-key').value = 'wi_live_' + '\u2022'.repeat(56)")
        readme_shot(page, "api-keys-new-key", config.parent)

        job_ids = make_jobs(base, key, 3)
        for name, path in [("dashboard", "/console"), ("api-keys", "/console/api-keys"),
                           ("playground", "/console/playground"), ("gallery", "/console/jobs"),
                           ("job", f"/console/jobs/{job_ids[0]}"),
                           ("accounts", "/console/admin/accounts"),
                           ("audit", "/console/admin/audit"),
                           ("system", "/console/admin/system")]:
            widths.visit(name, path)
            if name in ("dashboard", "gallery", "system"):
                readme_shot(page, name, config.parent)
        widths.visit("not-found", "/console/no-such-page", status=404)

        # With keys, the form is closed until Add Key opens it; a second click keeps it open.
        page.set_viewport_size({"width": 1280, "height": 800})
        page.goto("/console/api-keys")
        assert not form.is_visible()
        for _ in range(2):
            page.click("a:has-text('Add Key')")
            assert form.is_visible()

        # Audit details read as fields, not JSON.
        page.goto("/console/admin/audit?action=login.failed")
        details = page.locator("table.audit td.details")
        assert details.count() > 0
        assert "reason: wrong password" in details.first.inner_text()
        assert not any("{" in text for text in details.all_inner_texts())

        # The accounts' buttons: one height and weight, each action in the same column.
        page.goto("/console/admin/accounts")
        buttons = page.evaluate("""s => [...document.querySelectorAll(s)].map(b => {
            const r = b.getBoundingClientRect(), style = getComputedStyle(b);
            return [b.textContent.trim(), r.left, r.height, style.fontWeight, style.fontSize];
        })""", "table.accounts td.action .button")
        assert {"Unlock sign-in", "Make admin", "Disable"} <= {b[0] for b in buttons}
        assert len({tuple(b[2:]) for b in buttons}) == 1, buttons
        for label in ("Make admin", "Disable"):
            assert len({b[1] for b in buttons if b[0] == label}) == 1, buttons
        # New account, like Add Key, only ever opens its form.
        new_account = page.locator("form#new-account")
        assert not new_account.is_visible()
        for _ in range(2):
            page.click("a:has-text('New account')")
            assert new_account.is_visible()
            assert page.evaluate("document.activeElement.name") == "email"
        # Wide, the rows are a table again: each heading over its column.
        lefts = "s => [...document.querySelectorAll(s)].map(e => e.getBoundingClientRect().left)"
        headings = page.evaluate(lefts, "table.accounts th")
        cells = page.evaluate(lefts, "table.accounts tbody tr:first-child td")
        assert headings[:5] == cells[:5]

        labels = nav_links_reachable(page, shot="menu-open")
        assert labels[:6] == ["Dashboard", "API Keys", "Playground", "Gallery", "Accounts",
                              "Audit log"]
        page.click("#console-nav >> text=Audit log")
        page.wait_for_url(f"{base}/console/admin/audit")

        # Without script, Add Key still opens the form (by its #anchor) and nothing closes it.
        bare = browser.new_context(base_url=base, java_script_enabled=False,
                                   viewport={"width": 390, "height": 844})
        bare_page = bare.new_page()
        sign_in(bare_page, base, ADMIN)
        bare_page.goto("/console/api-keys")
        assert not bare_page.locator("form#add-key").is_visible()
        assert bare_page.locator("#console-nav a").first.is_visible()  # the nav wraps
        for _ in range(2):
            bare_page.click("a:has-text('Add Key')")
            assert bare_page.locator("form#add-key").is_visible()
        assert bare_page.evaluate(FITS)[0] <= 390, bare_page.evaluate(STICKING_OUT)
        bare.close()

        # A plain user: the same pages, without the admin links.
        user_context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 800})
        user_page = user_context.new_page()
        user_page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        sign_in(user_page, base, USER)
        user_widths = Widths(user_page)
        for name, path in [("user-dashboard", "/console"), ("user-api-keys", "/console/api-keys"),
                           ("user-playground", "/console/playground"),
                           ("user-gallery", "/console/jobs")]:
            user_widths.visit(name, path)
        assert nav_links_reachable(user_page) == ["Dashboard", "API Keys", "Playground",
                                                  "Gallery"]
        user_context.close()
        context.close()
        browser.close()

    print("\n" + "\n".join(widths.figures + user_widths.figures))
    assert widths.too_wide + user_widths.too_wide == []
    assert problems == []

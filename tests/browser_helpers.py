"""Driving Debian's Chromium with Playwright in the console's browser tests.

A test module that imports this is skipped where chromium is missing (outside CI);
the browser is never downloaded. Screenshots go under tests/artifacts/console/.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from .console_helpers import PASSWORD

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (./install.sh --dev --test installs it)",
                allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


def shoot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_until(page, condition: str, seconds: float = 20) -> None:
    """Polls from here: page.wait_for_function evaluates a string in the page, which the
    console's policy (no 'unsafe-eval') refuses once it has to poll."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(condition):
        assert time.monotonic() < deadline, f"never true: {condition}"
        time.sleep(0.05)


def sign_in(page, base: str, email: str, password: str = PASSWORD) -> None:
    """Signs in through the sign-in form, as a person does, and waits for the dashboard."""
    page.goto("/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base}/console")

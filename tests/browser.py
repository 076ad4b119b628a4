"""A headless Chromium (Debian's package, installed here if missing) driven by playwright, logged in to an
AirflowStack through its auth manager."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools import services

CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> Path:
    if not CHROMIUM.exists():
        services.apt_install("chromium", str(CHROMIUM))
    return CHROMIUM


@contextmanager
def logged_in_page(stack, width: int = 1600, height: int = 900) -> Iterator:
    """A page whose browser holds the session cookie the Airflow UI's login sets (`_token`, a JWT from the auth
    manager's /auth/token)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(ensure_chromium()), headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_cookies([{"name": "_token", "value": stack.token, "url": stack.base}])
            yield context.new_page()
        finally:
            browser.close()

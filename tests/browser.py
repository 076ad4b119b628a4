"""A headless Chromium (Debian's package, installed here if missing) driven by playwright, logged in to an
AirflowStack through its auth manager."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium() -> Path:
    if not CHROMIUM.exists():
        if not shutil.which("apt-get"):
            raise RuntimeError("no /usr/bin/chromium and no apt-get to install Debian's chromium")
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True)
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

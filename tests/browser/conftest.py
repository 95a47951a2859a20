"""Browser fixtures: Debian's Chromium driven by Playwright (no browser download)."""

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup-browser.sh (make test does)")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            # The closed network refuses Chromium's background connections; keep it quiet.
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        yield b
        b.close()


@pytest.fixture(autouse=True)
def pages_closed_after_each_test(request):
    """Close every page a test opened once it ends, passed or failed: an open Gradio page
    keeps its timers polling (its app stopped or not), five renderers took about 40% of a
    core for the rest of the run, and the training tests after them share two cores."""
    yield
    if "browser" in request.fixturenames:
        for context in request.getfixturevalue("browser").contexts:
            context.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def sign_in(page, url: str, user: str, password: str) -> None:
    page.goto(url)
    page.locator("input[data-testid=textbox]").first.fill(user)
    page.locator("input[data-testid=password]").fill(password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#message textarea", timeout=30_000)

"""The dashboard in a real browser: Debian's chromium, driven by Playwright, headless.

scripts/install_browser.sh installs both (chromium from apt, the playwright Python package from
PyPI; no browser download). The test runs it when either is missing and FAILS, with the reason,
when they still cannot be had: a browser test that skips itself would hide a broken dashboard.
Screenshots go to the test's tmp folder, or to $MMSAE_SCREENSHOTS when set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mmsae.report import DashboardConfig, build_dashboard, make_server
from test_report import HOSTILE, make_run

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _have_browser() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM.exists()


@pytest.fixture(scope="module")
def playwright(tmp_path_factory):
    if not _have_browser():
        proc = subprocess.run(["bash", str(ROOT / "scripts/install_browser.sh")], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable}, timeout=900)
        if not _have_browser():
            pytest.fail("headless Chromium is not available: scripts/install_browser.sh could not install Debian's "
                        f"chromium (/usr/bin/chromium) and the playwright package (exit {proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-500:]}", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


def _launch(playwright, profile: Path, bypass_csp: bool):
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
        viewport={"width": 1280, "height": 900}, bypass_csp=bypass_csp)


@pytest.fixture(scope="module")
def browser_context(playwright, tmp_path_factory):
    """The site's Content-Security-Policy switched off: escaping alone must keep the payload inert."""
    context = _launch(playwright, tmp_path_factory.mktemp("profile-no-csp"), bypass_csp=True)
    yield context
    context.close()


@pytest.fixture(scope="module")
def csp_context(playwright, tmp_path_factory):
    """The site as users get it, under its own Content-Security-Policy (which forbids eval: no wait_for_function)."""
    context = _launch(playwright, tmp_path_factory.mktemp("profile-csp"), bypass_csp=False)
    yield context
    context.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("browser"))
    build_dashboard(DashboardConfig(run=str(run), page_size=4, chunk_size=4))
    return run / "site"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("MMSAE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


class Watch:
    """Records what must never happen on the page: script errors, dialogs, requests off the site."""

    def __init__(self, page, base: str):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.foreign: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: None if r.url.startswith(base) else self.foreign.append(r.url))

    def check(self, page, title_prefix: str = "") -> None:
        assert page.evaluate("typeof window.pwned") == "undefined", "the hostile payload ran"
        assert "pwned" not in page.title()
        assert not self.dialogs, self.dialogs
        assert not self.errors, self.errors
        assert not self.foreign, f"the page requested files outside the site: {self.foreign}"


def _ready(page) -> None:
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)


def test_feature_list_search_feature_page_and_hostile_payload(browser_context, site, shots):
    page = browser_context.new_page()
    base = site.resolve().as_uri()
    watch = Watch(page, base)
    chunks: list[str] = []
    page.on("request", lambda r: chunks.append(r.url.rsplit("/", 1)[-1]) if "/data/list/" in r.url else None)
    page.goto(f"{base}/index.html")
    _ready(page)
    assert chunks == ["00000.js"]  # lazily: only the chunk of the page on screen
    rows = page.locator("#features tbody tr")
    assert rows.count() == 4  # the first page (page size 4) of the 6 live features
    assert "page 1 of 2" in page.inner_text("#page-info")
    assert rows.nth(0).locator("td").nth(0).inner_text() == "#5"  # best IoU first
    assert page.locator("#features img.thumb").count() == 4  # each live feature's best example
    page.wait_for_function("Array.from(document.querySelectorAll('#features img.thumb')).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(shots / "index.png"), full_page=True)

    # the next page needs the second chunk, loaded on demand; the hostile explanation is plain text there
    page.click("#pager button:has-text('next')")
    page.wait_for_function("document.getElementById('page-info').textContent.startsWith('page 2')")
    assert page.locator("#features tbody tr").count() == 2
    assert chunks == ["00000.js", "00001.js"]
    assert HOSTILE.replace("\u2028", "").replace("\u2029", "")[:60] in page.inner_text("#features tbody").replace("\u2028", "").replace("\u2029", "")
    watch.check(page)

    # showing dead features lists all 12; search narrows to the feature whose explanation matches
    page.uncheck("#hide-dead")
    page.wait_for_function("document.getElementById('page-info').textContent.includes('12 features')")
    assert chunks == ["00000.js", "00001.js"]  # dead features come last: page 1 still needs only chunk 0
    page.fill("#search", "circles")
    page.wait_for_function("document.getElementById('page-info').textContent.includes(' 1 features')")
    assert sorted(chunks) == ["00000.js", "00001.js", "00002.js"]  # search needs them all, each loaded once
    assert page.locator("#features tbody tr").count() == 1
    assert "blue circles" in page.inner_text("#features tbody")
    page.fill("#search", "#4")
    page.wait_for_function("document.querySelector('#features tbody td a') && "
                           "document.querySelector('#features tbody td a').textContent === '#4'")
    page.select_option("#sort", "frequency")
    page.fill("#search", "")
    page.wait_for_function("document.getElementById('page-info').textContent.includes('12 features')")

    # open the feature found by search: its images load, the toggle switches raw / overlay / mask
    page.fill("#search", "circles")
    page.wait_for_function("document.getElementById('page-info').textContent.includes(' 1 features')")
    page.click("#features tbody a")
    page.wait_for_url("**/feature.html#1")
    _ready(page)
    assert page.inner_text("#explanation") == "blue circles and blue squares"
    imgs = page.locator("#examples img")
    assert imgs.count() == 2
    page.wait_for_function("Array.from(document.querySelectorAll('#examples img')).every(i => i.complete && i.naturalWidth > 0)")
    assert "-overlay.jpg" in imgs.nth(0).get_attribute("src")
    page.click("#mode button[data-mode='mask']")
    assert "-mask.jpg" in imgs.nth(0).get_attribute("src")
    page.wait_for_function("Array.from(document.querySelectorAll('#examples img')).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#scores tbody tr").count() == 2
    assert page.locator("svg.hist rect").count() > 0
    page.click("#mode button[data-mode='overlay']")
    page.screenshot(path=str(shots / "feature.png"), full_page=True)
    # previous / next follow the list's order (IoU: 5, 4, 3, 2, 1, 0)
    assert page.get_attribute("#prev", "href") == "#2" and page.get_attribute("#next", "href") == "#0"
    page.click("#prev")
    page.wait_for_function("document.getElementById('explanation') && "
                           "document.getElementById('explanation').textContent === 'green triangles'")
    watch.check(page)

    # the hostile feature: its explanation and token context are shown exactly, as text, and nothing runs
    page.goto(f"{base}/feature.html#0")
    _ready(page)
    assert page.locator("#explanation").evaluate("e => e.textContent") == HOSTILE
    assert page.locator("#feature script, #feature img[onerror], #feature iframe").count() == 0
    watch.check(page)
    page.screenshot(path=str(shots / "hostile.png"), full_page=True)

    # a feature without a page says so
    page.goto(f"{base}/feature.html#9")
    _ready(page)
    assert "no page" in page.inner_text("#feature")
    assert watch.errors == ["Failed to load resource: net::ERR_FILE_NOT_FOUND"]  # its data file, looked for
    watch.errors.clear()
    watch.check(page)


def test_run_report_in_browser(csp_context, site, shots):
    page = csp_context.new_page()
    base = site.resolve().as_uri()
    watch = Watch(page, base)
    page.goto(f"{base}/report.html")
    page.wait_for_load_state("load")
    assert page.locator("h2").all_inner_texts()[:4] == ["Run", "Pipeline (mmsae demo)", "SAE configuration", "Training"]
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert not broken and page.locator("img").count() >= 4
    assert HOSTILE[:40] in page.inner_text("body")
    page.screenshot(path=str(shots / "report.png"), full_page=True)
    watch.check(page)


def test_served_over_http(csp_context, site):
    server = make_server(site, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        page = csp_context.new_page()
        watch = Watch(page, base)
        page.goto(f"{base}/index.html")
        _ready(page)
        assert page.locator("#features tbody tr").count() == 4
        page.click("#features tbody a:text-is('#2')")
        page.wait_for_url("**/feature.html#2")
        _ready(page)
        assert page.inner_text("#explanation") == "green triangles"
        page.locator("#examples img").first.wait_for()
        page.goto(f"{base}/feature.html#0")
        _ready(page)
        assert page.locator("#explanation").evaluate("e => e.textContent") == HOSTILE
        watch.check(page)
    finally:
        server.shutdown()
        server.server_close()


def test_install_script_is_idempotent():
    """Once everything is installed the script changes nothing and says nothing."""
    if not _have_browser():
        pytest.fail("run scripts/install_browser.sh first (chromium and playwright are missing)", pytrace=False)
    proc = subprocess.run(["bash", str(ROOT / "scripts/install_browser.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert shutil.which("chromium") or CHROMIUM.exists()

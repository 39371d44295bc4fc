"""Fixtures for the demo-page tests: a real ``imhub serve --demo`` and Debian's chromium.

The browser is the distribution's ``/usr/bin/chromium`` driven by playwright
(``scripts/install-browser`` installs it). A missing browser fails the tests
unless ``IMHUB_ALLOW_SKIP_BROWSER=1`` says skipping is acceptable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import REPO, free_port, wait_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Short enough that a page which never pings is cut off during a test.
IDLE_TIMEOUT_SECONDS = 3
VIEWPORT = {"width": 1100, "height": 720}


def _missing(reason: str) -> None:
    if os.environ.get("IMHUB_ALLOW_SKIP_BROWSER") == "1":
        pytest.skip(f"{reason} (skipping: IMHUB_ALLOW_SKIP_BROWSER=1)")
    pytest.fail(
        f"{reason}: run scripts/install-browser, or set IMHUB_ALLOW_SKIP_BROWSER=1 to skip",
        pytrace=False,
    )


@dataclass
class DemoServer:
    """``imhub serve --demo`` in a subprocess on a free loopback port."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "IMHUB_IDLE_TIMEOUT_SECONDS": str(IDLE_TIMEOUT_SECONDS)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imhub",
                    "serve",
                    "--demo",
                    "--data-dir",
                    str(self.data_dir),
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=log,
                env=env,
                cwd=str(REPO),
            )
        try:
            wait_http(self.url + "/readyz", timeout=30, proc=self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise RuntimeError(f"demo server did not start:\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rest(self, user: str) -> httpx.Client:
        token = httpx.get(f"{self.url}/demo/token", params={"user": user}, timeout=5).json()
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token['token']}"},
            timeout=10,
        )


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    server = DemoServer(tmp_path_factory.mktemp("demo-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Module scope, not session: sync playwright runs an event loop on this thread
# while it is open, and the async tests of other modules need the thread back.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package is not installed")
    from playwright.sync_api import expect

    expect.set_options(timeout=10_000)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class UserPage:
    """One signed-in demo page plus what it did on the wire."""

    user: str
    page: Any
    sockets: list[Any] = field(default_factory=list)
    sent_frames: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


@pytest.fixture
def open_page(browser: Any, demo_server: DemoServer) -> Iterator[Callable[..., UserPage]]:
    """``open_page("alice")``: a fresh browser context signed in through the user picker."""
    contexts: list[Any] = []

    def _open(
        user: str,
        *,
        viewport: dict[str, int] | None = None,
        setup: Callable[[Any], None] | None = None,
    ) -> UserPage:
        context = browser.new_context(viewport=viewport or VIEWPORT)
        context.set_default_timeout(10_000)
        contexts.append(context)
        page = context.new_page()
        up = UserPage(user, page)

        def on_socket(ws: Any) -> None:
            up.sockets.append(ws)
            ws.on("framesent", lambda payload: up.sent_frames.append(str(payload)))

        page.on("websocket", on_socket)
        page.on("request", lambda req: up.requests.append(req.url))
        page.on(
            "console",
            lambda msg: up.console_errors.append(msg.text) if msg.type == "error" else None,
        )
        page.on("pageerror", lambda exc: up.console_errors.append(f"pageerror: {exc}"))
        if setup is not None:
            setup(page)
        page.goto(demo_server.url + "/demo")
        page.get_by_test_id(f"user-pick-{user}").click()
        from playwright.sync_api import expect

        expect(page.get_by_test_id("current-user")).to_have_text(user)
        expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "online")
        return up

    yield _open
    for context in contexts:
        context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the tail of the demo server's log to the report."""
    report = yield
    if report.when == "call" and report.failed:
        server = getattr(item, "funcargs", {}).get("demo_server")
        if isinstance(server, DemoServer):
            report.sections.append(("demo server log (tail)", server.log()[-4000:]))
    return report

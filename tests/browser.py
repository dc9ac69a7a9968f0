"""Headless Chromium with the network cut off, driven through the Chrome DevTools Protocol.

Used by the browser tests (do the pages render offline, did every plot draw) and to take the
README's screenshot of the report:

    python -m tests.browser reports/report.html --screenshot docs/report.png

The browser sends everything through a proxy at a dead address (loopback included), so a page
that needs the network renders without it, and every request it makes is recorded: `external()`
lists those that would have left the machine.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kneexray.atomic import write_bytes
from kneexray.errors import KneexrayError

log = logging.getLogger("tests.browser")

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--mute-audio",
    # every request through a proxy that isn't there, loopback too: nothing gets out
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


def find_chromium() -> str | None:
    """Path of an installed Chromium/Chrome, or None."""
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


class BrowserError(KneexrayError, RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page; a context manager. `events` holds every CDP event."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900, timeout: float = 60):
        self.executable: str = executable or find_chromium() or ""
        if not self.executable:
            raise BrowserError(f"no Chromium found (looked for {', '.join(CANDIDATES)}); e.g. apt-get install chromium")
        self.width, self.height, self.timeout = width, height, timeout
        self.events: list[dict] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        import websocket  # websocket-client

        self._profile = tempfile.mkdtemp(prefix="kneexray-chromium-")
        self._process = subprocess.Popen(
            [
                self.executable,
                *FLAGS,
                f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            port = self._devtools_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
                pages = [t for t in json.load(reply) if t["type"] == "page"]
            self._socket = websocket.create_connection(
                pages[0]["webSocketDebuggerUrl"], timeout=self.timeout, suppress_origin=True
            )
            for domain in ("Page", "Network", "Runtime", "Log"):
                self.send(f"{domain}.enable")
            self.send(
                "Emulation.setDeviceMetricsOverride",
                width=self.width,
                height=self.height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "_socket", None):
            self._socket.close()
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _devtools_port(self) -> int:
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrowserError(
                    f"{self.executable} exited ({self._process.returncode}): "
                    f"{self._process.stderr.read().decode(errors='replace')[-2000:] if self._process.stderr else ''}"
                )
            if marker.is_file() and (lines := marker.read_text().split()):
                return int(lines[0])
            time.sleep(0.1)
        raise BrowserError(f"{self.executable} did not open its DevTools port in {self.timeout:.0f} s")

    def _receive(self) -> dict:
        message = json.loads(self._socket.recv())
        if "method" in message:
            self.events.append(message)
        return message

    def send(self, method: str, **params) -> dict:
        """Call a CDP method and return its result; events that arrive meanwhile go to `events`."""
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while (message := self._receive()).get("id") != call_id:
            pass
        if "error" in message:
            raise BrowserError(f"{method}: {message['error']}")
        return message.get("result", {})

    def evaluate(self, expression: str, await_promise: bool = False):
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url_or_path: str | Path) -> None:
        """Load a page and wait for its load event."""
        url = str(url_or_path)
        if "://" not in url:
            url = Path(url).resolve().as_uri()
        seen = len(self.events)
        self.send("Page.navigate", url=url)
        while not any(e["method"] == "Page.loadEventFired" for e in self.events[seen:]):
            self._receive()  # times out after self.timeout seconds of silence

    def wait_for(self, expression: str, timeout: float | None = None, interval: float = 0.2):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for: {expression}")
            time.sleep(interval)

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def external(self) -> list[str]:
        """Requests that would have left the machine (anything but file:, data:, blob:, about:)."""
        return [url for url in self.requested_urls() if urlsplit(url).scheme not in LOCAL_SCHEMES]

    def errors(self) -> list[str]:
        """Uncaught exceptions and console errors on the page."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                found.append(
                    params["exceptionDetails"].get("exception", {}).get("description")
                    or params["exceptionDetails"].get("text")
                )
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif event["method"] == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text"))
        return found

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """PNG of the page (all of it with `full_page`), written atomically."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        write_bytes(path, data)
        return Path(path)


# Every <img> decoded: the same check for the report and DVC's pages.
IMAGES_DECODED = "[...document.images].every(i => i.complete && i.naturalWidth > 0)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Screenshot of a local HTML page in headless Chromium, offline.")
    parser.add_argument("page", help="HTML file, e.g. reports/report.html")
    parser.add_argument("--screenshot", required=True, help="PNG to write, e.g. docs/report.png")
    parser.add_argument("--width", type=int, default=1100, help="viewport width in CSS pixels (default 1100)")
    parser.add_argument(
        "--height", type=int, default=0, help="clip to this many pixels from the top (default: the whole page)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with Browser(width=args.width, height=args.height or 900) as browser:
        browser.open(args.page)
        browser.wait_for(IMAGES_DECODED)
        if browser.external():
            raise SystemExit(f"error: the page requested {browser.external()}")
        browser.screenshot(args.screenshot, full_page=not args.height)
    log.info("wrote %s", args.screenshot)


if __name__ == "__main__":
    main()

"""A headless Chromium driven over the DevTools protocol (websocket-client), for tests of pages mifa writes.

`open_page` loads a file and reports what a user's browser would meet: console errors and uncaught
exceptions, requests that leave the file (network), and the result of a JavaScript expression; it can
save a full-page screenshot. Debian's `chromium` package (`make setup` installs it) is enough.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    value: Any = None  # what the expression evaluated to


class _Session:
    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        message = {"id": msg_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        for event in self.events[:seen]:
            if event.get("method") == method:
                return event
        while time.monotonic() < deadline:
            event = json.loads(self.ws.recv())
            self.events.append(event)
            if event.get("method") == method:
                return event
        raise TimeoutError(f"no {method} within {timeout} s")


def _start(browser: str, profile: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--remote-debugging-port=0", "--remote-allow-origins=*",
                             f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.is_file() and len(lines := port_file.read_text().split("\n")) >= 2 and lines[1]:
            return proc, f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{browser} did not start (exit {proc.poll()})")


def open_page(path: Path, expression: str, screenshot: Path | None = None, width: int = 1280) -> PageResult:
    """Load `path` in a fresh headless browser, evaluate `expression` once loaded, optionally screenshot it."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found")
    with tempfile.TemporaryDirectory(prefix="mifa-chromium-") as profile:
        proc, url = _start(browser, Path(profile))
        try:
            cdp = _Session(url)
            target = cdp.send("Target.createTarget", url="about:blank")["targetId"]
            sid = cdp.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.send(f"{domain}.enable", sid)
            cdp.send("Emulation.setDeviceMetricsOverride", sid, width=width, height=900, deviceScaleFactor=1, mobile=False)
            cdp.send("Page.navigate", sid, url=path.resolve().as_uri())
            cdp.wait_for("Page.loadEventFired")
            value = cdp.send("Runtime.evaluate", sid, expression=expression, returnByValue=True,
                             awaitPromise=True)["result"].get("value")
            if screenshot is not None:
                shot = cdp.send("Page.captureScreenshot", sid, format="png", captureBeyondViewport=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            result = PageResult(value=value)
            for event in cdp.events:
                method, params = event.get("method"), event.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    result.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
                elif method == "Runtime.exceptionThrown":
                    result.errors.append(params["exceptionDetails"].get("text", "exception"))
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    result.errors.append(params["entry"]["text"])
                elif method == "Network.loadingFailed":
                    result.errors.append(f"load failed: {params.get('errorText')}")
                elif method == "Network.requestWillBeSent":
                    result.requests.append(params["request"]["url"])
            cdp.ws.close()
            return result
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

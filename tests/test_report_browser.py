"""The HTML report in a real browser: every image decodes, the table is in the DOM, nothing is fetched.

Headless Chromium is driven over the Chrome DevTools protocol on a pipe (`--remote-debugging-pipe`:
commands on fd 3, replies on fd 4, NUL-terminated JSON), so the check needs only the standard
library and leaves the report untouched. A full-page screenshot goes to test-artifacts/report.png.
"""

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_report import make_run

from declip.report import write_report

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"headless Chromium not installed at {CHROMIUM}"),
]


class DevTools:
    """A minimal CDP client over Chromium's debugging pipe."""

    def __init__(self, profile: Path):
        cmd_r, self.cmd_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        # Chromium expects the pipe on fds 3 and 4 exactly; move ours above them first so the dup2s cannot collide.
        high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, resp_w))
        os.close(cmd_r)
        os.close(resp_w)

        def to_3_and_4():
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, preexec_fn=to_3_and_4, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(high_r)
        os.close(high_w)
        self.next_id, self.buffer, self.events = 0, b"", []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.resp_r], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self.resp_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the debugging pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result["result"]["value"]

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.resp_r)


CHECK = """JSON.stringify({
  images: Array.from(document.images).map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                                                 src: i.src.slice(0, 22)})),
  firstRow: Array.from(document.querySelectorAll("table")[0].rows[1].cells).map(c => c.textContent),
  seedRows: Array.from(document.querySelectorAll("table")[0].rows).slice(2).map(r => r.cells[2].textContent),
  scripts: document.scripts.length,
  escaped: document.body.textContent.includes("<script>alert(1)</script>"),
  height: document.documentElement.scrollHeight,
})"""


def test_report_renders_in_headless_chromium(tmp_path):
    make_run(tmp_path / "run")
    paths = write_report([tmp_path / "run"], tmp_path / "report")
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)  # fmt: skip
        browser.send("Page.navigate", {"url": paths["html"].as_uri()}, session)
        browser.wait_event("Page.loadEventFired")
        state = json.loads(browser.evaluate(session, CHECK))

        assert len(state["images"]) == 5
        for img in state["images"]:
            assert img["complete"] and img["w"] > 0 and img["h"] > 0 and img["src"] == "data:image/png;base64,"
        assert state["firstRow"] == ["demo_tiny", "cpu", "41.25", "123.5", "2", "100"]
        assert state["seedRows"] == ["-", "32.91"]
        assert state["scripts"] == 0 and state["escaped"]  # the caption is shown as text, not run
        requests = [
            e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
        ]
        assert requests and all(url.startswith(("file://", "data:")) for url in requests), requests

        shot = browser.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                       "clip": {"x": 0, "y": 0, "width": 1100, "height": state["height"], "scale": 1}},
            session, timeout=60,
        )  # fmt: skip
    finally:
        browser.close()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(base64.b64decode(shot["data"]))
    shutil.copyfile(paths["html"], ARTIFACTS / "report.html")
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000

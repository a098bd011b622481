"""Screenshots of a flow run's artifacts in the Prefect UI, taken with headless Chromium.

    .venv/bin/python scripts/screenshots.py --api http://127.0.0.1:4200/api \
        --flow-run <flow run id> --out docs/img

Writes `<out>/flow-run-artifacts.png` (the run's Artifacts tab) and one
`<out>/artifact-<name>.png` per artifact with a key (`pages`, `picture`, `summary` for vramflow's
artifacts keyed by document). With `--deployment process-pdf/process-pdf`, also
`<out>/run-form.png`, that deployment's custom run form with its parameter descriptions.

Chromium is Debian's package (`apt-get install -y chromium`); it is driven over the DevTools
protocol so that each shot is taken once the single-page UI has drawn what it waits for, not
after a fixed sleep.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)
WAIT_S = 60


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, width: int, height: int) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            sys.exit("chromium not found: apt-get update && apt-get install -y chromium")
        self.profile = tempfile.mkdtemp(prefix="vramflow-chromium-")
        self.process = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = self._devtools_port()
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        target = next(p for p in pages if p["type"] == "page")
        self.socket = connect(target["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def _devtools_port(self) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT_S
        while not marker.exists() or not marker.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                sys.exit("chromium did not open its DevTools port")
            time.sleep(0.1)
        return int(marker.read_text().split()[0])

    def call(self, method: str, **params) -> dict:
        """Send one command and return its result (events in between are skipped)."""
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def wait_for(self, expression: str, what: str) -> None:
        """Poll a JavaScript expression until it is true."""
        deadline = time.monotonic() + WAIT_S
        while not self.call("Runtime.evaluate", expression=expression)["result"].get("value"):
            if time.monotonic() > deadline:
                sys.exit(f"{what} did not happen within {WAIT_S} s")
            time.sleep(0.2)

    def shoot(self, url: str, wait_for: str, target: Path, tab: str | None = None) -> None:
        """Open `url` (and its `tab`), wait until the page's text contains `wait_for`, save a
        full-page PNG."""
        self.call("Page.navigate", url=url)
        if tab is not None:
            # The run page opens on its Logs tab whatever the URL asks: click the tab.
            click = (
                "(() => { const tab = Array.from("
                "document.querySelectorAll('.p-tab, button, [role=tab]'))"
                f".find(e => e.innerText.trim() === {json.dumps(tab)});"
                " if (tab) { tab.click(); return true; } return false; })()"
            )
            self.wait_for(click, f"{url}: the {tab} tab")
        probe = f"document.body && document.body.innerText.includes({json.dumps(wait_for)})"
        self.wait_for(probe, f"{url}: {wait_for!r}")
        # Images (the run's picture) decode after the text is there.
        images = "Array.from(document.images).every(i => i.complete)"
        while not self.call("Runtime.evaluate", expression=images)["result"].get("value"):
            time.sleep(0.2)
        time.sleep(0.5)  # let the UI's transitions settle: a shot, not a correctness check
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        _save_small(base64.b64decode(shot["data"]), target)
        print(f"{target} ({target.stat().st_size // 1024} KiB): {url}")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def _save_small(png: bytes, target: Path, colours: int = 96) -> None:
    """A palette PNG: a third of the size of the browser's, and the UI's flat colours survive."""
    from PIL import Image  # Pillow comes with matplotlib

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def _short(key: str) -> str:
    """`vramflow-pages-<sha prefix>` → `pages`: one file name per kind, whichever document."""
    parts = key.split("-")
    return parts[1] if parts[0] == "vramflow" and len(parts) == 3 else key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="Prefect API URL, e.g. http://host:4200/api")
    parser.add_argument("--flow-run", required=True, help="Flow run id")
    parser.add_argument("--deployment", help="flow/deployment name whose run form to shoot")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    api = args.api.rstrip("/")
    ui = api.removesuffix("/api")
    query = {"artifacts": {"flow_run_id": {"any_": [args.flow_run]}}}
    artifacts = httpx.post(f"{api}/artifacts/filter", json=query).raise_for_status().json()
    keyed = [a for a in artifacts if a.get("key") and a["type"] != "progress"]
    args.out.mkdir(parents=True, exist_ok=True)
    browser = Browser(args.width, args.height)
    try:
        browser.shoot(
            f"{ui}/runs/flow-run/{args.flow_run}",
            keyed[0]["key"] if keyed else "Artifacts",
            args.out / "flow-run-artifacts.png",
            tab="Artifacts",
        )
        for artifact in keyed:
            browser.shoot(
                f"{ui}/artifacts/artifact/{artifact['id']}",
                artifact["key"],  # the page heading; a description may be rendered markdown
                args.out / f"artifact-{_short(artifact['key'])}.png",
            )
        if args.deployment:
            deployment = httpx.get(f"{api}/deployments/name/{args.deployment}").raise_for_status()
            browser.shoot(
                f"{ui}/deployments/deployment/{deployment.json()['id']}/run",
                "Parameters",
                args.out / "run-form.png",
            )
    finally:
        browser.close()


if __name__ == "__main__":
    main()

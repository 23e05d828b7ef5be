"""docs/img/page.png: the demo's page, a broken-gateway answer and its verdict in words.

Run by ``scripts/screenshot``. Starts ``chunkwatch demo --serve`` as a child, switches the
upstream gateway to ``zero`` with the page's own panel, asks, waits for the page's error
and shoots the whole page, 1100 CSS pixels wide; then stops the demo with SIGINT, as a person would.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright never downloads one here
SIZE = {"width": 1100, "height": 700}


def _page_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.match(r"page: (http://127\.0\.0\.1:\d+)/", line)
        if found:
            return found.group(1)
    raise SystemExit("chunkwatch demo --serve printed no page URL")


def shoot(url: str, out: Path) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=SIZE, color_scheme="light")
            page.goto(url + "/")
            page.get_by_label("Upstream side").select_option("zero")
            page.get_by_role("button", name="Apply upstream").click()
            page.wait_for_function(
                "() => document.getElementById('fault-now-upstream').textContent === 'zero'"
            )
            page.get_by_label("Your message").fill("Why did the stream carry no data?")
            page.get_by_role("button", name="Send").click()
            page.wait_for_selector('body[data-state="error"]', state="attached")
            try:  # the funnel's server rows: filled once the service reports the request
                page.wait_for_selector(
                    "body[data-browser-outcome]", state="attached", timeout=10_000
                )
            except PlaywrightTimeout:
                print("the service reported no funnel within 10 s: shot without it")
            page.screenshot(path=str(out), full_page=True)  # the panel, chat and verdict
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/page.png"))
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "chunkwatch", "demo", "--serve"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        shoot(_page_url(proc), args.out)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Screenshots of each tab of `ldmkit serve`, taken by Debian's headless Chromium, into docs/.

    .venv/bin/python scripts/webui_screenshots.py [--out docs]

Starts the server on the bundled pipelines, fills each tab with an example (a prompt; an edit of a test image
with a drawn mask; a test image's reconstruction, CLIP captions and a latent interpolation), and writes
webui-text-to-image.png, webui-edit.png and webui-look-inside.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from ldmkit.serve import background_server
    out = Path(args.out)
    with background_server([], cwd=ROOT) as (url, _):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#generate")
            page.fill("#num input", "8")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#images img').length >= 8", timeout=300_000)
            time.sleep(1)
            page.screenshot(path=str(out / "webui-text-to-image.png"), full_page=True)

            page.get_by_role("tab", name="Look inside").click()
            page.get_by_role("button", name="A test image").first.click()
            page.wait_for_timeout(2000)
            page.get_by_role("button", name="Encode and decode").click()
            page.wait_for_timeout(4000)
            page.get_by_role("button", name="Closest captions (CLIP)").click()
            page.wait_for_timeout(4000)
            page.get_by_role("button", name="A test image").nth(1).click()
            page.wait_for_timeout(2000)
            page.get_by_role("button", name="Interpolate in latent space").click()
            page.wait_for_timeout(5000)
            page.screenshot(path=str(out / "webui-look-inside.png"), full_page=True)

            # an edit: a test image, a stroke drawn down its left third (inpainted), the rest kept
            page.get_by_role("tab", name="Edit").click()
            page.get_by_role("button", name="A test image").first.click()
            page.wait_for_timeout(2500)
            box = page.locator("#editor canvas").first.bounding_box()
            if box:
                x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
                page.mouse.move(x0 + w * 0.3, y0 + h * 0.2)
                page.mouse.down()
                for k in range(15):
                    page.mouse.move(x0 + w * 0.3, y0 + h * (0.2 + k * 0.04))
                page.mouse.up()
            page.get_by_role("button", name="Edit", exact=True).click()
            page.wait_for_timeout(8000)
            page.screenshot(path=str(out / "webui-edit.png"), full_page=True)
            browser.close()
    print(f"wrote {out}/webui-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

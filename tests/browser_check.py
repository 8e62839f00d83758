"""Render every page of a built Sphinx site in headless Chromium and report what a reader sees
wrong: math left as raw TeX, code blocks wider than their box, images that do not load.

One browser process loads one harness page from a local HTTP server; the harness opens each
documentation page in a desktop-sized iframe, waits for MathJax to finish typesetting, runs the
checks in the page and posts the findings back to the server. The browser resolves no host other
than the local server, so the pages are checked as an offline reader gets them.

Run it on a build by hand with ``python tests/browser_check.py docs/_build/html``.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path

#: Width of the browser viewport in CSS pixels: a laptop screen, wider than the theme's page.
VIEWPORT = (1280, 900)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# Runs in the harness page. Each documentation page is same-origin with it (both come from the
# local server), so the harness can read the page's DOM and layout directly.
_HARNESS = r"""<!doctype html>
<meta charset="utf-8">
<body>
<script>
const PAGES = __PAGES__;
const [WIDTH, HEIGHT] = __VIEWPORT__;
const TEX = /\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{/;
const CODE = "pre, code, kbd, samp, script, style, textarea, mjx-container, .highlight";

function load(frame, url) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve("timed out loading"), 20000);
    frame.onload = () => { clearTimeout(timer); resolve(null); };
    frame.src = url;
  });
}

async function typeset(win) {
  // MathJax 3 resolves startup.promise once the initial typesetting is done.
  const ready = win.MathJax && win.MathJax.startup && win.MathJax.startup.promise;
  if (!ready) return;
  await Promise.race([ready, new Promise((r) => setTimeout(r, 15000))]);
}

function visible(el) {
  return el.getClientRects().length > 0 && win_style(el).visibility !== "hidden";
}
function win_style(el) { return el.ownerDocument.defaultView.getComputedStyle(el); }

function snippet(text) { return text.replace(/\s+/g, " ").trim().slice(0, 120); }

function inspect(doc) {
  const problems = [];
  const walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(CODE) || !TEX.test(node.data) || !visible(parent)) continue;
    problems.push(`raw TeX: ${snippet(node.data)}`);
  }
  for (const err of doc.querySelectorAll("mjx-merror")) {
    problems.push(`TeX error: ${snippet(err.getAttribute("data-mjx-error") || err.textContent)}`);
  }
  for (const pre of doc.querySelectorAll("pre")) {
    if (!visible(pre) || pre.scrollWidth <= pre.clientWidth) continue;
    const lines = pre.textContent.split("\n");
    const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
    problems.push(`code wider than its box (${pre.scrollWidth}px in ${pre.clientWidth}px): ` +
                  snippet(longest));
  }
  for (const img of doc.querySelectorAll("img")) {
    if (!img.complete || img.naturalWidth === 0) {
      problems.push(`broken image: ${img.getAttribute("src")}`);
    }
  }
  return problems;
}

async function main() {
  const frame = document.createElement("iframe");
  frame.style.width = WIDTH + "px";
  frame.style.height = HEIGHT + "px";
  frame.style.border = "0";
  document.body.appendChild(frame);
  const results = {};
  for (const page of PAGES) {
    try {
      const failed = await load(frame, page);
      if (failed) { results[page] = [failed]; continue; }
      await typeset(frame.contentWindow);
      results[page] = inspect(frame.contentDocument);
    } catch (e) {
      results[page] = [`harness error: ${e}`];
    }
  }
  await fetch("/__results__", {method: "POST", body: JSON.stringify(results)});
}
main().catch((e) => fetch("/__results__", {method: "POST",
                                             body: JSON.stringify({"harness": [String(e)]})}));
</script>
"""


def find_browser() -> str | None:
    """The Chromium executable: ``$CHROMIUM`` if set, else the first known name on ``PATH``."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class _Handler(http.server.SimpleHTTPRequestHandler):
    harness: bytes = b""
    results: dict = {}
    done: threading.Event

    def do_GET(self):  # noqa: N802 (the http.server naming)
        if self.path != "/__harness__.html":
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.harness)))
        self.end_headers()
        self.wfile.write(self.harness)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).results.update(json.loads(body))
        self.send_response(204)
        self.end_headers()
        type(self).done.set()

    def log_message(self, *args):  # quiet
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # The browser drops a connection when the harness moves on to the next page while a
        # font is still loading; that is not a problem of the site.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def check_site(root: Path, pages: list[str], browser: str,
               timeout: float = 120) -> dict[str, list[str]]:
    """Load ``pages`` (paths relative to ``root``) in ``browser``; ``{page: [problem, ...]}``."""
    handler = type("Handler", (_Handler,), {"results": {}, "done": threading.Event()})
    handler.harness = (
        _HARNESS.replace("__PAGES__", json.dumps(["/" + p for p in pages]))
        .replace("__VIEWPORT__", json.dumps(VIEWPORT))
        .encode()
    )
    server = _Server(("127.0.0.1", 0), partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={profile}", f"--window-size={VIEWPORT[0] + 40},{VIEWPORT[1]}",
            # Offline: every host name but the local server fails to resolve.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"http://127.0.0.1:{port}/__harness__.html",
        ]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if not handler.done.wait(timeout):
                raise TimeoutError(f"{browser} reported nothing within {timeout} s")
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            server.shutdown()
            server.server_close()
    return {page.lstrip("/"): problems for page, problems in handler.results.items()}


def site_pages(root: Path) -> list[str]:
    """The pages of a built site, relative to ``root``: all but Sphinx's own folders
    (``_static``, ``_sources``, ``_images``, ``_downloads``) and the highlighted module sources
    under ``_modules``, which show the library's code at its own 100-character limit."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.html")
                  if not p.relative_to(root).parts[0].startswith("_"))


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html").resolve()
    browser = find_browser()
    if browser is None:
        print("no Chromium found (set $CHROMIUM)", file=sys.stderr)
        return 2
    problems = {p: found for p, found in check_site(root, site_pages(root), browser).items()
                if found}
    for page, found in problems.items():
        print(page)
        for problem in found:
            print("   ", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""report.html as a person sees it: rendered by headless Chromium (skipped when none is installed), every image
loaded and every section present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
SECTIONS = ("setup", "figures", "tables", "findings", "cost")

# Appended to a copy of the page only (the report itself has no script): after load, one line per image with its
# decoded size; a broken or missing image has naturalWidth 0.
_CHECK = """<script>
window.addEventListener("load", function () {
  var out = document.createElement("pre"); out.id = "image-check";
  var lines = [];
  for (var img of document.images) { lines.push(img.getAttribute("src") + " " + img.complete + " " + img.naturalWidth); }
  out.textContent = lines.join("\\n"); document.body.appendChild(out);
});
</script>"""


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_report_html_renders_with_every_image_and_section(built_report, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    page = tmp_path / "page"
    shutil.copytree(built_report.out_dir, page)
    html = (page / "report.html").read_text()
    (page / "check.html").write_text(html.replace("</body>", _CHECK + "</body>"))

    dom = _chromium(browser, "--virtual-time-budget=20000", "--dump-dom", (page / "check.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stdout[-2000:]
    images = [line.split() for line in match.group(1).strip().splitlines()]
    assert len(images) == len(re.findall(r"<img ", html)) == len(built_report.figures) // 2
    for src, complete, width in images:
        assert complete == "true" and int(width) > 0, f"{src} did not load"
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in dom.stdout

    # and the page as an image: not blank, as tall as its content
    shot = tmp_path / "shot.png"
    _chromium(browser, "--hide-scrollbars", "--window-size=1280,3000", f"--screenshot={shot}", built_report.html.as_uri())
    assert shot.is_file() and shot.stat().st_size > 50_000

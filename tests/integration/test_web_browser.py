"""The console in a real browser (issue 22): Debian's chromium, headless, driven by
selenium through chromium-driver. Open the URL ``cdpctl web`` prints, see the volumes,
click a moment on the timeline, browse to a file, download it and compare it with
``cdpctl restore``; rewind from the console and undo it.

Set ``CDP_WEB_SCREENSHOTS=DIR`` to also keep the two screenshots (the README's are
made so: ``CDP_WEB_SCREENSHOTS=docs/img``)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.integration.web_env import A1, A2, WebEnv, web_env

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebEnv]:
    with web_env(tmp_path_factory.mktemp("webui"), big=False) as e:
        yield e


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    """One headless chromium for the module; quit in teardown."""
    require_tool("chromium", "chromedriver")
    opts = Options()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,900", "--lang=en-GB"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "safebrowsing.enabled": False})
    drv = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # not there yet (stale element, not found)
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def shot(drv: Any, tmp: Path, name: str) -> None:
    drv.save_screenshot(str(tmp / name))
    keep = os.environ.get("CDP_WEB_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / name, Path(keep) / name)


def click_time(drv: Any, ns: int) -> None:
    """Click the timeline at time *ns* (its SVG says which range it draws)."""
    box = drv.find_element(By.ID, "timeline")
    svg = box.find_element(By.TAG_NAME, "svg")
    t0, t1 = int(svg.get_attribute("data-from")), int(svg.get_attribute("data-to"))
    w = box.size["width"]
    px = 8 + (ns - t0) / (t1 - t0) * (w - 16)
    ActionChains(drv).move_to_element_with_offset(box, int(px - w / 2), 20).click().perform()


def entry(drv: Any, name: str) -> Any:
    return drv.find_element(By.CSS_SELECTOR, f"#files a.entry[data-name='{name}']")


def test_console_browse_download_rewind_undo(env: WebEnv, browser: Any, downloads: Path,
                                             tmp_path: Path) -> None:
    drv = browser
    c = env.cdpd
    url = c.cdpctl("web").stdout.strip()
    drv.get(url)
    # the volumes, and the token gone from the address bar
    wait_for("the volume list", lambda: drv.find_element(By.CSS_SELECTOR, "#volumes li[data-volume='vol0']"))
    assert "token=" not in drv.current_url
    wait_for("the timeline", lambda: drv.find_elements(By.CSS_SELECTOR, "#timeline rect.bucket"))
    marks = wait_for("the markers on the timeline",
                     lambda: len(drv.find_elements(By.CSS_SELECTOR, "#timeline g.marker")) >= 2)
    assert marks
    m1, m2 = c.cdpctl_json("markers")[:2]
    # a moment between the markers (not a marker), before a.txt was rewritten: the file
    # browser opens there
    assert m1["time_ns"] < env.before_rewrite_ns < m2["time_ns"]
    click_time(drv, (m1["time_ns"] + env.before_rewrite_ns) // 2)
    at = wait_for("a point picked on the timeline",
                  lambda: (t := drv.find_element(By.ID, "at-text").text) != "now" and t)
    assert not at.startswith("marker"), at
    picked_ns = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() * 1e9
    assert m1["time_ns"] - 1e6 < picked_ns < m2["time_ns"], (at, m1, m2)
    wait_for("the root listing", lambda: entry(drv, "docs")).click()
    wait_for("/docs", lambda: entry(drv, "a.txt"))
    assert {e.get_attribute("data-name") for e in drv.find_elements(By.CSS_SELECTOR, "#files a.entry")} \
        == {"a.txt", "sub"}
    entry(drv, "a.txt").click()  # its versions
    wait_for("the versions of a.txt", lambda: len(drv.find_elements(By.CSS_SELECTOR, "#versions tr.version")) == 2)
    shot(drv, tmp_path, "console-files.png")
    # download it and compare with cdpctl restore at the same point
    link = drv.find_element(By.CSS_SELECTOR, "#files a.download[data-path='/docs/a.txt']")
    link.click()
    got = wait_for("the download", lambda: (downloads / "a.txt").exists()
                   and not list(downloads.glob("*.crdownload")) and (downloads / "a.txt").read_bytes())
    out = tmp_path / "a.cli"
    c.cdpctl("restore", "/docs/a.txt", "--at", at, "-o", str(out))
    assert got == out.read_bytes() == A1

    # rewind the live volume to that moment: the confirmation shows the undo point
    head = c.cdpctl_json("status")["last_seq"]
    drv.find_element(By.ID, "rewind").click()
    dlg = wait_for("the confirmation", lambda: (d := drv.find_element(By.ID, "rewind-dialog")).is_displayed() and d)
    assert drv.find_element(By.ID, "rw-point").text == at
    assert drv.find_element(By.ID, "rw-undo").text == f"@{head}"
    shot(drv, tmp_path, "console-rewind.png")
    dlg.find_element(By.ID, "rewind-ok").click()
    undo = wait_for("the undo offer", lambda: drv.find_element(By.ID, "undo-box").is_displayed()
                    and drv.find_element(By.ID, "undo").get_attribute("data-undo"))
    assert undo == f"@{head}"
    c.cdpctl("restore", "/docs/a.txt", "--at", "now", "-o", str(out))
    assert out.read_bytes() == A1
    assert c.cdpctl_json("status")["maps"]["epochs"] == 2
    # undo it from the console
    drv.find_element(By.ID, "undo").click()
    wait_for("the undo", lambda: c.cdpctl_json("status")["maps"]["epochs"] == 3)
    c.cdpctl("restore", "/docs/a.txt", "--at", "now", "-o", str(out))
    assert out.read_bytes() == A2
    wait_for("the rewinds on the timeline",
             lambda: len(drv.find_elements(By.CSS_SELECTOR, "#timeline line.rewind")) == 2)

"""The HTML report, opened from disk in a real headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote_to_bytes, urlsplit

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CAMFRAME_REQUIRE_BROWSER"),
                                   reason="no chromium here (CI installs it and sets CAMFRAME_REQUIRE_BROWSER)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Input names that broke the report: a script URL, URL syntax (# ? %), markup, quotes, a newline, a
# percent escape that must not be decoded twice, and bytes that are not UTF-8 (decoded as a surrogate).
HOSTILE = ["javascript:alert(1).jpg", "a#b.jpg", "q?x=1.jpg", "100%.jpg", "%41.jpg", "new\nline.jpg",
           "<img src=x onerror=alert(1)>.jpg", "\"quote'.jpg", "&amp;.jpg", os.fsdecode(b"caf\xe9.jpg")]
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "b", "div", "figure", "a", "img",
                "figcaption", "table", "tr", "th", "td"}


def _browser(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "chromium is required"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000",
                           *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def _named(*methods: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("method") in methods


def _pipe() -> tuple[int, int]:
    """A pipe with both ends numbered 10 or more, clear of fds 3 and 4 that Chromium talks on."""
    ends = os.pipe()
    high = fcntl.fcntl(ends[0], fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(ends[1], fcntl.F_DUPFD_CLOEXEC, 10)
    for fd in ends:
        os.close(fd)
    return high


class Browser:
    """One headless Chromium page, driven with ``--remote-debugging-pipe`` (no network, no extra package)."""

    def __init__(self, tmp: Path) -> None:
        assert CHROMIUM is not None, "chromium is required"
        (chrome_in, self._w), (self._r, chrome_out) = _pipe(), _pipe()
        shell = f'exec 3<&{chrome_in} 4>&{chrome_out} {chrome_in}<&- {chrome_out}>&-; exec "$0" "$@"'
        self.proc = subprocess.Popen(["bash", "-c", shell, CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'cdp-profile'}",
                                      "--remote-debugging-pipe", "about:blank"], pass_fds=(chrome_in, chrome_out),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(chrome_in)
        os.close(chrome_out)
        self._buf, self._id, self.session = b"", 0, None
        self.events: list[dict[str, Any]] = []
        self.dialogs: list[dict[str, Any]] = []  # every alert, confirm or prompt a page opened
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._w)
        os.close(self._r)

    def _read(self, deadline: float) -> dict[str, Any] | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self._r, 1 << 20)
            assert chunk, "chromium closed the DevTools pipe"
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        event = json.loads(message)
        if event.get("method") == "Page.javascriptDialogOpening":
            self.dialogs.append(event["params"])
        return event

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one protocol command and return its result; events that arrive meanwhile are kept."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while (reply := self._read(deadline)) is not None:
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)
        raise TimeoutError(method)

    def wait(self, accept: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any] | None:
        """The first unseen event ``accept`` takes, dropping those before it (None after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if accept(event):
                    del self.events[:i + 1]
                    return event
            event = self._read(deadline)
            if event is None:
                return None
            self.events.append(event)

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait until it has loaded (late events of the page before are dropped)."""
        loader = self.send("Page.navigate", url=url)["loaderId"]
        committed = self.wait(lambda e: _named("Page.frameNavigated")(e) and e["params"]["frame"]["loaderId"] == loader)
        assert committed and self.wait(_named("Page.loadEventFired")), f"{url} did not load"

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


def _explain(tmp: Path, images: dict[str, Path], *extra: str) -> Path:
    out = tmp / "out"
    run = subprocess.run([sys.executable, "-m", "camframe", "explain", str(images["chelsea"]), str(images["bus"]),
                          "--model", "resnet18", "--weights", "random", "--classes", "0,1", "--quiet", "--report",
                          "--out", str(out), *extra], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, images) -> Path:
    """``camframe explain --report`` run through the real CLI on a folder of hostile file names."""
    tmp = tmp_path_factory.mktemp("hostile")
    src = tmp / "in"
    src.mkdir()
    Image.open(images["chelsea"]).convert("RGB").resize((96, 64)).save(tmp / "small.jpg")
    for name in HOSTILE:
        shutil.copyfile(tmp / "small.jpg", src / name)
    out = tmp / "out"
    run = subprocess.run([sys.executable, "-m", "camframe", "explain", str(src), "--model", "mobilenet_v2",
                          "--weights", "random", "--quiet", "--report", "--out", str(out)], capture_output=True)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    return out


class _Page(HTMLParser):
    """Tags, attributes, ``<meta>`` policies and ``<h2>`` texts of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.headings: list[str] = []
        self._in_h2 = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_h2 = tag == "h2"
        if self._in_h2:
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_h2 = self._in_h2 and tag != "h2"

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings[-1] += data

    def urls(self) -> list[str]:
        return [v for _, attrs in self.tags for k, v in attrs.items() if k in ("href", "src") and v is not None]


def _shown(name: str) -> str:
    """A name as the page must show it: each byte that is not UTF-8 becomes U+FFFD."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def _cam_files(out: Path) -> set[bytes]:
    manifest = json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    return {os.fsencode(e["files"]["cam"]) for entry in manifest["images"] for e in entry["explanations"]}


def test_report_has_no_script_and_escapes_every_name(hostile):
    page = _Page((hostile / "index.html").read_bytes().decode("utf-8"))  # strict UTF-8: no surrogate got through
    assert {tag for tag, _ in page.tags} <= ALLOWED_TAGS  # no <script>, no injected <img src=x ...> markup
    assert not [k for _, attrs in page.tags for k in attrs if k.startswith("on")]  # no event handler attribute
    policy = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(policy) == 1
    directives = dict(d.strip().split(" ", 1) for d in policy[0].split(";"))
    assert directives["default-src"] == "'none'" and directives["img-src"] == "'self'"
    assert "script-src" not in directives and "unsafe-inline" not in directives["default-src"]
    assert sorted(page.headings) == sorted(_shown(str(hostile.parent / "in" / n)) for n in HOSTILE)


def test_report_urls_are_relative_and_percent_encoded(hostile):
    urls = _Page((hostile / "index.html").read_text()).urls()
    assert len(urls) == 2 * len(HOSTILE)  # each thumbnail and its link
    for url in urls:
        assert re.fullmatch(r"\./[A-Za-z0-9._~%/-]+", url), url  # cannot be javascript:, # or ? stay in the path
        assert os.path.isfile(os.fsencode(hostile) + b"/" + unquote_to_bytes(url[2:])), url
    assert {unquote_to_bytes(u[2:]) for u in urls} == _cam_files(hostile)
    assert os.fsencode("caf\udce9.cam.jpg") in _cam_files(hostile)  # the original bytes, not UTF-8 of U+FFFD


def test_manifest_keeps_non_utf8_names_as_valid_json(hostile):
    manifest = json.loads((hostile / "manifest.json").read_bytes().decode("utf-8"))
    paths = {os.fsencode(e["path"]) for e in manifest["images"]}
    assert paths == {os.fsencode(hostile.parent / "in" / n) for n in HOSTILE}  # round-trips to the real files


@needs_browser
def test_hostile_names_load_and_no_click_runs_script(hostile, browser):
    page = (hostile / "index.html").as_uri()
    browser.open(page)
    thumbs = browser.js("[...document.images].map(i => [i.complete && i.naturalWidth > 0, i.src])")
    assert len(thumbs) == len(HOSTILE) and all(ok for ok, _ in thumbs), thumbs
    links = browser.js("[...document.links].map(a => [a.protocol, a.href === a.querySelector('img').src])")
    assert links == [["file:", True]] * len(HOSTILE)
    blocked = browser.js("new Promise(done => {document.addEventListener('securitypolicyviolation', "
                         "e => done(e.effectiveDirective)); const s = document.createElement('script'); "
                         "s.textContent = 'document.title = 1'; document.head.append(s)})")
    assert blocked == "script-src-elem"  # the policy is in force: an inline script cannot run
    targets = set()
    for i in range(len(HOSTILE)):  # click every link: each opens its picture, none runs a script
        browser.open(page)
        browser.js(f"document.links[{i}].click()")
        event = browser.wait(_named("Page.frameNavigated", "Page.javascriptDialogOpening"))
        assert event and event["method"] == "Page.frameNavigated", event
        url = urlsplit(event["params"]["frame"]["url"])
        assert url.scheme == "file" and not url.query and not url.fragment, url
        targets.add(unquote_to_bytes(url.path))
    assert targets == {os.fsencode(hostile) + b"/" + name for name in _cam_files(hostile)}
    assert not browser.dialogs


@needs_browser
def test_report_shows_every_thumbnail_in_chromium(tmp_path, images, browser):
    out = _explain(tmp_path, images)
    page = out / "index.html"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # opens with no network
    expected = 2 * 2  # two images x two classes
    assert html.count('class="thumb"') == expected
    browser.open(page.as_uri())
    assert browser.js("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length") == expected
    shot = tmp_path / "shot.png"
    run = _browser(page, tmp_path, f"--screenshot={shot}", "--window-size=1100,900")
    assert run.returncode == 0 and shot.is_file(), run.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 10  # not a blank page: the heat maps are drawn
    assert (pixels[..., 0] - pixels[..., 2] > 80).mean() > 0.002  # some red (hot) heat-map pixels on screen


def test_report_lists_every_explanation(tmp_path, images):
    out = _explain(tmp_path, images)
    html = (out / "index.html").read_text()
    for name in ("chelsea.c0-tench.cam.jpg", "chelsea.c1-goldfish.cam.jpg", "bus.c0-tench.cam.jpg",
                 "bus.c1-goldfish.cam.jpg"):
        assert f'src="./{name}"' in html and (out / name).is_file()
    # each figure is captioned with its class, target score and its kind; one the model does not back is marked
    manifest = json.loads((out / "manifest.json").read_text())
    explanations = [e for entry in manifest["images"] for e in entry["explanations"]]
    assert explanations and all(e["supported"] == (e["target_score"] > 0) for e in explanations)  # a classifier's rule
    for e in explanations:
        caption = f"{e['class_name']} · logit {e['target_score']:.3f}"
        caption += "" if e["supported"] else " · NOT SUPPORTED by the model"
        kind = "explanation" if e["supported"] else "explanation unsupported"
        assert re.search(f'<figure class="{kind}"><a href="./{re.escape(e["files"]["cam"])}".*?<figcaption>'
                         f'{re.escape(caption)} ·', html)

"""Open a Snakemake HTML report in Debian's headless chromium: rendered DOM, screenshots, requests.

The Snakemake report is a React app bundled into one HTML file. This module drives it the way a
reader would, without any browser-automation package: it runs ``chromium --headless`` with
``--dump-dom`` (after ``--virtual-time-budget`` lets the app render) or ``--screenshot``, and records
the browser's network log (``--log-net-log``) to list every http(s) request the *page* made (requests
the browser itself makes, with initiator "not an origin", are not the page's).

To look inside the app, :func:`probe_report` renders a copy of the report with a small script
appended that walks the app's own views (``app.showCategory``, ``app.setView``,
``app.showResultInfo``): the landing page, every category, every subcategory and every result (image
results are opened in the content pane), and writes what each view rendered (``innerText``, download
names, images with their decoded size) into a hidden ``<pre id="nvmeta-probe">`` that
``--dump-dom`` returns.

Command line (writes screenshots, prints a summary)::

    python tests/report_browser.py results/report.html --outdir report-shots \
        --view pain/Meta-analysis --result z.png
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
# No network in the sandbox: keep the browser from phoning home and from trying QUIC.
CHROMIUM_FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
PROBE_ID = "nvmeta-probe"


def chromium_flags() -> tuple[str, ...]:
    """:data:`CHROMIUM_FLAGS`, plus ``--no-sandbox`` when running as root (chromium refuses to start
    its sandbox as root: "Running as root without --no-sandbox is not supported")."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return CHROMIUM_FLAGS + (("--no-sandbox",) if root else ())


def find_chromium() -> str | None:
    """Path of Debian's chromium, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium(install: bool = True, timeout: float = 900) -> tuple[str | None, str]:
    """Find chromium; when missing and running as root, ``apt-get install -y chromium``.

    Returns
    -------
    path : str or None
        The chromium executable, None when it is not there and could not be installed.
    reason : str
        Why it could not be had (empty when ``path`` is set).
    """
    path = find_chromium()
    if path or not install:
        return path, "" if path else "chromium is not installed"
    if os.geteuid() != 0:
        return None, "chromium is not installed and this is not root (apt-get install -y chromium)"
    if shutil.which("apt-get") is None:
        return None, "chromium is not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for cmd in (
        ["apt-get", "install", "-y", "-q", "chromium"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium"],
    ):
        proc = subprocess.run(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        log.append(f"$ {' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-1500:]}")
        path = find_chromium()
        if path:
            return path, ""
    return None, "apt-get install -y chromium failed:\n" + "\n".join(log)


@dataclass
class BrowserRun:
    """What one headless chromium run gave."""

    returncode: int
    stdout: str
    stderr: str
    page_requests: list[str] = field(default_factory=list)  # http(s) URLs the page asked for


def _page_requests(netlog: Path) -> list[str]:
    """http(s) URLs whose requests the page started (not chromium's own background requests)."""
    try:
        data = json.loads(netlog.read_text())
    except (OSError, ValueError):
        # chromium may leave the closing brackets out when killed; be lenient
        text = netlog.read_text() if netlog.exists() else ""
        return sorted(
            set(re.findall(r'"initiator":"(?!not an origin)[^"]*"[^{}]*"url":"(https?://[^"]+)"', text))
        )
    names = {v: k for k, v in data.get("constants", {}).get("logEventTypes", {}).items()}
    urls = set()
    for ev in data.get("events", []):
        if names.get(ev.get("type")) != "URL_REQUEST_START_JOB":
            continue
        params = ev.get("params", {})
        url = str(params.get("url", ""))
        if url.startswith(("http://", "https://")) and params.get("initiator") != "not an origin":
            urls.add(url)
    return sorted(urls)


def run_chromium(
    chrome: str, page: Path, *args: str, budget_ms: int = 10000, timeout: float = 180
) -> BrowserRun:
    """Run headless chromium once on ``page`` (fresh profile directory, network log recorded)."""
    with tempfile.TemporaryDirectory(prefix="nvmeta-chromium-") as tmp:
        profile = Path(tmp) / "profile"
        netlog = Path(tmp) / "netlog.json"
        cmd = [
            chrome,
            *chromium_flags(),
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            f"--log-net-log={netlog}",
            *args,
            Path(page).resolve().as_uri(),
        ]
        # Own process group, so that a hung browser is ended with all its helper processes (and only them).
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise RuntimeError(f"chromium did not finish within {timeout} s:\n{err[-3000:]}") from None
        return BrowserRun(proc.returncode, out, err, _page_requests(netlog))


def dump_dom(
    chrome: str, page: Path, budget_ms: int = 10000, size: tuple[int, int] = (1400, 1000)
) -> BrowserRun:
    """The DOM after the page's scripts ran for ``budget_ms`` of virtual time (in ``.stdout``), in a
    ``size`` window."""
    return run_chromium(chrome, page, "--dump-dom", f"--window-size={size[0]},{size[1]}", budget_ms=budget_ms)


def screenshot(
    chrome: str, page: Path, png: Path, size: tuple[int, int] = (1400, 1000), budget_ms: int = 10000
) -> BrowserRun:
    """Screenshot of ``page`` after ``budget_ms`` of virtual time, written to ``png``."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    run = run_chromium(
        chrome, page, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", budget_ms=budget_ms
    )
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot ({run.returncode}):\n{run.stderr[-3000:]}")
    return run


# ---------------------------------------------------------------------------------------------
# Static checks of the HTML file


class _Tags:
    """Tags of an HTML document that make the browser fetch something, and visible text."""

    FETCHING = {
        "script": "src",
        "link": "href",
        "img": "src",
        "iframe": "src",
        "embed": "src",
        "source": "src",
        "video": "src",
        "audio": "src",
        "object": "data",
        "input": "src",
    }

    def __init__(self, text: str):
        from html.parser import HTMLParser

        refs: list[tuple[str, str]] = []
        visible: list[str] = []
        skip = [0]

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                attr = _Tags.FETCHING.get(tag)
                for name, value in attrs:
                    if value and (name == attr or (tag == "link" and name == "href")):
                        refs.append((tag, value))
                if tag in ("script", "style"):
                    skip[0] += 1

            def handle_endtag(self, tag):
                if tag in ("script", "style"):
                    skip[0] = max(0, skip[0] - 1)

            def handle_data(self, data):
                if not skip[0] and data.strip():
                    visible.append(data.strip())

        Parser(convert_charrefs=True).feed(text)
        self.refs = refs
        self.visible = visible


def external_references(html_text: str) -> list[str]:
    """References in ``html_text`` that would make a browser fetch something not embedded in the file:
    ``src``/``href`` of script, link, img, iframe, ... that are not ``data:`` URIs or fragments, and CSS
    ``@import``/``url(...)`` pointing at http(s). (Plain ``<a href>`` links are not fetched and not listed.)"""
    out = [
        f"<{tag}> {ref}" for tag, ref in _Tags(html_text).refs if not ref.startswith(("data:", "#", "blob:"))
    ]
    for m in re.finditer(
        r"""@import\s+(?:url\()?\s*['"]?(https?:[^'")\s]+)|url\(\s*['"]?(https?:[^'")\s]+)""", html_text
    ):
        out.append(f"css {m.group(1) or m.group(2)}")
    return out


def visible_text(html_text: str) -> list[str]:
    """Text nodes outside ``<script>``/``<style>`` (what a reader sees of a dumped DOM)."""
    return _Tags(html_text).visible


# ---------------------------------------------------------------------------------------------
# Colour contrast (WCAG 2)


def parse_css_color(text: str) -> tuple[float, float, float, float]:
    """``rgb(r, g, b)`` / ``rgba(r, g, b, a)`` (as ``getComputedStyle`` returns them) -> (r, g, b, a)."""
    m = re.fullmatch(r"\s*rgba?\(([^)]*)\)\s*", text)
    if not m:
        raise ValueError(f"not an rgb()/rgba() colour: {text!r}")
    parts = [float(x) for x in re.split(r"[,\s/]+", m.group(1).strip()) if x]
    return (*parts[:3], parts[3] if len(parts) > 3 else 1.0)


def composite(layers: list[str], base: tuple[float, float, float] = (255.0, 255.0, 255.0)):
    """The opaque colour seen through ``layers`` (outermost first) over ``base`` (the white page)."""
    out = base
    for layer in layers:
        r, g, b, a = parse_css_color(layer)
        out = tuple(a * c + (1 - a) * o for c, o in zip((r, g, b), out, strict=True))
    return out


def relative_luminance(rgb: tuple[float, float, float]) -> float:
    def lin(c: float) -> float:
        c /= 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(fg: tuple[float, float, float], bg: tuple[float, float, float]) -> float:
    """WCAG 2 contrast ratio (1 to 21) of two opaque colours."""
    hi, lo = sorted((relative_luminance(fg), relative_luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def nav_contrasts(view: dict) -> list[tuple[str, float]]:
    """(text, contrast ratio) of every text in the navigation of a probed view (text colour composited
    over its backgrounds, those over the white page)."""
    out = []
    for t in view.get("nav_text", []):
        bg = composite(list(reversed(t["backgrounds"])))
        fg = composite([t["color"]], base=bg)
        out.append((t["text"], contrast_ratio(fg, bg)))
    return out


# ---------------------------------------------------------------------------------------------
# Walking the report app

_PROBE_JS = r"""
<script>
(function () {
  var out = {views: [], errors: [], finished: false};
  window.addEventListener("error", function (ev) { out.errors.push(String(ev.message)); });
  function snap(kind, extra) {
    var root = document.querySelector("#app");
    var view = {kind: kind, text: root ? root.innerText : "",
      downloads: root ? Array.from(root.querySelectorAll("a[download]")).map(function (a) {
        return a.getAttribute("download"); }) : [],
      images: root ? Array.from(root.querySelectorAll("img")).map(function (i) {
        return {width: i.naturalWidth, height: i.naturalHeight, embedded: i.src.indexOf("data:") === 0}; }) : [],
      iframes: root ? Array.from(root.querySelectorAll("iframe")).map(function (f) {
        return {embedded: f.src.indexOf("data:") === 0, length: f.src.length}; }) : []};
    // Where the content pane's content starts once scrolled to the top: negative = cut off out of reach.
    var pane = root ? root.querySelector("div.h-screen.overflow-auto") : null;
    if (pane && pane.firstElementChild) {
      pane.scrollTop = 0;
      pane.scrollLeft = 0;
      var a = pane.getBoundingClientRect(), b = pane.firstElementChild.getBoundingClientRect();
      view.content_offset = {top: b.top - a.top, left: b.left - a.left, pane_height: pane.clientHeight,
                             content_height: b.height};
    }
    // Text colours in the navigation, each with the backgrounds behind it (innermost first, up to the
    // nav itself), so that the reader's contrast can be computed.
    var nav = root ? root.querySelector("nav") : null;
    if (nav) {
      view.nav_text = [];
      Array.from(nav.querySelectorAll("*")).forEach(function (el) {
        var own = Array.from(el.childNodes).filter(function (n) {
          return n.nodeType === 3 && n.textContent.trim(); }).map(function (n) { return n.textContent.trim(); });
        if (!own.length || el.offsetParent === null) { return; }
        var bgs = [];
        for (var a = el; a; a = a.parentElement) {
          bgs.push(getComputedStyle(a).backgroundColor);
          if (a === nav) { break; }
        }
        view.nav_text.push({text: own.join(" ").slice(0, 40), color: getComputedStyle(el).color, backgrounds: bgs});
      });
    }
    for (var k in extra) { view[k] = extra[k]; }
    out.views.push(view);
  }
  function publish() {
    out.finished = true;
    var pre = document.getElementById("__PROBE_ID__") || document.createElement("pre");
    pre.id = "__PROBE_ID__";
    pre.style.display = "none";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  var steps = [function () { snap("landing", {}); }];
  var finalView = __FINAL_VIEW__;
  function openResult(path) {
    // one setView: the app's setView merges into this.state, so two calls in a row would lose the first
    var r = results[path];
    if (r.mime_type && r.mime_type.indexOf("image/") === 0) {
      app.setView({navbarMode: "resultinfo", content: "img", contentPath: r.data_uri, resultPath: path});
    } else if (r.mime_type === "text/html") {
      app.setView({navbarMode: "resultinfo", content: "html", contentPath: r.data_uri, resultPath: path});
    } else {
      app.showResultInfo(path);
    }
  }
  if (finalView === null) {
    Object.keys(categories).forEach(function (c) {
      steps.push(function () { app.showCategory(c); });
      steps.push(function () { snap("category", {category: c}); });
      Object.keys(categories[c]).forEach(function (s) {
        // back through the category view, as a reader clicking the breadcrumbs does (the app keeps a
        // subcategory table's rows in component state, so subcategory -> subcategory would show stale rows)
        steps.push(function () { app.showCategory(c); });
        steps.push(function () { app.setView({navbarMode: "subcategory", category: c, subcategory: s}); });
        steps.push(function () { snap("subcategory", {category: c, subcategory: s}); });
        categories[c][s].forEach(function (p) {
          steps.push(function () { openResult(p); });
          steps.push(function () {
            snap("result", {category: c, subcategory: s, path: p, name: results[p].name,
                            mime: results[p].mime_type, labels: results[p].labels}); });
        });
      });
    });
  } else {
    steps.push(function () {
      if (finalView.subcategory) {
        app.setView({navbarMode: "subcategory", category: finalView.category, subcategory: finalView.subcategory});
      } else {
        app.showCategory(finalView.category);
      }
    });
    if (finalView.result) {
      steps.push(function () {
        var paths = categories[finalView.category][finalView.subcategory];
        var hit = paths.filter(function (p) {
          return results[p].name === finalView.result || p.endsWith("/" + finalView.result);
        })[0] || paths[0];
        var r = results[hit];
        if (r.mime_type && r.mime_type.indexOf("image/") === 0) {
          app.setView({content: "img", contentPath: r.data_uri, resultPath: hit});
        } else if (r.mime_type === "text/html") {
          app.setView({content: "html", contentPath: r.data_uri, resultPath: hit});
        }
      });
    }
    steps.push(function () { snap("final", finalView); });
  }
  var i = 0;
  function next() {
    try { steps[i](); } catch (e) { out.errors.push("step " + i + ": " + String(e)); }
    i += 1;
    if (i < steps.length) { setTimeout(next, __STEP_MS__); } else { publish(); }
  }
  window.addEventListener("load", function () { setTimeout(next, 300); });
})();
</script>
"""


def _probe_copy(report: Path, dest: Path, final_view: dict | None, step_ms: int) -> Path:
    text = Path(report).read_text(encoding="utf-8")
    js = (
        _PROBE_JS.replace("__PROBE_ID__", PROBE_ID)
        .replace("__STEP_MS__", str(int(step_ms)))
        .replace("__FINAL_VIEW__", json.dumps(final_view))
    )
    at = text.rfind("</body>")
    if at < 0:
        raise ValueError(f"{report}: no </body>")
    dest.write_text(text[:at] + js + text[at:], encoding="utf-8")
    return dest


def _read_probe(dom: str) -> dict:
    m = re.search(rf'<pre id="{PROBE_ID}"[^>]*>(.*?)</pre>', dom, flags=re.S)
    if m is None:
        raise RuntimeError("the report app did not finish the probe walk (no probe output in the DOM)")
    return json.loads(html.unescape(m.group(1)))


def probe_report(chrome: str, report: Path, step_ms: int = 60, budget_ms: int | None = None) -> dict:
    """Walk every view of the report app in headless chromium; see the module docstring.

    Returns
    -------
    dict
        ``views`` (list of dicts with ``kind`` landing|category|subcategory|result, ``text``,
        ``downloads``, ``images`` and, for results, ``category``, ``subcategory``, ``path``, ``name``,
        ``mime``, ``labels``), ``errors`` (JavaScript errors), ``page_requests`` (http(s) URLs).
    """
    text = Path(report).read_text(encoding="utf-8")
    m = re.search(r"var categories = (\{.*?\});\s*</script>", text, flags=re.S)
    n_steps = 10
    if m:
        cats = json.loads(m.group(1))
        n_steps += sum(2 + sum(3 + 2 * len(p) for p in subs.values()) for subs in cats.values())
    budget = budget_ms or max(10000, 1000 + n_steps * step_ms * 2)
    with tempfile.TemporaryDirectory(prefix="nvmeta-probe-") as tmp:
        page = _probe_copy(Path(report), Path(tmp) / "report.html", None, step_ms)
        run = dump_dom(chrome, page, budget_ms=budget)
    probe = _read_probe(run.stdout)
    probe["page_requests"] = run.page_requests
    return probe


def screenshot_view(
    chrome: str,
    report: Path,
    png: Path,
    category: str,
    subcategory: str | None,
    result: str | None = None,
    size: tuple[int, int] = (1400, 1000),
) -> dict:
    """Screenshot of the report with ``category``/``subcategory`` open in the navigation (only the
    category, listing its subcategories, when ``subcategory`` is None) and, if
    given, the image or HTML result named ``result`` (a file name such as ``z.png``, or the end of its path such as
    ``stouffer/z.png``) shown in the content pane."""
    if result and not subcategory:
        raise ValueError("a result is shown from its subcategory: give the subcategory too")
    view = {"category": category, "subcategory": subcategory, "result": result}
    with tempfile.TemporaryDirectory(prefix="nvmeta-view-") as tmp:
        page = _probe_copy(Path(report), Path(tmp) / "report.html", view, 200)
        screenshot(chrome, page, png, size=size)
        run = dump_dom(chrome, page)
    probe = _read_probe(run.stdout)
    probe["page_requests"] = run.page_requests
    return probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--outdir", type=Path, default=Path("report-shots"))
    ap.add_argument(
        "--view",
        default=None,
        help="analysis (category) or category/subcategory to screenshot, e.g. pain or pain/Meta-analysis",
    )
    ap.add_argument("--result", default=None, help="image result of that view to show, e.g. z.png")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install chromium when missing")
    args = ap.parse_args(argv)
    chrome, reason = ensure_chromium(install=not args.no_install)
    if chrome is None:
        print(reason)
        return 2
    text = args.report.read_text(encoding="utf-8")
    print("external references:", external_references(text) or "none")
    landing = args.outdir / "landing.png"
    run = screenshot(chrome, args.report, landing)
    print("landing screenshot:", landing.resolve(), "page requests:", run.page_requests or "none")
    probe = probe_report(chrome, args.report)
    print("javascript errors:", probe["errors"] or "none", "page requests:", probe["page_requests"] or "none")
    for v in probe["views"]:
        where = "/".join(x for x in (v.get("category"), v.get("subcategory"), v.get("name")) if x)
        imgs = ", ".join(f"{i['width']}x{i['height']}" for i in v["images"])
        print(
            f"{v['kind']:12s} {where:55s} images: {imgs or '-'}  downloads: {', '.join(v['downloads']) or '-'}"
        )
    if args.view:
        category, _, subcategory = args.view.partition("/")
        png = args.outdir / "_".join(x for x in (category, subcategory) if x).replace(" ", "_")
        png = png.with_suffix(".png")
        if not subcategory and args.result:
            print("--result needs --view category/subcategory")
            return 2
        screenshot_view(chrome, args.report, png, category, subcategory or None, args.result)
        print("view screenshot:", png.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The built book, opened page by page in a real browser (headless Chromium, driven
by Playwright), works offline and as a reader sees it.

The session's build (tests/conftest.py) is served on 127.0.0.1 (a free port), and
every page of it is opened once. The tests below then check, over all pages:

- no JavaScript error (uncaught exceptions and console errors) and no failed or
  404 request;
- no request to any host but 127.0.0.1 (the browser aborts them all);
- every equation rendered by MathJax, no error, no TeX left raw in the text;
- every image loaded;
- every exercise solution (its code and its explanation) collapsed, and opened by a click on the
  toggle button of its title; one solution per exercise;
- the "next" links, followed from index.html, reach every page of _toc.yml in order;
- every image has alternative text, none empty or a file name;
- no page is wider than a 360 px screen (tables and equations scroll in their own box);
- axe-core finds no accessibility violation, in light and in dark mode;
- the navigation buttons work: at 390 and 800 px the menu button opens the chapter list
  (and Escape closes it) and the "Contents" button the page's contents; at 1280 px the
  menu button collapses and restores the sidebar.

A full-page screenshot of each page at 1280 px and at 390 px (and of each chapter
with its solutions open) is saved to the folder named by BNKIT_ARTIFACTS, by default
_build/screenshots/.

Needs Chromium: Debian's `chromium` package (`apt-get install chromium`), or any
Chromium/Chrome binary named by BNKIT_CHROMIUM. Without one, the tests are
skipped, except where CI=true, where they fail (so CI cannot pass without them).
The accessibility tests also need axe-core, pinned in tools/axe/package-lock.json and
installed by `make venv` (`npm ci`); without it they are skipped, or fail under CI=true.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from notebooks import toc_files, toc_notebooks  # noqa: E402

HOST = "127.0.0.1"
ARTIFACTS = Path(os.environ.get("BNKIT_ARTIFACTS") or REPO / "_build" / "screenshots")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
PAGE_TIMEOUT_MS = 60_000
AXE = REPO / "tools" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
PHONE, SMALL_PHONE, TABLET, DESKTOP = 390, 360, 800, 1280  # viewport widths, px
NAV_PAGE = "chapters/03_ewa.html"  # the page whose navigation buttons are tried
HOW_TO_ENABLE = (
    "install Chromium (Debian/Ubuntu: `apt-get install --no-install-recommends chromium`) "
    "or set BNKIT_CHROMIUM=/path/to/chromium, and `pip install -r requirements.txt` (playwright)"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_chromium() -> str | None:
    """BNKIT_CHROMIUM if set (an empty or wrong path means: no browser), else the first
    Chromium or Chrome on PATH or at Debian's path."""
    if "BNKIT_CHROMIUM" in os.environ:
        path = os.environ["BNKIT_CHROMIUM"]
        return path if path and os.access(path, os.X_OK) and Path(path).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def skip_or_fail(reason: str):
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the browser tests must run in CI; {HOW_TO_ENABLE})")
    pytest.skip(f"{reason}: to run the browser tests, {HOW_TO_ENABLE}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser's path; skips (fails under CI=true) where there is none. Used by
    every test of this file before anything else (pytestmark below), so that a
    machine without a browser does not build the book for nothing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("the Python package playwright is not installed")
    path = find_chromium()
    if path is None:
        skip_or_fail("no Chromium found")
    return path


pytestmark = pytest.mark.usefixtures("chromium")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on stderr
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A browser closing a connection early (page closed mid-download) is no error."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server(chromium, html):
    handler = functools.partial(QuietHandler, directory=str(html))
    httpd = Server((HOST, 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Visit:
    """What one page showed."""
    name: str
    errors: list[str] = field(default_factory=list)  # JS exceptions, console errors, failed requests
    foreign: list[str] = field(default_factory=list)  # requests to other hosts (aborted)
    math: dict = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # images that did not load
    solutions: list[str] = field(default_factory=list)  # solution problems
    n_solutions: int = 0
    n_exercises: int = 0
    alt: list[str] = field(default_factory=list)  # images with no meaningful alternative text
    too_wide: list[str] = field(default_factory=list)  # what sticks out of a 360 px screen
    axe: dict = field(default_factory=dict)  # colour mode -> axe's violations (None: no axe)


# In the page, once loaded: let MathJax finish, make lazy images load, wait for them all.
SETTLE_JS = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const imgs = Array.from(document.images);
  for (const img of imgs) { img.loading = 'eager'; }
  await Promise.all(imgs.map(img => img.complete ? null :
      new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done); })));
}"""

MATH_JS = r"""() => {
  const math = Array.from(document.querySelectorAll('.math'));
  const unrendered = math.filter(el => !el.querySelector('mjx-container')).map(el => el.textContent.trim().slice(0, 80));
  const merrors = Array.from(document.querySelectorAll('mjx-merror')).map(el => el.getAttribute('data-mjx-error') || el.textContent);
  // The text a reader sees, without code (which may hold $ or \( legitimately) and rendered math.
  const main = (document.querySelector('main') || document.body).cloneNode(true);
  main.querySelectorAll('pre, code, mjx-container, script, style, .highlight, textarea').forEach(el => el.remove());
  const text = main.textContent;
  const raw = [];
  for (const re of [/\$\$/, /\\\(/, /\\\)/, /\\\[/, /\\\]/, /\\begin\{/, /\$[^$\s][^$]*\\[A-Za-z]+[^$]*\$/]) {
    const m = text.match(re);
    if (m) raw.push(text.slice(Math.max(0, m.index - 40), m.index + 60).replace(/\s+/g, ' '));
  }
  return {count: math.length, rendered: document.querySelectorAll('mjx-container').length,
          mathjax: !!(window.MathJax && MathJax.startup), unrendered, merrors, raw};
}"""

IMAGES_JS = """() => Array.from(document.images)
  .filter(img => !(img.complete && img.naturalWidth > 0))
  .map(img => img.currentSrc || img.src)"""

# Whether any of a solution's content (all but its title) can be seen.
VISIBLE_JS = """el => Array.from(el.children).filter(c => !c.classList.contains('admonition-title'))
  .some(c => c.getBoundingClientRect().height > 0 && getComputedStyle(c).visibility !== 'hidden'
             && Number(getComputedStyle(c).opacity) > 0)"""


# Images whose alternative text is missing, empty, or a file name / path (what Sphinx writes
# when a figure has none). Purely decorative images would need alt="" and role="presentation";
# the book has none.
ALT_JS = r"""() => Array.from(document.images)
  .filter(img => { const alt = (img.getAttribute('alt') || '').trim();
                   return !alt || /^[^\s]*\.(png|jpe?g|svg|gif|webp)$/i.test(alt) || alt.includes('_images/'); })
  .map(img => `${img.getAttribute('src')} (alt=${JSON.stringify(img.getAttribute('alt'))})`)"""

# Is the page wider than the window? Then: the innermost elements that stick out on the right
# (their own parents fit), as "tag.class: right edge", for the message.
TOO_WIDE_JS = r"""async () => {
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  const width = window.innerWidth;
  if (Math.max(document.documentElement.scrollWidth, document.body.scrollWidth) <= width) return [];
  const clips = el => ['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(el).overflowX);
  const out = el => el.getBoundingClientRect().right > width + 1
      && !(el.parentElement && el.parentElement.closest && (() => {  // clipped by a box that fits
        for (let a = el.parentElement; a && a !== document.body; a = a.parentElement)
          if (clips(a) && a.getBoundingClientRect().right <= width + 1) return true;
        return false; })());
  const culprits = Array.from(document.body.querySelectorAll('*')).filter(el => out(el)
      && el.getClientRects().length && !Array.from(el.children).some(out));
  const name = el => el.tagName.toLowerCase() + (el.className && typeof el.className === 'string'
      ? '.' + el.className.trim().split(/\s+/).join('.') : '');
  return [`page ${document.documentElement.scrollWidth} px wide in a ${width} px window`,
          ...culprits.slice(0, 5).map(el => `${name(el)} reaches ${Math.round(el.getBoundingClientRect().right)} px: `
                                            + JSON.stringify(el.textContent.trim().slice(0, 60)))];
}"""

# axe-core's violations on the page, as plain data (rule, impact, number of nodes, first targets).
AXE_JS = """async () => {
  const result = await axe.run(document, {resultTypes: ['violations']});
  return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help, n: v.nodes.length,
                                      targets: v.nodes.slice(0, 3).map(n => n.target.join(' '))}));
}"""


def _axe_both_modes(page) -> dict:
    """{"light": violations, "dark": violations}: the theme's colour mode is switched the
    way its own switch does it (data-theme on <html>), then set back to light."""
    page.add_script_tag(path=str(AXE))
    found = {}
    for mode in ("light", "dark"):
        page.evaluate("mode => { document.documentElement.dataset.theme = mode; }", mode)
        found[mode] = page.evaluate(AXE_JS)
    page.evaluate("() => { document.documentElement.dataset.theme = 'light'; }")
    return found


REFRESH = re.compile(r"""<meta[^>]*http-equiv=["']refresh["'][^>]*url=([^"';]+)""", re.I)


def _visit(page, base: str, name: str, html: Path, screenshots: Path, axe: bool) -> Visit:
    visit = Visit(name)
    page.on("pageerror", lambda exc: visit.errors.append(f"uncaught exception: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and visit.errors.append(f"console error: {msg.text}"))
    page.on("requestfailed", lambda req: urlsplit(req.url).hostname == HOST
            and visit.errors.append(f"request failed: {req.url} ({req.failure})"))
    page.on("response", lambda res: res.status >= 400
            and visit.errors.append(f"HTTP {res.status}: {res.url}"))
    page.goto(f"{base}/{name}", wait_until="load", timeout=PAGE_TIMEOUT_MS)
    if redirect := REFRESH.search((html / name).read_text(encoding="utf-8")):  # index.html
        target = urljoin(f"{base}/{name}", redirect[1].strip())
        page.wait_for_url(target, wait_until="load", timeout=PAGE_TIMEOUT_MS)
    page.evaluate(SETTLE_JS)
    page.wait_for_load_state("networkidle", timeout=PAGE_TIMEOUT_MS)
    visit.math = page.evaluate(MATH_JS)
    visit.images = page.evaluate(IMAGES_JS)
    shot = screenshots / (name.replace("/", "__").removesuffix(".html") + ".png")
    page.screenshot(path=str(shot), full_page=True)

    solutions = page.query_selector_all("div.solution")
    visit.n_solutions = len(solutions)
    visit.n_exercises = len(page.query_selector_all("div.exercise"))
    for sol in solutions:
        label = sol.get_attribute("id") or "a solution"
        if sol.query_selector("div.cell div.cell_input pre") is None:  # the gated solution holds the code cell
            visit.solutions.append(f"{label} holds no solution code")
        if sol.evaluate(VISIBLE_JS):
            visit.solutions.append(f"{label} is open before any click")
            continue
        # The toggle button in the title (a click on the title's link to the
        # exercise goes to the exercise instead, as a link should).
        button = sol.query_selector(".admonition-title .toggle-button")
        if button is None:
            visit.solutions.append(f"{label} has no toggle button in its title")
            continue
        button.scroll_into_view_if_needed()
        button.click()
        try:
            page.wait_for_function(f"el => ({VISIBLE_JS})(el)", arg=sol, timeout=5_000)
        except Exception:
            visit.solutions.append(f"{label} does not open on a click on its toggle button")
    if solutions:
        page.screenshot(path=str(shot.with_name(shot.stem + "--solutions-open.png")), full_page=True)

    visit.alt = page.evaluate(ALT_JS)
    visit.axe = _axe_both_modes(page) if axe else None
    page.set_viewport_size({"width": SMALL_PHONE, "height": 800})
    visit.too_wide = page.evaluate(TOO_WIDE_JS)
    page.set_viewport_size({"width": PHONE, "height": 844})
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    page.screenshot(path=str(shot.with_name(f"{shot.stem}--{PHONE}px.png")), full_page=True)
    return visit


def _visible(page, selector: str) -> bool:
    return page.locator(selector).first.is_visible()


def _try_navigation(context, base: str) -> list[str]:
    """What goes wrong when a reader uses the navigation buttons of NAV_PAGE (empty: nothing)."""
    problems = []
    page = context.new_page()
    chapters = "dialog[open] nav.bd-docs-nav a.reference.internal"
    contents = "dialog[open] #pst-page-toc-nav a"
    try:
        for width in (PHONE, TABLET):
            page.set_viewport_size({"width": width, "height": 844})
            page.goto(f"{base}/{NAV_PAGE}", wait_until="load", timeout=PAGE_TIMEOUT_MS)
            page.locator(".primary-toggle:visible").first.click()
            links = page.locator(chapters)
            shown = sum(links.nth(i).is_visible() for i in range(links.count()))
            if shown < len(toc_files()):
                problems.append(f"{width} px: the menu button shows {shown} chapter links, "
                                f"expected the {len(toc_files())} of _toc.yml")
            page.keyboard.press("Escape")
            try:
                page.wait_for_function("() => !document.querySelector('dialog[open]')", timeout=5_000)
            except Exception:
                problems.append(f"{width} px: Escape does not close the chapter list")
            page.locator(".secondary-toggle:visible").first.click()
            if not _visible(page, contents):
                problems.append(f"{width} px: the Contents button does not show the page's contents")
            page.keyboard.press("Escape")
        page.set_viewport_size({"width": DESKTOP, "height": 900})
        page.goto(f"{base}/{NAV_PAGE}", wait_until="load", timeout=PAGE_TIMEOUT_MS)
        shown = "() => !document.querySelector('#pst-primary-sidebar').classList.contains('pst-sidebar-hidden')"
        for click, expected in ((0, True), (1, False), (2, True)):
            try:  # the theme hides the sidebar by this class (and a transition)
                page.wait_for_function(shown if expected else f"() => !({shown})()", timeout=5_000)
            except Exception:
                problems.append(f"{DESKTOP} px: after {click} click(s) on the menu button the sidebar is "
                                f"{'hidden' if expected else 'still shown'}")
            if click < 2:
                page.locator(".primary-toggle:visible").first.click()
    finally:
        page.close()
    return problems


@pytest.fixture(scope="module")
def browse(chromium, server, html) -> tuple[dict[str, Visit], list[str], list[str]]:
    """Open every page of the build once, then follow the "next" links from
    index.html, then try the navigation buttons: ({page path: what it showed},
    [the pages reached, in order], [what went wrong with the navigation])."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    names = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                   if "_static" not in p.relative_to(html).parts)
    results: dict[str, Visit] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
            foreign: list[str] = []

            def route(r):
                if urlsplit(r.request.url).hostname == HOST:
                    r.continue_()
                else:
                    foreign.append(r.request.url)
                    r.abort()

            context.route("**/*", route)
            for name in names:
                page = context.new_page()
                try:
                    results[name] = _visit(page, server, name, html, ARTIFACTS, AXE.is_file())
                    results[name].foreign = list(foreign)
                    foreign.clear()
                finally:
                    page.close()
            reached = _follow_next(context, server)
            navigation = _try_navigation(context, server)
        finally:
            browser.close()
    return results, reached, navigation


@pytest.fixture(scope="module")
def visits(browse) -> dict[str, Visit]:
    return browse[0]


def _follow_next(context, base: str) -> list[str]:
    """The pages reached from index.html by the "next" links, in order (as paths)."""
    page = context.new_page()
    reached = []
    try:
        page.goto(f"{base}/index.html", wait_until="load", timeout=PAGE_TIMEOUT_MS)
        page.wait_for_url(re.compile(r".*/chapters/.*\.html"), timeout=PAGE_TIMEOUT_MS)  # the redirect
        while True:
            path = urlsplit(page.url).path.lstrip("/")
            if path in reached or len(reached) > 200:
                break
            reached.append(path)
            nxt = page.query_selector("a.right-next")
            if nxt is None:
                break
            with page.expect_navigation(wait_until="load", timeout=PAGE_TIMEOUT_MS):
                nxt.click()
    finally:
        page.close()
    return reached


def test_every_page_was_opened(visits):
    opened = set(visits)
    for source in toc_files():
        assert source.relative_to(REPO).with_suffix(".html").as_posix() in opened
    assert {"index.html", "search.html", "genindex.html"} <= opened
    assert len(list(ARTIFACTS.glob("*.png"))) >= len(opened)


def test_no_javascript_errors(visits):
    problems = [f"{v.name}: {e}" for v in visits.values() for e in v.errors]
    assert not problems, "\n".join(problems)


def test_nothing_is_fetched_from_another_host(visits):
    problems = [f"{v.name}: {u}" for v in visits.values() for u in v.foreign]
    assert not problems, "requests to hosts other than 127.0.0.1 (aborted):\n" + "\n".join(problems)


def test_every_equation_is_rendered(visits):
    problems, total = [], 0
    for v in visits.values():
        m = v.math
        total += m["count"]
        if m["count"] and not m["mathjax"]:
            problems.append(f"{v.name}: {m['count']} equations but MathJax did not start")
        problems += [f"{v.name}: not rendered: {t!r}" for t in m["unrendered"]]
        problems += [f"{v.name}: MathJax error: {t!r}" for t in m["merrors"]]
        problems += [f"{v.name}: raw TeX in the text: ...{t!r}..." for t in m["raw"]]
    assert total > 0, "no equation found in the whole book"
    assert not problems, "\n".join(problems)


def test_every_image_is_loaded(visits):
    problems = [f"{v.name}: {src}" for v in visits.values() for src in v.images]
    assert not problems, "images that did not load:\n" + "\n".join(problems)


def test_solutions_are_collapsed_and_open_on_click(visits):
    problems = [f"{v.name}: {p}" for v in visits.values() for p in v.solutions]
    assert not problems, "\n".join(problems)
    for nb in toc_notebooks():
        source = nb.read_text(encoding="utf-8")
        if "{solution-start}" in source or "{solution}" in source:
            name = nb.relative_to(REPO).with_suffix(".html").as_posix()
            assert visits[name].n_solutions > 0, f"{name}: the chapter has solutions but none was found on the page"
            assert visits[name].n_solutions == visits[name].n_exercises, f"{name}: not one solution per exercise"


def test_next_links_reach_every_chapter_in_order(browse):
    reached = browse[1]
    expected = [p.relative_to(REPO).with_suffix(".html").as_posix() for p in toc_files()]
    assert reached == expected, f"following 'next' from index.html reached {reached}, expected {expected}"


def test_every_image_has_alternative_text(visits):
    problems = [f"{v.name}: {img}" for v in visits.values() for img in v.alt]
    assert not problems, ("images with no alternative text, or a file name as text (give the "
                          "notebook cell `mystnb: image: alt:` metadata):\n" + "\n".join(problems))


def test_no_page_is_wider_than_a_phone(visits):
    problems = [f"{v.name}: {p}" for v in visits.values() for p in v.too_wide]
    assert not problems, f"pages wider than a {SMALL_PHONE} px screen:\n" + "\n".join(problems)


def _axe_violations(visits, impacts: set[str]) -> list[str]:
    if not AXE.is_file():
        skip_or_fail(f"axe-core is not installed at {AXE.relative_to(REPO)} (run `make venv`)")
    return [f"{v.name} ({mode}): {x['impact']} {x['id']} ({x['help']}), {x['n']} node(s): {x['targets']}"
            for v in visits.values() for mode, found in v.axe.items()
            for x in found if x["impact"] in impacts]


def test_axe_finds_no_critical_or_serious_violation(visits):
    problems = _axe_violations(visits, {"critical", "serious"})
    assert not problems, "\n".join(problems)


def test_axe_finds_no_moderate_or_minor_violation(visits):
    problems = _axe_violations(visits, {"moderate", "minor"})
    assert not problems, "\n".join(problems)


def test_navigation_buttons_open_and_close_the_sidebars(browse):
    assert not browse[2], "\n".join(browse[2])

"""The status page as HTTP: content negotiation at /, the fixed /status, the assets in the package, the
headers (security policy, caching, Vary), and that nothing in it points anywhere but this admin port."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import orjson
import pytest

from proxy.admin.page import CSP, FILES, asset, none_match, prefers_html, quality
from tests.conftest import ProxyFactory
from tests.helpers import fetch

REPO = Path(__file__).resolve().parents[2]
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ([], False),  # no Accept: JSON, as before
        (["*/*"], False),  # curl
        (["application/json"], False),
        ([BROWSER_ACCEPT], True),  # Chromium and Firefox navigating
        (["text/html"], True),
        (["text/*"], True),
        (["text/html;q=0.5, application/json"], False),
        (["application/json;q=0.4, text/html;q=0.6"], True),
        (["text/html;q=0", "*/*"], False),  # two field lines count as one list
        (["text/html, application/json"], False),  # a tie keeps the JSON
        (["image/png"], False),  # neither: the JSON (the field may be ignored, RFC 9110 12.5.1)
        (["text/html;q=x"], False),  # a malformed q leaves the range out
        (["garbage, ,;q=1"], False),
    ],
)
def test_negotiation(accept: list[str], html: bool) -> None:
    assert prefers_html(accept) is html


def test_the_most_specific_range_gives_the_q() -> None:
    assert quality(["*/*;q=0.1, text/*;q=0.5, text/html;q=0.9"], "text/html") == 0.9
    assert quality(["*/*;q=0.1, text/*;q=0.5"], "text/html") == 0.5
    assert quality(["*/*;q=0.1"], "application/json") == 0.1
    assert quality(["text/plain"], "application/json") == 0.0


async def test_a_browser_gets_the_page_and_curl_the_json(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    page = await fetch(app.admin_address, "/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status == 200
    assert page.header("content-type") == "text/html; charset=utf-8"
    assert page.header("vary") == "Accept"
    assert page.header("content-security-policy") == CSP and "default-src 'self'" in CSP
    assert page.header("x-content-type-options") == "nosniff"
    assert page.header("cache-control") == "no-cache"
    assert b"<title>infermon status</title>" in page.body
    for accept in (None, "*/*", "application/json"):
        resp = await fetch(app.admin_address, "/", headers={"Accept": accept} if accept else None)
        assert resp.status == 200 and resp.header("content-type") == "application/json", accept
        assert resp.header("vary") == "Accept"
        assert "/timeseries" in orjson.loads(resp.body)["endpoints"]
    # /status is the page whatever Accept says
    fixed = await fetch(app.admin_address, "/status", headers={"Accept": "application/json"})
    assert fixed.status == 200 and fixed.body == page.body


async def test_assets_revalidate_with_etags(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    for name, ctype in FILES.items():
        resp = await fetch(app.admin_address, f"/static/{name}")
        assert resp.status == 200, name
        assert resp.header("content-type") == f"{ctype}; charset=utf-8"
        etag = resp.header("etag")
        assert etag is not None and resp.header("cache-control") == "no-cache"
        again = await fetch(app.admin_address, f"/static/{name}", headers={"If-None-Match": etag})
        assert again.status == 304 and again.body == b""
    assert (await fetch(app.admin_address, "/favicon.ico")).header("content-type") == "image/svg+xml; charset=utf-8"


def test_if_none_match_compares_weakly_and_takes_lists_and_the_star() -> None:
    """RFC 9110 13.1.2: If-None-Match uses the weak comparison, holds a list (over several field lines
    too), and ``*`` matches any current representation."""
    etag = '"abc"'
    assert none_match([etag], etag)
    assert none_match(['W/"abc"'], etag)  # what a cache that compressed the answer sends back
    assert none_match(['"x", W/"abc"'], etag)
    assert none_match(['"x",,  "abc" '], etag)  # empty list elements are allowed (RFC 9110 5.6.1)
    assert none_match(['"x"', '"abc"'], etag)
    assert none_match(["*"], etag)
    assert not none_match([], etag)
    assert not none_match(['"abcd"', 'W/"ab"'], etag)
    assert not none_match(["abc"], etag)  # not quoted: no entity-tag


async def test_the_page_revalidates_with_a_weak_etag_at_the_root(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream)
    _, etag = asset("index.html")
    for inm in (f"W/{etag}", f'"other", {etag}', "*"):
        resp = await fetch(app.admin_address, "/", headers={"Accept": BROWSER_ACCEPT, "If-None-Match": inm})
        assert resp.status == 304, inm
        assert resp.header("etag") == etag and resp.header("vary") == "Accept"
    # the JSON at / is not the page: a page's tag does not make it a 304
    resp = await fetch(app.admin_address, "/", headers={"Accept": "application/json", "If-None-Match": etag})
    assert resp.status == 200 and resp.header("content-type") == "application/json"
    missing = await fetch(app.admin_address, "/static/../server.py")
    assert missing.status == 404
    assert (await fetch(app.admin_address, "/static/other.js")).status == 404


async def test_the_page_needs_no_token(make_proxy: ProxyFactory, upstream: str) -> None:
    token = "0123456789abcdef-status"
    app = await make_proxy(upstream, admin={"token": token})
    for path in ("/status", "/static/status.js", "/timeseries", "/gpu", "/drift", "/quality"):
        resp = await fetch(app.admin_address, path)
        assert resp.status == 200, path
        assert token.encode() not in resp.body


def test_assets_ship_in_the_package() -> None:
    static = resources.files("proxy.admin").joinpath("static")
    for name in FILES:
        assert static.joinpath(name).is_file(), name
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"proxy.admin" = ["static/*"]' in pyproject


def test_a_package_build_carries_the_assets(tmp_path: Path) -> None:
    """``pip install .`` (not editable) installs what setuptools' build_py copies into the build tree
    (the wheel is made from it): run that step and look there."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "INFERMON_PURE_PYTHON": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for name in FILES:
        assert (tmp_path / "proxy" / "admin" / "static" / name).is_file(), name


_URL = re.compile(r"""(?:src|href|action)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)|fetch\(\s*["'`]([^"'`]+)""")


def test_every_url_of_the_page_is_relative_and_local() -> None:
    static = resources.files("proxy.admin").joinpath("static")
    text = "\n".join(static.joinpath(name).read_text(encoding="utf-8") for name in FILES)
    urls = [next(g for g in m.groups() if g) for m in _URL.finditer(text)]
    assert "static/status.js" in urls and "static/status.css" in urls
    for url in urls:
        assert not url.startswith(("/", "http:", "https:", "//")), url
    # no origin but this one anywhere: no CDN, no web fonts (the SVG namespace is a name, not a fetch)
    origins = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
    assert origins == set()
    assert "@import" not in text and "@font-face" not in text
    js = static.joinpath("status.js").read_text(encoding="utf-8")
    assert "innerHTML" not in js and "eval(" not in js  # values are written as text
    assert "readyz" not in js  # a 503 there would be a console error in the browser: the page never asks

"""The status page's files and how they are served: content negotiation, caching, the security policy.

The page (``static/index.html``, ``status.js``, ``status.css``, ``favicon.svg``) ships inside the
package and is read once, at first use, with :mod:`importlib.resources`; nothing is ever fetched from
another origin. Every URL in it is relative, so it works at ``/`` and ``/status``, behind ``kubectl
port-forward`` and behind a path prefix. Each file is served with a strong ETag (its SHA-256) and
``Cache-Control: no-cache``: a browser revalidates and gets a 304 until the package changes.

``Content-Security-Policy: default-src 'self'`` (and no frames, forms, plugins or ``<base>``) keeps
the page from loading or sending anything elsewhere, even if a value it shows were hostile: the
page writes every value as text, never as markup.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources

from aiohttp import web

#: the file names under static/ and their content types; nothing else is served
FILES = {
    "index.html": "text/html",
    "status.js": "text/javascript",
    "status.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
#: routes of the page itself, left out of the JSON list of endpoints
PAGE_PATHS = frozenset({"/", "/static/{name}", "/favicon.ico"})
#: an entity-tag of an If-None-Match list: an optional weak prefix, then the quoted opaque tag
_ENTITY_TAG = re.compile(r'(?:W/)?("[^"]*")')
CSP = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; object-src 'none'"


@cache
def asset(name: str) -> tuple[bytes, str]:
    """(content, ETag) of a file of the page; KeyError for a name that is not one."""
    if name not in FILES:
        raise KeyError(name)
    body = resources.files("proxy.admin").joinpath("static", name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def page_response(request: web.Request, name: str) -> web.Response:
    """One file of the page, or 304 when the client holds it already."""
    try:
        body, etag = asset(name)
    except KeyError:
        raise web.HTTPNotFound() from None
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if none_match(request.headers.getall("If-None-Match", []), etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, headers=headers, content_type=FILES[name], charset="utf-8")


def none_match(fields: list[str], etag: str) -> bool:
    """True when If-None-Match field values name ``etag`` (RFC 9110 13.1.2): ``*``, or a list of
    entity-tags compared weakly (``W/"x"`` matches ``"x"``), several field lines making one list."""
    return any(value.strip() == "*" or etag in _ENTITY_TAG.findall(value) for value in fields)


def _ranges(accept: list[str]) -> list[tuple[str, str, float]]:
    """(type, subtype, q) of every media range of Accept field values; malformed ranges are skipped."""
    out = []
    for value in accept:
        for item in value.split(","):
            media, *params = (part.strip() for part in item.split(";"))
            kind, slash, sub = media.lower().partition("/")
            if not slash or not kind or not sub:
                continue
            q = 1.0
            for param in params:
                name, _, v = param.partition("=")
                if name.strip().lower() == "q":
                    try:
                        q = float(v.strip())
                    except ValueError:
                        q = -1.0
            if 0.0 <= q <= 1.0:
                out.append((kind, sub, q))
    return out


def quality(accept: list[str], media: str) -> float:
    """The q the Accept field values give ``media`` (type/subtype): that of the most specific range
    that matches (``text/html`` over ``text/*`` over ``*/*``), 0 when none does (RFC 9110 12.5.1)."""
    kind, _, sub = media.partition("/")
    best, found = -1, 0.0
    for k, s, q in _ranges(accept):
        if k == kind and s == sub:
            rank = 2
        elif k == kind and s == "*":
            rank = 1
        elif k == "*" and s == "*":
            rank = 0
        else:
            continue
        if rank > best:
            best, found = rank, q
    return found


def prefers_html(accept: list[str]) -> bool:
    """True when the client prefers text/html to application/json: a browser. No Accept, ``*/*``
    (curl), a tie or ``application/json`` keep the JSON."""
    if not accept:
        return False
    return quality(accept, "text/html") > quality(accept, "application/json")

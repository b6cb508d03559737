"""The container image's HEALTHCHECK: ``python -m proxy.deploy.healthcheck [URL ...]``.

One image runs ``infermon proxy`` (admin port 9464) or ``infermon agent`` (9465), so by default it
asks both /healthz addresses on the loopback and is healthy when either answers 200. Exit 0 healthy,
1 not. Only the standard library (and the light package imports): no event loop, one short
timeout per address. Kubernetes ignores HEALTHCHECK and uses the pod's probes instead (docs/kubernetes.md).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_URLS = ("http://127.0.0.1:9464/healthz", "http://127.0.0.1:9465/healthz")
TIMEOUT = 2.0


def healthy(url: str, timeout: float = TIMEOUT) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    urls = list(sys.argv[1:] if argv is None else argv) or list(DEFAULT_URLS)
    for url in urls:
        if healthy(url):
            return 0
    print(f"unhealthy: no 200 from {', '.join(urls)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

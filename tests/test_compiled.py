"""proxy/_compiled.py: the compiled data plane is used only when it is there, asked for and up to date."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from proxy import _compiled
from tests.helpers import TIMEOUT


def _mode(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import proxy._compiled as c, proxy.dataplane.server; print(c.MODE, '|', c.mode())"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return out.stdout.strip()


def test_pure_python_when_asked() -> None:
    assert _mode({"INFERMON_PURE_PYTHON": "1"}) == "python | python"


def test_the_default_uses_what_is_built() -> None:
    built = any(_compiled._paths(name)[1] for name in _compiled.COMPILED)
    env = {k: v for k, v in os.environ.items() if k != "INFERMON_PURE_PYTHON"}
    out = subprocess.run(
        [sys.executable, "-c", "import proxy._compiled as c, proxy.dataplane.server; print(c.mode())"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == ("compiled" if built and not _compiled._stale() else "python")


def test_a_source_newer_than_its_build_means_pure_python(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    source, built = base / "server.py", base / "server.cpython-311-x86_64-linux-gnu.so"
    built.write_bytes(b"")
    source.write_text("x = 1\n")
    os.utime(built, (1_000_000, 1_000_000))
    monkeypatch.setattr(_compiled, "_paths", lambda name: (str(source), [str(built)]))
    assert _compiled._stale()  # this checkout has setup.py beside the package: a source tree
    os.utime(built, None)
    os.utime(source, (1_000_000, 1_000_000))
    assert not _compiled._stale()


def test_an_installed_package_is_never_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    site = Path(str(tmp_path)) / "site-packages" / "proxy"
    site.mkdir(parents=True)
    monkeypatch.setattr(_compiled, "_HERE", str(site))  # no setup.py beside an installed package
    source, built = site / "server.py", site / "server.cpython-311-x86_64-linux-gnu.so"
    built.write_bytes(b"")
    source.write_text("x = 1\n")
    os.utime(built, (1_000_000, 1_000_000))
    monkeypatch.setattr(_compiled, "_paths", lambda name: (str(source), [str(built)]))
    assert not _compiled._stale()


def test_a_rebuild_that_leaves_old_shims_is_not_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    source, shim, library = base / "server.py", base / "server.so", base / "_native__mypyc.so"
    for path in (shim, library):
        path.write_bytes(b"")
    source.write_text("x = 1\n")
    os.utime(shim, (1_000_000, 1_000_000))  # the shim kept its old time; the library is new
    os.utime(source, (2_000_000, 2_000_000))

    def paths(name: str) -> tuple[str, list[str]]:
        if name == _compiled._GROUP:
            return "", [str(library)]
        return str(source), [str(shim)]

    monkeypatch.setattr(_compiled, "_paths", paths)
    assert not _compiled._stale()
    os.utime(library, (1_500_000, 1_500_000))
    assert _compiled._stale()

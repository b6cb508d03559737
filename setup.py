"""Build: the data plane's hot modules compiled with mypyc when a C compiler is there; pure Python otherwise.

Everything else lives in pyproject.toml. The compiled modules are the same source, type-checked
(mypy --strict) and tested both ways (``make test`` runs the suite compiled and with
``INFERMON_PURE_PYTHON=1``). A machine without a C compiler, or a build that fails for any reason,
installs the pure-Python package: the compiled path is an optimisation, never a requirement.
``INFERMON_PURE_PYTHON=1`` at install time skips the compilation too.

An editable install (``pip install -e .``, what ``make`` does) gets the compiled modules from
``python setup.py build_ext --inplace`` (the Makefile runs it): they land beside their sources.
A wheel (``pip install .``, a container image) carries them inside the package.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

GROUP = "proxy.dataplane._native"
# keep in step with proxy/_compiled.py
COMPILED = [
    "proxy/dataplane/exchange.py",
    "proxy/dataplane/heads.py",
    "proxy/dataplane/http.py",
    "proxy/dataplane/server.py",
    "proxy/dataplane/timer.py",
    "proxy/dataplane/upstream.py",
]


def _say(message: str) -> None:
    print(f"infermon build: {message}", file=sys.stderr)


class OptionalBuildExt(build_ext):  # type: ignore[misc]
    """build_ext that falls back to pure Python instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, missing headers ...
            _say(f"compiled data plane not built ({exc}); installing pure Python")

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            _say(f"compiled data plane not built ({exc}); installing pure Python")


def _extensions() -> list[Any]:
    if os.environ.get("INFERMON_PURE_PYTHON") == "1":
        _say("INFERMON_PURE_PYTHON=1: pure Python")
        return []
    try:
        from mypyc.build import mypycify

        # pip's isolated build environment has mypy but not the runtime dependencies: their types are
        # Any there, and pyproject.toml's strict settings then find errors in modules that import them
        # (subclassing BaseModel, untyped validators). Only the compiled modules must type-check for
        # mypyc: the others are followed for their types with their errors silenced (the project's own
        # mypy --strict run, with every dependency installed, checks them all for real).
        # One shared library inside the package (proxy/dataplane/_native__mypyc...so), not at the top level.
        flags = ["--ignore-missing-imports", "--follow-imports=silent"]
        return list(mypycify([*flags, *COMPILED], opt_level="3", group_name=GROUP))
    except BaseException as exc:  # mypyc missing, or it stopped (SystemExit on a type error): pure Python
        _say(f"mypyc unavailable ({exc!r}); installing pure Python")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})

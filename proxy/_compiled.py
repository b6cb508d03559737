"""Which data-plane modules may be compiled (mypyc, see setup.py), and the switch back to pure Python.

Imported first by ``proxy/__init__.py``. The compiled modules are used when they are there and up to
date. They are bypassed, all of them together, when ``INFERMON_PURE_PYTHON=1`` is set or when, in a
source checkout, any of their sources is newer than its compiled module (an edited checkout with an
older build): the sources are then imported as plain Python, so what runs is always what the files
say.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

# keep in step with setup.py
COMPILED = (
    "proxy.dataplane.exchange",
    "proxy.dataplane.heads",
    "proxy.dataplane.http",
    "proxy.dataplane.server",
    "proxy.dataplane.timer",
    "proxy.dataplane.upstream",
)
_HERE = os.path.dirname(os.path.abspath(__file__))


_GROUP = "proxy.dataplane._native__mypyc"  # the shared library of the compiled modules (setup.py GROUP)


def _paths(name: str) -> tuple[str, list[str]]:
    """(source path, compiled module paths) of one module of COMPILED."""
    base = os.path.join(os.path.dirname(_HERE), *name.split("."))
    compiled = [base + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES if os.path.exists(base + suffix)]
    return base + ".py", compiled


def _stale() -> bool:
    """A compiled module older than its source, in a source checkout (setup.py beside the package).

    An installed wheel is never stale: its files are written in any order, within moments.
    """
    if not os.path.exists(os.path.join(os.path.dirname(_HERE), "setup.py")):
        return False
    # the compiled code lives in the shared library; a rebuild may leave the per-module shims as they
    # were (same bytes, old times), so the library's time is the build's time
    _, library = _paths(_GROUP)
    for name in COMPILED:
        source, compiled = _paths(name)
        built = library or compiled
        if compiled and os.path.exists(source) and os.path.getmtime(source) > min(map(os.path.getmtime, built)):
            return True
    return False


class _SourceFinder:
    """Finds the modules of COMPILED as their .py source, never as an extension module."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == _GROUP:
            raise ImportError(f"{_GROUP} is bypassed: pure Python was asked for (or the build is stale)")
        if fullname not in COMPILED:
            return None
        source, _ = _paths(fullname)
        if not os.path.exists(source):
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def install() -> str:
    """Put the source finder in front when pure Python is asked for or the build is stale.

    Returns how the data plane runs: ``"compiled"``, ``"python"`` or ``"python (stale build)"``.
    """
    forced = os.environ.get("INFERMON_PURE_PYTHON") == "1"
    stale = not forced and _stale()
    if forced or stale:
        if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _SourceFinder())
        return "python (stale build)" if stale else "python"
    return "compiled" if any(_paths(name)[1] for name in COMPILED) else "python"


def mode() -> str:
    """How the data plane actually runs, from the loaded modules (for logs and /metrics)."""
    server = sys.modules.get("proxy.dataplane.server")
    if server is None:
        return MODE
    loaded_from = str(getattr(server, "__file__", ""))
    return "compiled" if loaded_from.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) else "python"


MODE = install()

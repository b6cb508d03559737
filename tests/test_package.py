"""The ``proxy`` package as a whole: what every module must share."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import proxy


def test_every_module_logger_is_under_infermon() -> None:
    """One logger tree, so ``logging.getLogger("infermon")`` configures every message infermon writes."""
    loggers: dict[str, str] = {}
    for info in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if info.name == "proxy.__main__":  # runs the command when imported
            continue
        if info.name.endswith("__mypyc"):  # the compiled modules' shared library (setup.py), not a module
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, logging.Logger):
                loggers[info.name] = value.name
    assert "proxy.agent.gpu" in loggers  # the walk reached the subpackages
    wrong = {module: name for module, name in loggers.items() if name.partition(".")[0] != "infermon"}
    assert wrong == {}

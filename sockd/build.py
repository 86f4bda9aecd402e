"""Which build of sockd is running: the hot path compiled with mypyc, or pure Python.

`HOT_MODULES` is the one list of what mypyc compiles: setup.py reads it for `pip install .` (a
wheel, `make install`, the package and the image), and the Makefile for `make compiled`. It is
read there without importing sockd (setup.py runs before sockd's dependencies are installed), so
this module imports nothing of sockd's and nothing outside the standard library.

A compiled module is an extension module beside its source: the same source is the pure build,
which stays correct and supported wherever no C compiler or no Python headers were found.
"""

from __future__ import annotations

import functools
import importlib
from importlib.machinery import EXTENSION_SUFFIXES

# The data path, per connection and per request: the lifecycle and what it calls on every read.
HOT_MODULES = (
    "sockd.lifecycle",
    "sockd.handlers",
    "sockd.limits",
    "sockd.transports",
    "sockd.counters",
    "sockd.relay",
    "sockd.tls.layer",
    "sockd.proxy.reading",
    "sockd.proxy.stage",
)


@functools.cache
def compiled_modules() -> tuple[str, ...]:
    """The hot modules this process imported as extension modules (all of them, or none)."""
    return tuple(name for name in HOT_MODULES if _is_extension(importlib.import_module(name).__file__ or ""))


def compiled() -> bool:
    """Whether the whole hot path runs compiled (`sockd_build_info{compiled="true"}`)."""
    return len(compiled_modules()) == len(HOT_MODULES)


def describe() -> str:
    """How this build reads in `sockd --version`."""
    if compiled():
        return "compiled with mypyc"
    if not compiled_modules():
        return "pure Python"
    return f"partly compiled: {', '.join(compiled_modules())}"


def _is_extension(path: str) -> bool:
    return path.endswith(tuple(EXTENSION_SUFFIXES))

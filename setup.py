"""The compiled build: `pip install .` compiles sockd's hot path with mypyc where it can.

Everything else about the package is in pyproject.toml. mypyc needs a C compiler and Python's
headers: where either is missing, in an editable install (`pip install -e .`, as `make test`
uses: its sources must take effect as they are edited), or where SOCKD_PURE=1 is set, sockd
installs as pure Python and says so. `sockd --version` and `sockd_build_info{compiled=...}` tell which build runs.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent
# setuptools builds in the checkout's build/ and relinks no extension it finds up to date there:
# another Python of the same version (pyenv's beside Debian's, say) would be handed the first
# one's build, linked against that one's library path. Each interpreter builds apart.
BUILD = Path("build") / f"setup-{hashlib.sha256(sys.base_prefix.encode()).hexdigest()[:12]}"


def hot_modules() -> list[str]:
    """sockd.build.HOT_MODULES as source paths, read without importing sockd (its dependencies
    are not installed yet when this runs)."""
    tree = ast.parse((HERE / "sockd" / "build.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "HOT_MODULES" for t in node.targets):
            names: tuple[str, ...] = ast.literal_eval(node.value)
            return [_source(name) for name in names]
    raise SystemExit("setup.py: sockd/build.py has no HOT_MODULES")


def _source(name: str) -> str:
    path = Path(*name.split("."))
    package = path / "__init__.py"
    return str(package if (HERE / package).exists() else path.with_suffix(".py"))


def why_pure() -> str | None:
    if os.environ.get("SOCKD_PURE") == "1":
        return "SOCKD_PURE=1"
    # An extension module beside its source is imported instead of it: in an editable install
    # (`pip install -e .`, which setuptools runs as editable_wheel) an edit would not take effect.
    if {"editable_wheel", "develop"} & set(sys.argv):
        return "an editable install, whose sources must take effect as they are edited"
    # setuptools compiles with $CC where it is set, else with what Python was built with.
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Debian: python3-dev)"
    return None


def ext_modules() -> list[Any]:
    reason = why_pure()
    if reason is not None:
        print(f"sockd: building pure Python: {reason}", file=sys.stderr)
        return []
    # A build requirement (pyproject.toml), but a build without isolation may lack it when pure.
    from mypyc.build import mypycify  # noqa: PLC0415

    # mypy reads pyproject.toml's [tool.mypy] (strict, the pydantic plugin) from the working
    # directory, which a build from an sdist or a checkout has as its root.
    options = [*hot_modules(), "--config-file", str(HERE / "pyproject.toml")]
    return mypycify(options, opt_level="3", target_dir=str(BUILD / "mypyc"))


setup(ext_modules=ext_modules(), options={"build": {"build_base": str(BUILD)}})

"""``neuroloc view``: a local web viewer for localize results and evaluation folders.

The server parts (Starlette, uvicorn, python-multipart) are an optional extra: ``pip install "neuroloc[view]"``.
Importing this package needs none of them; :mod:`neuroloc.viewer.app` does.
"""

from __future__ import annotations

import importlib.util

# PyPI package -> the import names that provide it (python-multipart is ``python_multipart`` since 0.0.13)
REQUIRED = {"starlette": ("starlette",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
INSTALL_HINT = 'pip install "neuroloc[view]"   (or: pip install starlette uvicorn python-multipart)'


def missing_dependencies() -> list[str]:
    """The PyPI names of the viewer's dependencies that are not installed."""
    return [
        package for package, modules in REQUIRED.items()
        if not any(importlib.util.find_spec(module) is not None for module in modules)
    ]

"""Where templates/, clusters/ and recipes/ are: the checkout, or inside the installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The folder `name` (templates, clusters or recipes).

    In a checkout it sits beside the package; a wheel installs it inside the package
    (see [tool.setuptools.package-dir] in pyproject.toml).
    """
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"moe-launcher is installed without its {name}/ folder")

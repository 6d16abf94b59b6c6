"""Run a subprocess as if torch were not installed."""

import os
from pathlib import Path
from typing import Dict


def env_without_torch(directory: Path) -> Dict[str, str]:
    """os.environ with a ``torch`` package first on PYTHONPATH that fails to import the way
    a missing one does (ModuleNotFoundError, name "torch"), in every process started with it."""
    package = directory / "no_torch" / "torch"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    path = os.pathsep.join(filter(None, [str(package.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}

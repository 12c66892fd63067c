"""Optional dependencies: import a package that an extra installs, or fail with the extra to install.

Modalities and rewards keep their heavy dependencies out of `pip install diffalign` (core only). Where
one is needed, `require` imports it and, when it is missing, raises `MissingExtraError` (an ImportError)
that says which extra brings it:

    require("rdkit", "molecule", "diffalign.modalities.molecule")
    # MissingExtraError: diffalign.modalities.molecule needs rdkit: pip install 'diffalign[molecule]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: distribution names that differ from the import name
_DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module` (e.g. "rdkit" or "sklearn.datasets") for `what`, the feature that needs it.

    Raises MissingExtraError (an ImportError), "<what> needs <package>: pip install 'diffalign[<extra>]'",
    when the package is not installed. One that is installed but fails to import (a broken build, a
    missing dependency of its own) raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if module != missing and not module.startswith(missing + "."):
            raise  # the package is there; something it imports is not
        top = module.partition(".")[0]
        package = _DISTRIBUTION.get(top, top)
        raise MissingExtraError(f"{what} needs {package}: pip install 'diffalign[{extra}]'") from e

"""diffserve: one import namespace for the engine and its servers.

The subpackages live at the repository's top level (``engine/``, ``export/``, ``api/``,
``benchmarks/``, ``triton_serving/``, and the Triton stub templates ``model_repository/templates``)
and are installed as ``diffserve.engine``, ``diffserve.export``, ``diffserve.api``,
``diffserve.benchmarks``, ``diffserve.triton_serving`` and ``diffserve.templates``
(``package-dir`` in pyproject.toml). A wheel holds them under ``diffserve/``.

A source checkout that is not installed (``PYTHONPATH=<repo root>``, as the Triton stubs of a
repository exported from a checkout and some helpers run) finds them too: when this file sits in
such a checkout, the repository root joins this package's ``__path__``, so ``diffserve.engine`` is
``<repo root>/engine``. ``diffserve.templates`` is the one name whose folder differs from its
package name; ``TEMPLATES`` below resolves it in both layouts.
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent
#: True when this package is the one of a source checkout (not an installed wheel).
SOURCE_CHECKOUT = (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "engine" / "__init__.py").is_file()

if SOURCE_CHECKOUT and str(_CHECKOUT) not in __path__:
    __path__.append(str(_CHECKOUT))

#: The Triton Python-backend stubs (``<name>/model.py``) that ``diffserve export`` copies.
TEMPLATES = (_CHECKOUT / "model_repository" / "templates") if SOURCE_CHECKOUT else (_HERE / "templates")
#: The directory to put on a child's PYTHONPATH so that it imports this ``diffserve``.
IMPORT_ROOT = _CHECKOUT if SOURCE_CHECKOUT else _HERE.parent

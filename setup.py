"""The package list of the one ``diffserve`` namespace (everything else is in pyproject.toml).

``[tool.setuptools.package-dir]`` maps ``diffserve.<folder>`` onto the top-level folders; pyproject's
``packages.find`` cannot prefix what it finds, so the list is computed here: every package under
each mapped folder, found by ``find_packages`` and named ``diffserve.<folder>.<sub>``. A new
subpackage (a folder with ``__init__.py``) is picked up without editing anything.
"""
from setuptools import find_namespace_packages, find_packages, setup

FOLDERS = {"engine": "engine", "export": "export", "api": "api", "benchmarks": "benchmarks",
           "triton_serving": "triton_serving"}

# The Triton stubs: one folder per template holding its model.py (no __init__.py: Triton loads them).
packages = ["diffserve", "diffserve.templates"]
packages += [f"diffserve.templates.{t}"
             for t in find_namespace_packages("model_repository/templates", exclude=["*__pycache__*"])]
for name, folder in FOLDERS.items():
    packages.append(f"diffserve.{name}")
    packages += [f"diffserve.{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages)

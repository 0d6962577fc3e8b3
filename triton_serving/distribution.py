"""Where the Triton server comes from and what its python-backend stubs need to run our Python.

This module owns the pieces of a launch that do not depend on a running server: locating the
``tritonserver`` binary, the python backend and the per-version stubs shipped inside the
``nvidia-pytriton`` wheel (``TritonDistribution``), finding the running interpreter's shared
libpython (``find_libpython``), and preparing a private work directory: a backend directory with
the stub that matches the interpreter, a venv-like Python shim, and the process environment
(``prepare_launch``). It never modifies site-packages; everything it writes lives in the work
directory the caller owns and removes.

How the python-backend stub gets the right interpreter (verified with the nvidia-pytriton that
pyproject.toml pins and the Triton it ships):

* The stub links ``libpython3.X.so.1.0``; ``sysconfig LIBDIR`` is put first in
  ``LD_LIBRARY_PATH`` so it loads the running interpreter's libpython and not a system copy of a
  different patch release (which fails on stdlib C extensions with ``undefined symbol:
  _PyModule_Add``). The wheel's ``nvidia_pytriton.libs`` follows it.
* The stub initialises Python in *isolated* mode (``sys.flags.isolated == 1``), so
  ``PYTHONPATH`` is ignored inside model.py files. Python instead locates its prefix by
  searching ``python3`` on ``PATH``; we therefore put a private, venv-like directory first on
  ``PATH`` (``bin/python3`` -> the running interpreter, ``pyvenv.cfg``, and a ``.pth`` hook in its
  site-packages) that adds the running environment's site-packages (with their ``.pth`` files,
  so editable installs work), the project root and the caller's extra import paths.
  ``PYTHONPATH`` is still exported for subprocesses that models may spawn.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffserve

__all__ = [
    "PROJECT_ROOT",
    "TritonDistribution",
    "TritonLaunchError",
    "find_libpython",
    "prepare_launch",
    "running_python_version",
]

LOGGER = logging.getLogger(__name__)

PROJECT_ROOT = diffserve.IMPORT_ROOT
"""Always importable from the stubs' model.py files (the templates import diffserve.engine and
diffserve.triton_serving): the checkout's root, or the site-packages holding an installed diffserve."""


class TritonLaunchError(RuntimeError):
    """Triton could not be started (missing pieces, early exit, readiness timeout)."""



def running_python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"



@dataclass(frozen=True)
class TritonDistribution:
    """Paths of the Triton server shipped inside the ``nvidia-pytriton`` wheel."""

    root: Path  #: the ``pytriton`` package directory
    binary: Path  #: ``tritonserver/bin/tritonserver``
    python_backend_dir: Path  #: ``libtriton_python.so`` and ``triton_python_backend_utils.py``
    stubs_dir: Path  #: ``<X.Y>/triton_python_backend_stub`` per Python version
    libs_dir: Path  #: ``nvidia_pytriton.libs`` (vendored shared libraries)

    @classmethod
    def locate(cls, pytriton_root: Path | None = None) -> TritonDistribution:
        """Find the distribution in the installed ``pytriton`` package (or ``pytriton_root``)."""
        if pytriton_root is None:
            import importlib.util

            spec = importlib.util.find_spec("pytriton")
            if spec is None or not spec.submodule_search_locations:
                raise TritonLaunchError(
                    "the 'pytriton' package is not installed in this environment "
                    f"({sys.prefix}); install it with: pip install nvidia-pytriton==0.7.0"
                )
            pytriton_root = Path(next(iter(spec.submodule_search_locations)))
        root = Path(pytriton_root)
        server_dir = root / "tritonserver"
        dist = cls(
            root=root,
            binary=server_dir / "bin" / "tritonserver",
            python_backend_dir=server_dir / "backends" / "python",
            stubs_dir=server_dir / "python_backend_stubs",
            libs_dir=root.parent / "nvidia_pytriton.libs",
        )
        if not dist.binary.is_file():
            raise TritonLaunchError(
                f"tritonserver binary not found at {dist.binary}; the nvidia-pytriton wheel "
                "(manylinux, x86_64/aarch64) ships it - reinstall it with: "
                "pip install --force-reinstall nvidia-pytriton==0.7.0"
            )
        if not os.access(dist.binary, os.X_OK):
            raise TritonLaunchError(f"tritonserver binary {dist.binary} is not executable")
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            if not (dist.python_backend_dir / name).is_file():
                raise TritonLaunchError(
                    f"python backend file {name} missing in {dist.python_backend_dir}; "
                    "the nvidia-pytriton installation is incomplete, reinstall it"
                )
        if not dist.libs_dir.is_dir():
            LOGGER.warning("nvidia_pytriton.libs not found at %s; relying on RPATH", dist.libs_dir)
        return dist

    def available_stub_versions(self) -> list[str]:
        """Python versions (``"3.11"``) for which the wheel ships a python-backend stub."""
        if not self.stubs_dir.is_dir():
            return []
        found = [p.parent.name for p in self.stubs_dir.glob("*/triton_python_backend_stub")]
        return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))

    def stub_for(self, python_version: str) -> Path:
        """The stub for ``python_version`` (``"3.11"``); raises :class:`TritonLaunchError`."""
        stub = self.stubs_dir / python_version / "triton_python_backend_stub"
        if not stub.is_file():
            available = ", ".join(self.available_stub_versions()) or "none"
            raise TritonLaunchError(
                f"nvidia-pytriton has no python-backend stub for Python {python_version} "
                f"(looked for {stub}; available: {available}). Run diffserve with one of the "
                "available Python versions or install an nvidia-pytriton release that supports "
                f"Python {python_version}."
            )
        return stub



def find_libpython(config_vars: Mapping[str, object] | None = None) -> Path:
    """Path of the running interpreter's shared libpython (what the stub must load).

    ``config_vars`` defaults to :func:`sysconfig.get_config_vars` and can be injected for tests.
    Raises :class:`TritonLaunchError` for statically linked interpreters or a missing library.
    """
    cfg = sysconfig.get_config_vars() if config_vars is None else config_vars
    if not cfg.get("Py_ENABLE_SHARED"):
        raise TritonLaunchError(
            f"this Python ({sys.executable}) is statically linked (Py_ENABLE_SHARED=0), but "
            "Triton's python-backend stub needs a shared libpython of the same version. Use a "
            "Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared, "
            "distribution and conda Pythons are shared) for the diffserve virtualenv."
        )
    libdir = cfg.get("LIBDIR")
    soname = cfg.get("INSTSONAME") or cfg.get("LDLIBRARY")
    if not libdir or not soname:
        raise TritonLaunchError(
            f"cannot locate libpython: sysconfig LIBDIR={libdir!r} INSTSONAME={soname!r}"
        )
    path = Path(str(libdir)) / str(soname)
    if not path.exists():
        raise TritonLaunchError(
            f"libpython not found at {path} (sysconfig LIBDIR/INSTSONAME); the python-backend "
            "stub would load a different libpython and fail. Reinstall Python with its shared "
            "library or point diffserve at an interpreter whose LIBDIR contains it."
        )
    return path



def _pth_hook_source(front: Sequence[str], site_dirs: Sequence[str]) -> str:
    return (
        '"""Generated by diffserve.triton_serving.distribution: import paths for Triton python models."""\n'
        "import os, site, sys\n\n"
        f"FRONT = {list(front)!r}\n"
        f"SITE_DIRS = {list(site_dirs)!r}\n\n"
        "_here = os.path.dirname(os.path.abspath(__file__))\n"
        "_at = sys.path.index(_here) if _here in sys.path else len(sys.path)\n"
        "sys.path[_at:_at] = [p for p in FRONT if p not in sys.path]\n"
        "for _d in SITE_DIRS:\n"
        "    if os.path.isdir(_d):\n"
        "        site.addsitedir(_d)\n"
    )



def _prepare_backends(workdir: Path, dist: TritonDistribution, stub: Path) -> Path:
    """``<work>/backends/python/`` with symlinks to the wheel's files and the right stub."""
    backend_root = workdir / "backends"
    python_dir = backend_root / "python"
    python_dir.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python_dir / name).symlink_to(dist.python_backend_dir / name)
    # A symlink keeps the stub's RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) valid.
    (python_dir / "triton_python_backend_stub").symlink_to(stub)
    return backend_root


def _prepare_python_shim(workdir: Path, version: str, front: Sequence[Path]) -> Path:
    """Venv-like dir whose ``bin/python3`` the isolated stub finds on PATH (see the module docstring)."""
    shim = workdir / "python"
    bin_dir = shim / "bin"
    site_dir = shim / "lib" / f"python{version}" / "site-packages"
    bin_dir.mkdir(parents=True)
    site_dir.mkdir(parents=True)
    real_exe = Path(os.path.realpath(sys.executable))
    base_exe = Path(os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable))
    for name in ("python3", "python", f"python{version}"):
        (bin_dir / name).symlink_to(real_exe)
    (shim / "pyvenv.cfg").write_text(
        f"home = {base_exe.parent}\n"
        "include-system-site-packages = false\n"
        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n",
        encoding="utf-8",
    )
    (site_dir / "_diffserve_triton_paths.py").write_text(
        _pth_hook_source([str(p) for p in front], _site_dirs()), encoding="utf-8"
    )
    (site_dir / "_diffserve_triton_paths.pth").write_text(
        "import _diffserve_triton_paths\n", encoding="utf-8"
    )
    return bin_dir


def _pythonpath_front(extra_pythonpath: Sequence[Path]) -> list[Path]:
    paths = [Path(p).resolve() for p in extra_pythonpath] + [PROJECT_ROOT]
    paths += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return list(dict.fromkeys(paths))


def _site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(dirs))


def _environment(dist: TritonDistribution, libpython: Path, shim_bin: Path,
                 front: Sequence[Path]) -> dict[str, str]:
    env = dict(os.environ)
    ld = [str(libpython.parent), str(dist.libs_dir)]
    ld += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(ld))
    py = [str(p) for p in front] + _site_dirs()
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(py))
    env["PATH"] = os.pathsep.join([str(shim_bin), env.get("PATH", os.defpath)])
    env.pop("PYTHONHOME", None)
    return env


def prepare_launch(workdir: Path, dist: TritonDistribution, stub: Path, version: str, libpython: Path,
                   extra_pythonpath: Sequence[Path] = ()) -> tuple[Path, dict[str, str]]:
    """Fill ``workdir`` with the backend directory and the Python shim; return the backend directory
    (``--backend-directory``) and the server's environment. Raises ``OSError`` when it cannot."""
    front = _pythonpath_front(extra_pythonpath)
    backend_dir = _prepare_backends(workdir, dist, stub)
    shim_bin = _prepare_python_shim(workdir, version, front)
    return backend_dir, _environment(dist, libpython, shim_bin, front)

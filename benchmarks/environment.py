"""Where a benchmark ran: machine, GPU, package versions, git commit and command line.

``environment(device)`` is the block every report carries under ``"environment"``, so a number
can be traced to the machine, the GPU (for a CUDA device: name, memory, CUDA, cuDNN, driver),
the versions of the packages that produced it and the commit (with whether the tree had local
changes); nothing here reads or writes a report.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import diffserve

REPO_ROOT = diffserve.IMPORT_ROOT  # the checkout (where PYTHONPATH finds diffserve), or site-packages
_PACKAGES = ("diffserve", "torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "tritonclient", "nvidia-pytriton", "numpy", "fastapi", "uvicorn", "httpx")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "branch": git("rev-parse",
                                                                                                  "--abbrev-ref", "HEAD")}


def _gpu(device: Any) -> dict[str, Any] | None:
    import torch

    if device is None or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev)
    info = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "capability": f"{props.major}.{props.minor}"}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
        info["driver"] = out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def environment(device: Any = None) -> dict[str, Any]:
    """Where a benchmark ran: machine, GPU (for a CUDA device), versions, git commit."""
    return {
        "machine": {"platform": platform.platform(), "arch": platform.machine(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(), "memory_gb": _memory_gb()},
        "gpu": _gpu(device),
        "versions": _versions(),
        "git": git_info(),
        "argv": sys.argv[1:],
    }

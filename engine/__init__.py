"""diffserve's engine: catalog, pipelines and runtimes (never imports the API or Triton modules)."""

import os
from pathlib import Path


def home_dir() -> Path:
    """Where demo checkpoints, repositories, outputs and compile caches live (``DIFFSERVE_HOME``, default ./var)."""
    return Path(os.environ.get("DIFFSERVE_HOME", "var")).resolve()

"""``repository.json``: what a built model repository serves, read by whoever serves it.

``diffserve.export.repository`` writes it beside the model directories; the pipeline client, the API's Triton
backend and the benchmarks read it back here (``read_manifest``) to learn each pipeline model's slug
and defaults without importing the exporter (and with it torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "repository.json"


def read_manifest(repository: str | Path) -> dict[str, Any]:
    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{repository} has no {MANIFEST}; build it with `diffserve export`")
    return json.loads(path.read_text())

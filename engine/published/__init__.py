"""Published model artifacts, as their publishers lay them out, turned into what the engine loads.

A deployer names each artifact of a slug by its role (``checkpoint``, ``base``, ``ip_adapter_plus``,
``subject_lora`` …) in the models file (``diffserve.engine.models_file``); the modules here check
those files against the architecture the slug needs and assemble the engine's checkpoint
directory from them — links to files used as published, conversions where the engine needs
another form (an LDM single-file checkpoint, ZoeDepth's original ``.pt``) — so nothing is
renamed or converted by hand. Every problem found is an ``ArtifactProblem`` saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


TINY_MARKER = "diffserve_tiny_published.json"
"""Written last by a ``write_tiny``: its artifacts are complete and need no rebuild."""


def tiny_is_current(root: Path, version: int) -> bool:
    """Whether ``root`` holds a complete set of tiny artifacts written by this ``version`` of the writer."""
    import json

    marker = Path(root) / TINY_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("version") == version


def mark_tiny(root: Path, version: int) -> None:
    import json

    (Path(root) / TINY_MARKER).write_text(json.dumps({"version": version}))


@dataclass(frozen=True)
class ArtifactProblem:
    """One thing wrong with a slug's artifacts, for ``diffserve models check``, the log and ``/readyz``."""

    slug: str
    role: str
    """The configuration key the problem is about (``subject_lora``, ``face_models`` …)."""
    path: Path | None
    """The path configured for the role, if any."""
    message: str
    """What is wrong, e.g. "missing" or "UNet has 320 input channels, SD1.5 has 4"."""
    fix: str
    """What to do about it, e.g. where the publisher ships the file."""

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.slug}: {self.role}{where}: {self.message} — {self.fix}"

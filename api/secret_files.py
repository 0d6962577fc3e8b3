"""Secrets read from mounted files (Docker and Kubernetes secrets): the Redis password, webhook secrets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["read_secret_file"]


def read_secret_file(path: Path, what: str, *, strip: Callable[[str], str] = str.strip) -> str:
    """The content of a mounted secret file, ``strip``-ped; ValueError naming ``what`` when the file
    cannot be read or holds nothing."""
    try:
        text = strip(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc}") from exc
    if not text:
        raise ValueError(f"the {what} file {path} is empty")
    return text

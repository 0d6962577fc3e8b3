"""A deployment's models file (``models.toml``): one TOML file naming, per slug, each published artifact.

```toml
[sd1.5-scifi]
checkpoint = "/models/scifi-fine-tune.safetensors"
[segmind-vega]
checkpoint = "/models/Segmind-Vega"
```

This module owns that file (``models.toml``; setting ``models_file``, flag ``--models``): parsing
it (relative paths are relative to the file; an unknown slug or role is an error naming the
valid ones), checking every slug's artifacts (``check``: missing files, architecture checks by
the slug's family, ``ModelFamily.published``) and assembling from them the one checkpoint directory
in the engine's internal layout that the rest of the stack loads (``materialize``), under
``$DIFFSERVE_HOME/models/<slug>-<fingerprint>/``, cached by a fingerprint of the inputs (paths,
sizes, modification times and the converter's version), so a second start costs a stat per file.

Each slug's artifacts are handled by its family's ``published`` module (``diffserve.engine.models.<family>.published``)
exposing ``ROLES``, ``check``, ``materialize`` and ``write_tiny``, imported on first use. ``omni-zero`` and ``ominicontrol`` also accept ``checkpoint``: a directory
already in the engine's layout, used as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from diffserve.engine import home_dir
from diffserve.engine.catalog import CATALOG, get_model
from diffserve.engine.published import ArtifactProblem

logger = logging.getLogger(__name__)

MARKER = ".diffserve_materialized.json"


class ModelsFileError(ValueError):
    """The models file cannot be used as written (syntax, unknown slug or role, wrong value type)."""


@dataclass(frozen=True)
class ModelsFile:
    """A parsed models file: ``{slug: {role: absolute path}}`` in file order."""

    entries: dict[str, dict[str, Path]]
    path: Path | None = None
    """The file it was read from (None when built in code)."""

    @property
    def slugs(self) -> list[str]:
        return list(self.entries)


@dataclass
class Materialized:
    """What ``prepare`` made of a configuration: served checkpoints and the slugs left out, with why."""

    checkpoints: dict[str, Path] = field(default_factory=dict)
    problems: dict[str, list[ArtifactProblem]] = field(default_factory=dict)

    def unavailable(self) -> dict[str, list[str]]:
        """``{slug: [problem, ...]}`` of the slugs not served (for ``/readyz`` and the manifest)."""
        return {slug: [str(p) for p in ps] for slug, ps in self.problems.items() if ps}


def slug_module(slug: str) -> ModuleType:
    """The module that checks and materializes ``slug``'s artifacts: its family's ``published``."""
    return get_model(slug).family.published


def roles(slug: str) -> dict[str, bool]:
    """``{role: required}`` accepted under ``[slug]``."""
    return dict(slug_module(slug).ROLES)


def _flatten_slugs(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Undo TOML's dotted table names: ``[sd1.5-scifi]`` unquoted parses as table ``sd1`` holding ``5-scifi``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = prefix + key
        if name not in CATALOG and isinstance(value, Mapping) and value and all(
                isinstance(v, Mapping) for v in value.values()):
            out.update(_flatten_slugs(value, name + "."))
        else:
            out[name] = value
    return out


def parse_models_file(data: Mapping[str, Any], base_dir: Path | None = None,
                        source: Path | None = None) -> ModelsFile:
    """Validate parsed TOML; relative paths are taken relative to ``base_dir``."""
    where = f"{source}: " if source else ""
    data = _flatten_slugs(data)
    unknown = [s for s in data if s not in CATALOG]
    if unknown:
        raise ModelsFileError(f"{where}unknown slug [{unknown[0]}]; valid slugs: {', '.join(CATALOG)}")
    entries: dict[str, dict[str, Path]] = {}
    for slug, table in data.items():
        if not isinstance(table, Mapping):
            raise ModelsFileError(f"{where}[{slug}] must be a table of role = \"path\" entries")
        valid = roles(slug)
        entry: dict[str, Path] = {}
        for role, value in table.items():
            if role not in valid:
                raise ModelsFileError(f"{where}[{slug}] has unknown role {role!r}; valid roles: {', '.join(valid)}")
            if not isinstance(value, str) or not value:
                raise ModelsFileError(f"{where}[{slug}] {role} must be a path string, got {value!r}")
            path = Path(os.path.expanduser(value))
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            entry[role] = path.absolute()
        entries[slug] = entry
    return ModelsFile(entries=entries, path=source)


def load_models_file(path: str | Path) -> ModelsFile:
    """Read ``models.toml``."""
    path = Path(path).absolute()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ModelsFileError(f"models file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelsFileError(f"{path}: {exc}") from None
    return parse_models_file(data, path.parent, path)


def check_slug(slug: str, entry: Mapping[str, Path]) -> list[ArtifactProblem]:
    """Problems with one slug's artifacts; empty: it can be served."""
    module = slug_module(slug)
    problems = []
    for role, required in roles(slug).items():
        if required and role not in entry:
            problems.append(ArtifactProblem(slug, role, None, "not configured",
                                            f"add `{role} = \"PATH\"` under [{slug}]"))
    return problems + list(module.check(slug, {r: p for r, p in entry.items()}))


def check(config: ModelsFile) -> dict[str, list[ArtifactProblem]]:
    """``{slug: problems}`` for every configured slug (an empty list: complete)."""
    return {slug: check_slug(slug, entry) for slug, entry in config.entries.items()}


def default_cache_root() -> Path:
    return home_dir() / "models"


def _stat_tree(path: Path) -> list[Any]:
    """(relative name, size, mtime_ns) of a file, or of every file under a directory (links followed)."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def fingerprint(slug: str, entry: Mapping[str, Path]) -> str:
    data = {"slug": slug, "code": getattr(slug_module(slug), "CODE_VERSION", 0),
            "artifacts": {role: [str(path), _stat_tree(path) if path.exists() else None]
                          for role, path in sorted(entry.items())}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def materialize(slug: str, entry: Mapping[str, Path], cache_root: str | Path | None = None, **deps: Any) -> Path:
    """The engine's checkpoint directory for ``slug`` assembled from its published artifacts (cached).

    Raises ``ValueError`` naming the problems when the artifacts are incomplete.
    """
    problems = check_slug(slug, entry)
    if problems:
        raise ValueError("; ".join(map(str, problems)))
    cache = Path(cache_root or default_cache_root())
    out = cache / f"{slug}-{fingerprint(slug, entry)}"
    if (out / MARKER).is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    module = slug_module(slug)
    try:
        module.materialize(slug, dict(entry), tmp, **deps)
        (tmp / MARKER).write_text(json.dumps({"slug": slug, "artifacts": {r: str(p) for r, p in entry.items()}},
                                             indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("materialized %s from %s into %s", slug, ", ".join(f"{r}={p}" for r, p in entry.items()), out)
    return out


def prepare(config: ModelsFile, cache_root: str | Path | None = None,
            slugs: list[str] | None = None) -> Materialized:
    """Check every configured slug and materialize the complete ones; the others are logged and left out."""
    result = Materialized()
    for slug, entry in config.entries.items():
        if slugs is not None and slug not in slugs:
            continue
        problems = check_slug(slug, entry)
        if not problems:
            try:
                result.checkpoints[slug] = materialize(slug, entry, cache_root)
            except Exception as exc:  # noqa: BLE001 - one slug's failed conversion must not stop the others
                problems = [ArtifactProblem(slug, "*", None, f"could not be assembled: {type(exc).__name__}: {exc}",
                                            "run `diffserve models check`; re-download the artifacts")]
        result.problems[slug] = problems
        for p in problems:
            logger.error("not serving %s", p)
    return result


def describe(slug: str, entry: Mapping[str, Path]) -> list[str]:
    """Facts about complete artifacts worth printing (the module's ``describe``, if it has one)."""
    fn = getattr(slug_module(slug), "describe", None)
    try:
        return list(fn(slug, entry)) if fn else []
    except Exception as exc:  # noqa: BLE001
        return [f"(could not describe: {exc})"]


def format_report(config: ModelsFile, problems: Mapping[str, list[ArtifactProblem]]) -> str:
    """``diffserve models check``'s text: per slug every artifact found or missing, then what to do."""
    lines = [f"models file: {config.path or '(in code)'}"]
    for slug in CATALOG:
        if slug not in config.entries:
            lines.append(f"\n{slug}: not configured (not served)")
            continue
        entry = config.entries[slug]
        slug_problems = problems.get(slug, [])
        lines.append(f"\n{slug}: {'OK' if not slug_problems else 'INCOMPLETE (not served)'}")
        for role, required in roles(slug).items():
            path = entry.get(role)
            if path is None:
                if required:
                    lines.append(f"  {role:<18} MISSING  (not configured)")
                continue
            bad = [p for p in slug_problems if p.role == role]
            state = "found" if path.exists() and not bad else ("MISSING" if not path.exists() else "PROBLEM")
            lines.append(f"  {role:<18} {state:<8} {path}")
        if not slug_problems:
            lines += [f"  {line}" for line in describe(slug, entry)]
        for p in slug_problems:
            lines.append(f"  ! {p.role}: {p.message}")
            lines.append(f"    fix: {p.fix}")
    complete = [s for s in config.entries if not problems.get(s)]
    lines.append(f"\n{len(complete)} of {len(config.entries)} configured slugs complete"
                 + (f"; not served: {', '.join(s for s in config.entries if problems.get(s))}"
                    if len(complete) < len(config.entries) else ""))
    return "\n".join(lines)


def content_digest(checkpoint: str | Path, cache_root: str | Path | None = None) -> str:
    """A digest of the networks of an engine checkpoint directory: every file in its sub-folders except
    the tokenizers (links followed; top-level files such as markers and ``model_index.json`` left out).

    Two slugs whose checkpoints hold the same bytes, however they were published (a single file and
    the diffusers folder it came from), get the same digest, so the Triton repository gives them one
    set of component models. Reading the weights once costs about a second per GB; the digest is
    cached under ``cache_root`` by the files' sizes and modification times.
    """
    root = Path(checkpoint).resolve()
    stats = [s for s in _stat_tree(root) if "/" in s[0] and not s[0].startswith("tokenizer")]
    key = hashlib.sha256(json.dumps([str(root), stats]).encode()).hexdigest()[:24]
    cache = Path(cache_root or default_cache_root()) / ".digests"
    cached = cache / f"{key}.txt"
    if cached.is_file():
        return cached.read_text().strip()
    h = hashlib.sha256()
    for name, _, _ in stats:
        h.update(name.encode() + b"\0")
        with open(root / name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    cached.write_text(digest)
    return digest

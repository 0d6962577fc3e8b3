"""The house's rules, read from the code: layers import only downward and no import circles.

Every ``import`` statement of every module is read with ``ast`` — at module level and inside
functions alike, since a lazy import is still a dependency — and resolved to a module of this
project. Every module is named as installed, ``diffserve.<layer>...``. Layers, lowest first:
``engine`` → ``triton_serving`` → ``export`` → ``benchmarks`` → ``api``; the Triton stub templates
(``model_repository/templates``, installed as ``diffserve.templates``) sit on top and may import
``engine`` and ``triton_serving``, never the exporter. The namespace package ``diffserve`` itself
imports no layer, so any layer may import it; its ``__main__`` is the command line (on top).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "diffserve"
# layer -> its folder in the checkout (installed as diffserve.<layer>; package-dir in pyproject.toml)
FOLDERS = {"engine": "engine", "triton_serving": "triton_serving", "export": "export",
           "benchmarks": "benchmarks", "api": "api", "templates": "model_repository/templates"}
PACKAGES = tuple(FOLDERS)
LAYER = {name: i for i, name in enumerate(PACKAGES)}
FORBIDDEN = {
    "engine": {"triton_serving", "export", "benchmarks", "api", "templates", "__main__"},
    "triton_serving": {"export", "benchmarks", "api", "templates", "__main__"},
    "export": {"benchmarks", "api", "templates", "__main__"},
    "benchmarks": {"api", "templates", "__main__"},
    "api": {"templates", "__main__"},
    "templates": {"export", "benchmarks", "api", "__main__"},
    "": set(PACKAGES) | {"__main__"},  # diffserve/__init__.py: below every layer
}
THIRD_PARTY_FORBIDDEN_IN_ENGINE = ("fastapi", "tritonclient", "triton_python_backend_utils", "uvicorn", "starlette")


def layer(module: str) -> str:
    """``diffserve.engine.catalog`` -> ``engine``; the namespace package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == NAMESPACE else "" if module == NAMESPACE else parts[0]


def _module_name(path: Path, folder: Path, prefix: str) -> str:
    parts = (*prefix.split("."), *path.relative_to(folder).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / NAMESPACE).glob("*.py")):
        modules[_module_name(path, ROOT / NAMESPACE, NAMESPACE)] = path
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            modules[_module_name(path, ROOT / folder, f"{NAMESPACE}.{package}")] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (``a.b.c`` → ``a.b`` when ``c`` is a function), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """Every dotted name an import statement of this file reaches, with its line."""
    names = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names] or [(base, node.lineno)]
    return names


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported project module: line}}``."""
    modules = project_modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in imported_names(path, module):
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_reader_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import os\nfrom . import sibling\n\ndef f():\n    from diffserve.api.cli import main\n")
    names = [name for name, _ in imported_names(source, "diffserve.engine.pkg.mod")]
    assert names == ["os", "diffserve.engine.pkg.sibling", "diffserve.api.cli.main"]


def test_the_cycle_finder_finds_a_circle():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_every_package_is_read(graph):
    assert {layer(m) for m in graph} == set(PACKAGES) | {"", "__main__"}
    assert "diffserve.templates.pipeline.model" in graph
    assert "diffserve.engine.catalog" in graph and "diffserve.api.cli" in graph  # a regression here would blind the tests below


def test_no_import_cycles(graph):
    assert find_cycles(graph) == []


def test_layers_import_only_downward(graph):
    upward = [f"{src} -> {dst} (line {line})"
              for src, edges in graph.items() for dst, line in edges.items()
              if layer(dst) in FORBIDDEN.get(layer(src), ())]
    assert upward == []


def test_engine_never_imports_http_or_triton_modules():
    offenders = []
    for module, path in project_modules().items():
        if layer(module) != "engine":
            continue
        for name, line in imported_names(path, module):
            if name.split(".")[0] in THIRD_PARTY_FORBIDDEN_IN_ENGINE:
                offenders.append(f"{module}:{line} imports {name}")
    assert offenders == []


def test_only_api_cli_composes_the_command_line(graph):
    """The sub-command parsers of export and benchmarks are composed by api/cli.py alone."""
    composers = sorted(src for src, edges in graph.items()
                       if {"diffserve.export.cli", "diffserve.benchmarks.cli"} & set(edges) )
    assert composers == ["diffserve.api.cli"]


CHILD_PROCESS_HOME = "engine/processes.py"
CHILD_PROCESS_CALLS = {"Popen", "killpg", "setsid", "setpgid", "fork", "forkpty"}
CHILD_PROCESS_KEYWORDS = {"start_new_session", "process_group", "preexec_fn"}


def child_process_code(source: str) -> list[str]:
    """Calls in ``source`` that start a long-lived child or handle a process group: ``Popen`` (however
    imported), ``os.killpg``/``setsid``/``setpgid``/``fork``, or a call with ``start_new_session``,
    ``process_group`` or ``preexec_fn``; as ``line name``. Code inside strings (a child's own
    ``python -c``) is not read."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        keywords = sorted({k.arg for k in node.keywords if k.arg} & CHILD_PROCESS_KEYWORDS)
        if name in CHILD_PROCESS_CALLS or keywords:
            found.append(" ".join([str(node.lineno), name or "(call)", *keywords]))
    return found


def test_the_child_process_scan_sees_popen_killpg_and_sessions():
    source = ("import os, subprocess\nfrom subprocess import Popen\nsubprocess.Popen(['x'])\nPopen(['x'])\n"
              "os.killpg(1, 9)\nsubprocess.run(['x'], start_new_session=True)\n"
              "subprocess.run(['x'])\ncode = 'subprocess.Popen([])'\n")
    assert child_process_code(source) == ["3 Popen", "4 Popen", "5 killpg", "6 run start_new_session"]


def test_no_child_process_code_outside_the_helper():
    """Children are started, watched and stopped by engine/processes.py alone; everything else (the
    Triton launcher, the benchmarks, the demo, the tests) goes through its ChildProcess. One-shot
    commands run to completion (``subprocess.run``) are not child-process handling."""
    offenders = []
    for folder in (NAMESPACE, *FOLDERS.values(), "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if where != CHILD_PROCESS_HOME:
                offenders += [f"{where}:{hit}" for hit in child_process_code(path.read_text(encoding="utf-8"))]
    assert offenders == []


FAMILY_PREFIX = "diffserve.engine.models."
FAMILY_DOORS = {
    # The checkpoint reader builds CheckpointArchitecture, whose omni_zero field is Omni-Zero's own config:
    # the architecture is read before any family is chosen (engine.models.family_of_checkpoint needs it).
    ("diffserve.engine.checkpoint", "diffserve.engine.models.omni_zero.checkpoint"),
}


def test_family_folders_are_reached_through_their_family_object(graph):
    """Outside engine/models a family's modules are reached through its ModelFamily (engine.models and the
    catalog's ModelSpec.family), so a new family adds its folder and one registration line, nothing else."""
    families = {m.split(".")[3] for m in graph if m.startswith(FAMILY_PREFIX) and m.count(".") >= 4}
    assert {"sd", "omni_zero", "ominicontrol"} <= families
    reached = [f"{src} -> {dst} (line {line})"
               for src, edges in graph.items() if not src.startswith(FAMILY_PREFIX.rstrip("."))
               for dst, line in edges.items()
               if dst.startswith(FAMILY_PREFIX) and dst.split(".")[3] in families and (src, dst) not in FAMILY_DOORS]
    assert reached == []


def test_family_objects_do_not_import_the_catalog(graph):
    """The catalog points at the family objects; a family object that read the catalog would close a circle."""
    registry = [m for m in graph if m == "diffserve.engine.models" or m == "diffserve.engine.models.core"
                or (m.startswith(FAMILY_PREFIX) and m.count(".") == 3)]
    assert len(registry) >= 5
    assert [m for m in registry if "diffserve.engine.catalog" in graph[m]] == []

"""A plain (non-editable) install works: the wheel holds the one ``diffserve`` namespace and every
data file the code reads (Triton stub templates, engine and benchmark configs, the CLIP vocabulary,
the Redis Lua scripts), and the installed command runs from outside the checkout.

The wheel is built from a copy of the checkout's files (an in-tree ``build/`` would keep stale
modules), installed with ``--no-deps`` into a fresh virtual environment outside the checkout; the
dependencies come from this interpreter's site-packages through a plain path line in a ``.pth``
file, which adds the folder to ``sys.path`` without running its ``.pth`` files, so the editable
install's finder (which maps ``diffserve`` onto the checkout) is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "var", "demo",
                                 ".pytest_cache", "outputs")


def _copy_sources(dst: Path) -> None:
    """The files git would ship (tracked plus untracked-not-ignored), or the tree without build output."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dst, ignore=IGNORED)
        return
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, diffserve script, env, work dir) of a fresh venv holding only the built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(ROOT)
    src, wheels, venv = tmp / "src", tmp / "wheels", tmp / "venv"
    src.mkdir()
    _copy_sources(src)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(wheels)], cwd=tmp)
    (wheel,) = wheels.glob("diffserve-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "zz_diffserve_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)), encoding="utf-8")
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(DIFFSERVE_HOME=str(tmp / "home"), PYTHONNOUSERSITE="1")
    return python, venv / "bin" / "diffserve", env, work, venv


def test_the_installed_package_is_the_wheel_and_carries_its_data(installed):
    python, _, env, work, venv = installed
    code = r"""
import json, sys, tempfile
from importlib import resources
from pathlib import Path
import diffserve, diffserve.engine
from diffserve.api.redis_client import lua
from diffserve.engine.models.sd import published as sd
from diffserve.export.repository import TEMPLATES
from diffserve.triton_serving.distribution import PROJECT_ROOT
out = tempfile.mkdtemp()
print(json.dumps({
    "engine": diffserve.engine.__file__,
    "checkout": diffserve.SOURCE_CHECKOUT,
    "editable_finders": [m for m in sys.modules if m.startswith("__editable__")],
    "templates": sorted(str(p.relative_to(TEMPLATES)) for p in TEMPLATES.glob("*/model.py")),
    "templates_dir": str(TEMPLATES),
    "import_root": str(PROJECT_ROOT),
    "lua": len(lua("jobs_claim")),
    "bench_configs": sorted(p.name for p in resources.files("diffserve.benchmarks").joinpath("configs").iterdir()),
    "sd15_vocab": (sd.local_config_dir("sd15", Path(out)) / "tokenizer" / "vocab.json").is_file(),
}))
"""
    facts = json.loads(_run([str(python), "-c", code], cwd=work, env=env).stdout.strip().splitlines()[-1])
    venv = venv.resolve()
    assert Path(facts["engine"]).resolve().is_relative_to(venv), facts["engine"]
    assert not Path(facts["engine"]).resolve().is_relative_to(ROOT)
    assert facts["checkout"] is False and facts["editable_finders"] == []
    assert facts["templates"] == ["component/model.py", "pipeline/model.py"]
    assert Path(facts["templates_dir"]).resolve().is_relative_to(venv)
    assert (Path(facts["import_root"]) / "diffserve" / "__init__.py").is_file()  # the stubs' PYTHONPATH
    assert facts["lua"] > 0 and facts["sd15_vocab"]
    assert "tiny" in facts["bench_configs"] and "sd15_unet.json" in facts["bench_configs"]


def test_the_installed_command_checks_and_exports_the_demo(installed, tmp_path):
    _, diffserve, env, work, _ = installed
    check = _run([str(diffserve), "models", "check", "--demo"], cwd=work, env=env)
    assert "5 of 5 configured slugs complete" in check.stdout, check.stdout
    single = Path(env["DIFFSERVE_HOME"]) / "checkpoints" / "published" / "sd" / "scifi-fine-tune.safetensors"
    assert single.is_file()
    models = tmp_path / "models.toml"
    models.write_text(f'["sd1.5-scifi"]\ncheckpoint = "{single}"\n', encoding="utf-8")
    repo = tmp_path / "repo"
    _run([str(diffserve), "export", "--models", str(models), "--repository", str(repo), "--runtime", "torch",
          "--fused-runtime", "torch", "--device", "cpu"], cwd=work, env=env)
    stub = repo / "sd1.5-scifi" / "1" / "model.py"
    assert stub.read_text() == (ROOT / "model_repository" / "templates" / "pipeline" / "model.py").read_text()
    assert "from diffserve.engine" in stub.read_text()
    assert "sd1.5-scifi" in json.loads((repo / "repository.json").read_text())["pipelines"]


def test_an_editable_install_imports_the_checkout(tmp_path):
    """``pip install -e .``: setuptools' finder maps diffserve.<pkg> onto the top-level folders."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the build backend (setuptools, --no-build-isolation) and the dependencies come from this interpreter
    (purelib / "zz_diffserve_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation", "-q",
          "-e", str(ROOT)], cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    code = ("import json, diffserve.engine, diffserve.api.cli, diffserve.export.repository as r; "
            "print(json.dumps([diffserve.engine.__file__, diffserve.api.cli.__file__, str(r.TEMPLATES)]))")
    files = json.loads(_run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert [Path(f).resolve() for f in files] == [ROOT / "engine" / "__init__.py", ROOT / "api" / "cli.py",
                                                   ROOT / "model_repository" / "templates"]

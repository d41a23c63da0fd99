"""The serving install (`pip install .[serve]`, what the image's builder stage does) has no
torch and runs the image's entrypoint.

The fresh virtual environment gets our wheel installed for real by pip, offline
(`--no-index`). Its dependencies are not downloaded again (onnxruntime-gpu alone is hundreds
of MB): a folder of links to exactly the distributions that `.[serve]` requires, transitively,
taken from the test environment, is put on the new environment's path. pip must find every
requirement satisfied there, so a dependency missing from the `serve` extra fails the install,
and torch, which the test environment does have, is simply not in that folder.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import pkgutil
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.serve.conftest import free_ports, make_classifier
from tests.serve.procs import probe_until_serving

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on; the project supports 3.10 too
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.install


def _requirement_closure(extra: str) -> dict[str, metadata.Distribution]:
    """Installed distributions the project's core + ``extra`` requirements pull in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [(Requirement(r), "") for r in project["dependencies"]]
    todo += [(Requirement(r), "") for r in project["optional-dependencies"][extra]]
    found: dict[str, metadata.Distribution] = {}
    while todo:
        requirement, from_extra = todo.pop()
        marker = requirement.marker
        if marker is not None and not marker.evaluate({"extra": from_extra}):
            continue
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement} (needed by .[{extra}]) is not installed here")
        wanted = set(requirement.extras)
        known = found.get(name)
        if known is not None and not wanted - getattr(known, "_closure_extras", set()):
            continue
        found[name] = dist
        dist._closure_extras = wanted | getattr(known, "_closure_extras", set())  # type: ignore[attr-defined]
        for text in dist.requires or []:
            sub = Requirement(text)
            for e in ("", *wanted):
                if sub.marker is None or sub.marker.evaluate({"extra": e}):
                    todo.append((sub, e))
                    break
    return found


def _link_view(dists: dict[str, metadata.Distribution], view: Path) -> None:
    """Mirror every file of ``dists`` into ``view`` as symbolic links."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for dist in dists.values():
        for file in dist.files or []:
            if file.parts[0] == "..":
                continue  # scripts and data outside site-packages
            source = Path(dist.locate_file(file)).resolve()
            if not source.is_file() or site not in source.parents:
                continue
            target = view / file
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    # Outside the checkout by default, so `import serve` cannot pick up the source tree.
    kwargs.setdefault("cwd", tempfile.gettempdir())
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("install")
    source = work / "src"
    source.mkdir()
    # Build from a copy holding what the Dockerfile copies, like its builder stage.
    shutil.copy(ROOT / "pyproject.toml", source / "pyproject.toml")
    readme = ROOT / "README.md"  # pyproject's readme; the image build copies it too
    (source / "README.md").write_text(readme.read_text() if readme.exists() else "# readme\n")
    for name in ("serve", "export", "protos"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = work / "wheels"
    done = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--no-index", "-w", str(wheels), str(source)])
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("onnx_classifier_serving-*.whl")

    venv = work / "venv"
    done = _run([sys.executable, "-m", "venv", str(venv)])
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    view = work / "deps"
    dists = _requirement_closure("serve")
    assert "torch" not in dists
    _link_view(dists, view)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(purelib.stdout.strip()) / "serving-deps.pth").write_text(f"{view}\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    done = _run([str(python), "-m", "pip", "install", "--no-index", "--no-cache-dir",
                 f"{wheel}[serve]"], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch" not in done.stdout.lower()
    return python


def test_torch_is_absent(serving_venv: Path) -> None:
    done = _run([str(serving_venv), "-c", "import torch"])
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    listed = _run([str(serving_venv), "-m", "pip", "list", "--format", "json"])
    names = {canonicalize_name(p["name"]) for p in json.loads(listed.stdout)}
    assert "onnx-classifier-serving" in names and "grpcio" in names
    assert "torch" not in names
    where = _run([str(serving_venv), "-c", "import serve, sys; print(serve.__path__[0])"])
    assert str(ROOT) not in where.stdout, "the venv must use the installed wheel"


def test_entrypoint_serves_a_model(serving_venv: Path, tmp_path: Path) -> None:
    # The image's entrypoint, `python -m serve`, with the venv's python.
    done = _run([str(serving_venv), "-m", "serve", "--help"])
    assert done.returncode == 0 and "--model-repository" in done.stdout, done.stderr

    repository = tmp_path / "models"
    (repository / "tiny" / "1").mkdir(parents=True)
    make_classifier(repository / "tiny" / "1" / "model.onnx")
    port, metrics_port = free_ports(2)
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [str(serving_venv), "-m", "serve", "--model-repository", str(repository),
             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
             "--device", "cpu"],
            stdout=err, stderr=err, cwd=tmp_path,
        )
    try:
        probe = [str(serving_venv), "-m", "serve.health", f"127.0.0.1:{port}", "--model", "tiny"]
        # Outside the checkout, so `import serve` cannot pick up the source tree.
        done = probe_until_serving(proc, probe, cwd=tempfile.gettempdir())
        assert done.returncode == 0, done.stderr + log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert 'serve_model_ready{model="tiny"} 1.0' in r.read().decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_no_serving_module_imports_torch() -> None:
    """Even where torch is installed, importing every serve module leaves it unloaded."""
    names = [f"serve.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "serve")])]
    assert "serve.server" in names and "serve.__main__" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    done = _run([sys.executable, "-c", code], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr

"""What the distribution installs: one import name, `vramflow`, whatever the repository's layout."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.servers import REPO_ROOT

# The repository's top-level folders that install under `vramflow`.
MAPPED = ("flows", "tasks", "migrations")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    if importlib.util.find_spec("setuptools") is not None:
        command.append("--no-build-isolation")  # the build backend is already here
    subprocess.run([*command, str(REPO_ROOT)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("vramflow-*.whl")
    return built


def test_the_wheel_installs_only_the_vramflow_import_name(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"vramflow"}
    for folder in MAPPED:  # mapped, not left out
        assert f"vramflow/{folder}/__init__.py" in names
    assert "vramflow/flows/process_pdf.py" in names
    assert "vramflow/tasks/gpu_worker.py" in names
    assert any(name.startswith("vramflow/migrations/versions/") for name in names)
    assert "vramflow/migrations/script.py.mako" in names
    assert "vramflow/demo/demo.pdf" in names


def _top_level_imports(path: Path) -> list[str]:
    """Modules `path` imports, absolute imports only."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def test_no_code_imports_the_folders_by_their_checkout_names():
    """From a checkout `tasks.infer` would import too, as a second copy of the module beside
    `vramflow.tasks.infer` (with its own engines and locks), and installed it would not exist."""
    offenders = []
    for folder in ("vramflow", *MAPPED, "tests", "benchmarks", "scripts"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for module in _top_level_imports(path):
                if module.split(".")[0] in MAPPED:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}: {module}")
    assert offenders == []


def test_prefect_yaml_entrypoints_import_from_the_installed_package():
    lines = (REPO_ROOT / "prefect.yaml").read_text().splitlines()
    entrypoints = [line.split(":", 1)[1].strip() for line in lines if "entrypoint:" in line]
    assert len(entrypoints) == 3
    for entrypoint in entrypoints:
        module, _, function = entrypoint.rpartition(".")
        assert module.startswith("vramflow.flows.")
        assert importlib.util.find_spec(module) is not None, entrypoint

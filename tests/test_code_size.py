"""Every tracked Python file stays small enough to read: modules up to 400 lines, functions and
methods up to 60 (STYLE.md, "Size")."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _tracked_python_files() -> list[Path]:
    """The repository's .py files as git knows them, so virtual environments and build output
    never count."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip(f"needs git and a checkout: looked for `git` and {REPO_ROOT / '.git'}")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "*.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    # A file deleted in the work tree but not yet in the index is no longer code to read.
    return [REPO_ROOT / name for name in listed.split("\0") if (REPO_ROOT / name).is_file()]


def _offences(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    name = path.relative_to(REPO_ROOT).as_posix()
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines")
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_over_400_lines_and_no_function_over_60():
    files = _tracked_python_files()
    assert files, "git ls-files listed no .py files"
    offences = [offence for path in files for offence in _offences(path)]
    assert offences == [], (
        f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function:\n"
        + "\n".join(offences)
    )

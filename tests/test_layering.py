"""The package layering (README "Layout", docs/design.md section 2): import-linter's contracts hold, and no import hides in a function."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("main_imagenet", "generate_dataset", "main", "data_loaders", "nn", "utils", "configs")


@pytest.mark.slow
def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -c constraints.txt -e '.[dev]')")
    run = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _imports_inside_functions(source: str) -> list[tuple[int, str]]:
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return found


@pytest.mark.slow
def test_no_project_import_inside_a_function():
    """Cycles must be removed, not dodged by importing late: every project import sits at module level."""
    late = [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            for line, name in _imports_inside_functions(path.read_text())]
    assert not late, "\n".join(late)


def test_the_scan_sees_a_late_import():
    assert _imports_inside_functions("def f():\n    from utils.io import read_json\n") == [(2, "utils.io")]
    assert _imports_inside_functions("import utils.io\n") == []  # module level is fine

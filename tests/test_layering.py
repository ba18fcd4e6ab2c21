"""Package arrows point one way: the library (llama_engine/) never imports the server,
benchmarks or tests; the server never imports benchmarks or tests. The command line,
llama_engine/cli.py, is the one module that composes them."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPOSER = ROOT / "llama_engine" / "cli.py"
FORBIDDEN = {"llama_engine": {"server", "benchmarks", "tests"},
             "server": {"benchmarks", "tests"}}


def imported_packages(path: pathlib.Path) -> set[str]:
    """Top-level names of every absolute import in the file, however deeply nested."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path == COMPOSER:
            continue
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert offenders == []


def test_importing_the_library_loads_no_server_module():
    code = ("import sys, llama_engine, llama_engine.llm, llama_engine.engine.async_engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('server', 'benchmarks', 'tests')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"

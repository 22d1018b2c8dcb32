"""The test suite's own layout: test modules share code through tests/helpers.py (and fixtures through
conftest.py), never by importing each other, and the benchmarks do not depend on the tests."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

TESTS = REPO / "tests"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, function-level ones included."""
    package = ".".join(path.relative_to(REPO).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            if module == "tests":  # from tests import test_x
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def test_no_test_module_imports_another_test_module_or_conftest():
    offending = [f"{path.name}:{line}: {module}"
                 for path in sorted(TESTS.glob("*.py"))
                 for line, module in _imported_modules(path)
                 if module.startswith(("tests.test_", "tests.conftest"))]
    assert not offending, "import shared code from tests.helpers instead:\n" + "\n".join(offending)


def test_benchmarks_do_not_import_the_tests():
    offending = [f"{path.relative_to(REPO)}:{line}: {module}"
                 for path in sorted((REPO / "benchmarks").rglob("*.py"))
                 for line, module in _imported_modules(path)
                 if module == "tests" or module.startswith("tests.")]
    assert not offending, "\n".join(offending)

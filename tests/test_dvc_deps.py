"""dvc.yaml's code deps match the code: every module a stage's command imports (transitively,
function-level imports included) is a dependency of that stage, so editing it re-runs the stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from tests.conftest import REPO

PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imports(file: Path) -> set[str]:
    """Modules of this project that `file` imports anywhere (top level or inside functions)."""
    tree = ast.parse(file.read_text())
    package = ".".join(file.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pipeline import checkpoint`
    return {n for n in names if n.split(".")[0] in PACKAGES}


def imported_files(module: str) -> set[Path]:
    """The files of `module` and of everything in this project it imports, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            file = _module_file(".".join(parts[:i]))
            if file is not None and file not in seen:
                seen.add(file)
                todo.extend(_imports(file))
    return seen


def _stages() -> dict[str, dict]:
    """Every stage of dvc.yaml with foreach expanded to its first entry (the deps are the same)."""
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in raw.items():
        if "foreach" in stage:
            entries = stage["foreach"]
            key = next(iter(entries))
            item = entries[key] if isinstance(entries, dict) else key
            text = yaml.safe_dump(stage["do"]).replace("${key}", str(key))
            if isinstance(item, str):
                text = text.replace("${item}", item)
            out[name] = yaml.safe_load(text)
        else:
            out[name] = stage
    return out


def test_every_stage_depends_on_the_code_it_imports():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in _stages().items():
        command = re.match(r"bkd ([a-z-]+)", stage["cmd"].strip())
        assert command, f"stage {name}: not a bkd command"
        module = f"stages.{command.group(1).replace('-', '_')}"
        assert _module_file(module) is not None, f"stage {name}: no module {module}"
        deps = [re.sub(r"\$\{([a-z_.]+)\}", lambda m: _lookup(params, m.group(1)), d) for d in stage.get("deps", [])]
        needed = {f for f in imported_files(module) if not _docstring_only(f)}
        missing = sorted(str(f.relative_to(REPO)) for f in needed
                         if not any(f == REPO / d or REPO / d in f.parents for d in deps))
        assert not missing, f"dvc.yaml stage {name} misses deps it imports: {missing}"
        for dep in deps:
            assert (REPO / dep).exists() or dep == _lookup(params, "teacher.checkpoint") or \
                dep == _lookup(params, "extract.store") or dep.startswith("runs/") or dep.startswith("metrics/"), \
                f"stage {name}: dep {dep} does not exist"


def _docstring_only(file: Path) -> bool:
    """An __init__.py that runs nothing (a docstring at most) cannot change a stage's result."""
    body = ast.parse(file.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _lookup(params: dict, dotted: str) -> str:
    node = params
    for key in dotted.split("."):
        node = node[key]
    return str(node)


def test_the_import_walk_sees_function_level_imports():
    files = {f.relative_to(REPO).as_posix() for f in imported_files("stages.evaluate")}
    assert "pipeline/evaluate.py" in files  # imported inside main()
    assert "pipeline/targets/store.py" in files  # through evaluate -> targets (function-level)

"""dvc.yaml's code deps match the code: every module a stage's command imports (transitively,
function-level imports included) is a dependency of that stage, so editing it re-runs the stage, and
no other code is, so editing it does not. Stage one imports nothing of the student side."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

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
        code = [d for d in deps if d.split("/")[0] in PACKAGES]
        extra = [d for d in code if not any(f == REPO / d or REPO / d in f.parents for f in needed)]
        assert not extra, f"dvc.yaml stage {name} depends on code it never imports: {extra}"
        for dep in deps:
            assert (REPO / dep).exists() or dep == _lookup(params, "teacher.checkpoint") or \
                dep == _lookup(params, "extract.identity") or dep.startswith("runs/") or dep.startswith("metrics/"), \
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
    assert "pipeline/student/evaluate.py" in files  # imported inside main()
    assert "pipeline/targets/reader.py" in files  # through evaluate -> targets (function-level)


@pytest.mark.parametrize("stage", ["stages.train_teacher", "stages.extract_teacher"])
def test_stage_one_imports_nothing_of_the_student_side(stage):
    files = {f.relative_to(REPO).as_posix() for f in imported_files(stage)}
    student = sorted(f for f in files if f.startswith("pipeline/student/"))
    assert not student, f"{stage} imports student code: {student}"
    assert "pipeline/teacher/train.py" not in files or stage == "stages.train_teacher"
    if stage == "stages.extract_teacher":  # extraction imports no teacher-training code
        assert not {"pipeline/teacher/train.py", "pipeline/engine.py", "pipeline/rundir.py"} & files


def test_the_one_teacher_route_to_student_code_is_the_snn_teacher():
    """A `bkd:<student>` teacher is a student architecture: the teacher side reaches the student models
    through `snn_models()` alone, by name, and only for such a teacher."""
    from pipeline.teacher import models

    def names_student_module(file: Path) -> bool:  # a string that is a student module's name (importlib)
        return any(isinstance(node, ast.Constant) and isinstance(node.value, str)
                   and re.fullmatch(r"pipeline\.student(\.\w+)*", node.value) for node in ast.walk(ast.parse(file.read_text())))

    shared = [f for f in (REPO / "pipeline").rglob("*.py") if not f.is_relative_to(REPO / "pipeline/student")]
    routes = {f.relative_to(REPO).as_posix() for f in shared if names_student_module(f)}
    assert routes == {"pipeline/teacher/models.py"}, routes
    assert models.SNN_MODELS == "pipeline.student.models"
    assert models.snn_models().STUDENTS  # the registry it names exists


def test_the_student_stages_are_the_distillation_modes():
    """train_student has one stage per mode of pipeline.modes, its `uses` the parameters the mode's loss
    reads (padded with seed); evaluate one per mode too."""
    from pipeline.modes import MODES

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    foreach = stages["train_student"]["foreach"]
    slots = sum(str(p).startswith("${item.uses[") for p in stages["train_student"]["do"]["params"])
    assert list(foreach) == list(MODES)
    for mode, item in foreach.items():
        assert [u for u in item["uses"] if u != "seed"] == list(MODES[mode].params), mode
        assert len(item["uses"]) == slots, mode
    assert stages["evaluate"]["foreach"] == list(MODES)


def test_the_store_is_never_a_dvc_output_or_dependency():
    """DVC tracks the store's identity file, never the store: it would hash it, copy it into its cache and
    into every queued experiment, and delete it (at a URL too) before re-running the extraction."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    store, identity = _lookup(params, "extract.store"), _lookup(params, "extract.identity")
    assert identity and identity != store
    text = (REPO / "dvc.yaml").read_text()
    assert "${extract.store}" not in text.replace("# ", "")
    stages = _stages()
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stages["extract_teacher"]["outs"]]
    assert outs == ["${extract.identity}"]
    for name, stage in stages.items():
        if name.startswith(("train_student", "evaluate")):
            assert "${extract.identity}" in stage["deps"], name
    config = (REPO / ".dvc/config").read_text()
    assert re.search(r"^\s*type = hardlink,symlink$", config, re.M), "DVC's cache must link, not copy"

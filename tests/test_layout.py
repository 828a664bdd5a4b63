"""The shape the design card asks for, measured: no import circles between the repository's files (an
import inside a function counts too), no non-test file over MAX_LINES lines, and each training stage's
`train` short enough to read top to bottom."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600        # the "no non-test file over about 600 lines"
MAX_TRAIN_LINES = 70   # each stage's `train`
SKIP = {"tests", ".venv", "runs", "data", ".git"}


def source_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP & set(p.relative_to(REPO).parts))


def module_file(name: str) -> Path | None:
    """The repository file of a dotted module name, None for anything outside the repository."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path) -> set[Path]:
    """The repository files `path` imports, at any depth of its code."""
    found = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's package
                module = ".".join(filter(None, [package, module]))
            # `from pkg import sub` imports the submodule when there is one, else the package's name
            names = [f"{module}.{alias.name}" if module_file(f"{module}.{alias.name}") else module
                     for alias in node.names]
        for name in names:
            target = module_file(name)
            if target is not None and target != path:
                found.add(target)
    return found


def test_no_import_circles():
    graph = {path: imports_of(path) for path in source_files()}
    state: dict[Path, str] = {}

    def visit(path: Path, stack: list[Path]) -> None:
        state[path] = "open"
        for target in graph.get(path, ()):
            if state.get(target) == "open":
                circle = stack[stack.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(str(p.relative_to(REPO)) for p in circle))
            if target not in state:
                visit(target, stack + [target])
        state[path] = "done"

    for path in graph:
        if path not in state:
            visit(path, [path])


def test_no_file_is_a_container():
    long = {str(p.relative_to(REPO)): n for p in source_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("script", ["train_stage1.py", "train_stage2.py"])
def test_each_stage_train_reads_in_one_screenful(script):
    tree = ast.parse((REPO / script).read_text())
    train = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert train.end_lineno - train.lineno + 1 <= MAX_TRAIN_LINES

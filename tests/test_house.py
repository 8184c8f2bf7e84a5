"""The house: every project import points down a floor, none hides inside a function, and the training script
stays a loop a researcher can read in place. docs/architecture.md draws the same floors.

Read with `ast`, counting imports anywhere in a file (module level, functions, TYPE_CHECKING blocks), so a cycle
cannot come back disguised as a lazy import. A new module gets a floor here: above everything it imports, below
everything that imports it.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# Lowest floor first. A module may import only modules on lower floors.
FLOORS = [
    ["config", "metrics", "plots", "distributed", "quant"],  # settings; pure scoring; SVG; processes and signals;
    # NF4 weights
    ["clips", "trackers"],  # the clip model: parsing, the event-frame rule, the dialogue state, DataError; W&B and
    # TensorBoard
    ["sequence", "frames"],  # tokens and labels of a clip; frame files and raw-frame decoding
    ["losses", "backbones"],  # the four losses; VLM towers and real-weight imports
    ["logs", "model"],  # log lines, progress, MFU; the model and its precision policy
    ["nlg", "demo", "extract", "stream", "sharding"],  # text metrics; demo data; feature extraction; the streaming
    # runner; FSDP sharding
    ["data", "report"],  # clip policies, dataset, sampler, collate, data CLI; the evaluation report
    ["checkpoint", "validation"],  # checkpoints; validation during training
    ["train", "evaluate", "export"],  # the two scripts; exporting a checkpoint
    ["judge"],  # the LLM judge of an evaluation's predictions (runs evaluate.py first when asked)
]
FLOOR = {module: level for level, modules in enumerate(FLOORS) for module in modules}
LIMITS = {"train_lines": 550, "function_lines": 100, "parameters": 8}


def project_modules() -> dict[str, Path]:
    return {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name.split(".")[0] for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            found.extend((name, child.lineno, inside) for name in names if name in modules and name != path.stem)
            visit(child, inside)

    visit(tree, False)
    return found


def test_every_module_has_a_floor_and_imports_only_from_below():
    modules = project_modules()
    assert set(modules) == set(FLOOR), f"give these modules a floor in FLOORS: {sorted(set(modules) ^ set(FLOOR))}"
    upward = []
    for name, path in modules.items():
        for imported, line, _ in project_imports(path, set(modules)):
            if FLOOR[imported] >= FLOOR[name]:
                upward.append(f"{name}.py:{line} imports {imported} (floor {FLOOR[imported]} >= {FLOOR[name]})")
    assert not upward, "\n".join(upward)


def test_no_project_import_hides_in_a_function():
    modules = project_modules()
    hidden = [f"{name}.py:{line} imports {imported} inside a function"
              for name, path in modules.items() for imported, line, inside in project_imports(path, set(modules))
              if inside]
    assert not hidden, "\n".join(hidden)


def functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, lines, parameters without self/cls) of every function of a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            count = len(params) - (1 if params and params[0].arg in ("self", "cls") else 0)
            out.append((node.name, node.end_lineno - node.lineno + 1, count))
    return out


def test_the_training_script_reads_in_place():
    train = ROOT / "train.py"
    lines = len(train.read_text().splitlines())
    assert lines <= LIMITS["train_lines"], f"train.py has {lines} lines; move what is not the loop to its own room"
    longest = max(functions(train), key=lambda f: f[1])
    assert longest[1] <= LIMITS["function_lines"], f"train.py: {longest[0]} is {longest[1]} lines"
    for script in ("train.py", "evaluate.py"):
        crowded = [(name, n) for name, _, n in functions(ROOT / script) if n > LIMITS["parameters"]]
        assert not crowded, f"{script}: functions taking more than {LIMITS['parameters']} parameters: {crowded}"


def test_tests_share_helpers_only_through_conftest():
    """A test file imports no other test file: what several of them need lives in conftest.py."""
    test_files = {path.stem for path in (ROOT / "tests").glob("test_*.py")}
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"{path.name}:{node.lineno} imports {name}" for name in names if name in test_files]
    assert not found

"""The package keeps the layering docs/architecture.md states: every import of a module of
fmnist_accel (at the top of a file or inside a function, TYPE_CHECKING ones included) goes
down the documented import order and only into folders its own folder may use; every module
is in that order and in the module tables; the subpackages' __init__.py files stay empty.

    python tests/test_layering.py      # the import graph in figures: modules, arrows, by folder

The check reads the code's own syntax (ast), not a tool's picture of it.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "fmnist_accel"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    """fmnist_accel/run/training.py -> 'run/training'; fmnist_accel/cli.py -> 'cli'."""
    return path.relative_to(PACKAGE).with_suffix("").as_posix()


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {
        path.relative_to(package).with_suffix("").as_posix(): path
        for path in sorted(package.rglob("*.py"))
    }


def imported_modules(name: str, source: str, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import of a package module in `source` (module `name`):
    `from . import x`, `from ..store.layout import y`, `import fmnist_accel.engine.data`, at
    any depth of the file."""
    found = []
    folder = name.split("/")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = folder[: len(folder) - (node.level - 1)] if node.level > 1 else folder
            elif node.module and node.module.split(".")[0] == "fmnist_accel":
                base = []
            else:
                continue
            parts = node.module.split(".") if node.module else []
            if not node.level:
                parts = parts[1:]  # fmnist_accel.x.y -> x/y
            target = "/".join([*base, *parts])
            for alias in node.names:
                as_module = f"{target}/{alias.name}" if target else alias.name
                if as_module in modules:  # from . import outputs
                    found.append((node.lineno, as_module))
                elif target in modules:  # from .layout import CONFIG
                    found.append((node.lineno, target))
                elif f"{target}/__init__" in modules:  # from ..store import something else
                    found.append((node.lineno, f"{target}/__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                target = "/".join(parts[1:])
                if parts[0] == "fmnist_accel" and target in modules:
                    found.append((node.lineno, target))
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, list[tuple[int, str]]]:
    modules = package_modules(package)
    return {
        name: imported_modules(name, path.read_text(), set(modules))
        for name, path in modules.items()
    }


# --------------------------------------------------------------------------------------------
# What docs/architecture.md states
# --------------------------------------------------------------------------------------------
def section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/architecture.md has no section '## {heading}'"
    return match.group(1)


def documented_order(text: str) -> dict[str, int]:
    """module -> layer (0 is the top) from the first indented block of '## Import order'."""
    block = re.search(r"((?:^    \S.*\n)+)", section(text, "Import order"), re.M)
    assert block, "the import order is an indented block of module names, top line first"
    layers = {}
    for depth, line in enumerate(block.group(1).splitlines()):
        for name in re.split(r",\s*", line.strip()):
            assert name not in layers, f"{name} is listed twice in the import order"
            layers[name] = depth
    return layers


def folder_rules(text: str) -> dict[str, set[str]]:
    """folder -> the folders and top-level modules it may import, from the '## Folders' table
    (its first column the folder, its last what it may import)."""
    rules = {}
    for row in section(text, "Folders").splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        folder = cells[0].strip("`").rstrip("/")
        rules[folder] = {c.rstrip("/") for c in re.findall(r"`([^`]+)`", cells[-1])}
    return rules


def area(module: str) -> str:
    """The folder of a module, or the module itself at the top of the package."""
    return module.split("/")[0]


def layering_problems(graph: dict, order: dict[str, int], rules: dict) -> list[str]:
    problems = []
    for module in sorted(set(graph) - set(order)):
        if not module.endswith("/__init__"):
            problems.append(f"{module} is not in the documented import order")
    for module in sorted(set(order) - set(graph)):
        problems.append(f"the import order names {module}, which does not exist")
    for module, imports in sorted(graph.items()):
        for line, target in imports:
            if target.endswith("/__init__") or target == module:
                continue
            where = f"fmnist_accel/{module}.py:{line} imports {target}"
            if module in order and target in order and order[target] <= order[module]:
                direction = "up" if order[target] < order[module] else "across"
                problems.append(f"{where}: {direction} the documented order")
            source, goal = area(module), area(target)
            if source in rules and source != goal and goal not in rules[source]:
                problems.append(f"{where}: {source}/ may not import from {goal}")
    return problems


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------
def test_every_import_goes_down_the_documented_order_and_into_allowed_folders():
    text = ARCHITECTURE.read_text()
    problems = layering_problems(import_graph(), documented_order(text), folder_rules(text))
    assert problems == [], "\n".join(problems)


def test_every_module_is_described_in_the_architecture_page():
    text = ARCHITECTURE.read_text()
    described = set(re.findall(r"^\| `([\w/]+)\.py` \|", section(text, "Modules"), re.M))
    modules = {m for m in package_modules() if not m.endswith("__init__") and m != "__main__"}
    assert sorted(modules - described) == [], "modules missing from the module tables"
    assert sorted(described - modules) == [], "the module tables name modules that do not exist"


def test_the_subpackages_faces_are_empty():
    """An __init__.py that imported its modules would load them all (and torch) for
    `fmnist-accel --help`."""
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        assert init.read_text().strip() == "", f"{init.relative_to(REPO)} is not empty"


def test_the_check_sees_an_upward_import_an_unknown_module_and_a_forbidden_folder(tmp_path):
    """The checker itself, on a package written here: it must find what it is for."""
    package = tmp_path / "fmnist_accel"
    files = {
        "cli.py": "from .run import training\n",
        "run/__init__.py": "",
        "run/training.py": "def f():\n    from ..commands.eval import g  # a run using a command\n",
        "commands/__init__.py": "",
        "commands/eval.py": "from ..engine import loop\n",
        "engine/__init__.py": "",
        "engine/loop.py": "from ..run.training import f  # upward, from a lower layer\n",
        "engine/extra.py": "",
    }
    for name, code in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(code)
    order = {"cli": 0, "commands/eval": 1, "run/training": 2, "engine/loop": 3}
    rules = {"run": {"engine"}, "commands": {"engine"}, "engine": set()}
    problems = layering_problems(import_graph(package), order, rules)
    assert "engine/extra is not in the documented import order" in problems
    assert any(
        p.startswith("fmnist_accel/engine/loop.py:1 imports run/training: up") for p in problems
    )
    assert any("run/training.py:2 imports commands/eval: up" in p for p in problems)
    assert any("run/ may not import from commands" in p for p in problems)
    assert any("engine/ may not import from run" in p for p in problems)
    assert len(problems) == 5, problems


def graph_figures() -> str:
    graph = import_graph()
    modules = [m for m in graph if not m.endswith("__init__")]
    arrows = {
        (m, t) for m, imports in graph.items() for _, t in imports if not t.endswith("__init__")
    }
    folders = Counter(area(m) for m in modules if "/" in m)
    between = {(area(a), area(b)) for a, b in arrows if area(a) != area(b)}
    lines = [
        f"{len(modules)} modules: {len(modules) - sum(folders.values())} at the top, "
        + ", ".join(f"{n} in {f}/" for f, n in sorted(folders.items())),
        f"{len(arrows)} import arrows between modules, {len(between)} between folders and "
        "top-level modules",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(graph_figures())
    sys.exit(0)

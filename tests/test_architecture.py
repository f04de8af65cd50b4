"""The shape of the code: every module of ``blocks``, ``hybrid`` and ``convert`` imports (and the
benchmark scripts' imports resolve); their import graph, read from the source with ``ast`` (imports
at module level and inside functions alike), has no cycle; no module imports another module's
private name; nothing imports the command line except ``python -m hybrid``; every module has a
docstring; no function of these packages or of ``benchmarks`` is longer than 80 lines, argument
tables excepted. Each check is also run on a small planted package that breaks it, so none can pass
by seeing nothing."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blocks", "hybrid", "convert")
CLI = "hybrid.cli"
CLI_ENTRY = "hybrid.__main__"  # runs the command line when imported: checked, never imported here
OPTIONAL = {"hybrid.evaluation.lm_eval_adapter": "lm_eval"}  # module -> the extra it needs
MAX_FUNCTION_LINES = 80
ARGPARSE_BUILDERS = {"ArgumentParser", "add_argument", "add_argument_group", "add_mutually_exclusive_group",
                     "add_parser", "add_subparsers", "set_defaults"}


@dataclasses.dataclass(frozen=True)
class Import:
    """``importer`` imports the project module ``module`` (and from it ``name``, when the import takes
    a name that is not itself a module)."""

    importer: str
    module: str
    name: str | None
    line: int

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.module}{'.' + self.name if self.name else ''}"


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_in(path: Path, importer: str, is_package: bool, modules: set[str],
               packages: tuple[str, ...]) -> list[Import]:
    """Every import of a project module in the file ``path`` (module ``importer``), at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(importer, alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, one level up per extra dot
                package = importer.split(".") if is_package else importer.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append(Import(importer, submodule, None, node.lineno) if submodule in modules
                             else Import(importer, base, alias.name, node.lineno))
    return [i for i in found if i.module.split(".")[0] in packages]


def project_imports(root: Path, packages: tuple[str, ...]) -> list[Import]:
    files = module_files(root, packages)
    return [i for name, path in files.items()
            for i in imports_in(path, name, path.name == "__init__.py", set(files), packages)]


def find_cycle(imports: list[Import]) -> list[str] | None:
    """A cycle of the import graph as the modules along it (the first repeated at the end), or None."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.importer, set()).add(i.module)
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def private_imports(imports: list[Import]) -> list[Import]:
    """Imports of a ``_private`` name, or of a ``_private`` module, from another module."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    return [i for i in imports if i.module != i.importer
            and (private(i.name or "") or private(i.module.rsplit(".", 1)[-1]))]


def cli_imports(imports: list[Import]) -> list[Import]:
    """Imports of the command line from outside it, other than its entry point."""
    def in_cli(module: str) -> bool:
        return module == CLI or module.startswith(CLI + ".")

    return [i for i in imports if in_cli(i.module) and not in_cli(i.importer) and i.importer != CLI_ENTRY]


def without_docstring(root: Path, packages: tuple[str, ...]) -> list[str]:
    return [name for name, path in module_files(root, packages).items()
            if not ast.get_docstring(ast.parse(path.read_text()))]


def is_argument_table(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the function's body is an argument table and nothing else: every statement, other
    than a docstring and one ``return`` of a plain name at the end, is a call (bare or assigned to
    names) to ``argparse.ArgumentParser`` or to a parser's ``add_argument``, ``add_parser``,
    ``add_subparsers``, ``add_argument_group``, ``add_mutually_exclusive_group`` or ``set_defaults``.
    A loop, a condition, or any other work in the body makes it an ordinary function."""
    body = list(function.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if body and isinstance(body[-1], ast.Return) and isinstance(body[-1].value, ast.Name):
        body = body[:-1]

    def builder_call(statement: ast.stmt) -> bool:
        if isinstance(statement, ast.Expr):
            value = statement.value
        elif isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
            value = statement.value
        else:
            return False
        if not isinstance(value, ast.Call):
            return False
        name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", None)
        return name in ARGPARSE_BUILDERS

    return bool(body) and all(builder_call(statement) for statement in body)


def long_functions(root: Path, folders: tuple[str, ...]) -> list[str]:
    """``path:line name (N lines)`` for every function or method of a ``.py`` file under ``folders``
    longer than ``MAX_FUNCTION_LINES``, from its ``def`` (decorators not counted) to its last line,
    unless it is an argument table."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES and not is_argument_table(node):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


# ----------------------------------------------------------------------------- the project

def test_every_module_imports():
    """In a fresh interpreter, so no import here changes what other tests see (lm_eval's globals)."""
    names = [name for name in module_files(ROOT, PACKAGES) if name != CLI_ENTRY
             and (name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[name]) is not None)]
    script = ("import importlib, json, sys, traceback\nfailed = {}\nfor name in json.loads(sys.argv[1]):\n"
              "    try:\n        importlib.import_module(name)\n    except Exception:\n"
              "        failed[name] = traceback.format_exc(limit=-3)\nprint(json.dumps(failed))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(names)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())
    assert len(names) > 50  # the walk found the packages


def test_the_entry_point_and_the_benchmark_scripts_import_what_exists():
    """``hybrid/__main__.py`` (which runs the command line when imported) and ``benchmarks/*.py``:
    every project module they import exists, with every name they take from it."""
    files = module_files(ROOT, PACKAGES)
    scripts = {CLI_ENTRY: files[CLI_ENTRY]}
    scripts.update({f"benchmarks.{p.stem}": p for p in sorted((ROOT / "benchmarks").glob("*.py"))})
    missing = []
    for name, path in scripts.items():
        for i in imports_in(path, name, False, set(files), PACKAGES):
            module = importlib.import_module(i.module)
            if i.name is not None and not hasattr(module, i.name):
                missing.append(str(i))
    assert not missing, "\n".join(missing)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(project_imports(ROOT, PACKAGES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    found = private_imports(project_imports(ROOT, PACKAGES))
    assert not found, "\n".join(map(str, found))


def test_nothing_imports_the_command_line_but_its_entry_point():
    found = cli_imports(project_imports(ROOT, PACKAGES))
    assert not found, "\n".join(map(str, found))


def test_every_module_has_a_docstring():
    assert not without_docstring(ROOT, PACKAGES)


def test_no_function_is_longer_than_80_lines():
    found = long_functions(ROOT, PACKAGES + ("benchmarks",))
    assert not found, "\n".join(found)


# ----------------------------------------------------------------------------- the checks themselves

@pytest.fixture
def planted(tmp_path) -> Path:
    """A package ``pkg`` with one of each fault: a cycle through an import inside a function (a -> b
    -> a), a private name taken from another module, the command line imported from a library
    module, a module without a docstring; and in ``long.py`` an argument table of 84 lines (which
    passes), a table with one more call in it (82 lines), a function of 80 lines (which passes) and
    a method of 81 lines."""
    table = "    parser.add_argument('--x')\n" * 80
    work = "    x = 1\n"
    long = ('"""Long functions."""\nimport argparse\n\n\n'
            'def table():\n    """A table."""\n    parser = argparse.ArgumentParser()\n' + table + "    return parser\n\n\n"
            "def almost_table(parser):\n" + table + "    parser.parse_args()\n\n\n"
            "def fits():\n" + work * 79 + "\n\n"
            "class K:\n    def too_long(self):\n" + ("    " + work) * 80)
    modules = {
        "__init__.py": '"""The package."""\n',
        "a.py": '"""A."""\nfrom pkg import b\n_hidden = 1\n',
        "b.py": '"""B."""\n\ndef late():\n    from pkg.a import _hidden\n    return _hidden\n',
        "c.py": '"""C."""\nfrom . import d\n',
        "d.py": "import json\n",
        "cli/__init__.py": '"""The command line."""\n',
        "cli/main.py": '"""Main."""\nfrom pkg import c\n',
        "lib.py": '"""A library module."""\nfrom pkg.cli import main\n',
        "long.py": long,
    }
    for name, text in modules.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    return tmp_path


def test_the_checks_find_what_is_planted(planted, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CLI", "pkg.cli")
    imports = project_imports(planted, ("pkg",))
    assert {(i.importer, i.module, i.name) for i in imports} >= {
        ("pkg.a", "pkg.b", None), ("pkg.b", "pkg.a", "_hidden"), ("pkg.c", "pkg.d", None),
        ("pkg.cli.main", "pkg.c", None), ("pkg.lib", "pkg.cli.main", None)}
    assert find_cycle(imports) == ["pkg.a", "pkg.b", "pkg.a"]
    assert [(i.importer, i.name) for i in private_imports(imports)] == [("pkg.b", "_hidden")]
    assert [i.importer for i in cli_imports(imports)] == ["pkg.lib"]
    assert without_docstring(planted, ("pkg",)) == ["pkg.d"]
    assert long_functions(planted, ("pkg",)) == ["pkg/long.py:91 almost_table (82 lines)",
                                                  "pkg/long.py:258 too_long (81 lines)"]

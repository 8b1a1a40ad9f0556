"""The code layout of docs/model.md holds: the shared engine (scripts/engine) imports neither family, no module imports
another module's private names, in-project imports sit at the top of their modules, and every dotted path that the
configs and docs name exists."""

from __future__ import annotations

import ast
import glob
import importlib
import json
import os
import re

import pytest

from tests.conftest import ROOT

FAMILIES = ("scripts.vdvae", "scripts.vq")
PROJECT = ("scripts", "tests")
# In-project imports allowed inside a function or class body: {(module, imported module): reason}. Keep it empty: a
# cycle is better broken by moving the shared piece down into scripts/engine.
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def python_files(*folders: str) -> list[str]:
    return sorted(f for d in folders for f in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True))


def imports(source: str, module: str, is_package: bool = False) -> list[dict]:
    """Every import of ``source`` (the code of ``module``), one per imported module: {"module", "names": the names
    taken from it (``from`` imports), "line", "local": whether it sits inside a function or class body}. Relative
    imports are resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append({"module": alias.name, "names": [], "line": child.lineno, "local": local})
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names = [a.name for a in child.names]
                found.append({"module": base, "names": names, "line": child.lineno, "local": local})
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def targets(i: dict) -> list[str]:
    """What an import may load: its module and, for ``from package import name``, ``package.name`` (a submodule)."""
    return [i["module"]] + [f"{i['module']}.{n}" for n in i["names"]]


def in_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT


def family_imports(source: str, module: str) -> list[str]:
    """Imports of a family package by ``module`` (meant for the modules of scripts/engine)."""
    return [
        f"{module}:{i['line']} imports {i['module']}{' ' + str(i['names']) if i['names'] else ''}"
        for i in imports(source, module)
        if any(t == f or t.startswith(f + ".") for t in targets(i) for f in FAMILIES)
    ]


def private_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """``from X import _name`` (or ``import X._private``) of another in-project module's private name."""
    out = []
    for i in imports(source, module, is_package):
        if not in_project(i["module"]) or i["module"] == module:
            continue
        private = [n for n in i["names"] if n.startswith("_") and not n.startswith("__")]
        private += [p for p in i["module"].split(".") if p.startswith("_") and not p.startswith("__")]
        if private:
            out.append(f"{module}:{i['line']} imports {private} from {i['module']}")
    return out


def local_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """In-project imports inside a function or class body, except those of :data:`LOCAL_IMPORTS_ALLOWED`."""
    return [
        f"{module}:{i['line']} imports {i['module']} inside a function"
        for i in imports(source, module, is_package)
        if i["local"] and in_project(i["module"]) and (module, i["module"]) not in LOCAL_IMPORTS_ALLOWED
    ]


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_the_engine_imports_no_family():
    files = python_files("scripts/engine")
    assert len(files) > 10
    bad = [v for f in files for v in family_imports(read(f), module_name(f))]
    assert not bad, "scripts/engine must not depend on a family:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = [
        v
        for f in python_files("scripts", "tests")
        for v in private_imports(read(f), module_name(f), f.endswith("__init__.py"))
    ]
    assert not bad, "make these names public or move them:\n" + "\n".join(bad)


def test_in_project_imports_are_at_module_top():
    bad = [
        v for f in python_files("scripts") for v in local_imports(read(f), module_name(f), f.endswith("__init__.py"))
    ]
    assert not bad, "move these imports to the top of the module:\n" + "\n".join(bad)
    for (module, imported), reason in LOCAL_IMPORTS_ALLOWED.items():
        assert reason.strip(), f"{module} -> {imported}: say why the import must stay inside the function"


def test_the_checks_catch_what_they_forbid():
    code = (
        "import os\n"
        "from . import network\n"
        "from scripts.engine.metrics import summary, _operating_points\n"
        "def f():\n"
        "    import json\n"
        "    from scripts import vq\n"
        "    return lambda: None\n"
        "class C:\n"
        "    def g(self):\n"
        "        from scripts.vdvae.network import VDVAE\n"
    )
    assert family_imports(code, "scripts.engine.x") == [
        "scripts.engine.x:6 imports scripts ['vq']",
        "scripts.engine.x:10 imports scripts.vdvae.network ['VDVAE']",
    ]
    assert family_imports(code, "scripts.vdvae.x") == [
        "scripts.vdvae.x:2 imports scripts.vdvae ['network']",
        "scripts.vdvae.x:6 imports scripts ['vq']",
        "scripts.vdvae.x:10 imports scripts.vdvae.network ['VDVAE']",
    ]
    assert private_imports(code, "scripts.engine.x") == [
        "scripts.engine.x:3 imports ['_operating_points'] from scripts.engine.metrics"
    ]
    assert private_imports(code, "scripts.engine.metrics") == []  # a module's own private names are its business
    assert local_imports(code, "scripts.engine.x") == [
        "scripts.engine.x:6 imports scripts inside a function",
        "scripts.engine.x:10 imports scripts.vdvae.network inside a function",
    ]


def resolve(dotted: str) -> object:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def dotted_paths(text: str) -> set[str]:
    return {m.rstrip(".") for m in re.findall(r"\bscripts(?:\.[A-Za-z_]\w*)+", text)}


@pytest.mark.parametrize(
    "pattern",
    ["configs/*.json", "docs/*.md", "README.md", "scripts/**/*.py"],
    ids=["configs", "docs", "readme", "code"],
)
def test_every_dotted_path_named_exists(pattern):
    """The ``_target_`` and expressions of the configs, and the paths docs and docstrings name, after moves."""
    files = [f for f in glob.glob(os.path.join(ROOT, pattern), recursive=True) if not f.endswith("metadata.json")]
    assert files
    missing = []
    for f in files:
        text = read(f)
        if f.endswith(".json"):
            json.loads(text)
        for path in sorted(dotted_paths(text)):
            try:
                resolve(path)
            except (ImportError, AttributeError) as e:
                missing.append(f"{os.path.relpath(f, ROOT)}: {path} ({type(e).__name__}: {e})")
    assert not missing, "\n".join(missing)

"""The import layers (issue 17): packages point one way, ov3common <- encoder <- {llava_bridge, rae_generation} <-
eval, and no two modules import each other, directly or round a loop. Read from the source (AST), every import
statement at any depth (a function-level import counts: it hides a cycle, it does not remove it).

An upper layer reaches down only by name: a trainer's in-training evaluation and ``ov3common.pipeline``'s schemas are
``module:function`` strings in the config, imported with :func:`ov3common.config.import_object`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# rank of each package: a module may import its own package and packages of a lower rank only (siblings: no)
LAYERS = {"ov3common": 0, "encoder": 1, "llava_bridge": 2, "rae_generation": 2, "eval": 3}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    p = root.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path, root: Path, packages) -> list[tuple[str, int]]:
    """(imported project module, line) of every import statement in ``path`` (any depth)."""
    me = module_name(path, root)
    here = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            names = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}", root) else base for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] in packages:
                while not is_module(n, root) and "." in n:  # `import a.b.c` of an attribute path: its module
                    n = n.rsplit(".", 1)[0]
                out.append((n, node.lineno))
    return out


def graph(root: Path, layers: dict[str, int]) -> dict[str, dict[str, int]]:
    """{module: {imported project module: line}} over the packages of ``layers``."""
    g: dict[str, dict[str, int]] = {}
    for pkg in layers:
        for f in sorted((root / pkg).rglob("*.py")):
            g.setdefault(module_name(f, root), {}).update(
                {m: line for m, line in imports_of(f, root, layers) if m != module_name(f, root)})
    return g


def upward(g: dict[str, dict[str, int]], layers: dict[str, int]) -> list[str]:
    bad = []
    for a, deps in g.items():
        pa = a.split(".")[0]
        for b, line in deps.items():
            pb = b.split(".")[0]
            if pb != pa and layers[pb] >= layers[pa]:
                bad.append(f"{a}:{line} imports {b} ({pb} is not below {pa})")
    return bad


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_packages_import_only_lower_layers():
    g = graph(ROOT, LAYERS)
    assert len(g) > 80, "the walk found the project's modules"
    assert upward(g, LAYERS) == []


def test_no_import_cycle_between_modules():
    assert cycles(graph(ROOT, LAYERS)) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("late", [False, True])
def test_checker_finds_a_cycle_and_an_upward_import(tmp_path, late):
    """The walk sees through function-level and relative imports (what hid the old cycles)."""
    indent = "def f():\n    " if late else ""
    _write(tmp_path, {"low/__init__.py": "", "low/a.py": f"{indent}from . import b\n",
                      "low/b.py": f"{indent}from low.c import x\n", "low/c.py": f"{indent}import low.a\n",
                      "low/d.py": f"{indent}from top.e import y\n", "top/__init__.py": "",
                      "top/e.py": "from low import b\n"})
    layers = {"low": 0, "top": 1}
    g = graph(tmp_path, layers)
    assert cycles(g) == [["low.a", "low.b", "low.c"]]
    assert upward(g, layers) == [f"low.d:{2 if late else 1} imports top.e (top is not below low)"]


def test_every_subprocess_a_test_starts_has_a_timeout():
    """A hung child (torchrun, make) fails its test instead of stalling the suite: ``subprocess.run`` and friends get
    ``timeout=``; a ``Popen`` is waited on with ``communicate(timeout=)`` or a deadline loop (tests/helpers.py)."""
    bare = []
    for f in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                    and node.func.attr in ("run", "call", "check_call", "check_output")
                    and not any(k.arg == "timeout" for k in node.keywords)):
                bare.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert bare == []


def test_no_test_skips_on_a_project_module():
    """``pytest.importorskip`` is for optional third-party packages: a broken project module must fail, not skip."""
    skips = []
    for f in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "importorskip" and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).split(".")[0] in LAYERS):
                skips.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.args[0].value}")
    assert skips == []

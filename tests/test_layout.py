"""The import rules of the package layout (README "How the code is laid out"), read from the
source with `ast`: every import counts, those inside functions too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "donkeytune"
KERNELS = ("attention", "loralinear", "dropout", "headloss", "blockops", "prefixcache")
TORCH_ENGINE = "donkeytune.train.torch"
ENGINES = (TORCH_ENGINE, "donkeytune.train.mlx")


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under `root` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """For every module of the package: the package's modules it imports, and the top-level
    names of the outside packages it imports (torch, mlx, ...)."""
    modules = module_names(root, package)
    inner, outer = {}, {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        inner[name], outer[name] = set(), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                if target == package or target.startswith(package + "."):
                    while target not in modules:  # `import pkg.mod.attr` style: the module part
                        target = target.rpartition(".")[0]
                    if target != name:
                        inner[name].add(target)
                else:
                    outer[name].add(target.split(".")[0])
    return inner, outer


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a graph (one path per strongly connected group of modules)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT, "donkeytune")


def test_no_import_circle(graph):
    inner, _ = graph
    assert cycles(inner) == []


def test_the_checker_finds_a_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")  # a lazy import counts
    (pkg / "c.py").write_text("from pkg import a\nimport os\n")
    inner, outer = import_graph(pkg, "pkg")
    assert inner["pkg.a"] == {"pkg.sub.b"} and outer["pkg.c"] == {"os"}
    assert cycles(inner) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("import os\n")
    assert cycles(import_graph(pkg, "pkg")[0]) == []


def test_gguf_does_not_import_torch(graph):
    _, outer = graph
    offenders = [m for m, names in outer.items() if m.startswith("donkeytune.gguf")
                 and m != "donkeytune.gguf.fidelity" and "torch" in names]
    assert offenders == []


def test_speed_kernels_are_imported_only_by_the_torch_engine(graph):
    inner, _ = graph
    kernels = {f"{TORCH_ENGINE}.{k}" for k in KERNELS}
    offenders = [(m, sorted(targets & kernels)) for m, targets in inner.items()
                 if targets & kernels and not (m == TORCH_ENGINE or m.startswith(TORCH_ENGINE + "."))]
    assert offenders == []


def test_no_engine_imports_another_or_the_stage(graph):
    inner, outer = graph
    for engine in ENGINES:
        mine = [m for m in inner if m == engine or m.startswith(engine + ".")]
        reached = {t for m in mine for t in inner[m]}
        others = [t for t in reached for e in ENGINES if e != engine and (t == e or t.startswith(e + "."))]
        assert others == [], engine
        assert "donkeytune.train" not in reached, f"{engine} imports the stage"
    assert "mlx" not in {n for m in inner if m.startswith(TORCH_ENGINE) for n in outer[m]}


def test_importing_donkeytune_imports_neither_the_kernels_nor_mlx():
    code = ("import sys, donkeytune, donkeytune.cli, donkeytune.train, donkeytune.config; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm') "
            f"or m.startswith('{TORCH_ENGINE}.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

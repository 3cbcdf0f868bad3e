"""The layout's rules, read from the source with `ast` (nothing is imported): the direction of dependencies
(DESIGN.md, "Layout") and no import cycles.

Every import counts: top-level, inside functions, under `if TYPE_CHECKING:`. A cycle closed by a lazy import is
still a cycle of the design (the two modules cannot be understood, tested or moved apart), and hiding an import in
a function is not a way to break one.

Modules are named as they are imported (pyproject's package-dir: encoders/ is omni.encoders, ...). An edge goes to
the module an import names: `from omni.encoders import vision` names omni.encoders.vision, `from omni.encoders
import AudioEncoder` names the package omni.encoders (its __init__). Importing a submodule also runs its parents'
__init__, but those implicit edges are left out: a package that re-exports its modules would otherwise be a cycle
with each of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "omni": "omni",
    "omni.encoders": "encoders",
    "omni.decoders": "decoders",
    "omni.serve": "serve",
    "omni.demos": "demos",
}

CORE_MUST_NOT = ("omni.encoders", "omni.decoders", "omni.serve", "omni.demos")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the file; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


def _edges() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        out = graph.setdefault(name, {})
        for target, line in _imports(name, path):
            # `import omni.serve.cli` and `from omni.serve.cli import x` both name a module; walk up to the
            # nearest project module (`import omni.encoders.audio.foo` is not a thing, but be safe)
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.setdefault(target, line)
    return graph


GRAPH = _edges()


def _all_imports() -> list[tuple[str, str, int]]:
    return [(mod, target, line) for mod, path in MODULES.items() for target, line in _imports(mod, path)]


def _under(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def _where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT)}:{line}"


def test_the_packages_are_found():
    assert "omni.prompt" in MODULES and "omni.encoders.vision" in MODULES and "omni.serve.cluster.builder" in MODULES
    assert any(GRAPH.values()), "no imports found: the parser is broken"


def test_the_core_imports_no_outer_layer():
    bad = [
        f"{_where(m, line)} imports {t}"
        for m, t, line in _all_imports()
        if _under(m, "omni")
        and not any(_under(m, p) for p in CORE_MUST_NOT)
        and any(_under(t, p) for p in CORE_MUST_NOT)
    ]
    assert not bad, "omni/ (the core) must not import encoders, decoders, serve or demos:\n" + "\n".join(bad)


def test_encoders_and_decoders_import_neither_each_other_nor_serve():
    bad = []
    for m, t, line in _all_imports():
        for side, other in (("omni.encoders", "omni.decoders"), ("omni.decoders", "omni.encoders")):
            if _under(m, side) and any(_under(t, p) for p in (other, "omni.serve", "omni.demos")):
                bad.append(f"{_where(m, line)} imports {t}")
    assert not bad, "encoders and decoders import only the core:\n" + "\n".join(bad)


def test_only_serve_cluster_imports_ray():
    bad = [
        f"{_where(m, line)} imports {t}"
        for m, t, line in _all_imports()
        if _under(t, "ray") and not _under(m, "omni.serve.cluster")
    ]
    assert not bad, "only serve/cluster/ imports ray:\n" + "\n".join(bad)


def test_nothing_imports_demos():
    bad = [
        f"{_where(m, line)} imports {t}"
        for m, t, line in _all_imports()
        if _under(t, "omni.demos") and not _under(m, "omni.demos")
    ]
    assert not bad, "nothing imports omni.demos (`omni demo` runs it as a subprocess):\n" + "\n".join(bad)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(comp: list[str]) -> str:
    members = set(comp)
    arrows = [
        f"    {m} -> {t} ({_where(m, line)})" for m in comp for t, line in sorted(GRAPH[m].items()) if t in members
    ]
    return " <-> ".join(comp) + "\n" + "\n".join(arrows)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = _cycles(GRAPH)
    assert not found, f"{len(found)} import cycle(s), lazy imports included:\n" + "\n".join(map(_describe, found))


RECORD = "omni.architectures"


def _architecture_names() -> set[str]:
    """The `name=` and `model_type=` of every Architecture(...) record in omni/architectures.py."""
    tree = ast.parse(MODULES[RECORD].read_text())
    return {
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Architecture"
        for kw in node.keywords
        if kw.arg in ("name", "model_type") and isinstance(kw.value, ast.Constant)
    }


def test_only_the_record_names_an_architecture():
    """No module but omni/architectures.py spells an architecture's name or model_type as a value (so none compares
    against one): every difference between the generations is a field of their record. Docstrings may mention them
    (they are longer strings, never equal to a name)."""
    names = _architecture_names()
    assert {"qwen2.5-omni", "qwen3-omni", "qwen2_5_omni", "qwen3_omni_moe"} <= names
    bad = []
    for mod, path in MODULES.items():
        if mod == RECORD or _under(mod, "omni.demos"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                bad.append(f"{_where(mod, node.lineno)}: {node.value!r}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr == "signature"
                and getattr(node.value, "id", None) == "inspect"
            ):
                bad.append(f"{_where(mod, node.lineno)}: inspect.signature (say it in the record or the class)")
    assert not bad, "architecture names outside omni/architectures.py (read the record instead):\n" + "\n".join(bad)

"""The package's imports point one way: no cycle, no upward edge, no edge between transports.

Layers, lowest first (a module may import its own layer's group and any lower layer):

    errors, checks, wire -> local -> data, models -> protocol -> compress, lowrank -> algorithms
    -> server -> sim | flower | ddp -> analysis, plot, tracking -> federation -> app -> rankfed (front door)

Every import counts, function-level ones included (the test parses the source, it does not
import it).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rankfed"

# (layer, group): groups of one layer must not import each other
LAYERS = {
    "rankfed._version": (0, "base"),
    "rankfed.errors": (0, "base"),
    "rankfed.checks": (0, "base"),
    "rankfed.wire": (0, "base"),
    "rankfed.local": (1, "local"),
    "rankfed.data": (2, "data"),
    "rankfed.models": (2, "models"),
    "rankfed.protocol": (3, "protocol"),
    "rankfed.compress": (4, "compress"),
    "rankfed.lowrank": (4, "lowrank"),
    "rankfed.algorithms": (5, "algorithms"),
    "rankfed.server": (6, "server"),
    "rankfed.sim": (7, "sim"),
    "rankfed.flower": (7, "flower"),
    "rankfed.ddp": (7, "ddp"),
    "rankfed.analysis": (8, "analysis"),
    "rankfed.plot": (8, "plot"),
    "rankfed.tracking": (8, "tracking"),
    "rankfed.federation": (9, "federation"),
    "rankfed.app": (10, "app"),
    "rankfed.__main__": (11, "front"),
    "rankfed": (11, "front"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The rankfed modules ``name`` imports (a ``from pkg import x`` names ``pkg.x`` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "rankfed")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "rankfed":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            out.update(subs if subs and len(subs) == len(node.names) else [mod, *subs])
    return {m for m in out if m != name}


def _layer(module: str) -> tuple[int, str]:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer():
    for name in _modules():
        assert _layer(name), name


def test_imports_point_down_only():
    mods = _modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        layer, group = _layer(name)
        for dep in _imports(name, path, known):
            dep_layer, dep_group = _layer(dep)
            if dep_layer > layer or (dep_layer == layer and dep_group != group):
                bad.append(f"{name} (layer {layer} {group}) imports {dep} (layer {dep_layer} {dep_group})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    known = set(mods)
    graph = {name: {d for d in _imports(name, path, known) if d in known} for name, path in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, cycles


def test_the_checker_sees_an_upward_edge(tmp_path):
    """The checker itself: an algorithm importing the simulator is caught."""
    fake = tmp_path / "rankfed" / "algorithms"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from rankfed.sim import Simulator\n", encoding="utf-8")
    deps = _imports("rankfed.algorithms.bad", fake / "bad.py", {"rankfed.sim"})
    assert deps == {"rankfed.sim"} and _layer("rankfed.sim")[0] > _layer("rankfed.algorithms.bad")[0]

"""The import rules of docs/architecture.md, read from the source with ast: the layers import only
downwards, `vision` and `projector` never import `xcomposer`, and no two modules import each other
through any chain (imports inside functions count)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xcomposer", "vision", "projector")

# layer of each package, low to high: a module may import its own layer and lower ones
LAYERS = {"vision": 0, "projector": 0, "xcomposer.llm": 1, "xcomposer.parallel": 2, "xcomposer.models": 3,
          "xcomposer.engine": 3,  # the serving core: uses the decoder and the planner, never the models
          "xcomposer.compose": 4, "xcomposer.serve": 5, "xcomposer": 6}
# (importer, imported): the documented exceptions
ALLOWED_UPWARD = {("xcomposer.models.xcomposer", "xcomposer.compose.pipeline"),  # XComposer.compose()
                  ("xcomposer.models.xcomposer2", "xcomposer.compose.pipeline")}  # XComposer2.compose()


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(ROOT).with_suffix("")
            mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Modules of ours that `name` imports anywhere in its file (the closest known module of each)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package[: len(package) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer():
    assert all(m.split(".")[0] in PACKAGES for m in MODULES)
    assert {"xcomposer.llm.decoder", "xcomposer.parallel.sharding", "xcomposer.models.xcomposer",
            "xcomposer.compose.library", "xcomposer.serve.webui.app"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module) and (module, t) not in ALLOWED_UPWARD)
    assert not upward, f"{module} imports higher layers {upward} (docs/architecture.md, import rules)"


def test_vision_and_projector_never_import_xcomposer():
    for m in MODULES:
        if m.split(".")[0] in ("vision", "projector"):
            assert not [t for t in GRAPH[m] if t.startswith("xcomposer")], m


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph; package __init__ files that only
    re-export are left out as targets, as a re-export forms no cycle of its own."""
    edges = {m: {t for t in ts if MODULES[t].name != "__init__.py"} for m, ts in GRAPH.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_graph_holds_function_local_and_relative_imports():
    """The checks above can fail only if the graph sees every kind of import: a function-local one
    (`XComposer.compose`) and relative ones two levels up (`serve.webui.app` -> `compose.article`)."""
    assert "xcomposer.compose.pipeline" in GRAPH["xcomposer.models.xcomposer"]  # the documented exception
    assert "xcomposer.llm.decoder" in GRAPH["xcomposer.parallel.sharding"]
    assert "xcomposer.compose.article" in GRAPH["xcomposer.serve.webui.app"]
    assert _layer("xcomposer.serve.webui.app") > _layer("xcomposer.models.vl_prompt") > _layer("xcomposer.llm.chat")

"""The package's imports point down (docs/design.md, "Layers").

Walks every ``prefopt_fast/**/*.py`` with ``ast`` (module-level and function-level imports,
``if`` / ``try`` branches included) and checks:

(a) the import graph between the package's modules has no cycle;
(b) each module imports only from its own layer or below (``LAYERS``);
(c) no underscore-prefixed name defined in one package module is imported
    (``from m import _x``) or read as an attribute (``m._x``) in another. Importing a
    package-internal module whose file name starts with an underscore (``from .. import
    _validate``) and using its public names is fine; dunders (``__all__``) are not private.
"""

import ast
from pathlib import Path

import pytest

PKG = "prefopt_fast"
ROOT = Path(__file__).resolve().parents[1] / PKG

# Layer of a module: the first matching prefix (dotted, longest first) wins.
#   0  the row contract, validation, backend dispatch, the backends and kernels, build info
#   1  distributed: layouts of a vocabulary over a process group, DTensor unpacking and the
#      collective merge of per-shard statistics (no op logic: the ops call it)
#   2  ops: the autograd Functions over logits / hidden states, one device or sharded
#   3  loss heads over per-token / per-sequence vectors (and their fused-linear twins)
#   4  the public modules re-exporting them (prefopt_fast, prefopt_fast.linear)
#   5  integrations with other libraries
LAYERS = {
    f"{PKG}._version": 0,
    f"{PKG}._rows": 0,
    f"{PKG}._validate": 0,
    f"{PKG}._blocks": 0,
    f"{PKG}._dispatch": 0,
    f"{PKG}._build_info": 0,
    f"{PKG}.backends": 0,
    f"{PKG}.kernels": 0,
    f"{PKG}.distributed": 1,
    f"{PKG}.reference": 2,  # the fp64 oracle: imports torch only (test_reference_is_independent)
    f"{PKG}.ops": 2,
    f"{PKG}.losses": 3,
    f"{PKG}.linear": 4,
    PKG: 4,
    f"{PKG}.integrations": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()
# compiled extension modules (prefopt_fast._C): modules, but no Python source to walk
EXTENSIONS = {_module_name(p.with_name(p.name.split(".")[0] + ".py")) for p in ROOT.rglob("*.so")}


def layer(mod: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{mod} has no layer in tests/test_layers.py LAYERS")


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(mod: str, level: int, target) -> str:
    """The absolute name of ``from <level dots><target> import ...`` inside ``mod``."""
    if level == 0:
        return target or ""
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(mod: str):
    """Names bound at the top level of ``mod`` (defs, classes, assignments, imports)."""
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def analyse():
    """(edges {mod: {imported package module: first line}}, private-name uses [(mod, line, text)])."""
    edges, private = {}, []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        out = edges.setdefault(mod, {})
        aliases = {}  # local name -> package module it is bound to

        def add(target, lineno):
            if target in MODULES and target != mod:
                out.setdefault(target, lineno)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == PKG or a.name.startswith(PKG + "."):
                        add(a.name, node.lineno)
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, node.level, node.module)
                if not (src == PKG or src.startswith(PKG + ".")):
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in MODULES:  # a module of the package
                        add(sub, node.lineno)
                        aliases[a.asname or a.name] = sub
                        continue
                    if sub in EXTENSIONS:
                        continue
                    add(src, node.lineno)  # a name defined in (or re-exported by) src
                    if a.name != "*" and _private(a.name) and src != mod:
                        private.append((mod, node.lineno, f"from {src} import {a.name}"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
                target = aliases.get(node.value.id)
                if target is not None and target != mod and node.attr in _defined_names(target):
                    private.append((mod, node.lineno, f"{node.value.id}.{node.attr} ({target}.{node.attr})"))
    return edges, private


def _cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return comps


def test_walks_the_package():
    assert f"{PKG}.distributed" in MODULES and f"{PKG}.ops.token_logprobs" in MODULES
    edges, _ = analyse()
    # function-level imports are seen too (hf imports the fused-linear op inside a function)
    assert f"{PKG}.ops.linear_logprobs" in edges[f"{PKG}.integrations.hf"]


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer(mod)


def test_no_import_cycle():
    edges, _ = analyse()
    comps = _cycles(edges)
    detail = [
        " <-> ".join(c)
        + ": "
        + "; ".join(f"{a} imports {b} (line {edges[a][b]})" for a in c for b in c if b in edges[a])
        for c in comps
    ]
    assert not comps, "import cycles between package modules:\n" + "\n".join(detail)


def test_imports_point_down():
    edges, _ = analyse()
    bad = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}) at line {line}"
        for a, targets in sorted(edges.items())
        for b, line in sorted(targets.items())
        if layer(b) > layer(a)
    ]
    assert not bad, "imports pointing up the layers (docs/design.md):\n" + "\n".join(bad)


def test_reference_is_independent():
    """prefopt_fast.reference is the oracle of the tests: it imports no module of the package
    (so it cannot share a bug with the ops or the loss heads) and nothing but torch."""
    edges, _ = analyse()
    assert not edges[f"{PKG}.reference"], f"{PKG}.reference imports {sorted(edges[f'{PKG}.reference'])}"
    tree = ast.parse(MODULES[f"{PKG}.reference"].read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"math", "typing", "torch"}, roots


def test_no_private_name_used_across_modules():
    _, private = analyse()
    bad = [f"{mod}:{line}: {text}" for mod, line, text in private]
    assert not bad, "private names used from another module (give them a public name):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "src, want",
    [
        ("from .x import _y\n", [("p.m", 1, "from p.x import _y")]),
        ("from . import x\nx._y\n", [("p.m", 2, "x._y (p.x._y)")]),
        ("from . import x\nx.y\nx.__all__\n", []),
    ],
)
def test_private_name_detection(src, want, tmp_path, monkeypatch):
    """The checker itself: a throwaway package p with modules m (the source) and x (defines _y)."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "p" / "x.py").write_text("_y = 1\ny = 2\n__all__ = []\n")
    (tmp_path / "p" / "m.py").write_text(src)
    g = globals()
    monkeypatch.setitem(g, "PKG", "p")
    monkeypatch.setitem(g, "ROOT", tmp_path / "p")
    monkeypatch.setitem(g, "MODULES", {_module_name(p): p for p in sorted((tmp_path / "p").rglob("*.py"))})
    _, private = analyse()
    assert [p for p in private if p[0] == "p.m"] == want

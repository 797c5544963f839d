"""The code's structure: the packages' layering, read from the source (every import, at module level or inside a
function), and the one error root.

Rules: the libraries (``segmenter``, ``retrieval``) import neither the server, the proto, vLLM nor gRPC; the
engine (``server/engine``, part of it runs inside vLLM's engine core) imports no other part of the server; the
sessions (``server/session``) import the libraries, the engine and the server's leaf modules (errors, report,
logs, quotas, tenants, contrast), not the RPC layer, the process, vLLM nor gRPC; the RPC layer
(``server/rpc``) imports the sessions, the engine, the libraries, the wire and the server's leaf modules, not
the process (app, cli, config) that builds it; provisioning (``server/provision``: models, texts) imports only
itself and the error root; the client distribution (``client/``: ``emserve.client``, ``emserve.api``) imports
only itself, gRPC and protobuf; no emserve module imports itself back through others (no cycle).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer -> (emserve modules it may import, third-party top-level packages it must not import)
RPC_AND_WIRE = {"grpc", "grpc_health", "grpc_reflection", "google", "prometheus_client", "vllm"}
RULES: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "emserve.segmenter": (("emserve.segmenter", "emserve.retrieval.errors"), RPC_AND_WIRE),
    "emserve.retrieval": (("emserve.retrieval",), RPC_AND_WIRE),
    "emserve.server.engine": (("emserve.server.engine", "emserve.retrieval"),
                              {"grpc", "grpc_health", "grpc_reflection", "prometheus_client"}),
    "emserve.server.session": (("emserve.server.session", "emserve.server.engine", "emserve.retrieval",
                                "emserve.segmenter", "emserve.server.contrast", "emserve.server.errors",
                                "emserve.server.logs", "emserve.server.quota", "emserve.server.report",
                                "emserve.server.tenants"), RPC_AND_WIRE),
    "emserve.server.rpc": (("emserve.server.rpc", "emserve.server.session", "emserve.server.engine",
                            "emserve.retrieval", "emserve.segmenter", "emserve.api", "emserve.server.errors",
                            "emserve.server.metrics", "emserve.server.tenants", "emserve.server.report",
                            "emserve.server.logs"), set()),
    "emserve.server.provision": (("emserve.server.provision", "emserve.retrieval.errors"), RPC_AND_WIRE),
    "emserve.client": (("emserve.client", "emserve.api"),
                       {"torch", "numpy", "transformers", "vllm", "hnswlib", "prometheus_client"}),
    "emserve.api": (("emserve.api",), {"torch", "numpy", "transformers", "vllm", "hnswlib", "prometheus_client"}),
}


def _modules() -> dict[str, Path]:
    """Every emserve module of this tree, by import name (the server's package-dir and the client
    distribution's packages, found in ``client/``)."""
    dirs = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"])
    dirs.update({"emserve.client": "client/emserve/client", "emserve.api": "client/emserve/api"})
    out: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("").parts
            if "_pb2" in f.name or any(p.startswith(".") for p in rel):
                continue
            # a sub-folder mapped as its own package is that package's
            if any(other != pkg and (ROOT / sub).is_relative_to(ROOT / folder) and f.is_relative_to(ROOT / sub)
                   for other, sub in dirs.items()):
                continue
            out[".".join([pkg, *(p for p in rel if p != "__init__")])] = f
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The modules ``path`` imports (relative imports resolved), with ``from x import y`` as ``x.y`` too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(emserve module -> emserve modules it imports, emserve module -> third-party top-level names)."""
    mods = _modules()

    def owner(imported: str) -> str | None:
        hits = [m for m in mods if imported == m or imported.startswith(m + ".")]
        return max(hits, key=len) if hits else None

    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in mods.items():
        imps = _imports(name, path)
        internal[name] = {o for i in imps if (o := owner(i)) is not None and o != name}
        external[name] = {i.split(".")[0] for i in imps
                          if not i.startswith("emserve") and i.split(".")[0] not in sys.stdlib_module_names}
    return internal, external


GRAPH, EXTERNAL = _graph()


def test_the_graph_sees_the_imports() -> None:
    # the analysis itself: known edges, lazy imports included (a graph without them proves nothing)
    assert "emserve.retrieval.memory" in GRAPH["emserve.server.session.session"]
    assert "emserve.server.app" in GRAPH["emserve.server.cli"]  # imported inside _serve()
    assert "vllm" in EXTERNAL["emserve.server.engine.vllm_engine"]
    assert {"emserve.segmenter.segmenter", "emserve.retrieval.retriever", "emserve.client"} <= set(GRAPH)
    assert "emserve.api.v1" in GRAPH["emserve.client"]
    assert "emserve.client" in GRAPH["emserve.server.cli"]  # the server depends on the client, not the reverse


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    allowed, banned = RULES[layer]
    members = [m for m in GRAPH if m == layer or m.startswith(layer + ".")]
    assert members
    wrong = {m: sorted(d for d in GRAPH[m] if not any(d == a or d.startswith(a + ".") for a in allowed))
             for m in members}
    assert not {m: d for m, d in wrong.items() if d}, f"{layer} imports outside {allowed}"
    third = {m: sorted(EXTERNAL[m] & banned) for m in members}
    assert not {m: d for m, d in third.items() if d}, f"{layer} imports {sorted(banned)}"


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles


def test_every_domain_error_derives_from_the_one_root_and_has_its_own_name() -> None:
    import importlib
    import inspect

    from emserve.retrieval.errors import EmserveError

    errors: dict[str, list[str]] = {}
    for name in sorted(GRAPH):
        if "vllm" in EXTERNAL[name] or name.endswith("__main__"):
            continue  # vllm_engine, connector: they define no errors (and importing vLLM takes seconds)
        mod = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                errors.setdefault(cls_name, []).append(name)
                if name != "emserve.client":  # the client distribution has its own root (ClientError)
                    assert issubclass(cls, EmserveError), f"{name}.{cls_name} is not an EmserveError"
    assert {"EmserveError", "SegmenterError", "SessionNotFound", "EngineError", "ConfigError"} <= set(errors)
    assert not {n: ms for n, ms in errors.items() if len(ms) > 1}, "two classes share a name"


MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def test_functions_stay_short_and_long_modules_say_why() -> None:
    """In the server and the libraries no function is longer than 80 lines, and a module over 400 lines
    says in its docstring why it is one module (a paragraph starting "Size:")."""
    long_functions, unexplained = [], []
    for name, path in _modules().items():
        if not name.startswith(("emserve.server", "emserve.retrieval", "emserve.segmenter")):
            continue
        src = path.read_text()
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {n} lines")
        if len(src.splitlines()) > MAX_MODULE_LINES and "\nSize: " not in (ast.get_docstring(tree) or ""):
            unexplained.append(f"{name}: {len(src.splitlines())} lines")
    assert not long_functions, long_functions
    assert not unexplained, unexplained


def test_every_package_folder_is_installed() -> None:
    """A sub-package missing from pyproject's ``packages`` works from this tree (editable install) but is
    left out of a wheel and of the images."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in _modules().items()
             if path.name == "__init__.py" and not name.startswith(("emserve.client", "emserve.api"))}
    assert found - listed == set(), "add these to [tool.setuptools] packages"



def test_the_bench_harness_stands_apart_from_the_lab() -> None:
    """``bench.eval`` (acceptance benchmarks and their harness) imports no ``bench.lab`` module (experiments
    build on the harness, never the reverse); bench modules import each other as ``bench.*`` (no sibling
    imported as a top-level name, which works only when that script's folder is on ``sys.path``); nothing
    under emserve imports bench."""
    bench = {".".join(f.relative_to(ROOT).with_suffix("").parts): f for f in (ROOT / "bench").rglob("*.py")}
    siblings = {f.stem for f in bench.values()} - {"__init__"}
    wrong = {}
    for name, path in bench.items():
        imps = _imports(name, path)
        bad = {i for i in imps if i.split(".")[0] in siblings}
        if name.startswith("bench.eval"):
            bad |= {i for i in imps if i.startswith("bench.lab")}
        if bad:
            wrong[name] = sorted(bad)
    assert not wrong, wrong
    assert {"bench.eval.recall", "bench.eval.eval_server", "bench.lab.needle"} <= set(bench)
    assert "bench.eval.common" in {i for i in _imports("bench.lab.needle", bench["bench.lab.needle"])}
    assert not {m: sorted(d) for m, d in GRAPH.items() if any(i.startswith("bench") for i in d)}

"""The package's import graph, read from the sources with ``ast`` (nothing is imported): no cycle, and only
the compile pipeline imports compile.py / calibrate.py. Imports inside functions count as edges too."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# folder in the checkout → package it installs as (pyproject's package-dir)
PACKAGES = {"rptq_onnx": "rptq_onnx", "passes": "rptq_onnx.passes", "tools": "rptq_onnx.tools"}
COMPILE, CALIBRATE = "rptq_onnx.compile", "rptq_onnx.calibrate"
# the compile pipeline itself, and the CLI that dispatches `compile` and `inspect --error` (which draws
# calibration windows)
PIPELINE = {COMPILE, CALIBRATE, "rptq_onnx.compile_layerwise", "rptq_onnx.quantize", "rptq_onnx.cli"}
# what a benchmark (tools/) may take from them: compiling and calibrating, nothing else
ENTRY_POINTS = {COMPILE: {"compile_model", "compile_graph", "plan_layer", "cluster_counts", "layer_features",
                          "plan_point"},
                CALIBRATE: {"calibrate", "calibration_windows", "Calibration"}}


def module_files() -> dict[str, Path]:
    """module name → file, subpackages (rptq_onnx/anatomy/) included."""
    files = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            files[".".join((package, *parts[:-1], *([] if parts[-1] == "__init__" else parts[-1:])))] = path
    return files


def _canonical(name: str) -> str:
    head = name.split(".")[0]
    return f"rptq_onnx.{name}" if head in ("passes", "tools") else name


def imported_names(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in the file; name None for ``import module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(_canonical(alias.name), None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found += [(_canonical(node.module), alias.name) for alias in node.names]
    return found


@functools.cache
def import_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str | None]]]]:
    """module → the package modules it imports; and module → its (module, name) imports of package modules."""
    files = module_files()
    graph, names = {}, {}
    for module, path in files.items():
        edges, used = set(), []
        for target, name in imported_names(path):
            # ``from rptq_onnx import quantize`` imports the module rptq_onnx.quantize
            sub = f"{target}.{name}" if name else None
            hit = sub if sub in files else target if target in files else None
            if hit and hit != module:
                edges.add(hit)
                used.append((hit, None if hit == sub else name))
        graph[module], names[module] = edges, used
    return graph, names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_is_read():
    graph, _ = import_graph()
    assert {"rptq_onnx.anatomy", "rptq_onnx.anatomy.layers", "rptq_onnx.anatomy.llama"} <= set(graph)
    assert "rptq_onnx.anatomy.llama" in graph["rptq_onnx.anatomy.layers"]  # ``from rptq_onnx.anatomy import llama``
    assert {"rptq_onnx.compile", "rptq_onnx.passes.fold_reorder", "rptq_onnx.tools.bench_common"} <= set(graph)
    assert "rptq_onnx.passes.fold_reorder" in graph["rptq_onnx.compile"]
    assert "rptq_onnx.quantize" in graph["rptq_onnx.compile"]  # ``from rptq_onnx import quantize``


def test_no_import_cycle():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_only_the_compile_pipeline_imports_compile_and_calibrate():
    graph, names = import_graph()
    for module, edges in graph.items():
        if module in PIPELINE:
            continue
        for target in sorted(edges & {COMPILE, CALIBRATE}):
            assert module.startswith("rptq_onnx.tools."), f"{module} imports {target}"
            taken = {name for hit, name in names[module] if hit == target}
            assert taken <= ENTRY_POINTS[target], f"{module} takes {sorted(taken - ENTRY_POINTS[target])} from {target}"


def test_compile_and_calibrate_are_not_imported_by_run_time_modules():
    graph, _ = import_graph()
    for module in ("evaluate", "generate", "inspection", "memory", "placement", "point_error", "ranges", "report",
                   "export", "runtime", "text", "artifacts", "onnx_source"):
        assert not graph[f"rptq_onnx.{module}"] & {COMPILE, CALIBRATE}, module


VOCABULARY = "rptq_onnx.vocabulary"


def _defined_names(tree: ast.AST) -> set[str]:
    """Names a module binds anywhere: assignment targets, functions, classes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def vocabulary_names() -> set[str]:
    """The module-level names vocabulary.py defines."""
    names = set()
    for stmt in ast.parse(module_files()[VOCABULARY].read_text()).body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_the_vocabulary_is_defined_once():
    """No module but vocabulary.py binds a vocabulary name (TAP_POINTS, QDQ_PREFIX, storage_bits, …), and every
    module that uses one imports it from vocabulary.py."""
    words = vocabulary_names()
    assert {"POINTS", "TAP_POINTS", "TAPS", "HESSIAN_TAPS", "QDQ_PREFIX", "activation_container"} <= words
    _, names = import_graph()
    for module, path in module_files().items():
        if module == VOCABULARY:
            continue
        redefined = _defined_names(ast.parse(path.read_text())) & words
        assert not redefined, f"{module} redefines {sorted(redefined)}"
        for target, name in names[module]:
            assert name not in words or target == VOCABULARY, f"{module} takes {name} from {target}, not {VOCABULARY}"


def test_node_name_prefixes_are_not_spelled_out():
    """``"rptq.…"`` names are built from vocabulary's prefixes (docstrings may show them)."""
    for module, path in module_files().items():
        if module == VOCABULARY:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree)
                      if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not node.value.startswith("rptq."), f"{module}:{node.lineno}: {node.value!r}"


def test_anatomy_is_a_package_without_a_cycle_and_imports_only_downward():
    """rptq_onnx.anatomy: its modules import no module that imports them back, never their own ``__init__``
    (the re-exports), and nothing above them in the pipeline."""
    graph, _ = import_graph()
    inner = {m: edges for m, edges in graph.items() if m.startswith("rptq_onnx.anatomy.")}
    assert {"rptq_onnx.anatomy.records", "rptq_onnx.anatomy.walk", "rptq_onnx.anatomy.opt", "rptq_onnx.anatomy.llama",
            "rptq_onnx.anatomy.cache", "rptq_onnx.anatomy.shapes", "rptq_onnx.anatomy.layers"} <= set(inner)
    assert find_cycle(inner) is None, " → ".join(find_cycle(inner))
    allowed = {"rptq_onnx.errors", "rptq_onnx.graph", VOCABULARY}
    for module, edges in inner.items():
        assert "rptq_onnx.anatomy" not in edges, f"{module} imports the package's __init__"
        outside = {e for e in edges if not e.startswith("rptq_onnx.anatomy.")}
        assert outside <= allowed, f"{module} imports {sorted(outside - allowed)}"

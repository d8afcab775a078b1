"""The package's import graph, read statically (ast, nothing imported): no import circles
among module-level imports, and no upward imports across the layers below.

Module-level imports (run when a module is imported) and function-level imports (run when a
function is called: lazy imports of optional dependencies, CLI mains) are listed separately.
A circle of module-level imports is an error; a circle closed by a function-level import is
an error too unless it is listed in KNOWN_LAZY_CYCLES (each with why it is still there).
The layer rule applies to both kinds: a lazy import is still a dependency. Imports by name
through ``importlib`` (the lazy export tables of megatron/__init__.py and megatron_lm/__init__.py)
are not seen: keep those within the importing package's own group.

The layer table (also in docs/architecture.md), bottom first; a module may import its own
group and groups of lower layers, never a higher layer or a sibling group of its own layer:

====  ============  ===========================================================================
 0    base          msa_megatron (package root), config, versions, upstream_names, flops,
                    schedule, recall, selection_stats, and ops.naive (the pure-PyTorch
                    reference) + ops.common (shared checks): pure Python / PyTorch
 1    ops           msa_megatron.ops: the op dispatch, Triton kernels

ops/naive.py and ops/common.py sit beside the kernels (fla style) but depend on torch and
``config`` only, so base modules (recall, selection_stats) may import them; importing them
runs ops/__init__.py, which must therefore import nothing above base at module level
(test_ops_package_is_light).
 2    megatron      msa_megatron.megatron (the Megatron-Core backend) and its upstream fixes
                    msa_megatron.patches (all but mcore_019_training_*)
 3    training      msa_megatron.training (msa-train)
 3    megatron_lm   msa_megatron.megatron_lm and its Megatron-LM loop patches
                    msa_megatron.patches.mcore_019_training_*
 4    apps          msa_megatron.hf, generate, train, bench: tools on top of the library
 5    experiments   msa_megatron.experiments: research code, never imported by production
====  ============  ===========================================================================
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = "msa_megatron"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: (layer, group, module prefixes). A module belongs to the group of its longest prefix.
LAYERS: List[Tuple[int, str, Tuple[str, ...]]] = [
    (0, "base", ("msa_megatron", "msa_megatron.config", "msa_megatron.versions", "msa_megatron.upstream_names",
                 "msa_megatron.flops", "msa_megatron.schedule", "msa_megatron.recall",
                 "msa_megatron.selection_stats",
                 # beside the kernels, torch-only: base may import them (the reference and its checks)
                 "msa_megatron.ops.naive", "msa_megatron.ops.common")),
    (1, "ops", ("msa_megatron.ops",)),
    (2, "megatron", ("msa_megatron.megatron", "msa_megatron.patches")),
    (3, "training", ("msa_megatron.training",)),
    (3, "megatron_lm", ("msa_megatron.megatron_lm", "msa_megatron.patches.mcore_019_training_")),
    (4, "apps", ("msa_megatron.hf", "msa_megatron.generate", "msa_megatron.train", "msa_megatron.bench",
                 "msa_megatron.convert_cli")),
    (5, "experiments", ("msa_megatron.experiments",)),
]

#: (importer, imported) pairs allowed to break the layer rule, with the reason.
LAYER_EXCEPTIONS: Dict[Tuple[str, str], str] = {
    ("msa_megatron", "msa_megatron.megatron.registry"):
        "msa_megatron.register(): the public facade, imported lazily so the root stays light",
    # msa-train's associative-recall data task (data.assoc_recall, used by the fidelity runs) is built on the
    # MQAR generator, research code.
    ("msa_megatron.training.assoc_recall_task", "msa_megatron.experiments.assoc_recall"): "msa-train's recall task",
    ("msa_megatron.training.config", "msa_megatron.experiments.assoc_recall"): "msa-train's recall task spec",
    # ... and so is the passkey copy probe scored at evaluation (data.passkey)
    ("msa_megatron.training.config", "msa_megatron.experiments.passkey"): "msa-train's passkey probe spec",
    ("msa_megatron.training.loop", "msa_megatron.experiments.passkey"): "msa-train's passkey probe examples",
    ("msa_megatron.training.needle", "msa_megatron.experiments.assoc_recall"):
        "the passkey needle diagnostic buckets distances as the probe's accuracy does (counts_by_bucket)",
}

#: Circles closed by function-level imports that are known and not yet removed (frozensets of modules).
KNOWN_LAZY_CYCLES: Dict[frozenset, str] = {
    frozenset({"msa_megatron.bench.selections", "msa_megatron.bench.impls_main"}):
        "bench tooling (not in this package's layering scope)",
    frozenset({"msa_megatron.ops.triton_sparse_attn", "msa_megatron.ops.triton_union"}):
        "main-branch kernels: triton_sparse_attn dispatches to the union-tile path lazily, triton_union "
        "builds on triton_sparse_attn (to go when the dispatch moves out of triton_sparse_attn)",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    """Every module of the package except the tests shipped inside it (patches/test_*.py)."""
    return {module_name(p): p for p in ROOT.rglob("*.py")
            if not p.name.startswith("test_") and p.name != "conftest.py"}


def _targets(module: str, is_package: bool, node: ast.AST, modules: Dict[str, Path]) -> List[str]:
    """The package modules an import statement loads (the nearest existing module of each name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not is_package:
                base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
    out = []
    for name in names:
        if name.split(".")[0] != PACKAGE:
            continue
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def import_graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]]]:
    """(module-level edges, function-level edges): module -> package modules it imports.
    Imports under ``if TYPE_CHECKING`` are skipped (never run)."""
    modules = package_modules()
    top: Dict[str, Set[str]] = {m: set() for m in modules}
    lazy: Dict[str, Set[str]] = {m: set() for m in modules}

    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"

        def walk(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(module, is_package, child, modules):
                        if target != module:
                            (lazy if in_function else top)[module].add(target)
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        walk(tree, False)
    return top, lazy


def strongly_connected(edges: Dict[str, Set[str]]) -> List[Set[str]]:
    """Tarjan's strongly connected components with more than one module (the circles)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[Set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def group_of(module: str) -> Tuple[int, str]:
    best = None
    for layer, group, prefixes in LAYERS:
        for prefix in prefixes:
            if prefix == PACKAGE:  # the root package itself, not everything below it
                hit = module == prefix
            else:
                hit = module == prefix or module.startswith(prefix + ".") or (prefix.endswith("_") and
                                                                              module.startswith(prefix))
            if hit and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer, group)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it to the table (and docs/architecture.md)")
    return best[1], best[2]


def upward_imports(edges: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for src in sorted(edges):
        src_layer, src_group = group_of(src)
        for dst in sorted(edges[src]):
            dst_layer, dst_group = group_of(dst)
            if dst_group == src_group or dst_layer < src_layer or (src, dst) in LAYER_EXCEPTIONS:
                continue
            bad.append(f"{src} ({src_group}, layer {src_layer}) imports {dst} ({dst_group}, layer {dst_layer})")
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_is_read(graph):
    top, lazy = graph
    # a few edges that must be seen, so that an empty graph cannot pass
    assert "msa_megatron.config" in top["msa_megatron.ops.naive"]
    assert "msa_megatron.megatron.attention" in top["msa_megatron.megatron.specs"]
    assert "msa_megatron.megatron.registry" in lazy["msa_megatron"]
    assert len(top) > 50


def test_no_module_level_cycles(graph):
    top, _ = graph
    assert strongly_connected(top) == [], "import circle among module-level imports"


def test_no_new_cycles_through_lazy_imports(graph):
    top, lazy = graph
    both = {m: top[m] | lazy[m] for m in top}
    cycles = [c for c in strongly_connected(both) if frozenset(c) not in KNOWN_LAZY_CYCLES]
    assert cycles == [], f"import circles closed by function-level imports: {cycles}"


def test_no_upward_imports(graph):
    top, lazy = graph
    assert upward_imports(top) == [], "upward module-level imports"
    assert upward_imports(lazy) == [], "upward function-level imports"
    assert all(src in top for src, _ in LAYER_EXCEPTIONS), "LAYER_EXCEPTIONS names a module that is gone"


def test_ops_package_is_light(graph):
    """Base modules import ops.naive, which runs ops/__init__.py first: its module-level imports
    stay in base (the kernels, and Triton, load lazily on first use)."""
    top, _ = graph
    assert top["msa_megatron.ops"], "ops/__init__.py imports nothing? the graph is not read"
    for dst in top["msa_megatron.ops"]:
        assert group_of(dst)[1] == "base", f"ops/__init__.py imports {dst} at module level"
    assert group_of("msa_megatron.ops.naive") == (0, "base") and group_of("msa_megatron.ops.triton_op") == (1, "ops")


def test_every_module_has_a_layer(graph):
    top, _ = graph
    for module in top:
        group_of(module)


def test_checker_catches_cycles_and_upward_imports():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(edges) == [{"a", "b", "c"}]
    assert upward_imports({"msa_megatron.ops.foo": {"msa_megatron.megatron.attention"}}) != []
    assert upward_imports({"msa_megatron.training.loop": {"msa_megatron.megatron_lm.hooks"}}) != []
    assert upward_imports({"msa_megatron.megatron.attention": {"msa_megatron.ops"}}) == []
    with pytest.raises(AssertionError, match="in no layer"):
        group_of("msa_megatron.newpackage.module")

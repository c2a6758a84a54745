"""The package's imports point one way (docs/DESIGN.md §6): a module imports only from lower layers.

Every ``import`` inside ``cmpq_kernels`` (module level and inside functions) is read with ``ast``; an import of
a higher layer, or a cycle within one, fails with the offending edge named.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cmpq_kernels"

#: lowest first; a module may import from its own layer or any layer before it.
LAYERS = (
    ("progress", "format", "mixllm_format"),
    ("reference", "mixllm_reference"),
    ("ops",),
    ("nn", "mixllm_nn"),
    ("surgery", "shards", "tensor_parallel"),
    ("quantize",),
    ("checkpoint", "mixllm_checkpoint"),
    ("hf", "models", "from_disk", "vllm"),
    ("corpora", "perplexity", "generation", "inspection"),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top(name: str) -> str:
    """``cmpq_kernels.quantize.layer`` -> ``quantize``: the layer unit of a module."""
    return name.split(".")[1]


def imports(path: Path) -> set[str]:
    """The ``cmpq_kernels`` modules that ``path`` imports, resolved to absolute names."""
    own = module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]  # what a relative import is relative to
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            found.update(n for n in names if n.startswith("cmpq_kernels."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cmpq_kernels."))
    return {n for n in found if not n.split(".")[1].startswith("_")}  # compiled extensions: below everything


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_has_a_layer():
    assert {top(module_name(p)) for p in MODULES} == set(RANK)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    source = top(module_name(path))
    upward = sorted(t for t in imports(path) if t.split(".")[1] in RANK and RANK[top(t)] > RANK[source])
    assert not upward, f"{module_name(path)} (layer {RANK[source]}) imports from a higher layer: {upward}"


def test_no_cycles_between_modules():
    graph = {module_name(p): {t for t in imports(p) if t.split(".")[1] in RANK} for p in MODULES}
    done, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done or node not in graph:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)

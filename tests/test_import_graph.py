"""The package's shape, checked from its source: no import cycle between modules (lazy imports inside functions
count too), no private name imported across packages, the data layer's arrows run pipeline -> shards -> storage
only, and models, methods and the data layer never import DeepSpeed or torch.distributed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mimscale"
DATA_LAYERS = ("mimscale.pipeline", "mimscale.shards", "mimscale.storage")  # each may import only those after it
NO_DISTRIBUTED = ("mimscale.models", "mimscale.methods", *DATA_LAYERS)


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement of a module, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full, None) if full in modules else (base, alias.name))
    return found


def owning_module(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> tuple[dict[str, set[str]], list[str], dict[str, set[str]]]:
    """(edges between package modules, private cross-package imports, every top-level import of each module)."""
    modules = module_files()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private, external = [], {name: set() for name in modules}
    for name, path in modules.items():
        for target, imported in imports_of(name, path, modules):
            external[name].add(target)
            owner = owning_module(target, modules)
            if owner is None or owner == name or not owner.startswith("mimscale"):
                continue
            edges[name].add(owner)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                if name.split(".")[:2] != owner.split(".")[:2]:
                    private.append(f"{name} imports {imported} from {owner}")
    return edges, private, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str) -> int | None:
    for number, layer in enumerate(DATA_LAYERS):
        if module == layer or module.startswith(layer + "."):
            return number
    return None


def test_the_package_has_no_import_cycle():
    assert cycles(graph()[0]) == []


def test_no_private_name_is_imported_across_packages():
    assert graph()[1] == []


def test_data_layer_arrows_run_pipeline_to_shards_to_storage_only():
    edges = graph()[0]
    upward = [
        f"{module} -> {target}"
        for module, targets in edges.items()
        for target in targets
        if layer_of(module) is not None and layer_of(target) is not None and layer_of(target) < layer_of(module)
    ]
    assert upward == []


def test_models_methods_and_data_never_import_deepspeed_or_torch_distributed():
    external = graph()[2]
    offending = [
        f"{module} imports {target}"
        for module, targets in external.items()
        if module.startswith(NO_DISTRIBUTED)
        for target in targets
        if target.split(".")[0] == "deepspeed" or target.startswith("torch.distributed")
    ]
    assert offending == []


def test_the_checks_catch_what_they_look_for():
    """The walker itself: a planted cycle and an upward arrow are found (so an empty result means something)."""
    edges = {"mimscale.a": {"mimscale.b"}, "mimscale.b": {"mimscale.c"}, "mimscale.c": {"mimscale.a"}, "x": set()}
    assert cycles(edges) == [["mimscale.a", "mimscale.b", "mimscale.c"]]
    assert layer_of("mimscale.storage.remote") > layer_of("mimscale.shards.index") > layer_of("mimscale.pipeline")
    modules = module_files()
    relative = imports_of("mimscale.shards.index", PACKAGE / "shards/index.py", modules)
    assert "mimscale.shards.format" in {target for target, _ in relative}


def test_config_and_the_registries_it_reads_import_without_torch():
    """config.py checks choices against their owners' lists; those lists must not drag torch into every import."""
    import subprocess
    import sys

    code = "import sys, mimscale.config; print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"

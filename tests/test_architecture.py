"""The package structure holds: imports point down the layers, no module imports itself back.

Every import counts, also those inside functions and under TYPE_CHECKING:
a type-only import that climbs a layer is still a dependency a reader must
follow up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"

# Top to bottom: a package may import from its own layer's modules and from
# the layers below it, never from one above.
LAYERS = [
    "cli",       # the `appliance` command
    "bench",     # the benchmark, which drives a real server
    "runtime",   # the serving process: uvicorn, systemd notification, logs
    "web",       # HTTP: the API, the OpenAI endpoint, the console, the probes
    "services",  # the container the front ends get their services from
    "ops",       # scheduler, housekeeping, backup, doctor, the service lock
    "engine",    # queue, GPU workers, pipeline, PNG writers
    "jobs",      # the job service and its store
    "accounts",  # accounts, credits, keys, sign-in, audit
    "core",      # config, database, schema, clock, errors, digests, devices
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every appliance module or package `path` imports, wherever the import stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("appliance"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("appliance"):
            found.add(node.module)
            # `from appliance.accounts import keys` imports the module appliance.accounts.keys.
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")
                             ).with_suffix(".py").exists())
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {imported for imported in imports_of(path)
                   if imported in modules and imported != name}
            for name, path in modules.items()}


def layer(module: str) -> int:
    """The module's layer, counted from the top; -1 for the package's own __init__ and
    __main__, which sit above them all."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_relative_imports_are_not_used():
    # Absolute imports say which layer a name comes from.
    relative = [f"{module_name(path)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


def test_every_package_is_in_a_layer():
    top = {path.stem for path in PACKAGE.iterdir()
           if path.name not in ("__init__.py", "__main__.py", "__pycache__")}
    assert top == set(LAYERS)


def test_imports_point_down_the_layers():
    upward = sorted(
        f"{module} imports {imported}"
        for module, imported_modules in graph().items()
        for imported in imported_modules
        if layer(imported) < layer(module)
    )
    assert upward == []


def test_no_module_imports_itself_back():
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(edges[module]):
            # A package's __init__ is imported on the way to its modules: not an edge back.
            if module.startswith(imported + "."):
                continue
            if state.get(imported) == "open":
                cycles.append([*path[path.index(imported):], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_pure_modules_import_no_torch():
    # Code that needs no GPU must load fast and work where torch is broken or absent.
    pure = ["appliance.engine.queue", "appliance.engine.engine", "appliance.web.app",
            "appliance.services", "appliance.core.config", "appliance.jobs.service",
            # Every command starts fast; the benchmark's baseline server measures the
            # framework, not an import of torch.
            "appliance.cli.main", "appliance.bench.bare",
            # Loads and unloads models, and lists them, without touching one.
            "appliance.engine.loaded_models", "appliance.engine.adapters",
            "appliance.jobs.catalog", "appliance.engine.synth"]
    script = (f"import sys\nfor name in {pure!r}:\n    __import__(name)\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"

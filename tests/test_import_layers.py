"""The layer rule: imports run downward, cli > serve > offload > cache > quant, shared base modules below all.

Every `import` of every module is read from the source (function-level ones too) and resolved to the
package's layer, so a back-edge anywhere in the tree fails here, whatever name it imports.
"""
import ast
from pathlib import Path

import mixtral_offload

PACKAGE = Path(mixtral_offload.__file__).parent
# higher may import lower, never the reverse; modules at the package's top level are the base layer
LAYERS = {"quant": 1, "cache": 2, "offload": 3, "serve": 4, "cli": 5,
          "benchmark": 5, "profile_report": 5, "__main__": 6}  # top-level modules the CLI drives
PUBLIC = 6  # the package itself (`mixtral_offload.load`) may reach anything


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the mixtral_offload modules `path` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import cache` names a module
    return {m for m in found if m == "mixtral_offload" or m.startswith("mixtral_offload.")}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return PUBLIC
    return LAYERS.get(parts[1], 0)


def test_layer_of_resolves_names():
    assert layer_of("mixtral_offload.cache.expert_cache") == 2
    assert layer_of("mixtral_offload.offload.store.pool") == 3
    assert layer_of("mixtral_offload.errors") == 0 and layer_of("mixtral_offload") == PUBLIC
    here = PACKAGE / "cache" / "expert_cache.py"
    assert "mixtral_offload.cache.policies" in imported_modules(here)


def test_imports_run_downward():
    back_edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in imported_modules(path):
            if imported != "mixtral_offload" and layer_of(imported) > layer_of(importer):
                back_edges.append(f"{importer} imports {imported}")
    assert not back_edges, "\n".join(back_edges)

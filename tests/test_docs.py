"""docs/design.md's package map matches the code: it names every module, and each module's
imports at load time reach only modules listed before it (or its own sub-package)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "sparkmim"


def _map() -> list[str]:
    """The units of the map, in order: ``name.py`` modules and ``name/`` sub-packages."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text[text.index("## The package"):]
    block = block[block.index("```\nsrc/sparkmim/\n") + len("```\nsrc/sparkmim/\n"):]
    block = block[:block.index("```")]
    return [m.group(1) for line in block.splitlines() if (m := re.match(r"^  (\w+(?:\.py|/))\s", line))]


def _unit(module: str) -> str:
    """The map's unit of a module path relative to sparkmim (``train/run.py`` -> ``train/``)."""
    return module.split("/")[0] + "/" if "/" in module else module


def _load_time_imports(path: Path) -> set[str]:
    """The sparkmim units a module imports at load time (module-level statements, outside
    ``if TYPE_CHECKING``)."""
    rel = path.relative_to(SRC)
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
        elif (node.module or "").startswith("sparkmim."):
            parts = node.module.split(".")[1:]
        else:
            continue
        if not parts:  # ``from . import x`` inside a sub-package, or the package itself
            names = [a.name for a in node.names]
            parts = [*base, names[0]] if base else names[:1]
        target = "/".join(parts)
        if (SRC / f"{target}.py").is_file():
            found.add(_unit(f"{target}.py"))
        elif (SRC / target).is_dir():
            found.add(f"{parts[0]}/")
    return found


def test_the_package_map_names_every_module_in_import_order():
    order = _map()
    modules = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert sorted({_unit(m) for m in modules}) == sorted(order), "design.md's package map and src/sparkmim differ"
    late = []
    for module in modules:
        unit = _unit(module)
        for needed in _load_time_imports(SRC / module) - {unit}:
            if order.index(needed) > order.index(unit):
                late.append(f"{module} imports {needed}, listed after it")
    assert not late, late

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


def test_the_whole_run_marker_follows_a_run_through_helpers_and_fixtures():
    """conftest marks a test whole_run when it, a helper of its module or a fixture it requests
    starts a pre-training run; unit tests stay unmarked (a hand-made module as the oracle)."""
    import types

    from conftest import starts_a_run

    source = (
        "def helper(tmp):\n    return main(['pretrain', '--out', tmp])\n"
        "def indirect(tmp):\n    return helper(tmp)\n"
        "def finished_run(tmp_path):\n    return sparkmim.pretrain(out=tmp_path)\n"
        "def test_direct():\n    main(['demo'])\n"
        "def test_helper():\n    indirect('x')\n"
        "def test_fixture(finished_run):\n    pass\n"
        "def test_unit():\n    assert flag_of('lr') == '--lr' and Runner() is not None\n"
        "def test_subprocess():\n    cli(\"pretrain\", '--data', 'd')\n"
    )
    path = ROOT / "tests" / "_marker_probe.py"
    path.write_text(source)
    try:
        module = types.ModuleType("_marker_probe")
        module.__file__ = str(path)
        exec(compile(source, str(path), "exec"), module.__dict__)
        import sys

        sys.modules["_marker_probe"] = module
        marked = {name for name in ("test_direct", "test_helper", "test_fixture", "test_unit", "test_subprocess")
                  if starts_a_run(types.SimpleNamespace(module=module, function=getattr(module, name),
                                                        fixturenames=["finished_run"] if name == "test_fixture" else []))}
    finally:
        path.unlink()
        sys.modules.pop("_marker_probe", None)
    assert marked == {"test_direct", "test_helper", "test_fixture", "test_subprocess"}

"""The package's shape: no import cycle (function-level imports included), the registry at the
bottom, families imported lazily, and register() never silently replacing a model_type."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import flaxauto
from flaxauto import registry

ROOT = Path(__file__).resolve().parents[1]
#: where each installed package's source lives in the repository (pyproject's package-dir)
SOURCES = {"flaxauto": ROOT / "flaxauto", "flaxauto.heads": ROOT / "heads",
           "flaxauto.converters": ROOT / "converters"}  # fmt: skip


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The flaxauto modules `module` imports anywhere in its file (functions included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def test_no_import_cycle_anywhere_in_the_package():
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    # a package's __init__ re-exporting its submodules is not a cycle of the code itself
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, str] = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            cycle = trail[trail.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[module] = "open"
        for dep in sorted(graph[module]):
            visit(dep, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_registry_imports_nothing_of_flaxauto():
    modules = _modules()
    assert _imports("flaxauto.registry", modules["flaxauto.registry"], set(modules)) == set()


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_families_are_imported_lazily_by_model_type():
    out = _run(
        "import sys, flaxauto\n"
        "from flaxauto import registry\n"
        "registry.lookup('gpt2', 'causal-lm')\n"
        "print(sorted(m for m in sys.modules if m.startswith('flaxauto.models.')))"
    )
    assert out == "['flaxauto.models.gpt2']"


def test_register_refuses_to_replace_a_model_type_without_exist_ok():
    family, _ = registry.lookup("bert", "base")
    with pytest.raises(ValueError, match="already registered.*exist_ok"):
        flaxauto.register(
            model_types=("bert",), backbone=family.backbone, base_model_prefix="bert",
            heads={"base": flaxauto.HeadSpec(None)},
        )  # fmt: skip
    assert registry.lookup("bert", "masked-lm")[0] is family


def test_a_users_registration_survives_the_builtin_import():
    # in a fresh process: the user registers "bert" first; importing every built-in family
    # afterwards (supported(), roberta's import of bert) keeps the user's
    out = _run(
        "import flaxauto\n"
        "from flaxauto.models.distilbert import DistilBertModel\n"
        "from flaxauto import registry\n"
        "flaxauto.register(model_types=('bert',), backbone=DistilBertModel,\n"
        "    base_model_prefix='mine', heads={'base': flaxauto.HeadSpec(None)}, exist_ok=True)\n"
        "served = flaxauto.supported()\n"
        "print(registry.lookup('bert', 'base')[0].base_model_prefix, served['bert'],\n"
        "      'roberta' in served)"
    )
    assert out == "mine ('base',) True"

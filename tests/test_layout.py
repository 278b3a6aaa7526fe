"""The house rules of the layout, checked on the source itself."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "harness"


def _module_name(path: Path) -> str:
    parts = path.relative_to(HARNESS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_imports(path: Path) -> list[str]:
    """``from X import _name`` and imports of ``_module``s, where X is another harness
    module: a private name belongs to its own module."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("harness"):
                continue
            if module == here:
                continue
            if any(p.startswith("_") and not p.startswith("__") for p in module.split(".")):
                found.append(f"{path.name}:{node.lineno} imports private module {module}")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "harness" and any(p.startswith("_") for p in parts[1:]):
                    found.append(f"{path.name}:{node.lineno} imports private module {alias.name}")
    return found


def test_no_private_name_is_imported_across_modules():
    problems = [p for path in sorted(HARNESS.rglob("*.py")) for p in _private_imports(path)]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_private_import(tmp_path):
    fake = HARNESS / "mcn" / "zoo.py"  # any real module: its imports are public
    assert _private_imports(fake) == []
    bad = tmp_path / "x.py"
    bad.write_text("from harness.mcn.train import _secret\nfrom .options import _x\n")
    # a file outside the package is resolved as if it sat in harness/
    assert len(_private_imports_at(bad, "harness.mcn.x")) == 2


def _private_imports_at(path: Path, module: str) -> list[str]:
    """_private_imports for a file that pretends to be ``module``."""
    target = HARNESS.joinpath(*module.split(".")[1:]).with_suffix(".py")
    text = path.read_text()
    original = target.read_text() if target.exists() else None
    assert original is None, "pick a module name that does not exist"
    target.write_text(text)
    try:
        return _private_imports(target)
    finally:
        target.unlink()


@pytest.mark.parametrize(
    "path",
    [
        "harness.check",
        "harness.compare",
        "harness.compare_training",
        "harness.assert_equivalent",
        "harness.to_keras",
        "harness.matconvnet_optimizer",
        "harness.diagnosis.diagnose",
        "harness.diagnosis.probe_causes",
        "harness.equivalence.compare",
        "harness.training.compare_training",
        "harness.training.parity.train_parity",
        "harness.testing.EquivalenceError",
        "harness.testing.bugs.BUGS",
        "harness.testing.strategies.simplenn_nets",
        "harness.translate.to_keras",
        "harness.mcn.vl_simplenn",
        "harness.io.specs.probe_batch",
    ],
)
def test_documented_import_paths_resolve(path):
    """Every path the README and docs/ARCHITECTURE.md name, imported the way a user would:
    the module, then the attribute (``harness.diagnosis.diagnose`` after
    ``import harness.diagnosis``, unlike the old ``harness.compare`` package that a
    function of the same name hid)."""
    module, _, attr = path.rpartition(".")
    mod = importlib.import_module(module)
    assert getattr(mod, attr) is not None


def test_architecture_names_every_module():
    """docs/ARCHITECTURE.md is the map a newcomer reads first: every module of the tree
    is named in it (its file name), so a new room cannot appear without its line."""
    doc = (HARNESS.parent / "docs" / "ARCHITECTURE.md").read_text()
    missing = [
        str(p.relative_to(HARNESS))
        for p in sorted(HARNESS.rglob("*.py"))
        if p.name != "__init__.py" and p.name not in doc
    ]
    assert not missing, f"modules missing from docs/ARCHITECTURE.md: {missing}"

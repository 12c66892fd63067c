"""Project rules that keep the core modality-agnostic and the package complete."""

import ast

import tomllib

from tests.helpers import REPO

FORBIDDEN = ("diffalign.modalities", "diffalign.rewards")


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_core_imports_no_modality_or_reward():
    offenders = [
        f"{p.relative_to(REPO)} imports {name}"
        for p in sorted((REPO / "core").rglob("*.py"))
        for name in _imports(p)
        if name.startswith(FORBIDDEN)
    ]
    assert not offenders, offenders


def test_every_package_folder_is_installed():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for folder, pkg in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found == listed, (
        f"not in pyproject packages: {found - listed}; listed but missing: {listed - found}"
    )


def test_no_modality_imports_another():
    mods = [p.name for p in (REPO / "modalities").iterdir() if (p / "__init__.py").is_file()]
    for m in mods:
        for p in (REPO / "modalities" / m).rglob("*.py"):
            for name in _imports(p):
                for other in mods:
                    assert other == m or not name.startswith(f"diffalign.modalities.{other}"), (p, name)

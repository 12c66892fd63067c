"""pyproject.toml declares what the code imports, extras are guarded, constraints.txt pins every range.

- every third-party package imported by core/, modalities/, rewards/ or benchmarks/ is declared, in
  `dependencies` (core) or in an extra;
- core/ imports an extra's package only behind `require(...)` in the same file, so `pip install
  diffalign` without extras imports the core; modalities/ and rewards/ do the same in the file or in the
  package's `__init__.py`, so a missing package is reported with the extra to install;
- each `require(module, extra, ...)` names an extra that declares that package;
- a declared package that nothing imports says why it stays (NOT_IMPORTED);
- constraints.txt pins each declared package to one version inside its declared range.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO

#: import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}

#: packages used only where they are importable, never required (no installable build here, or optional)
WHEN_PRESENT = {
    "pytorch3d": "chamfer distance and the point rasteriser in shape3d when installed (no build here)",
    "torchcrepe": "a second pitch tracker for the audio rewards when installed",
}

#: declared packages no module imports, and why they stay
NOT_IMPORTED = {
    "tensorboard": "backend of lightning's TensorBoardLogger, which every run writes (core/cli.py)",
    "accelerate": "diffusers/transformers load real Stable Diffusion/CLIP weights low-memory only with it",
    "torch": "the audio extra caps torch at torchaudio's minor version",
    "torchaudio": "the audio modality (its issue names torchaudio transforms)",
    "soundfile": "audio I/O of the audio modality",
    "pyloudnorm": "loudness rewards of the audio modality",
    "trimesh": "meshes of the shape3d modality",
    "ray": "scale-out of rollouts and scoring",
}

SOURCE_FOLDERS = ("core", "modalities", "rewards", "benchmarks")
#: the benchmark scripts' own modules (`peer_common`, `sd_gpu`), imported by name from their folder
LOCAL_MODULES = {p.stem for p in (REPO / "benchmarks").rglob("*.py")}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements() -> tuple[dict[str, Requirement], dict[str, dict[str, Requirement]]]:
    """(core requirements by name, {extra: requirements by name}), leaving out diffalign[...] itself."""
    project = _project()
    core = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    extras = {}
    for extra, reqs in project["optional-dependencies"].items():
        parsed = [Requirement(r) for r in reqs]
        extras[extra] = {
            canonicalize_name(r.name): r for r in parsed if canonicalize_name(r.name) != "diffalign"
        }
    return core, extras


def _third_party(name: str) -> str | None:
    top = name.partition(".")[0]
    if not top or top in sys.stdlib_module_names or top in ("diffalign", "tests", "__future__"):
        return None
    return canonicalize_name(DISTRIBUTION.get(top, top))


def _scan(path: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """(distributions imported, {(distribution, extra)} imported through require) in one file; a script's
    own modules (`LOCAL_MODULES`) are not packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported, required = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "require"
            and len(node.args) >= 2
            and all(isinstance(a, ast.Constant) for a in node.args[:2])
        ):
            dist = _third_party(node.args[0].value)
            if dist:
                required.add((dist, node.args[1].value))
        names = [n for n in names if n.partition(".")[0] not in LOCAL_MODULES]
        imported |= {d for d in map(_third_party, names) if d}
    return imported | {d for d, _ in required}, required


def _files() -> list[Path]:
    """Our source files; `benchmarks/peer/` is TRL's side of the side-by-side benchmark (it imports trl,
    which the benchmark installs beside the project, never into it)."""
    files = (p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py"))
    return sorted(p for p in files if not p.is_relative_to(REPO / "benchmarks" / "peer"))


def test_every_import_is_declared():
    """Tests included: their packages come from the extras and [dev]."""
    core, extras = _requirements()
    declared = set(core).union(*extras.values())
    files = [*_files(), *sorted((REPO / "tests").rglob("*.py"))]
    undeclared = [
        f"{p.relative_to(REPO)} imports {d}"
        for p in files
        for d in _scan(p)[0]
        if d not in declared and d not in WHEN_PRESENT
    ]
    assert not undeclared, undeclared


def test_optional_imports_are_behind_require():
    core, extras = _requirements()
    problems = []
    for p in _files():
        if p.parts[len(REPO.parts)] == "benchmarks":
            continue  # scripts, run from a full install
        imported, required = _scan(p)
        guarded = {d for d, _ in required}
        if p.parts[len(REPO.parts)] != "core":
            init = p.parent / "__init__.py"
            guarded |= {d for d, _ in _scan(init)[1]} if init.is_file() and init != p else set()
        problems += [
            f"{p.relative_to(REPO)} imports {d} (not a core dependency) without require()"
            for d in sorted(imported - set(core) - guarded - set(WHEN_PRESENT))
        ]
    assert not problems, problems


def test_require_names_an_extra_that_declares_the_package():
    _, extras = _requirements()
    wrong = [
        f"{p.relative_to(REPO)}: require({d!r}, {extra!r}) but [{extra}] does not declare {d}"
        for p in [*_files(), REPO / "core" / "extras.py"]
        for d, extra in _scan(p)[1]
        if d not in extras.get(extra, {})
    ]
    assert not wrong, wrong


def test_declared_packages_are_imported_or_say_why():
    core, extras = _requirements()
    declared = set(core).union(*(r for e, r in extras.items() if e != "dev"))
    imported = set().union(*(_scan(p)[0] for p in _files()))
    unused = sorted(declared - imported - set(NOT_IMPORTED))
    assert not unused, (
        f"declared but imported nowhere (use it, remove it, or say why in NOT_IMPORTED): {unused}"
    )


def test_extras_named_in_all_exist_and_cover_every_modality_extra():
    extras = _project()["optional-dependencies"]
    (combined,) = extras["all"]
    names = set(re.fullmatch(r"diffalign\[(.*)\]", combined).group(1).split(","))
    assert names <= set(extras), names - set(extras)
    assert set(extras) - names == {"all", "dev", "ray"}


def test_constraints_pin_every_declared_package_inside_its_range():
    core, extras = _requirements()
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version.strip()
    problems = []
    for group, reqs in [("dependencies", core), *extras.items()]:
        for name, req in reqs.items():
            if name not in pins:
                problems.append(f"{name} ([{group}]) is not pinned in constraints.txt")
            elif not req.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{name}=={pins[name]} is outside [{group}]'s range {req.specifier}")
    assert not problems, problems


def test_lowest_constraints_pin_the_lower_bounds():
    """constraints-lowest.txt (the tested oldest set) follows pyproject.toml's lower bounds."""
    core, extras = _requirements()
    lowest = {}
    for line in (REPO / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            lowest[canonicalize_name(name)] = version.strip()
    problems = []
    for group, reqs in [("dependencies", core), *extras.items()]:
        for name, req in reqs.items():
            bounds = [s.version for s in req.specifier if s.operator == ">="]
            if group == "ray" or not bounds:
                continue
            (bound,) = bounds
            pin = lowest.get(name)
            parts = len(bound.split("."))
            if pin is None or pin.split(".")[:parts] != bound.split("."):
                problems.append(
                    f"{name}: lower bound {bound} ([{group}]) but constraints-lowest.txt pins {pin}"
                )
    assert not problems, problems

"""Recipes: names, composition from `_base/` fragments, and the listing of `diffalign recipes`.

A recipe is one YAML config for one command (`fit` and the other LightningCLI subcommands, `sample`,
`feedback`). It may name, in a top-level `bases:` list, the fragment files it builds on:

    # DDPO on the 2-D toy model: ...
    bases: [_base/toy/trainer.yaml, _base/toy/module.yaml, _base/toy/prompts.yaml]
    model:
      init_args:
        algorithm: ...

Before any parser sees the command line, every `--config X` is expanded into `--config` of each base (in
the order listed, a base's own bases first, each file once) and then X itself without its `bases:` key,
so the parser merges them left to right exactly as it merges several `--config` files: a later file's
value wins; mappings (`init_args`) merge key by key; a list (`trainer.callbacks`, `prompts`) is replaced
whole by a later file's list, never appended to; a later `class_path` that differs keeps the earlier
`init_args` the new class also accepts. The resolved config (`--print_config`, the run folder's
`config.yaml`) is therefore the full merged config, with no `bases:` key.

Where a file is found:

- `--config X`: X as a path; else X as a recipe name under the recipes root (`./recipes`, else the one
  beside the installed package), with `recipes/` and `.yaml` optional: `--config toy/ddpo_mode` works
  from any folder.
- a `bases:` entry: in the folder of the file that names it, else in each folder above that one, else
  under the recipes root (`.yaml` optional). So a recipe of `recipes/toy/` reaches
  `recipes/_base/toy/trainer.yaml` as `_base/toy/trainer.yaml`, and so does a copy of it anywhere else.

A missing file, a missing base and a cycle of bases are one-line errors naming the files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BASES_KEY = "bases"
SUFFIX = ".yaml"
CONFIG_FLAGS = ("--config", "-c")


class RecipeError(ValueError):
    """A recipe that cannot be resolved: a missing file or base, a malformed `bases:` list, a cycle."""


def recipes_root() -> Path:
    """recipes/ of the current directory, else the one beside the installed package (editable)."""
    here = Path.cwd() / "recipes"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "recipes"


def _shown(path: Path) -> str:
    """A path as messages show it: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _name_candidates(name: str) -> list[str]:
    """`toy/ddpo_mode`, `toy/ddpo_mode.yaml` and `recipes/toy/ddpo_mode.yaml` all name one recipe."""
    rel = name.replace(os.sep, "/")
    rel = rel[len("recipes/") :] if rel.startswith("recipes/") else rel
    return [rel] if rel.endswith(SUFFIX) else [rel + SUFFIX, rel]


def resolve_recipe(spec: str) -> Path:
    """The file a `--config` value names: a path as given, else a recipe name under `recipes_root()`."""
    path = Path(spec)
    if path.is_file():
        return path
    root = recipes_root()
    for rel in _name_candidates(spec):
        if (root / rel).is_file():
            return root / rel
    raise RecipeError(
        f"config file not found: {spec} (nor a recipe {_shown(root)}/{_name_candidates(spec)[0]}; "
        "'diffalign recipes' lists them)"
    )


def _load(path: Path) -> Any:
    import yaml

    try:
        return yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{_shown(path)}: not valid YAML: {e}".replace("\n", " ")) from None


def _bases_node(root_node: Any) -> tuple[Any, Any] | None:
    """The (key, value) nodes of a document's top-level `bases:` entry, if any."""
    import yaml

    if not isinstance(root_node, yaml.MappingNode):
        return None
    for key, value in root_node.value:
        if key.value == BASES_KEY:
            return key, value
    return None


def recipe_bases(path: Path) -> list[str]:
    """The `bases:` entries of one file, as written (empty when it has none)."""
    import yaml

    entry = _bases_node(_load(path))
    if entry is None:
        return []
    key, value = entry
    where = f"{_shown(path)}:{key.start_mark.line + 1}"
    if isinstance(value, yaml.ScalarNode) and value.value:
        return [value.value]
    if isinstance(value, yaml.SequenceNode) and all(
        isinstance(v, yaml.ScalarNode) and v.value for v in value.value
    ):
        return [v.value for v in value.value]
    raise RecipeError(f"{where}: '{BASES_KEY}' must be a list of fragment file names")


def find_base(entry: str, named_by: Path) -> Path:
    """The file a `bases:` entry names: beside `named_by`, else in a folder above it, else under the
    recipes root."""
    rels = [entry] if entry.endswith(SUFFIX) else [entry + SUFFIX, entry]
    folder = named_by.resolve().parent
    for anchor in (folder, *folder.parents, recipes_root()):
        for rel in rels:
            if (anchor / rel).is_file():
                return anchor / rel
    raise RecipeError(
        f"{_shown(named_by)}: base '{entry}' not found (looked beside it, in the folders above it and in "
        f"{_shown(recipes_root())})"
    )


def recipe_chain(path: Path) -> list[Path]:
    """Every file a recipe merges, in merge order: its bases (each one's own bases first, each file once),
    then the recipe itself. A cycle of bases is an error naming it."""
    chain: list[Path] = []
    seen: set[Path] = set()

    def visit(p: Path, stack: list[Path]) -> None:
        key = p.resolve()
        if key in (s.resolve() for s in stack):
            loop = [*stack[[s.resolve() for s in stack].index(key) :], p]
            raise RecipeError("bases form a cycle: " + " -> ".join(_shown(s) for s in loop))
        if key in seen:
            return
        for entry in recipe_bases(p):
            visit(find_base(entry, p), [*stack, p])
        seen.add(key)
        chain.append(p)

    visit(path, [])
    return chain


def _parser_text(path: Path) -> str | None:
    """The file's text with its `bases:` entry blanked out (lines kept, so positions stay), or None when
    nothing but `bases:` (and comments) is left."""
    node = _load(path)
    text = path.read_text(encoding="utf-8")
    entry = _bases_node(node)
    if entry is None:
        return text
    key, value = entry
    lines = text.splitlines(keepends=True)
    end = value.end_mark.line + (0 if value.end_mark.column == 0 else 1)
    lines[key.start_mark.line : end] = ["\n"] * (end - key.start_mark.line)
    return "".join(lines) if len(node.value) > 1 else None


def expand_config_args(argv: Sequence[str], exit_on_error: bool = True) -> tuple[list[str], list[str]]:
    """Resolve and expand every `--config` of a command line (see the module docstring).

    Returns the argv to parse (each recipe replaced by its bases, then its own text without `bases:`,
    given inline, which jsonargparse's `--config` accepts) and the config files merged, in order, as
    paths (for naming the run after the last one outside `_base/`, and for error messages). A file with
    no `bases:` is passed on as its path, unchanged. On a missing file or base or a cycle it exits with a
    one-line message (or, with `exit_on_error=False`, raises `RecipeError`).
    """
    out: list[str] = []
    files: list[str] = []
    argv = list(argv)
    try:
        i = 0
        while i < len(argv):
            a = argv[i]
            if a in CONFIG_FLAGS and i + 1 < len(argv):
                spec, i = argv[i + 1], i + 2
            elif a.startswith("--config="):
                spec, i = a.split("=", 1)[1], i + 1
            else:
                out.append(a)
                i += 1
                continue
            path = resolve_recipe(spec)
            for p in recipe_chain(path):
                files.append(spec if p is path and Path(spec).is_file() else _shown(p))
                if not recipe_bases(p):
                    out += ["--config", files[-1]]
                elif (text := _parser_text(p)) is not None:
                    out += ["--config", text]
    except RecipeError as e:
        if exit_on_error:
            raise SystemExit(f"diffalign: {e}") from None
        raise
    return out, files


def recipe_description(path: Path) -> str:
    """The first comment line of a recipe ("# ..."), which by convention describes it."""
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("#"):
            return s.lstrip("#").strip()
        if s:
            break
    return "(no description: start the file with a '# ...' line)"


def recipe_command(path: Path) -> str:
    """Which subcommand runs a recipe: `sample` (it or a base has a test-time `method`), `feedback` (has
    `samples_per_prompt`), else `fit`."""
    import yaml

    keys: set[str] = set()
    for p in recipe_chain(path):
        node = _load(p)
        if isinstance(node, yaml.MappingNode):
            keys.update(k.value for k, _ in node.value)
    if "method" in keys:
        return "sample"
    if "samples_per_prompt" in keys:
        return "feedback"
    return "fit"


def list_recipes(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, description) of every recipe YAML, `_base/` fragments excluded."""
    root = root or recipes_root()
    if not root.is_dir():
        raise FileNotFoundError(f"recipes folder not found: {root}")
    out = []
    for p in sorted(root.rglob("*" + SUFFIX)):
        rel = p.relative_to(root)
        if rel.parts[0].startswith("_"):
            continue
        out.append((str(Path("recipes") / rel), recipe_description(p)))
    return out


def recipes_command(argv: Sequence[str]) -> int:
    """`diffalign recipes`: one line per recipe: its name, the subcommand that runs it, its description."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="diffalign recipes", description="list the recipes with their one-line descriptions"
    )
    parser.add_argument("--root", type=Path, default=None, help="recipes folder (default: ./recipes)")
    args = parser.parse_args(list(argv))
    try:
        rows = list_recipes(args.root)
    except FileNotFoundError as e:
        print(f"diffalign recipes: {e}", file=sys.stderr)
        return 2
    width = max((len(r) for r, _ in rows), default=0)
    root = args.root or recipes_root()
    code = 0
    for rel, desc in rows:
        try:
            command = recipe_command(root / Path(rel).relative_to("recipes"))
        except RecipeError as e:
            print(f"diffalign recipes: {e}", file=sys.stderr)
            command, code = "?", 1
        print(f"{rel:<{width}}  {command:<8}  {desc}")
    return code

"""Every recipe runs through the CLI: two optimiser steps of `fit`, or one sample per prompt of `sample`
and `feedback`, with the tiny settings of tests/recipes/tiny.yaml."""

import json

import pytest

from diffalign.core.recipes import recipe_command
from tests.helpers import REPO, TINY_KEYS, load_tiny, prepare_recipe, run_fit, summary, tiny_configs

RECIPES = sorted(
    p.relative_to(REPO)
    for p in (REPO / "recipes").rglob("*.yaml")
    if not p.relative_to(REPO / "recipes").parts[0].startswith("_")
)


def test_tiny_settings_name_what_exists():
    """Every entry of tiny.yaml names an existing recipe (not a fragment) or fragment, with known keys and
    an importable prepare function: a renamed recipe cannot leave its exception silently unused."""
    import importlib

    tiny, root = load_tiny(), REPO / "recipes"
    names = {r.relative_to("recipes").with_suffix("").as_posix() for r in RECIPES}
    assert not set(tiny["recipes"]) - names, (
        f"tiny.yaml names recipes that do not exist: {set(tiny['recipes']) - names}"
    )
    missing = [f for f in tiny["fragments"] if not f.startswith("_base/") or not (root / f).is_file()]
    assert not missing, f"tiny.yaml names fragments that do not exist under recipes/_base/: {missing}"
    for name, entry in tiny["recipes"].items():
        assert set(entry) <= TINY_KEYS, f"tiny.yaml {name}: unknown keys {set(entry) - TINY_KEYS}"
        if "prepare" in entry:
            module, _, func = entry["prepare"].rpartition(".")
            assert callable(getattr(importlib.import_module(module), func, None)), entry["prepare"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r) for r in RECIPES])
def test_recipe_runs_two_steps(recipe, cleandir):
    prepare_recipe(recipe, cleandir)  # builds what the recipe reads (feedback, tiny weights) in cleandir
    extra = tiny_configs(recipe, cleandir)
    command = recipe_command(REPO / recipe)
    if command in ("sample", "feedback"):
        from diffalign.core.cli import cli_main

        out = cleandir / "out"
        args = [command, "--config", str(REPO / recipe), *[a for c in extra for a in ("--config", str(c))]]
        args += ["--output", str(out), "--seeds_per_prompt", "1"]
        assert cli_main(args + (["--progress", "false"] if command == "sample" else [])) == 0
        if command == "sample":
            assert json.loads((out / "results.json").read_text())["samples"] >= 1
        else:
            assert (out / "pairs.jsonl").read_text().strip()
        return
    run = run_fit(
        recipe,
        cleandir / "runs",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.max_steps=2",
        extra_configs=tuple(extra),
    )
    s = summary(run)
    assert s["global_step"] >= 2 and s["recipe"] == recipe.stem  # RWR/RAFT take several steps per batch
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()

"""Every recipe runs through the CLI: two optimiser steps of `fit`, or one sample per prompt of `sample`
(tiny overrides from tests/overrides/)."""

import json

import pytest

from diffalign.core.cli import recipe_command
from tests.helpers import REPO, run_fit, summary

RECIPES = sorted(
    p.relative_to(REPO)
    for p in (REPO / "recipes").rglob("*.yaml")
    if not p.relative_to(REPO / "recipes").parts[0].startswith("_")
)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[str(r) for r in RECIPES])
def test_recipe_runs_two_steps(recipe, cleandir):
    override = REPO / "tests" / "overrides" / recipe.relative_to("recipes")
    extra = (override,) if override.is_file() else ()
    prepare = override.with_suffix(".py")
    if prepare.is_file():  # builds what the override points at (tiny random weights) inside cleandir
        namespace: dict = {}
        exec(compile(prepare.read_text(), str(prepare), "exec"), namespace)
        namespace["prepare"](cleandir)
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
        extra_configs=extra,
    )
    s = summary(run)
    assert s["global_step"] >= 2 and s["recipe"] == recipe.stem  # RWR/RAFT take several steps per batch
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()

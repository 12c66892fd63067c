"""Recipes: names that resolve from any folder, `bases:` composition from `_base/` fragments, and the
errors of a missing fragment, a cycle and a bad key inside a fragment."""

import json
import re
from pathlib import Path

import pytest
import yaml

from diffalign.core.cli import cli_main
from diffalign.core.recipes import (
    RecipeError,
    expand_config_args,
    recipe_chain,
    recipe_command,
    resolve_recipe,
)
from tests.helpers import QUIET, REPO

SHIPPED = REPO / "recipes"


def _print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_recipe_names_resolve_from_another_folder(cleandir):
    # no ./recipes here: names resolve against the recipes/ beside the package
    want = (SHIPPED / "toy/ddpo_mode.yaml").resolve()
    for spec in ("toy/ddpo_mode", "toy/ddpo_mode.yaml", "recipes/toy/ddpo_mode.yaml"):
        assert resolve_recipe(spec).resolve() == want, spec
    (cleandir / "mine.yaml").write_text("seed_everything: 3\n")
    assert resolve_recipe("mine.yaml") == cleandir.joinpath("mine.yaml").relative_to(cleandir)  # a path wins
    with pytest.raises(RecipeError, match="config file not found: toy/nope .*diffalign recipes"):
        resolve_recipe("toy/nope")


def test_fit_by_recipe_name_from_another_folder_saves_the_merged_config(cleandir):
    small = ["--data.init_args.batches_per_epoch=1", "--data.init_args.eval_seeds_per_prompt=2"]
    cli = cli_main(["fit", "--config", "toy/ddpo_mode", "--trainer.max_epochs=1", *QUIET, *small])
    run = cleandir / "runs" / "ddpo_mode" / "version_0"  # named after the recipe, not a fragment
    assert Path(cli.trainer.log_dir).resolve() == run.resolve()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert "bases" not in saved and saved["seed_everything"] == 0  # trainer.yaml
    assert saved["trainer"]["accelerator"] == "cpu" and saved["trainer"]["max_epochs"] == 1
    policy = saved["model"]["init_args"]["policy"]["init_args"]  # module.yaml
    assert policy["backbone"]["class_path"].endswith("MixtureBackbone") and policy["num_steps"] == 10
    assert saved["model"]["init_args"]["algorithm"]["class_path"].endswith("DDPO")  # the recipe
    assert saved["data"]["init_args"]["prompts"] == [0, 1, 2, 3]  # prompts.yaml
    assert json.loads((run / "summary.json").read_text())["recipe"] == "ddpo_mode"


def test_a_recipe_key_overrides_its_fragment_and_the_rest_is_kept(capsys):
    cfg = _print_config(capsys, "--config", "toy/alignprop_mode")
    assert cfg["trainer"]["max_epochs"] == 30  # recipe over trainer.yaml's 40
    opt = cfg["model"]["init_args"]["optimizer"]["init_args"]
    assert opt["lr"] == 0.0005 and opt["weight_decay"] == 0.0  # recipe's lr, module.yaml's weight decay
    policy = cfg["model"]["init_args"]["policy"]["init_args"]
    assert policy["gradient_checkpointing"] is True and policy["kernel"]["init_args"]["eta"] == 1.0
    assert cfg["data"]["init_args"]["batches_per_epoch"] == 2 and cfg["data"]["init_args"]["batch_size"] == 64


def test_bases_merge_in_order_each_file_once_and_lists_are_replaced(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("trainer:\n  max_epochs: 5\n  accelerator: cpu\n")
    (tmp_path / "b.yaml").write_text(
        "bases: [a.yaml]\ntrainer:\n  max_epochs: 6\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelSummary\n"
    )
    recipe = tmp_path / "r.yaml"
    body = [
        line for line in (SHIPPED / "toy/ddpo_mode.yaml").read_text().splitlines() if "bases:" not in line
    ]
    bases = ["a.yaml", "b.yaml", "_base/toy/trainer.yaml", "_base/toy/module.yaml", "_base/toy/prompts"]
    recipe.write_text(
        "bases:\n"
        + "".join(f"  - {b}\n" for b in bases)
        + "\n".join(body)
        + "\ntrainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
    )
    chain = [p.name for p in recipe_chain(recipe)]
    assert chain == ["a.yaml", "b.yaml", "trainer.yaml", "module.yaml", "prompts.yaml", "r.yaml"], chain
    cfg = _print_config(capsys, "--config", str(recipe))
    # trainer.yaml (after b.yaml) sets max_epochs 40; the recipe's list replaces b.yaml's
    assert cfg["trainer"]["max_epochs"] == 40 and cfg["trainer"]["accelerator"] == "cpu"
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == [
        "lightning.pytorch.callbacks.LearningRateMonitor"
    ]


def test_expansion_passes_a_plain_config_through_and_blanks_only_bases(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("seed_everything: 1\n")
    (tmp_path / "f.yaml").write_text("seed_everything: 2\n")
    composed = tmp_path / "c.yaml"
    composed.write_text("# about\nbases:\n  - f.yaml  # the fragment\ntrainer:\n  max_epochs: 3\n")
    argv, files = expand_config_args(["fit", "--config", str(plain), "--config=" + str(composed), "--x=1"])
    assert argv[:3] == ["fit", "--config", str(plain)] and argv[-1] == "--x=1"
    assert files == [str(plain), str(tmp_path / "f.yaml"), str(composed)]
    inline = argv[6]
    assert argv[4] == str(tmp_path / "f.yaml") and "bases" not in inline and "f.yaml" not in inline
    assert inline.splitlines()[3:] == ["trainer:", "  max_epochs: 3"]  # lines keep their numbers


def test_missing_fragment_is_a_one_line_error_naming_recipe_and_fragment(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# r\nbases: [_base/toy/trainer.yaml, _base/toy/nope.yaml]\n")
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(recipe)])
    msg = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in msg, msg
    assert str(recipe) in msg and "base '_base/toy/nope.yaml' not found" in msg, msg


def test_a_cycle_of_bases_is_refused(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("bases: [b.yaml]\nseed_everything: 1\n")
    (tmp_path / "b.yaml").write_text("bases: [a]\nseed_everything: 2\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(tmp_path / "a.yaml")])
    assert re.search(r"bases form a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml", capsys.readouterr().err)
    with pytest.raises(SystemExit, match="cycle"):
        cli_main(["sample", "--config", str(tmp_path / "a.yaml")])


def test_bad_key_inside_a_fragment_names_the_fragment_file_and_line(tmp_path, capsys):
    frag = tmp_path / "trainer.yaml"
    frag.write_text((SHIPPED / "_base/toy/trainer.yaml").read_text().replace("max_epochs:", "max_epoch:"))
    line = next(i for i, s in enumerate(frag.read_text().splitlines(), 1) if "max_epoch:" in s)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        (SHIPPED / "toy/ddpo_mode.yaml").read_text().replace("_base/toy/trainer.yaml", str(frag))
    )
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(recipe)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{frag}:{line} (key 'max_epoch')" in err, err


def test_bad_value_over_a_fragment_names_the_recipe_line(tmp_path, capsys):
    # batch_size is set in prompts.yaml (64) and in the recipe: the recipe's (winning) line is named
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(
        (SHIPPED / "toy/grpo_mode.yaml").read_text().replace("batch_size: 8", "batch_size: eight")
    )
    line = next(i for i, s in enumerate(recipe.read_text().splitlines(), 1) if "batch_size: eight" in s)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(recipe)])
    assert f"{recipe}:{line} (key 'batch_size')" in capsys.readouterr().err


def test_sample_and_feedback_resolve_names_and_bases(cleandir):
    out = cleandir / "s"
    args = ["--config", "toy/sample_plain", "--seeds_per_prompt", "1", "--output", str(out)]
    assert cli_main(["sample", *args, "--progress", "false"]) == 0
    assert json.loads((out / "results.json").read_text())["samples"] == 4
    assert (
        cli_main(["sample", "--config", "toy/sample_plain", "--seeds_per_prompt", "1", "--progress", "false"])
        == 0
    )
    assert (cleandir / "samples" / "sample_plain" / "results.json").is_file()  # named after the recipe


def test_recipe_command_reads_the_bases_too(tmp_path):
    assert recipe_command(SHIPPED / "toy/sample_plain.yaml") == "sample"
    assert recipe_command(SHIPPED / "toy/feedback_target.yaml") == "feedback"
    assert recipe_command(SHIPPED / "toy/ddpo_mode.yaml") == "fit"
    (tmp_path / "m.yaml").write_text("method:\n  class_path: diffalign.core.guidance.PlainSampling\n")
    (tmp_path / "r.yaml").write_text(f"bases: [{SHIPPED / '_base/toy/sample.yaml'}, m.yaml]\n")
    assert recipe_command(tmp_path / "r.yaml") == "sample"


def test_every_recipe_names_existing_bases_and_lists_under_its_name(capsys):
    for path in SHIPPED.rglob("*.yaml"):
        chain = recipe_chain(path)  # raises on a missing base or a cycle
        assert all("_base" in p.parts for p in chain[:-1]), path
    assert cli_main(["recipes", "--root", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "recipes/_base" not in out and re.search(r"recipes/toy/sample_plain.yaml +sample ", out)

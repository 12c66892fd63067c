"""User errors are short: a few lines naming the file or option and the fix, no traceback, no folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffalign.core.cli import UserError, cli_main
from tests.reliability.common import TOY, fit_args

MAX_LINES = 6


def _fail(args, capsys, tmp_path) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= MAX_LINES and "Traceback" not in err, err
    assert not (tmp_path / "ddpo_mode").exists()  # nothing was claimed
    return err


TRAINER = str(Path(TOY).parents[1] / "_base" / "toy" / "trainer.yaml")  # where the toy recipes' max_epochs is


def _line(path: str, key: str) -> int:
    return next(n for n, s in enumerate(Path(path).read_text().splitlines(), 1) if s.strip().startswith(key))


@pytest.mark.parametrize("option", [["--trainer.max_epochs", "two"], ["--trainer.max_epochs=two"]])
def test_a_bad_command_line_value_is_blamed_on_the_command_line(tmp_path, capsys, option):
    err = _fail([*fit_args(tmp_path), *option], capsys, tmp_path)
    assert f"invalid value on the command line: {' '.join(option)} (key 'max_epochs')" in err, err
    assert f"{TRAINER}:{_line(TRAINER, 'max_epochs')}" not in err  # the fragment's line is not the culprit


def test_a_bad_value_in_a_file_is_blamed_on_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TRAINER).read_text().replace("max_epochs: 40", "max_epochs: forty"))
    err = _fail(["fit", "--config", TOY, "--config", str(bad), "--run_root", str(tmp_path)], capsys, tmp_path)
    assert f"invalid configuration at {bad}:{_line(TRAINER, 'max_epochs')} (key 'max_epochs')" in err, err


def test_a_wrong_class_path_names_the_option_and_the_missing_class(tmp_path, capsys):
    option = "--model.init_args.reward.class_path=diffalign.rewards.toy.TargetRegio"
    err = _fail([*fit_args(tmp_path), option], capsys, tmp_path)
    assert f"invalid value on the command line: {option}" in err, err
    assert "module 'diffalign.rewards.toy' has no attribute 'TargetRegio'" in err, err


@pytest.mark.parametrize(
    "option,cls,cause",
    [
        (
            "--model.init_args.reward.init_args.radius=-1",
            "diffalign.rewards.toy.TargetRegion",
            "radius must be > 0",
        ),
        (
            "--model.init_args.algorithm.init_args.kl_coef=-1",
            "diffalign.core.algorithms.ddpo.DDPO",
            "kl_coef",
        ),
    ],
)
def test_a_failing_constructor_shows_its_root_cause(tmp_path, capsys, option, cls, cause):
    err = _fail([*fit_args(tmp_path), option], capsys, tmp_path)
    assert err.splitlines()[0].startswith(f"diffalign: could not build {cls}: ValueError: ")
    assert cause in err and f"set on the command line: {option}" in err, err
    assert "Union" not in err and "Given value" not in err  # not jsonargparse's dump


def test_a_failing_constructor_set_in_a_file_points_at_the_key(tmp_path, capsys):
    module = Path(TRAINER).with_name("module.yaml")  # the toy recipes' policy and reward
    bad = tmp_path / "bad.yaml"
    bad.write_text(module.read_text().replace("radius: 1.0", "radius: 0.0"))
    assert "radius: 0.0" in bad.read_text()
    err = _fail(["fit", "--config", TOY, "--config", str(bad), "--run_root", str(tmp_path)], capsys, tmp_path)
    line = next(n for n, s in enumerate(bad.read_text().splitlines(), 1) if "radius: 0.0" in s)
    assert "radius must be > 0" in err and f"set at {bad}:{line} (key 'radius')" in err, err


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_yaml_names_the_file(tmp_path, capsys, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    err = _fail(["fit", "--config", TOY, "--config", str(empty)], capsys, tmp_path)
    assert f"config file {empty} is empty" in err and "Unexpected config" not in err, err


def test_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1, 2\nmodel: {}\n")
    err = _fail(["fit", "--config", str(bad)], capsys, tmp_path)
    assert err.startswith(f"diffalign: {bad}:") and "not valid YAML" in err, err
    list_yaml = tmp_path / "list.yaml"
    list_yaml.write_text("- a\n- b\n")
    err = _fail(["fit", "--config", str(list_yaml)], capsys, tmp_path)
    assert f"config file {list_yaml} holds a list" in err, err


def test_debug_raises_instead(tmp_path):
    with pytest.raises(UserError, match="radius must be > 0"):
        cli_main([*fit_args(tmp_path), "--model.init_args.reward.init_args.radius=-1", "--debug"])

"""The README's quick start works: its make targets, CLI commands and Python example run."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from diffalign.core.cli import cli_main
from tests.helpers import QUIET, REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _commands(lang):
    for block_lang, body in BLOCKS:
        if block_lang == lang:
            for line in body.splitlines():
                cmd = line.split("#")[0].strip()
                if cmd:
                    yield cmd


def test_readme_opens_with_make_demo_and_make_test():
    first = next(body for lang, body in BLOCKS if lang == "bash")
    assert "make demo" in first and "make test" in first


def test_make_demo_runs_an_existing_recipe():
    out = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    m = re.search(r"diffalign fit --config (\S+)", out)
    assert m and (REPO / m.group(1)).is_file(), out


@pytest.mark.slow
def test_quick_start_commands_run(cleandir, capsys):
    cmds = [c for c in _commands("bash") if c.startswith("diffalign")]
    assert len(cmds) >= 6
    runs = cleandir / "runs"
    for cmd in cmds:
        args = shlex.split(cmd)[1:]
        args = [str(REPO / a) if a.startswith("recipes/") else a for a in args]
        if args[0] == "recipes":
            assert cli_main(args) == 0
            assert "ddpo_mode.yaml" in capsys.readouterr().out
            continue
        if args[0] in ("sample", "feedback"):
            extra = ["--seeds_per_prompt", "2"] + (["--progress", "false"] if args[0] == "sample" else [])
            assert cli_main([*args, "--output", str(cleandir / args[0]), *extra]) == 0
            continue
        if args[0] == "score":
            (cleandir / args[1]).write_text("CCO\nc1ccccc1\nnot-a-smiles\n")
            assert (
                cli_main([*args[:2], *[str(cleandir / a) if a.endswith(".csv") else a for a in args[2:]]])
                == 0
            )
            rows = (cleandir / "scores.csv").read_text().splitlines()
            assert len(rows) == 4 and "error" in rows[0]
            continue
        if "--ckpt_path" in args:  # resume the run made by the first fit command
            i = args.index("--ckpt_path")
            args[i + 1] = str(runs / "ddpo_mode" / "version_0" / "checkpoints" / "last.ckpt")
        # tiny overrides: the commands must run, not converge
        cli = cli_main(
            [
                *args,
                "--run_root",
                str(runs),
                *QUIET,
                "--trainer.max_epochs=3",
                "--data.init_args.batches_per_epoch=1",
                "--data.init_args.eval_seeds_per_prompt=4",
            ]
        )
        assert (Path(cli.trainer.log_dir) / "summary.json").is_file(), cmd


def test_python_example_runs():
    for lang, body in BLOCKS:
        if lang == "python":
            exec(compile(body, "README.md", "exec"), {})

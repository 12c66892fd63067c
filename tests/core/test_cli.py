"""The `diffalign` command: recipe listing, errors that name the file, line and key, options that
manual optimisation cannot honour, help, loggers and a quiet console."""

import logging
import warnings
from pathlib import Path

import pytest

from diffalign.core.cli import cli_main, explain_config_error, list_recipes
from tests.helpers import REPO


def test_recipes_lists_every_recipe_with_its_description(capsys):
    assert cli_main(["recipes", "--root", str(REPO / "recipes")]) == 0
    out = capsys.readouterr().out
    yamls = [
        p
        for p in (REPO / "recipes").rglob("*.yaml")
        if not p.relative_to(REPO / "recipes").parts[0].startswith("_")
    ]
    assert len(out.strip().splitlines()) == len(yamls) >= 2
    assert "recipes/toy/ddpo_mode.yaml" in out and "DDPO" in out
    for rel, desc in list_recipes(REPO / "recipes"):
        assert not desc.startswith("(no description"), f"{rel} has no '# description' first line"


def _write_bad(tmp_path, old, new):
    text = (REPO / "recipes/toy/ddpo_mode.yaml").read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if new.split(":")[0].strip() in s)
    return bad, line


@pytest.mark.parametrize(
    "old,new,key",
    [
        ("clip_range: 0.0001", "clip_rnge: 0.0001", "clip_rnge"),
        ("num_inner_epochs: 1", "num_inner_epochs: one", "num_inner_epochs"),
        ("per_prompt_buffer: 64", "per_prompt_bufer: 64", "per_prompt_bufer"),
    ],
)
def test_wrong_key_or_type_names_file_line_and_key(tmp_path, capsys, old, new, key):
    bad, line = _write_bad(tmp_path, old, new)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}:{line} (key '{key}')" in err, err


def test_missing_config_file_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(missing)])
    assert exc.value.code == 2 and f"config file not found: {missing}" in capsys.readouterr().err


def test_missing_weights_file_names_the_path(tmp_path):
    from diffalign.modalities.toy import MixtureBackbone

    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        MixtureBackbone(weights=str(tmp_path / "nothing.safetensors"))


def test_explain_without_a_matching_line_still_names_the_key():
    msg = explain_config_error("Option 'zzz' is not accepted", ["a.yaml"])
    assert "offending key: 'zzz'" in msg and "a.yaml" in msg


@pytest.mark.slow
def test_validate_test_predict_score_the_evaluation_set(tmp_path):
    from tests.helpers import QUIET, run_fit, summary

    small = ["--data.init_args.batches_per_epoch=1", "--data.init_args.eval_seeds_per_prompt=4"]
    run = run_fit("recipes/toy/ddpo_mode.yaml", tmp_path, "--trainer.max_epochs=2", *small)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    base = ["--config", str(REPO / "recipes/toy/ddpo_mode.yaml"), "--run_root", str(tmp_path), *QUIET, *small]
    after = summary(run)["reward_after"]
    for sub in ("validate", "test"):
        cli = cli_main([sub, *base, "--ckpt_path", ckpt])
        assert cli.trainer.callback_metrics[
            f"{sub.replace('validate', 'val')}/reward_mean"
        ].item() == pytest.approx(after, abs=1e-5)
    cli = cli_main(["predict", *base, "--ckpt_path", ckpt])
    preds = __import__("torch").load(f"{cli.trainer.log_dir}/predictions.pt", weights_only=False)
    assert sum(len(p["seed"]) for p in preds) == 16 and preds[0]["samples"].shape[1] == 2
    # evaluation runs get their own folder: the fit run's config.yaml is not overwritten
    assert cli.trainer.log_dir != str(run) and "ckpt_path: null" in (run / "config.yaml").read_text()


def test_console_script_is_installed():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "diffalign"
    out = subprocess.run([str(exe), "recipes"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "recipes/toy/ddpo_mode.yaml" in out.stdout


TINY = [
    "--trainer.max_epochs=1",
    "--data.init_args.batches_per_epoch=1",
    "--data.init_args.eval_seeds_per_prompt=2",
    "--trainer.enable_model_summary=false",
]
QUIET_BAR = ["--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(
    "recipe,option,ours",
    [
        (
            "ddpo_mode",
            "--trainer.gradient_clip_val=1.0",
            "set model.init_args.max_grad_norm instead (now 1.0)",
        ),
        (
            "ddpo_mode",
            "--trainer.accumulate_grad_batches=4",
            "set model.init_args.algorithm.init_args.gradient_accumulation_steps instead",
        ),
        (
            "rwr_mode",
            "--trainer.accumulate_grad_batches=4",
            "RWR has no gradient accumulation (DDPO, DPOK and GRPO have "
            "model.init_args.algorithm.init_args.gradient_accumulation_steps)",
        ),
    ],
)
def test_trainer_options_manual_optimisation_ignores_name_our_equivalent(
    tmp_path, capsys, recipe, option, ours
):
    args = ["fit", "--config", str(REPO / f"recipes/toy/{recipe}.yaml"), "--run_root", str(tmp_path), option]
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ours in err and option.split("=")[0][2:] in err, err
    assert list(tmp_path.iterdir()) == []  # refused before a run folder is claimed


def test_fit_help_points_at_the_model_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "diffalign fit --model.help diffalign.core.module.AlignmentModule" in out
    assert out.index("--model.help diffalign.core.module.AlignmentModule") < out.index("\noptions:\n")


def test_a_chosen_logger_comes_on_top_of_csv_and_tensorboard(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from diffalign.core.callbacks import ResumableCSVLogger

    extra = tmp_path / "extra"
    cli = cli_main(
        ["fit", "--config", str(REPO / "recipes/toy/ddpo_mode.yaml"), "--run_root", str(tmp_path / "runs")]
        + [*QUIET_BAR, *TINY, "--trainer.logger=lightning.pytorch.loggers.CSVLogger"]
        + [f"--trainer.logger.init_args.save_dir={extra}"]
    )
    types = [type(lg) for lg in cli.trainer.loggers]
    assert types == [ResumableCSVLogger, TensorBoardLogger, CSVLogger]
    run = Path(cli.trainer.log_dir)
    assert run.parent.parent == tmp_path / "runs" and (run / "metrics.csv").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert len((extra / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()) == 2


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_banner_no_tip_no_known_warnings_and_the_result_prints_after_the_bar(tmp_path, capsys):
    from diffalign.core.cli import _BANNER_LOGGERS

    handler = _Records()
    loggers = [logging.getLogger(n) for n in _BANNER_LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli_main(
                ["fit", "--config", str(REPO / "recipes/toy/ddpo_mode.yaml"), "--run_root", str(tmp_path)]
                + TINY
            )
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert any("`Trainer.fit` stopped" in m for m in handler.messages)  # the handler does see Lightning
    for banner in ("GPU available", "TPU available", "litlogger", "Seed set to"):
        assert not any(banner in m for m in handler.messages), handler.messages
    shown = [str(w.message) for w in caught]
    assert not any("LeafSpec" in m or "across ranks is zero" in m for m in shown), shown
    out = capsys.readouterr().out
    assert "Epoch 0/0" in out and out.rindex("Epoch 0/0") < out.index("reward (target_region) before"), out
    assert out.rstrip().splitlines()[-1].startswith("run folder: ")

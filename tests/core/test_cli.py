"""The `diffalign` command: recipe listing and errors that name the file, line and key."""

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


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit, match=f"config file not found: {missing}"):
        cli_main(["fit", "--config", str(missing)])


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

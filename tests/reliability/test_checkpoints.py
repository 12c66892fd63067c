"""Broken and missing checkpoints fail in one line naming the file (and the run's readable ones) before
anything is built or written; resuming through another spelling of the run folder stays in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from diffalign.core.cli import cli_main
from diffalign.core.io import CheckpointError, inspect_checkpoint
from tests.reliability.common import checkpoint_names, fit_args, metrics


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    """A run of 2 of the 6 epochs under the relative root `runs`: checkpoints/epoch=1-step=8.ckpt and
    last.ckpt (both step 8), which store the relative folder runs/ddpo_mode/version_0/checkpoints."""
    base = tmp_path_factory.mktemp("base")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        cli_main(fit_args(Path("runs"), "--trainer.max_epochs=2"))
    finally:
        os.chdir(cwd)
    return base / "runs" / "ddpo_mode" / "version_0"


@pytest.fixture
def run(two_epoch_run, tmp_path) -> Path:
    """A private copy of the two-epoch run under tmp_path/runs."""
    copy = tmp_path / "runs" / "ddpo_mode" / "version_0"
    shutil.copytree(two_epoch_run, copy)
    return copy


def _fail(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_a_broken_last_ckpt_fails_in_one_line_and_the_listed_checkpoint_resumes(run, capsys, damage):
    last, older = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "epoch=1-step=8.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    # a metrics row cut short by the kill that broke the checkpoint
    with open(run / "metrics.csv", "a") as f:
        f.write("2,0.31,")
    root = run.parent.parent
    before = _files(root)
    err = _fail(fit_args(root, "--ckpt_path", str(last)), capsys)
    assert len(err.splitlines()) == 1, err
    reason = "truncated or corrupt" if damage == "truncated" else "is empty (0 bytes)"
    assert f"checkpoint {last} " in err and reason in err, err
    assert f"readable checkpoints of this run, newest first: {older} (step 8)" in err, err
    assert _files(root) == before  # nothing written, no folder made
    # the listed checkpoint resumes, and last.ckpt holds the latest state again
    cli_main(fit_args(root, "--trainer.max_epochs=3", "--ckpt_path", str(older)))
    assert inspect_checkpoint(last).global_step == 12
    # the checkpoint a run resumes from is kept (Lightning's rule); the rest is pruned as usual
    assert checkpoint_names(run) == ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]
    rows = metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(6)) and all(r["train/loss"] for r in rows)


def test_a_run_without_a_readable_checkpoint_says_so(run, capsys):
    for p in (run / "checkpoints").iterdir():
        p.write_bytes(b"PK\x03\x04 not a whole zip")
    err = _fail(fit_args(run.parent.parent, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")), capsys)
    assert len(err.splitlines()) == 1 and f"no readable checkpoint in {run / 'checkpoints'}" in err, err


@pytest.mark.parametrize("where", ["in the run folder", "nowhere"])
def test_a_missing_checkpoint_fails_before_any_folder_is_made(run, tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    root = run.parent.parent
    missing = (
        run / "checkpoints" / "last-v9.ckpt" if where == "in the run folder" else tmp_path / "x/last.ckpt"
    )
    before = _files(tmp_path)
    err = _fail(fit_args(root, "--ckpt_path", str(missing)), capsys)
    assert len(err.splitlines()) == 1 and f"checkpoint not found: {missing}" in err, err
    if where == "in the run folder":
        assert str(run / "checkpoints" / "last.ckpt") in err  # the readable ones are listed
    assert _files(tmp_path) == before


def test_debug_shows_the_traceback(run, monkeypatch):
    args = fit_args(run.parent.parent, "--ckpt_path", str(run / "nothing.ckpt"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        cli_main([*args, "--debug"])
    monkeypatch.setenv("DIFFALIGN_DEBUG", "1")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        cli_main(args)


@pytest.mark.parametrize("spelling", ["absolute", "moved"])
def test_resuming_through_another_spelling_keeps_last_ckpt_and_pruning(run, tmp_path, monkeypatch, spelling):
    """The run was made with the relative root `runs`; resume it by its absolute path (the CLI used to do
    that itself and write last-v1.ckpt), or after moving the folder."""
    monkeypatch.chdir(tmp_path)
    if spelling == "moved":
        shutil.move(tmp_path / "runs", tmp_path / "moved")
        run = tmp_path / "moved" / "ddpo_mode" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    cli = cli_main(fit_args(Path("runs"), "--trainer.max_epochs=3", "--ckpt_path", str(ckpt)))
    assert Path(cli.trainer.log_dir).resolve() == run.resolve()
    assert checkpoint_names(run) == ["epoch=2-step=12.ckpt", "last.ckpt"]
    assert inspect_checkpoint(ckpt).global_step == 12
    assert [int(r["step"]) for r in metrics(run)] == list(range(6))


def test_only_the_temporaries_of_atomic_writes_are_removed(tmp_path):
    from diffalign.core.io import remove_stale_temporaries

    keep = ["last.ckpt", "notes.tmp", ".hidden", ".last.ckpt.tmp", "epoch=1-step=8.ckpt"]
    stale = [".last.ckpt.ab_12cd3.tmp", ".epoch=1-step=8.ckpt.x1y2z3w4.tmp", ".summary.json.k9k9k9k9.tmp"]
    for name in keep + stale:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)

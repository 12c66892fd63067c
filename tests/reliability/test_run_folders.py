"""Runs started at the same instant in one folder each claim their own `version_N`."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import yaml

from diffalign.core.cli import cli_main
from diffalign.core.io import claim_version
from tests.reliability.common import fit_args, forkrun, metrics, summary

ROUNDS, PROCESSES = 3, 12


def _claim(barrier, root, name, out):
    barrier.wait()
    out.put(claim_version(root, name))


def test_processes_behind_a_barrier_claim_distinct_versions(tmp_path):
    ctx = mp.get_context("fork")  # the children only make folders
    for r in range(ROUNDS):
        barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [
            ctx.Process(target=_claim, args=(barrier, tmp_path, "recipe", out)) for _ in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        versions = sorted(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert versions == list(range(r * PROCESSES, (r + 1) * PROCESSES))
    assert len(list((tmp_path / "recipe").iterdir())) == ROUNDS * PROCESSES


@pytest.mark.slow
def test_cli_runs_started_together_get_their_own_folders(tmp_path):
    """Four fits of one recipe released by one barrier, each with its own epoch count: four folders,
    each holding one run's config, metrics and summary (none mixed)."""
    epochs = [1, 2, 3, 4]
    runs = [fit_args(tmp_path / "runs", f"--trainer.max_epochs={e}") for e in epochs]
    results = forkrun(tmp_path, runs, together=True)
    assert [r["code"] for r in results] == [0] * len(epochs), [r["log"][-800:] for r in results]
    folders = sorted((tmp_path / "runs" / "ddpo_mode").iterdir())
    assert [f.name for f in folders] == [f"version_{i}" for i in range(len(epochs))]
    seen = []
    for run in folders:
        e = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_epochs"]
        s = summary(run)
        assert s["epochs"] == e and s["global_step"] == 4 * e
        assert [int(r["epoch"]) for r in metrics(run)] == [i // 2 for i in range(2 * e)]
        seen.append(e)
    assert sorted(seen) == epochs


def test_a_run_that_fails_after_claiming_leaves_no_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(fit_args(tmp_path, "--trainer.accelerator=mps"))  # no Apple GPU on Linux
    assert "could not build lightning.pytorch.trainer.trainer.Trainer" in capsys.readouterr().err
    assert not (tmp_path / "ddpo_mode").exists()
    assert Path(cli_main(fit_args(tmp_path, "--trainer.max_epochs=1")).trainer.log_dir).name == "version_0"

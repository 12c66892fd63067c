"""Kill a run with SIGKILL at random points (mid-epoch and mid-checkpoint-write), resume it from
`last.ckpt` again and again, and end exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from tests.reliability.common import (
    BATCHES,
    EPOCHS,
    checkpoint_names,
    fit_args,
    forkrun,
    metrics,
    sigkill_at,
    sigkill_while_saving,
    summary,
    tensorboard_curve,
    weights,
)

# seed 0 interrupts the write of an epoch file, seed 3 that of last.ckpt; DIFFALIGN_FAULT_SEEDS=1,2,...
# tries other kill points
SEEDS = [int(s) for s in os.environ.get("DIFFALIGN_FAULT_SEEDS", "0,3").split(",")]


def kill_points(seed: int) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """(epoch, batch) of the first kill; which checkpoint write the second kill interrupts (two writes per
    epoch: epoch file, then last.ckpt); (epoch, batch) of the third. Each lies after the point the run
    before it resumes from, so every kill happens."""
    rng = random.Random(seed)
    first = (rng.randint(1, 3), rng.randrange(BATCHES))
    save = rng.randint(1, 2 * (EPOCHS - first[0]))
    resumes_at = first[0] + (save - 1) // 2  # the epoch after the last complete last.ckpt
    third = (rng.randint(resumes_at, EPOCHS - 1), rng.randrange(BATCHES))
    return first, save, third


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkilled_three_times_and_resumed_four_times_ends_as_one_uninterrupted_run(tmp_path, seed):
    first, save, third = kill_points(seed)
    killed = Path("killed")  # relative, as the default `runs` is: the spelling that used to break resume
    last = str(killed / "ddpo_mode" / "version_0" / "checkpoints" / "last.ckpt")
    resume = ["--ckpt_path", last]
    runs = [
        fit_args(tmp_path / "clean"),
        fit_args(killed, *sigkill_at(*first)),
        fit_args(killed, *resume, configs=(sigkill_while_saving(tmp_path, save),)),
        fit_args(killed, *resume, *sigkill_at(*third)),
        fit_args(killed, *resume),
        fit_args(killed, *resume),  # resuming a finished run changes nothing
    ]
    results = forkrun(tmp_path, runs, snapshot=tmp_path / killed)
    codes = [r["code"] for r in results]
    assert codes == [0, -9, -9, -9, 0, 0], (first, save, third, [r["log"][-800:] for r in results])
    files = [set(r["files"]) for r in results]
    ckpts = "ddpo_mode/version_0/checkpoints/"
    assert ckpts + "last.ckpt" in files[1] and "ddpo_mode/version_0/summary.json" not in files[1]
    # the second kill left a complete temporary checkpoint behind, as an atomic write can
    tmp = [(f, size) for f, size in results[2]["files"].items() if f.startswith(ckpts + ".")]
    assert len(tmp) == 1 and tmp[0][0].endswith(".tmp") and tmp[0][1] > 50_000, tmp
    for f in files[4] | files[5]:
        assert not f.endswith(".tmp") and "last-v" not in f, f
    assert {f.split("/")[1] for f in files[5]} == {"version_0"}  # one run folder throughout

    clean = tmp_path / "clean" / "ddpo_mode" / "version_0"
    run = tmp_path / killed / "ddpo_mode" / "version_0"
    assert (
        checkpoint_names(run) == checkpoint_names(clean) == [f"epoch={EPOCHS - 1}-step=24.ckpt", "last.ckpt"]
    )
    assert summary(run) == summary(clean)
    assert metrics(run) == metrics(clean) and len(metrics(clean)) == EPOCHS * BATCHES
    assert tensorboard_curve(run) == tensorboard_curve(clean)  # the killed runs' later events are hidden
    a, b = weights(run / "checkpoints" / "last.ckpt"), weights(clean / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the last resume (of the finished run) left the same files behind as the one before it
    assert results[5]["files"].keys() - {k for k in results[5]["files"] if "tfevents" in k} == (
        results[4]["files"].keys() - {k for k in results[4]["files"] if "tfevents" in k}
    )


def test_kill_points_always_land_after_the_resume_point():
    for seed in range(200):
        first, save, third = kill_points(seed)
        assert 1 <= first[0] <= 3 and 1 <= save <= 2 * (EPOCHS - first[0])
        assert first[0] + (save - 1) // 2 <= third[0] < EPOCHS

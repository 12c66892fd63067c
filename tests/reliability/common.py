"""Shared pieces of the reliability tests: the toy recipe made tiny, and forked CLI runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import QUIET, REPO

TOY = str(REPO / "recipes/toy/ddpo_mode.yaml")
EPOCHS, BATCHES = 6, 2
# two optimiser updates per batch, so checkpoint steps (optimiser) and metrics steps (batches) differ
TINY = [
    f"--trainer.max_epochs={EPOCHS}",
    f"--data.init_args.batches_per_epoch={BATCHES}",
    "--data.init_args.eval_seeds_per_prompt=4",
    "--model.init_args.algorithm.init_args.train_batch_size=32",
    *QUIET,
]
# summary.json fields that legitimately differ between two runs of the same recipe
VOLATILE = {"wall_seconds", "run_dir"}


def fit_args(run_root: Path, *extra: str, configs: tuple[str, ...] = ()) -> list[str]:
    """`fit` on the tiny toy recipe; `configs` come first (so the run keeps the recipe's name)."""
    args = ["fit"]
    for c in (*configs, TOY):
        args += ["--config", str(c)]
    return [*args, "--run_root", str(run_root), *TINY, *extra]


def sigkill_at(epoch: int, batch: int) -> list[str]:
    return [
        "--trainer.callbacks+=diffalign.core.testing.SignalAt",
        f"--trainer.callbacks.init_args.epoch={epoch}",
        f"--trainer.callbacks.init_args.batch={batch}",
    ]


def sigkill_while_saving(folder: Path, save: int) -> str:
    """A config file that makes the run die during its `save`-th checkpoint write."""
    path = folder / f"kill_at_save_{save}.yaml"
    path.write_text(
        "trainer:\n  plugins:\n    - class_path: diffalign.core.testing.SigkillWhileSaving\n"
        f"      init_args:\n        save: {save}\n"
    )
    return str(path)


def forkrun(cwd: Path, runs: list[list[str]], together: bool = False, snapshot: Path | None = None) -> list:
    """Run the command lines as forked processes of one interpreter (see forkrun.py)."""
    spec = cwd / "forkrun.json"
    snap = str(snapshot) if snapshot else None
    spec.write_text(json.dumps({"cwd": str(cwd), "runs": runs, "together": together, "snapshot": snap}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("forkrun.py")), str(spec)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in VOLATILE}


def metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def tensorboard_curve(run: Path, tag: str = "train/reward_mean") -> list[tuple[int, float]]:
    """(step, value) of a scalar as TensorBoard shows it, across every event file of the run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]

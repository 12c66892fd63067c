"""Shared pieces of the multi-process tests: forked ranks (see ranks.py) and what their runs left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import QUIET, REPO

DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]


def run_ranks(cwd: Path, runs: list[dict], imports: tuple[str, ...] = (), timeout: float = 900) -> list[dict]:
    """Run each {"argv", "world", "timeout", "record"} as `world` forked ranks (see ranks.py), one run
    after another; returns each run's exit codes, whether it timed out, and its logs."""
    spec = cwd / "ranks.json"
    spec.write_text(json.dumps({"cwd": str(cwd), "runs": runs, "imports": list(imports)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ranks.py")), str(spec)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(recipe: str, run_root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "recipes" / recipe), "--run_root", str(run_root), *QUIET, *extra]


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if isinstance(v, torch.Tensor)}


def records(cwd: Path, run: int, world: int) -> list[dict]:
    """Per rank: {"rollouts": [{"seeds", "x_T"}, ...], "all_reduces": n} of run `run` (see ranks.py)."""
    return [torch.load(cwd / f"record_{run}_{r}.pt", weights_only=False) for r in range(world)]


def explain(result: dict) -> str:
    return "\n".join(
        f"--- rank {r} (exit {c}) ---\n{log[-1500:]}"
        for r, (c, log) in enumerate(zip(result["codes"], result["logs"], strict=True))
    )

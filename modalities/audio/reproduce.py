"""Reproducing the shipped audio base models from their pretrain recipes, bit for bit.

Each shipped model has a sidecar JSON next to its weights (`mel_base.json`, `wave_flow_base.json`): the
recipe that made it, its step count, the sha256 of the weights file, and an *anchor* — the sha256 that
the same recipe exports when cut short with `--trainer.max_steps=N` (N small). Re-running the anchor takes
seconds, so the test suite does (`tests/modalities/audio/test_base_model.py`): when a code change breaks
reproduction, the cut run's file changes too. The full run is checked by hand, on one thread:

    OMP_NUM_THREADS=1 python -m diffalign.modalities.audio.reproduce mel --full   # or wave
    OMP_NUM_THREADS=1 python -m diffalign.modalities.audio.reproduce mel --record # rewrite the sidecar

Bit-for-bit holds for one torch build on one kind of CPU and one thread (the sidecar names the torch
version it was recorded with); this is a development tool and needs the repository's `recipes/` folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: kind → (pretrain recipe, shipped weights file name without suffix)
BASES = {
    "mel": ("recipes/audio/pretrain_mel.yaml", "mel_base"),
    "wave": ("recipes/audio/pretrain_wave.yaml", "wave_flow_base"),
}
ANCHOR_STEPS = 2
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sidecar_path(kind: str) -> Path:
    return HERE / f"{BASES[kind][1]}.json"


def load_sidecar(kind: str) -> dict[str, Any]:
    return json.loads(sidecar_path(kind).read_text())


def export(kind: str, workdir: str | os.PathLike[str], *overrides: str) -> tuple[str, int]:
    """Run `diffalign fit --config <kind's pretrain recipe> *overrides` inside `workdir` (the recipe's
    `ExportBackbone` path is relative) and return (sha256 of the exported weights, optimizer steps)."""
    from diffalign.core.cli import cli_main

    recipe, name = BASES[kind]
    if not (REPO / recipe).is_file():
        raise FileNotFoundError(f"{REPO / recipe} not found: reproducing a base model needs the repository")
    workdir = Path(workdir)
    with contextlib.chdir(workdir):
        cli = cli_main(
            ["fit", "--config", str(REPO / recipe), "--run_root", str(workdir / "runs"), *QUIET, *overrides]
        )
    return sha256(workdir / "modalities" / "audio" / f"{name}.safetensors"), int(cli.trainer.global_step)


def anchor_overrides(steps: int = ANCHOR_STEPS) -> list[str]:
    """The cut: `steps` optimizer steps, and one evaluation prompt instead of 32 (the evaluation samples
    before and after training take most of a short run's time; the 4,096 clips are still synthesized)."""
    return [f"--trainer.max_steps={steps}", '--data.init_args.eval_prompts=["a C4 sine note, medium"]']


def record(kind: str) -> dict[str, Any]:
    """Write `kind`'s sidecar from the shipped weights and a fresh anchor run."""
    import torch

    recipe, name = BASES[kind]
    overrides = anchor_overrides()
    with tempfile.TemporaryDirectory() as tmp:
        anchor, _ = export(kind, tmp, *overrides)
    old = load_sidecar(kind) if sidecar_path(kind).is_file() else {}
    info = {
        "recipe": recipe,
        "command": f"OMP_NUM_THREADS=1 diffalign fit --config {recipe}",
        "steps": old.get("steps"),
        "sha256": sha256(HERE / f"{name}.safetensors"),
        "anchor": {"overrides": overrides, "sha256": anchor},
        "torch": torch.__version__,
        "full_reproduction": old.get("full_reproduction"),
    }
    sidecar_path(kind).write_text(json.dumps(info, indent=2) + "\n")
    return info


def full(kind: str) -> dict[str, Any]:
    """Run `kind`'s whole pretrain recipe in a temporary folder and compare with the shipped weights."""
    import datetime

    info = load_sidecar(kind)
    with tempfile.TemporaryDirectory() as tmp:
        made, steps = export(kind, tmp)
    result = {
        "date": datetime.date.today().isoformat(),
        "made_sha256": made,
        "shipped_sha256": info["sha256"],
        "identical": made == info["sha256"],
        "steps": steps,
    }
    info["steps"], info["full_reproduction"] = steps, result
    sidecar_path(kind).write_text(json.dumps(info, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(BASES))
    parser.add_argument("--record", action="store_true", help="rewrite the sidecar (anchor re-run)")
    parser.add_argument("--full", action="store_true", help="re-run the whole recipe and compare")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.record:
        print(json.dumps(record(args.kind), indent=2))
    if args.full:
        result = full(args.kind)
        print(json.dumps(result, indent=2))
        return 0 if result["identical"] else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

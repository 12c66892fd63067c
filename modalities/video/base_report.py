"""The sidecar of the shipped moving-digit base, `moving_digits_flow_base.json`: what made the file, and a
fast anchor of its bit-for-bit reproduction.

The full pretrain (`recipes/video/pretrain_flow.yaml`) takes about 15 CPU-minutes, too long for the suite.
The sidecar records the recipe, its step count, the sha256 of the shipped file and the sha256 of the file the
same recipe exports when cut at `cut.max_steps` optimizer steps (`--trainer.max_steps`, real settings
otherwise, one thread). `tests/modalities/video/test_base_model.py` reruns that cut and compares, so a code
or library change that breaks reproduction fails in a minute instead of going unnoticed. Write it after a
full pretrain has exported the shipped file (one thread, as the recipe is reproduced):

    OMP_NUM_THREADS=1 python -m diffalign.modalities.video.base_report --cpu-minutes 15.3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

#: the pretrain recipe of the shipped base (under recipes/)
RECIPE = "recipes/video/pretrain_flow.yaml"
#: where the recipe's ExportBackbone writes, relative to the working folder
EXPORTED = "modalities/video/moving_digits_flow_base.safetensors"
SIDECAR = Path(__file__).with_name("moving_digits_flow_base.json")
SHIPPED = Path(__file__).with_name("moving_digits_flow_base.safetensors")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recipe_path(recipe: str = RECIPE) -> Path:
    from diffalign.core.recipes import resolve_recipe

    return resolve_recipe(recipe).resolve()


def recipe_settings(recipe: str = RECIPE) -> dict[str, int]:
    """The recipe's merged `steps` (epochs × batches per epoch), `T_max` and `batch_size` (clips per step)."""
    import yaml

    from diffalign.core.recipes import recipe_chain

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg: dict[str, Any] = {}
    for part in recipe_chain(recipe_path(recipe)):
        cfg = merge(cfg, yaml.safe_load(part.read_text()) or {})
    data = cfg["data"]["init_args"]
    return {
        "steps": cfg["trainer"]["max_epochs"] * data["batches_per_epoch"],
        "T_max": cfg["model"]["init_args"]["lr_scheduler"]["init_args"]["T_max"],
        "batch_size": data["batch_size"],
    }


def cut_export_sha256(max_steps: int, recipe: str = RECIPE) -> str:
    """Run the recipe for `max_steps` optimizer steps in a temporary folder; sha256 of the file it exports."""
    from diffalign.core.cli import cli_main

    config = recipe_path(recipe)
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        args = ["fit", "--config", str(config), "--run_root", str(Path(tmp) / "runs")]
        args += [f"--trainer.max_steps={max_steps}", "--trainer.enable_progress_bar=false"]
        cli_main(args)
        return sha256_of(Path(tmp) / EXPORTED)


def versions() -> dict[str, str]:
    """The library versions the bits depend on."""
    import diffusers
    import lightning
    import safetensors
    import torch

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "lightning": lightning.__version__,
        "safetensors": safetensors.__version__,
    }


def write_report(cut_steps: int = 2, cpu_minutes: float | None = None, path: Path = SIDECAR) -> dict:
    """Hash the shipped file, run the cut, write the sidecar; returns it."""
    import torch

    if torch.get_num_threads() != 1:
        raise RuntimeError("the recipe is reproduced with one thread: run with OMP_NUM_THREADS=1")
    settings = recipe_settings()
    report = {
        "recipe": RECIPE,
        "steps": settings["steps"],
        "clips_per_step": settings["batch_size"],
        "pretrain_cpu_minutes": cpu_minutes,
        "threads": 1,
        "sha256": sha256_of(SHIPPED),
        "bytes": SHIPPED.stat().st_size,
        "cut": {"max_steps": cut_steps, "sha256": cut_export_sha256(cut_steps)},
        "versions": versions(),
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cut-steps", type=int, default=2, help="optimizer steps of the fast anchor")
    ap.add_argument("--cpu-minutes", type=float, default=None, help="measured CPU time of the full pretrain")
    args = ap.parse_args(argv)
    print(json.dumps(write_report(args.cut_steps, args.cpu_minutes), indent=2))


if __name__ == "__main__":
    main()

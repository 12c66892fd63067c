"""Base models the project trains itself, reproduced bit for bit from their pretrain recipes.

A shipped base has a sidecar JSON next to its weights (the recipe's `ExportBackbone` path, suffix
`.json`): the recipe, its optimizer steps, the sha256 of the weights, the torch version, an *anchor* (the
sha256 the same recipe exports when cut short by the recorded overrides, `--trainer.max_steps=2` by
default) and the last full reproduction. A full pretrain can take many CPU-minutes, too long for the test
suite; re-running the anchor takes seconds, so the suites of the modalities do: a code or library change
that breaks reproduction changes the cut run's file too. The full run is checked by hand, on one thread:

    OMP_NUM_THREADS=1 diffalign reproduce recipes/video/pretrain_flow.yaml --record   # (re)write the sidecar
    OMP_NUM_THREADS=1 diffalign reproduce recipes/audio/pretrain_mel.yaml --record \
        --anchor=--trainer.max_steps=2 '--anchor=--data.init_args.eval_prompts=["a C4 sine note, medium"]'
    OMP_NUM_THREADS=1 diffalign reproduce recipes/video/pretrain_flow.yaml --full     # whole run, compare

Bit for bit holds for one torch build on one kind of CPU and one thread (the sidecar names the torch
version it was recorded with): convolution and matmul kernels round differently on another vector ISA,
CPU vendor or generation, so the anchor is kept per platform (`platform_keys`, `anchor.by_platform`):
`--record` rewrites it from this machine alone, `--add-platform` (same code, another CPU) adds this
machine's anchor; `anchor.sha256` is the one of the recording (used where no platform's anchor is
recorded). This is a development tool: it needs the repository's `recipes/` folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_ANCHOR = ("--trainer.max_steps=2",)
QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def platform_keys() -> list[str]:
    """What bit-for-bit reproduction depends on beyond the code, most specific first: the torch build, the
    CPU's vector ISA as torch dispatches it and the CPU vendor (e.g. "2.11.0+cu130 AVX512 AuthenticAMD"),
    then that with the CPU family and model ("… AuthenticAMD 25/1"): two AVX2 AMD generations were seen to
    round differently, so an anchor is recorded under the specific key and looked up specific first."""
    import torch

    cpu: dict[str, str] = {}  # the first processor's fields
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            cpu.setdefault(name.strip(), value.strip())
    vendor = cpu.get("vendor_id", "unknown")
    coarse = f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()} {vendor}"
    return [f"{coarse} {cpu.get('cpu family', '?')}/{cpu.get('model', '?')}", coarse]


def platform_key() -> str:
    """The key this machine's anchor is recorded under (the most specific of `platform_keys`)."""
    return platform_keys()[0]


def expected_anchor(info: dict[str, Any]) -> str:
    """The anchor sha256 recorded for this platform (its most specific key first), else the first
    recorded one (`anchor.sha256`)."""
    anchor = info["anchor"]
    recorded = anchor.get("by_platform", {})
    return next((recorded[k] for k in platform_keys() if k in recorded), anchor["sha256"])


def _recipe(recipe: str | os.PathLike[str]) -> Path:
    from diffalign.core.recipes import resolve_recipe

    return resolve_recipe(str(recipe)).resolve()


def exported_path(recipe: str | os.PathLike[str]) -> str:
    """Where the recipe's `ExportBackbone` writes, relative to the working folder (the last one its
    chain of files names)."""
    import yaml

    from diffalign.core.recipes import recipe_chain

    found = None
    for part in recipe_chain(_recipe(recipe)):
        callbacks = ((yaml.safe_load(part.read_text()) or {}).get("trainer") or {}).get("callbacks") or []
        for cb in callbacks if isinstance(callbacks, list) else []:
            if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ExportBackbone"):
                found = cb.get("init_args", {}).get("path", found)
    if found is None:
        raise ValueError(f"{recipe}: no ExportBackbone callback, so the recipe ships no weights")
    return str(found)


def repo_root() -> Path:
    """The folder holding `recipes/`: the shipped weights' paths are relative to it."""
    from diffalign.core.recipes import recipes_root

    return recipes_root().resolve().parent


def sidecar_path(recipe: str | os.PathLike[str]) -> Path:
    """The sidecar JSON of the weights the recipe ships."""
    return (repo_root() / exported_path(recipe)).with_suffix(".json")


def load_sidecar(recipe: str | os.PathLike[str], sidecar: Path | None = None) -> dict[str, Any]:
    path = sidecar or sidecar_path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sidecar; write one with 'diffalign reproduce {recipe} --record'")
    return json.loads(path.read_text())


def export(
    recipe: str | os.PathLike[str], workdir: str | os.PathLike[str], *overrides: str
) -> tuple[str, int]:
    """Run `diffalign fit --config <recipe> *overrides` inside `workdir` (the export path is relative) and
    return (sha256 of the exported weights, optimizer steps taken)."""
    from diffalign.core.cli import cli_main

    config, workdir = _recipe(recipe), Path(workdir).resolve()
    with contextlib.chdir(workdir):
        cli = cli_main(
            ["fit", "--config", str(config), "--run_root", str(workdir / "runs"), *QUIET, *overrides]
        )
    return sha256(workdir / exported_path(config)), int(cli.trainer.global_step)


def record(
    recipe: str | os.PathLike[str], anchor: Sequence[str] = DEFAULT_ANCHOR, sidecar: Path | None = None
) -> dict[str, Any]:
    """Write the sidecar from the shipped weights and a fresh anchor run (the last full reproduction and
    step count, when the old sidecar has them, are kept)."""
    import torch

    path = sidecar or sidecar_path(recipe)
    weights = path.with_suffix(".safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no shipped weights to describe")
    old = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        made, _ = export(recipe, tmp, *anchor)
    name = f"recipes/{_recipe(recipe).relative_to(repo_root() / 'recipes').as_posix()}"
    info = {
        "recipe": name,
        "command": f"OMP_NUM_THREADS=1 diffalign fit --config {name}",
        "steps": old.get("steps"),
        "sha256": sha256(weights),
        "bytes": weights.stat().st_size,
        "anchor": {
            "overrides": list(anchor),
            "sha256": made,
            "by_platform": {platform_key(): made},  # a re-record drops other platforms' (maybe stale) anchors
        },
        "torch": torch.__version__,
        "full_reproduction": old.get("full_reproduction"),
    }
    path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def add_platform(recipe: str | os.PathLike[str], sidecar: Path | None = None) -> dict[str, Any]:
    """Run the sidecar's anchor on this machine and add its sha256 under `anchor.by_platform` (for the
    same code on another kind of CPU; the rest of the sidecar is kept)."""
    path = sidecar or sidecar_path(recipe)
    info = load_sidecar(recipe, path)
    with tempfile.TemporaryDirectory() as tmp:
        made, _ = export(recipe, tmp, *info["anchor"]["overrides"])
    info["anchor"].setdefault("by_platform", {})[platform_key()] = made
    path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def full(recipe: str | os.PathLike[str], sidecar: Path | None = None) -> dict[str, Any]:
    """Run the whole recipe in a temporary folder, compare with the shipped weights, record the result."""
    path = sidecar or sidecar_path(recipe)
    info = load_sidecar(recipe, path)
    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        made, steps = export(recipe, tmp)
    result = {
        "date": datetime.date.today().isoformat(),
        "made_sha256": made,
        "identical": made == info["sha256"],
        "steps": steps,
        "cpu_minutes": round((time.process_time() - start) / 60, 1),
    }
    info["steps"], info["full_reproduction"] = steps, result
    path.write_text(json.dumps(info, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`diffalign reproduce RECIPE [--record] [--full]`: exit status 1 when the full run differs."""
    parser = argparse.ArgumentParser(prog="diffalign reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="a pretrain recipe with an ExportBackbone callback")
    parser.add_argument("--record", action="store_true", help="rewrite the sidecar (re-runs the anchor)")
    parser.add_argument("--full", action="store_true", help="re-run the whole recipe and compare")
    parser.add_argument(
        "--add-platform", action="store_true", help="add this CPU's anchor to the sidecar (same code)"
    )
    parser.add_argument(
        "--anchor",
        action="append",
        metavar="OVERRIDE",
        help="an override that cuts the anchor run short, as --anchor=--trainer.max_steps=2 (repeatable; "
        f"default {' '.join(DEFAULT_ANCHOR)})",
    )
    args = parser.parse_args(argv)
    args.anchor = args.anchor or list(DEFAULT_ANCHOR)
    import torch

    torch.set_num_threads(1)
    if not (args.record or args.full or args.add_platform):
        print(json.dumps(load_sidecar(args.recipe), indent=2))
        return 0
    if args.record:
        print(json.dumps(record(args.recipe, args.anchor), indent=2))
    if args.add_platform:
        print(json.dumps(add_platform(args.recipe)["anchor"], indent=2))
    if args.full:
        result = full(args.recipe)
        print(json.dumps(result, indent=2))
        return 0 if result["identical"] else 1
    return 0

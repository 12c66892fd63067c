"""The `diffalign` command: LightningCLI (fit, validate, test, predict) plus our own subcommands.

    diffalign fit --config recipes/toy/ddpo_mode.yaml      # train; several --config files merge
    diffalign recipes                                       # list recipes with their descriptions

Every run folder holds config.yaml (resolved), metrics.csv, TensorBoard events, checkpoints/last.ckpt
(written atomically) and summary.json. `--ckpt_path <run>/checkpoints/last.ckpt` resumes a killed
run in its own folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# recipe names, `bases:` composition and the `recipes` listing (re-exported: they used to live here)
from diffalign.core.recipes import (  # noqa: F401
    expand_config_args,
    list_recipes,
    recipe_command,
    recipe_description,
    recipes_command,
    recipes_root,
)

# Fail at once on a stray hub id instead of retrying for minutes (no network at run time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OWN_COMMANDS = {"recipes": "list the recipes under recipes/ with their one-line descriptions"}
# Subcommands implemented in their own module: name -> ("module:function(argv) -> int", description).
PLUGIN_COMMANDS = {
    # the engine is diffalign.core.score; diffalign.rewards.scoring adds the short names (qed, image, ...)
    "score": (
        "diffalign.rewards.scoring:main",
        "score a file or folder of samples with rewards, one output row per input record",
    ),
    "sample": (
        "diffalign.core.sample:main",
        "test-time alignment: sample with a method from a sampling recipe",
    ),
    "feedback": (
        "diffalign.core.feedback:main",
        "AI feedback: sample, rank with a reward, write preference pairs",
    ),
}


def _offending_keys(message: str) -> list[str]:
    """Key names a jsonargparse error mentions, innermost last."""
    import re

    keys = re.findall(r'Parser key "([^"]+)"', message)
    keys += re.findall(r"Option '([^']+)' is not accepted", message)
    keys += re.findall(r'Key "([^"]+)" is required', message)
    keys += re.findall(r"does not accept option '([^']+)'", message)
    return [k.split(".")[-1] for k in keys]


def explain_config_error(message: str, config_files: Sequence[str]) -> str:
    """A short error naming the config file and line of the offending key, then the parser's reason."""
    keys = _offending_keys(message)
    where = []
    for key in reversed(keys):
        for f in config_files:
            try:
                lines = Path(f).read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            for n, line in enumerate(lines, 1):
                if line.strip().startswith(f"{key}:") or line.strip().startswith(f"- {key}:"):
                    where.append(f"{f}:{n} (key '{key}')")
        if where:
            break
    reason = "\n".join(
        line
        for line in message.splitlines()
        if line.strip()
        and not line.strip().startswith(
            ("Given value", "- Expected a <class 'NoneType'>", "Does not validate", "Subtypes:", "Errors:")
        )
    )
    head = (
        f"invalid configuration at {where[0]}"
        if where
        else (
            f"invalid configuration (config files: {', '.join(config_files)})"
            if config_files
            else "invalid arguments"
        )
    )
    if keys and not where:
        head += f"; offending key: '{keys[-1]}'"
    return f"diffalign: {head}\n{reason}"


def _checkpoint_step(path: str) -> int | None:
    """The global step stored in a Lightning checkpoint (memory-mapped, so cheap for big files)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except (OSError, KeyError, RuntimeError):
        return None


def _build_cli_class() -> type:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import TensorBoardLogger

    from diffalign.core.callbacks import RatioConsistencyCheck, ResumableCSVLogger, RewardEvaluation
    from diffalign.core.io import AtomicCheckpointIO

    class DiffalignCLI(LightningCLI):
        """LightningCLI with diffalign's defaults: run folders, atomic checkpoints, evaluation."""

        def __init__(self, *args: Any, config_files: Sequence[str] = (), **kwargs: Any) -> None:
            self._config_files = list(config_files)
            super().__init__(*args, **kwargs)

        @property
        def recipe_name(self) -> str:
            cfgs = [c for c in self._config_files if "/_base/" not in c.replace(os.sep, "/")]
            return Path(cfgs[-1]).stem if cfgs else "run"

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--run_root",
                type=str,
                default="runs",
                help="folder under which each run gets <recipe>/version_N",
            )

        def _run_version(self, ckpt_path: str | None) -> str | int | None:
            """When resuming from <run>/checkpoints/x.ckpt, keep writing into <run>."""
            if not ckpt_path:
                return None
            p = Path(ckpt_path).resolve()
            if p.parent.name == "checkpoints":
                return p.parent.parent.name
            return None

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
            trainer_cfg = cfg["trainer"]
            run_root = cfg.get("run_root", "runs")
            if trainer_cfg.get("logger") in (None, True):
                # a resumed fit keeps writing into its run folder; validate/test/predict get a new one
                ckpt = cfg.get("ckpt_path") if self.subcommand == "fit" else None
                version = self._run_version(ckpt)
                root, keep_before = run_root, None
                if version is not None:
                    root = str(Path(ckpt).resolve().parent.parent.parent.parent)
                    keep_before = _checkpoint_step(ckpt)
                csv = ResumableCSVLogger(
                    root, name=self.recipe_name, version=version, keep_before_step=keep_before
                )
                tb = TensorBoardLogger(
                    root, name=self.recipe_name, version=csv.version, default_hp_metric=False
                )
                kwargs["logger"] = [csv, tb]
            callbacks = list(trainer_cfg.get("callbacks") or [])
            if trainer_cfg.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks
            ):
                callbacks.append(ModelCheckpoint(save_last=True, save_top_k=1, every_n_epochs=1))
            for c in callbacks:
                if isinstance(c, RewardEvaluation) and c.recipe is None:
                    c.recipe = self.recipe_name
            if not any(isinstance(c, RewardEvaluation) for c in callbacks):
                callbacks.append(RewardEvaluation(recipe=self.recipe_name))
            if not any(isinstance(c, RatioConsistencyCheck) for c in callbacks):
                callbacks.append(RatioConsistencyCheck())
            kwargs["callbacks"] = callbacks
            plugins = trainer_cfg.get("plugins")
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else ([plugins] if plugins else [])
            if not any(hasattr(p, "save_checkpoint") for p in plugins):
                plugins.append(AtomicCheckpointIO())
            kwargs["plugins"] = plugins
            return super().instantiate_trainer(**kwargs)

    return DiffalignCLI


def main() -> None:
    """Console-script entry point."""
    cli_main()


def cli_main(args: Sequence[str] | None = None) -> Any:
    """Run `diffalign`; `args` replaces sys.argv[1:] (tests call it in-process). Returns the CLI."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and (argv[0] in OWN_COMMANDS or argv[0] in PLUGIN_COMMANDS):
        if argv[0] in OWN_COMMANDS:
            code = recipes_command(argv[1:])
        else:
            import importlib

            module, _, func = PLUGIN_COMMANDS[argv[0]][0].partition(":")
            code = getattr(importlib.import_module(module), func)(argv[1:])
        if args is None:
            raise SystemExit(code)
        return code
    argv, config_files = expand_config_args(argv)  # recipe names and `bases:` -> several --config
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (and warns when given both)
    from jsonargparse import ArgumentError

    cli_cls = _build_cli_class()
    try:
        return _run_cli(cli_cls, argv if args is not None else None, config_files)
    except ArgumentError as e:
        if any(a in ("-h", "--help") for a in argv):
            raise
        # last file first: a key set in several files is named where its winning value is
        print(explain_config_error(str(e), config_files[::-1]), file=sys.stderr)
        print(
            "see 'diffalign fit --help' or 'diffalign fit --config <recipe> --print_config'", file=sys.stderr
        )
        raise SystemExit(2) from None


def _run_cli(cli_cls: type, args: Sequence[str] | None, config_files: list[str]) -> Any:
    from lightning import LightningDataModule, LightningModule

    return cli_cls(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 1},
        args=args,
        config_files=config_files,
        parser_kwargs={
            "exit_on_error": False,
            "description": "diffalign: align diffusion models with rewards and preferences. "
            "Own subcommands: "
            + ", ".join(f"'{k}' ({v})" for k, v in OWN_COMMANDS.items())
            + ", "
            + ", ".join(f"'{k}' ({v[1]})" for k, v in PLUGIN_COMMANDS.items()),
        },
    )


if __name__ == "__main__":
    cli_main()

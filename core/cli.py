"""The `diffalign` command: LightningCLI (fit, validate, test, predict) plus our own subcommands.

    diffalign fit --config recipes/toy/ddpo_mode.yaml      # train; several --config files merge
    diffalign recipes                                       # list recipes with their descriptions

Every run folder holds config.yaml (resolved), metrics.csv, TensorBoard events, checkpoints/last.ckpt
(written atomically) and summary.json. Run folders are claimed atomically, so runs started together get
distinct `version_N`. `--ckpt_path <run>/checkpoints/last.ckpt` resumes a killed run in its own folder,
as often as needed. User errors print a few lines (the traceback: `--debug` or DIFFALIGN_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
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

log = logging.getLogger(__name__)

OWN_COMMANDS = {"recipes": "list the recipes under recipes/ with their one-line descriptions"}
# Subcommands implemented in their own module: name -> ("module:function(argv) -> int", description).
PLUGIN_COMMANDS = {
    # the engine is diffalign.core.score; diffalign.rewards.scoring adds the short names (qed, image, ...)
    "score": (
        "diffalign.rewards.scoring:main",
        "score a file or folder of samples with rewards, one output row per input record",
    ),
    "reproduce": (
        "diffalign.core.reproduce:main",
        "check that a pretrain recipe re-makes the base weights it ships, bit for bit (sidecar JSON)",
    ),
    "sample": (
        "diffalign.core.sample:main",
        "test-time alignment: sample with a method from a sampling recipe",
    ),
    "feedback": (
        "diffalign.core.feedback:main",
        "AI feedback: sample, rank with a reward, write preference pairs",
    ),
    "serve-reward": ("diffalign.core.serve_reward:main", "serve a reward over HTTP for RemoteReward clients"),
}


DEBUG_ENV = "DIFFALIGN_DEBUG"
HELP_EPILOG = f"""\
The model's options:  diffalign fit --model.help diffalign.core.module.AlignmentModule
A part's options:     diffalign fit --model diffalign.core.module.AlignmentModule \\
                          --model.init_args.algorithm.help diffalign.core.algorithms.DDPO
A recipe, resolved:   diffalign fit --config <recipe> --print_config
Errors are a few lines naming the file or key; --debug (or {DEBUG_ENV}=1) shows the traceback.
"""
# ckpt_path values that Lightning resolves itself rather than reading a file
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


class UserError(Exception):
    """A mistake in the command line, a config file or a checkpoint: `cli_main` prints the message (a few
    lines naming the file or key and the fix) and exits with status 2; `--debug` shows the traceback."""


def _options(argv: Sequence[str]) -> list[tuple[str, str | None, str]]:
    """(dotted key, value, the option as typed) of every `--key value` / `--key=value` on the command line."""
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and len(a) > 2:
            if "=" in a:
                key, value = a[2:].split("=", 1)
                out.append((key, value, a))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append((a[2:], argv[i + 1], f"{a} {argv[i + 1]}"))
                i += 1
            else:
                out.append((a[2:], None, a))
        i += 1
    return [o for o in out if o[0] != "config"]


def _blame_command_line(key: str, message: str, argv: Sequence[str]) -> str | None:
    """The command-line option that set `key` (the last one wins, as in the parser), if any."""
    hits = []
    for dotted, value, typed in _options(argv):
        parts = dotted.split(".")
        if (
            parts[-1] == key
            or (len(parts) > 1 and parts[-1] in ("class_path", "init_args") and parts[-2] == key)
            or (value is not None and len(value) > 2 and f"'{value}'" in message)
        ):
            hits.append(typed)
    return hits[-1] if hits else None


def _offending_keys(message: str) -> list[str]:
    """Key names a jsonargparse error mentions, innermost last."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    keys += re.findall(r"Option '([^']+)' is not accepted", message)
    keys += re.findall(r'Key "([^"]+)" is required', message)
    keys += re.findall(r"does not accept option '([^']+)'", message)
    # older jsonargparse (4.39) words the last two differently
    keys += re.findall(r"does not accept nested key '([^']+)'", message)
    keys += re.findall(r"Key '([^']+)' is not expected", message)
    return [k.split(".")[-1] for k in keys]


def explain_config_error(message: str, config_files: Sequence[str], argv: Sequence[str] = ()) -> str:
    """A short error naming where the offending key was set (the command line, else the config file and
    line), then the parser's reason."""
    keys = _offending_keys(message)
    on_command_line = _blame_command_line(keys[-1], message, argv) if keys else None
    where = []
    for key in [] if on_command_line else reversed(keys):
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
    reason = _leaf_reasons(message)
    if on_command_line:
        head = f"invalid value on the command line: {on_command_line} (key '{keys[-1]}')"
    elif where:
        head = f"invalid configuration at {where[0]}"
    elif config_files:
        head = f"invalid configuration (config files: {', '.join(config_files)})"
    else:
        head = "invalid arguments"
    if keys and not where and not on_command_line:
        head += f"; offending key: '{keys[-1]}'"
    return f"diffalign: {head}\n{reason}"


def _did_you_mean(cls_path: str, option: str) -> str:
    import difflib
    import importlib
    import inspect

    module, _, name = cls_path.rpartition(".")
    try:
        params = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""
    close = difflib.get_close_matches(option, params, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _leaf_reasons(message: str) -> str:
    """The innermost reasons of a jsonargparse error, each with the class it concerns, instead of the
    nested dump of every Union member and given value."""
    skip = ("Given value", "- Expected a <class 'NoneType'>", "Does not validate", "Subtypes:", "Errors:")
    cls, out = None, []
    for raw in message.splitlines():
        line = raw.strip()
        if not line or line.startswith(skip) or re.fullmatch(r'(- )?Parser key "[^"]+":', line):
            continue
        m = re.fullmatch(r"(- )?Problem with given class_path '([^']+)':", line)
        if m:
            cls = m.group(2)
            continue
        line = line.removeprefix("- ")
        unknown = re.fullmatch(r"Option '([^']+)' is not accepted", line)
        if unknown and cls:
            line += _did_you_mean(cls, unknown.group(1))
        out.append(f"  in {cls}: {line}" if cls else f"  {line}")
    if not out:
        out = [f"  {line.strip()}" for line in message.splitlines()[:1]]
    return "\n".join(dict.fromkeys(out))


def explain_construction_error(error: BaseException, config_files: Sequence[str], argv: Sequence[str]) -> str:
    """What failed while building the run's objects: the class, the root cause (not jsonargparse's dump of
    every Union member), where it was set, and where it was raised."""
    import traceback

    chain = [error]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    cls = None
    tb = root.__traceback__
    while tb is not None:  # the innermost public class whose __init__ raised
        owner = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name == "__init__" else None
        if owner is not None and not type(owner).__name__.startswith("_"):
            cls = f"{type(owner).__module__}.{type(owner).__qualname__}"
        tb = tb.tb_next
    for wrapper in [] if cls else reversed(chain[:-1]):  # a wrapper's own value: its last "Given value"
        found = re.findall(r"^Given value: Namespace\(class_path='([^']+)'", str(wrapper), flags=re.M)
        if found:
            cls = found[-1]
            break
    reason = (str(root).strip().splitlines() or [""])[0]
    head = f"could not build {cls}" if cls else "could not set up the run"
    lines = [f"{head}: {type(root).__name__}: {reason}"]
    words = set(re.findall(r"\w+", reason))
    typed = [
        t
        for dotted, value, t in _options(argv)
        if dotted.split(".")[-1] in words
        or (value is not None and re.search(r"[A-Za-z/]", value) and len(value) > 2 and value in reason)
    ]
    if not typed and cls:
        typed = [t for _, value, t in _options(argv) if value == cls]
    if typed:
        lines.append(f"  set on the command line: {typed[-1]}")
    elif cls:
        lines += _where_in_files(cls.rpartition(".")[2], words, config_files)
    frames = traceback.extract_tb(root.__traceback__)
    if frames:
        lines.append(f"  raised at {frames[-1].filename}:{frames[-1].lineno} (the traceback: --debug)")
    return "\n".join(lines)


def _where_in_files(name: str, words: set[str], config_files: Sequence[str]) -> list[str]:
    """Where the files set up class `name`: a key of its block that the error names, else its class_path."""
    found = []
    for f in config_files:
        try:
            text = Path(f).read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for n, line in enumerate(text, 1):
            if not re.search(rf"class_path:\s*(\S+\.)?{re.escape(name)}\s*$", line):
                continue
            indent = len(line) - len(line.lstrip())
            where = f"  class_path at {f}:{n}"
            for m, inner in enumerate(text[n:], n + 1):
                if inner.strip() and len(inner) - len(inner.lstrip()) < indent:
                    break  # the class's block ended
                key = re.match(r"\s*([A-Za-z_]\w*)\s*:", inner)
                if key and key.group(1) in words:
                    where = f"  set at {f}:{m} (key '{key.group(1)}')"
                    break
            found.append(where)
    return found


def _check_config_contents(config_files: Sequence[str]) -> None:
    """An empty, non-mapping or unparsable YAML file fails naming the file (jsonargparse says only
    "Unexpected config")."""
    import yaml

    for f in config_files:
        try:
            data = yaml.safe_load(Path(f).read_text(encoding="utf-8"))
        except yaml.constructor.ConstructorError:  # a tag only jsonargparse's loader knows: let it judge
            continue
        except yaml.MarkedYAMLError as e:
            line = f":{e.problem_mark.line + 1}" if e.problem_mark is not None else ""
            raise UserError(f"{f}{line}: not valid YAML ({e.problem})") from e
        if data is None:
            raise UserError(
                f"config file {f} is empty (only blank lines or comments): give it at least one key, "
                "e.g. 'trainer: {max_epochs: 2}', or leave out this --config"
            )
        if not isinstance(data, dict):
            raise UserError(
                f"config file {f} holds a {type(data).__name__}, not a mapping of keys such as 'model:'"
            )


def _check_manual_optimisation(model: Any, trainer_cfg: Any) -> None:
    """Trainer options that manual optimisation cannot honour fail naming our equivalent."""
    if getattr(model, "automatic_optimization", True):
        return
    name = type(model).__name__
    if trainer_cfg.get("gradient_clip_val") is not None:
        raise UserError(
            f"trainer.gradient_clip_val: {name} optimises manually (several updates per collected batch), "
            "which Lightning cannot clip for; set model.init_args.max_grad_norm instead "
            f"(now {getattr(model, 'max_grad_norm', None)}) and remove trainer.gradient_clip_val"
        )
    if trainer_cfg.get("accumulate_grad_batches", 1) not in (1, None):
        algorithm = getattr(model, "algorithm", None)
        key = "model.init_args.algorithm.init_args.gradient_accumulation_steps"
        fix = (
            f"set {key} instead (micro-batches per optimiser step)"
            if hasattr(algorithm, "gradient_accumulation_steps")
            else f"{type(algorithm).__name__} has no gradient accumulation (DDPO, DPOK and GRPO have {key})"
        )
        raise UserError(
            f"trainer.accumulate_grad_batches: {name} optimises manually, which Lightning cannot accumulate "
            f"for; {fix}, and remove trainer.accumulate_grad_batches"
        )


def _resume_folder(ckpt: str | None, run_root: str) -> tuple[str, str, str | int] | None:
    """(save_dir, name, version) of the run folder that a fit from `<run>/checkpoints/x.ckpt` continues.

    `save_dir` is spelled as `run_root` when that names the same folder, so the paths Lightning stores in
    checkpoints read the same before and after a resume.
    """
    if not ckpt or ckpt in _LIGHTNING_CKPT_NAMES:
        return None
    p = Path(os.path.normpath(ckpt))
    if p.parent.name != "checkpoints":
        return None
    if len(p.parts) < 5:
        p = Path(os.path.abspath(ckpt))
    run = p.parent.parent
    spelled = Path(run_root) / run.parent.name / run.name
    same = spelled.is_dir() and os.path.samefile(spelled, run)
    version: str | int = run.name
    if run.name.startswith("version_") and run.name[len("version_") :].isdigit():
        version = int(run.name[len("version_") :])  # the same folder; the progress bar shows "v_num: N"
    return (run_root if same else str(run.parent.parent)), run.parent.name, version


# Known-harmless warnings (Lightning internals on this torch; our data modules' empty validation lists;
# in-process CLI calls; a resumed run's checkpoint folder is not empty by design).
_HARMLESS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"Total length of `list` across ranks is zero.*",
    r"LightningCLI's args parameter is intended to run from within Python.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*skip_none parameter was deprecated.*",
)
_BANNER = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "Seed set to")
_BANNER_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


class _DropBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not re.sub(r"^\[rank: \d+\] ", "", str(record.msg)).startswith(_BANNER)


_DROP_BANNER = _DropBanner()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's start-up banner, its litlogger tip and known-harmless warnings."""
    loggers = [logging.getLogger(n) for n in _BANNER_LOGGERS]
    for lg in loggers:
        lg.addFilter(_DROP_BANNER)
    try:
        with warnings.catch_warnings():
            for message in _HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(_DROP_BANNER)


def _build_cli_class() -> type:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import TensorBoardLogger

    from diffalign.core.callbacks import (
        RatioConsistencyCheck,
        ResumableCSVLogger,
        RewardEvaluation,
        RunCheckpoint,
    )
    from diffalign.core.io import (
        AtomicCheckpointIO,
        CheckpointError,
        check_checkpoint,
        claim_version,
        remove_stale_temporaries,
    )

    class DiffalignCLI(LightningCLI):
        """LightningCLI with diffalign's defaults: run folders, atomic checkpoints, evaluation, short
        errors."""

        def __init__(
            self, *args: Any, config_files: Sequence[str] = (), argv: Sequence[str] = (), **kwargs: Any
        ) -> None:
            self._config_files = list(config_files)
            self._argv = list(argv)
            self._ckpt_info: Any = None
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
            parser.description = f"{parser.description or ''}\n\n{HELP_EPILOG}"

        def _subconfig(self, cfg: Any) -> Any:
            return cfg[self.subcommand] if self.subcommand else cfg

        def parse_arguments(self, parser: Any, args: Any) -> None:
            super().parse_arguments(parser, args)
            # a missing or unreadable checkpoint fails here, before Lightning reads its hyperparameters,
            # anything is built or any folder is made
            sub = self.config.get("subcommand")
            ckpt = (self.config[sub] if sub else self.config).get("ckpt_path")
            if ckpt and ckpt not in _LIGHTNING_CKPT_NAMES and not str(ckpt).startswith("registry"):
                self._ckpt_info = check_checkpoint(ckpt)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (UserError, CheckpointError):
                raise
            except Exception as e:  # any constructor's failure is reported by its root cause
                raise UserError(explain_construction_error(e, self._config_files, self._argv)) from e

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            cfg = self._subconfig(self.config_init)
            trainer_cfg = cfg["trainer"]
            _check_manual_optimisation(self.model, trainer_cfg)
            run_root = cfg.get("run_root", "runs")
            logger_cfg = trainer_cfg.get("logger")
            claimed = None
            # in a multi-process run only rank 0 claims or cleans the run folder; the others write
            # nothing there (their loggers are rank-zero only; `trainer.log_dir` is rank 0's)
            from diffalign.core.distributed import launch_rank

            first = launch_rank() == 0
            if logger_cfg is not False:
                # a resumed fit keeps writing into its run folder; everything else claims a new one
                resume = _resume_folder(cfg.get("ckpt_path"), run_root) if self.subcommand == "fit" else None
                if resume is not None:
                    save_dir, name, version = resume
                    keep_before = self._ckpt_info.batches_stepped if self._ckpt_info else None
                    run = Path(save_dir) / name / _version_folder(version)
                    for folder in (run, run / "checkpoints") if first else ():
                        for p in remove_stale_temporaries(folder):
                            log.info("removed %s, left by a killed run", p)
                else:
                    save_dir, name, keep_before = run_root, self.recipe_name, None
                    if first:
                        version = claim_version(run_root, name)
                        claimed = Path(save_dir) / name / _version_folder(version)
                        # Lightning's launcher starts the other ranks from this process's environment
                        os.environ[RUN_FOLDER_ENV] = str(claimed)
                    else:
                        version = _announced_version(Path(save_dir) / name)
                csv = ResumableCSVLogger(save_dir, name=name, version=version, keep_before_step=keep_before)
                tb_kwargs = {} if keep_before is None else {"purge_step": keep_before}
                tb = TensorBoardLogger(
                    save_dir, name=name, version=version, default_hp_metric=False, **tb_kwargs
                )
                # a user's loggers (e.g. WandbLogger) come on top of the CSV + TensorBoard defaults
                extra = [] if logger_cfg in (None, True) else list(_as_list(logger_cfg))
                kwargs["logger"] = [csv, tb, *extra]
            callbacks = list(trainer_cfg.get("callbacks") or [])
            if trainer_cfg.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks
            ):
                callbacks.append(RunCheckpoint(save_last=True, save_top_k=1, every_n_epochs=1))
            for c in callbacks:
                if isinstance(c, RewardEvaluation) and c.recipe is None:
                    c.recipe = self.recipe_name
            if not any(isinstance(c, RewardEvaluation) for c in callbacks):
                callbacks.append(RewardEvaluation(recipe=self.recipe_name))
            if not any(isinstance(c, RatioConsistencyCheck) for c in callbacks):
                callbacks.append(RatioConsistencyCheck())
            kwargs["callbacks"] = callbacks
            plugins = list(_as_list(trainer_cfg.get("plugins")))
            if not any(hasattr(p, "save_checkpoint") for p in plugins):
                plugins.append(AtomicCheckpointIO())
            kwargs["plugins"] = plugins
            try:
                return super().instantiate_trainer(**kwargs)
            except Exception:
                if claimed is not None:  # leave no empty version_N behind
                    with contextlib.suppress(OSError):
                        claimed.rmdir()
                        claimed.parent.rmdir()
                raise

    return DiffalignCLI


RUN_FOLDER_ENV = "DIFFALIGN_RUN_FOLDER"


def _announced_version(parent: Path) -> int | None:
    """The version rank 0 claimed under `parent` when it launched this process (None when it did not
    say, e.g. under torchrun: the logger then names a folder it never writes)."""
    announced = os.environ.get(RUN_FOLDER_ENV)
    if not announced or os.path.normpath(str(Path(announced).parent)) != os.path.normpath(str(parent)):
        return None
    tail = Path(announced).name[len("version_") :]
    return int(tail) if tail.isdigit() else None


def _version_folder(version: str | int) -> str:
    return f"version_{version}" if isinstance(version, int) else version


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def main() -> None:
    """Console-script entry point."""
    cli_main()


def cli_main(args: Sequence[str] | None = None) -> Any:
    """Run `diffalign`; `args` replaces sys.argv[1:] (tests call it in-process). Returns the CLI.

    User errors (config, command line, checkpoint) print a few lines and exit with status 2; `--debug`
    or DIFFALIGN_DEBUG=1 shows the traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
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
    from diffalign.core.recipes import RecipeError

    try:  # recipe names and `bases:` -> several --config
        argv, config_files = expand_config_args(argv, exit_on_error=False)
    except RecipeError as e:
        if debug:
            raise
        print(f"diffalign: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # sys.argv stays as typed: Lightning's launcher starts the other ranks of a multi-process run with
    # it, and each expands the recipe itself
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from diffalign.core.io import CheckpointError

    try:
        _check_config_contents(config_files)
        cli_cls = _build_cli_class()
        with contextlib.nullcontext() if debug else _quiet():
            return _run_cli(cli_cls, argv, config_files)
    except ArgumentError as e:
        if debug or any(a in ("-h", "--help") for a in argv):
            raise
        # last file first: a key set in several files is named where its winning value is
        print(explain_config_error(str(e), config_files[::-1], argv), file=sys.stderr)
        print(
            "see 'diffalign fit --help' or 'diffalign fit --config <recipe> --print_config'", file=sys.stderr
        )
        raise SystemExit(2) from None
    except (UserError, CheckpointError) as e:
        if debug:
            raise
        print(f"diffalign: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        # Lightning stops at the next batch on SIGTERM and would exit 0, as if the run had finished:
        # a scheduler must see the stop (128 + 15, as a killed shell command reports)
        print(
            "diffalign: stopped by SIGTERM before the run finished (no end-of-training hooks ran, so nothing"
            " was exported); resume with --ckpt_path <run folder>/checkpoints/last.ckpt",
            file=sys.stderr,
        )
        raise SystemExit(143) from None


def _run_cli(cli_cls: type, args: Sequence[str], config_files: list[str]) -> Any:
    from jsonargparse import DefaultHelpFormatter
    from lightning import LightningDataModule, LightningModule

    class KeepLines(DefaultHelpFormatter):
        """Prints descriptions line by line, so the commands in them are not re-wrapped."""

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return cli_cls(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 1},
        args=list(args),
        config_files=config_files,
        argv=list(args),
        parser_kwargs={
            "exit_on_error": False,
            "formatter_class": KeepLines,
            "description": "diffalign: align diffusion models with rewards and preferences.\n"
            "Own subcommands:\n"
            + "".join(f"  {k:<9} {v}\n" for k, v in OWN_COMMANDS.items())
            + "".join(f"  {k:<9} {v[1]}\n" for k, v in PLUGIN_COMMANDS.items())
            + f"\n{HELP_EPILOG}",
        },
    )


if __name__ == "__main__":
    cli_main()

"""Picklable specs of what `diffalign score` builds: rewards and readers as (class path, init args).

The main process resolves names into specs and checks them (the class imports, is a `Reward` / `Reader`,
accepts the init args); each worker builds the objects once from the specs. A spec's init args may nest
further `{class_path, init_args}` blocks (a `WeightedSum` of rewards), exactly like a recipe's `reward:`.

    RewardSpec("qed", "diffalign.rewards.molecule.QED", {"invalid_value": float("nan")})
    reward_specs_from_config("reward.yaml")   # a recipe-style `reward:` block, or several columns
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.core.reward import Reward, import_object
from diffalign.core.score.readers import Reader


class ScoreError(Exception):
    """Wrong usage: an unknown reward or reader, bad init args, a bad option (exit status 2)."""


@dataclass(frozen=True)
class ShortName:
    """What a short name (`-r qed`, `--reader image`) stands for: a class path and its init args."""

    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)


def instantiate(config: Any) -> Any:
    """Build every `{class_path, init_args}` block in `config` (recursively through lists and dicts)."""
    if isinstance(config, Mapping):
        if "class_path" in config:
            extra = set(config) - {"class_path", "init_args"}
            if extra:
                raise ScoreError(f"{config['class_path']}: unexpected keys {sorted(extra)} beside class_path")
            cls = _import_class(str(config["class_path"]))
            kwargs = {k: instantiate(v) for k, v in dict(config.get("init_args") or {}).items()}
            try:
                return cls(**kwargs)
            except TypeError as e:
                raise ScoreError(f"{config['class_path']}: {e}") from None
        return {k: instantiate(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [instantiate(v) for v in config]
    return config


def _import_class(path: str) -> type:
    try:
        obj = import_object(path)
    except ValueError as e:
        raise ScoreError(str(e)) from None
    if not isinstance(obj, type):
        raise ScoreError(f"{path} is not a class")
    return obj


def _check_init_args(cls: type, init_args: Mapping[str, Any], where: str) -> None:
    """Bind the init args to the signature now, so a typo stops the run before any worker starts."""
    try:
        inspect.signature(cls).bind(**dict(init_args))
    except TypeError as e:
        raise ScoreError(f"{where}: {e}") from None
    for value in init_args.values():
        for nested in _nested_blocks(value):
            ncls = _import_class(str(nested["class_path"]))
            _check_init_args(ncls, nested.get("init_args") or {}, str(nested["class_path"]))


def _nested_blocks(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        if "class_path" in value:
            return [value]
        return [b for v in value.values() for b in _nested_blocks(v)]
    if isinstance(value, (list, tuple)):
        return [b for v in value for b in _nested_blocks(v)]
    return []


@dataclass(frozen=True)
class RewardSpec:
    """One output column: the reward class (by path) and its init args."""

    column: str
    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)

    def reward_class(self) -> type:
        cls = _import_class(self.class_path)
        if not issubclass(cls, Reward):
            raise ScoreError(f"{self.class_path} is not a diffalign Reward (core.reward.Reward)")
        return cls

    def check(self) -> None:
        """Import the class and bind the init args (cheap: builds nothing)."""
        _check_init_args(self.reward_class(), self.init_args, f"reward '{self.column}' ({self.class_path})")

    def build(self) -> Reward:
        """The reward, frozen."""
        reward = instantiate({"class_path": self.class_path, "init_args": dict(self.init_args)})
        return reward.freeze()

    def readers(self) -> set[str]:
        """The readers the reward declares (`Reward.reader`), through nested rewards too."""
        declared = getattr(self.reward_class(), "reader", None)
        if declared:
            return {declared}
        found: set[str] = set()
        for block in _nested_blocks(dict(self.init_args)):
            cls = _import_class(str(block["class_path"]))
            if getattr(cls, "reader", None):
                found.add(cls.reader)
        return found

    def to_json(self) -> dict[str, Any]:
        return {"column": self.column, "class_path": self.class_path, "init_args": _jsonable(self.init_args)}


@dataclass(frozen=True)
class ReaderSpec:
    """The reader: its class (by path) and its options."""

    class_path: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def reader_class(self) -> type[Reader]:
        cls = _import_class(self.class_path)
        if not issubclass(cls, Reader):
            raise ScoreError(f"{self.class_path} is not a reader (core.score.Reader)")
        return cls

    def build(self) -> Reader:
        cls = self.reader_class()
        try:
            return cls(**dict(self.options))
        except TypeError as e:
            params = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
            raise ScoreError(
                f"{cls.__name__}: {e}; its options: {', '.join(params) or 'none'}".replace("__init__() ", "")
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {"class_path": self.class_path, "options": _jsonable(self.options)}


def _jsonable(value: Any) -> Any:
    """Init args as JSON (NaN/inf as strings, so the metadata of a partial output compares exactly)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# From the command line
# ---------------------------------------------------------------------------------------------------
def reward_specs(text: str | Sequence[str], names: Mapping[str, ShortName]) -> list[RewardSpec]:
    """`-r` values: comma-separated short names or class paths, each optionally `column=...`.

    `qed,sa` (short names), `diffalign.rewards.image.DigitFidelity` (column: the class name),
    `fid=diffalign.rewards.image.DigitFidelity` (column "fid").
    """
    items = [text] if isinstance(text, str) else list(text)
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    specs = []
    for part in parts:
        column, _, target = part.rpartition("=")
        target = target.strip()
        if target in names:
            short = names[target]
            specs.append(RewardSpec(column.strip() or target, short.class_path, dict(short.init_args)))
        elif "." in target:
            specs.append(RewardSpec(column.strip() or target.rpartition(".")[2], target, {}))
        else:
            known = ", ".join(names) or "none"
            raise ScoreError(
                f"unknown reward '{target}': give a class path (package.module.Class) or a short name "
                f"({known})"
            )
    return specs


def reward_specs_from_config(source: str) -> list[RewardSpec]:
    """Reward columns from a YAML/JSON file, or inline YAML/JSON text.

    Accepted shapes: one recipe-style block (`class_path`, `init_args`; column: the `name` init arg,
    else the class name); `reward: <block>`; `rewards: {column: <block>, ...}`; or a recipe whose
    `model.init_args.reward` names its class_path.
    """
    import yaml

    path = Path(source)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # inline text too long for a file name
        is_file = False
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8") if is_file else source)
    except (OSError, yaml.YAMLError) as e:
        raise ScoreError(f"cannot read the reward config {source!r}: {e}") from None
    where = str(path) if is_file else "--reward-config"
    recipe_model = data.get("model") if isinstance(data, Mapping) else None
    if isinstance(recipe_model, Mapping):  # a recipe: its model.init_args.reward
        data = dict(recipe_model.get("init_args") or {})
    if isinstance(data, Mapping) and "rewards" in data and isinstance(data["rewards"], Mapping):
        blocks = list(data["rewards"].items())
    elif isinstance(data, Mapping) and "reward" in data:
        blocks = [(None, data["reward"])]
    elif isinstance(data, Mapping) and "class_path" in data:
        blocks = [(None, data)]
    else:
        raise ScoreError(
            f"{where}: expected a reward block (class_path, init_args), 'reward: <block>' or "
            "'rewards: {column: <block>}'"
        )
    specs = []
    for column, block in blocks:
        if not isinstance(block, Mapping) or "class_path" not in block:
            raise ScoreError(f"{where}: reward {column or ''} has no class_path".replace("  ", " "))
        init_args = dict(block.get("init_args") or {})
        default = str(init_args.get("name") or str(block["class_path"]).rpartition(".")[2])
        specs.append(RewardSpec(str(column or default), str(block["class_path"]), init_args))
    return specs


def reader_spec(name: str, names: Mapping[str, ShortName], options: Mapping[str, Any]) -> ReaderSpec:
    """`--reader` value: a short name or a class path, with the reader options."""
    if name in names:
        short = names[name]
        return ReaderSpec(short.class_path, {**dict(short.init_args), **dict(options)})
    if "." not in name:
        raise ScoreError(
            f"unknown reader '{name}': give a class path or a short name ({', '.join(names) or 'none'})"
        )
    return ReaderSpec(name, dict(options))


def declared_reader(specs: Sequence[RewardSpec], options: Mapping[str, Any]) -> ReaderSpec:
    """The reader the rewards declare for their layout; all must agree."""
    declared: dict[str, list[str]] = {}
    for s in specs:
        for r in s.readers():
            declared.setdefault(r, []).append(s.column)
    if len(declared) == 1:
        return ReaderSpec(next(iter(declared)), dict(options))
    if not declared:
        cols = ", ".join(s.column for s in specs)
        raise ScoreError(f"the rewards ({cols}) declare no reader of their samples; choose one with --reader")
    listed = "; ".join(f"{', '.join(c)} -> {r}" for r, c in declared.items())
    raise ScoreError(f"the rewards declare different readers ({listed}); choose one with --reader")

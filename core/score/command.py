"""`diffalign score`: the command line and the Python entry points over the engine.

Resolution, in order: reward columns from `-r` (short names or class paths, `NAME=` to name a column)
and `--reward-config` (recipe-style `reward:` blocks); the reader from `--reader` (short name or class
path) or, without it, the one the rewards declare for their layout (`Reward.reader`); prompts from
`--prompt`, `--prompts FILE`, or a `prompts.csv` / `prompts.jsonl` inside an input folder. Short names
come from the `names` tables the caller passes (`diffalign.rewards.scoring` passes the project's);
nothing is discovered, scanned or registered.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from diffalign.core.score.engine import check_columns, columns_of, score_records
from diffalign.core.score.output import Output, output_format, partial_path
from diffalign.core.score.readers import Reader, ReadError, Record, find_prompt_file, read_prompt_file
from diffalign.core.score.specs import (
    ReaderSpec,
    RewardSpec,
    ScoreError,
    ShortName,
    declared_reader,
    reader_spec,
    reward_specs,
    reward_specs_from_config,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreNames:
    """Short names the command accepts: reward name -> (class path, init args); reader name -> same."""

    rewards: Mapping[str, ShortName] = field(default_factory=dict)
    readers: Mapping[str, ShortName] = field(default_factory=dict)


@dataclass
class Plan:
    """Everything resolved for one input: reader, reward columns, prompts."""

    input: Path
    reader: ReaderSpec
    rewards: list[RewardSpec]
    built: Reader
    prompt: Any = None
    prompt_map: dict[str, Any] | None = None
    prompt_file: Path | None = None
    matched: int = 0

    @property
    def has_prompts(self) -> bool:
        return self.prompt is not None or self.prompt_map is not None or self.built.has_prompts

    @property
    def columns(self) -> list[str]:
        return columns_of(self.built, self.rewards, self.has_prompts)

    def meta(self) -> dict[str, Any]:
        """What `--resume` checks: the same input, reader, rewards and prompts."""
        return {
            "input": str(self.input.resolve()),
            "reader": self.reader.to_json(),
            "rewards": [s.to_json() for s in self.rewards],
            "prompt": self.prompt,
            "prompt_file": str(self.prompt_file.resolve()) if self.prompt_file else None,
        }

    def records(self) -> Iterator[Record]:
        """The input's records with their prompts; the first is read now, so an unreadable input fails
        here (`ReadError`), before anything is written."""
        try:
            it = iter(self.built.records(self.input))
            first = next(it, None)
        except (OSError, UnicodeError) as e:
            raise ReadError(f"cannot read {self.input}: {e}") from None

        def stream() -> Iterator[Record]:
            if first is None:
                return
            for r in _chain(first, it):
                yield self._prompted(r)

        return stream()

    def _prompted(self, r: Record) -> Record:
        if self.prompt is not None:
            return replace(r, prompt=self.prompt)
        if self.prompt_map is not None and r.id in self.prompt_map:
            self.matched += 1
            return replace(r, prompt=self.prompt_map[r.id])
        return r


def _chain(first: Record, rest: Iterator[Record]) -> Iterator[Record]:
    yield first
    yield from rest


def plan(
    input: str | os.PathLike[str],
    rewards: str | Sequence[str] | None = None,
    *,
    reward_config: str | None = None,
    reader: str | None = None,
    reader_options: Mapping[str, Any] | None = None,
    prompt: Any = None,
    prompts: str | os.PathLike[str] | None = None,
    names: ScoreNames | None = None,
) -> Plan:
    """Resolve what to score `input` with (see the module docstring); raises ScoreError / ReadError."""
    names = names or ScoreNames()
    specs = reward_specs(rewards, names.rewards) if rewards else []
    if reward_config:
        specs += reward_specs_from_config(reward_config)
    if not specs:
        raise ScoreError("no rewards: give -r NAME[,NAME...] or --reward-config FILE (--list shows names)")
    for s in specs:
        s.check()
    options = {k: v for k, v in dict(reader_options or {}).items() if v is not None}
    rspec = reader_spec(reader, names.readers, options) if reader else declared_reader(specs, options)
    built = rspec.build()
    path = Path(input)
    built.check(path)
    check_columns(built, specs)
    if prompt is not None and prompts is not None:
        raise ScoreError("give --prompt or --prompts, not both")
    prompt_file = (
        Path(prompts) if prompts is not None else (find_prompt_file(path) if prompt is None else None)
    )
    prompt_map = read_prompt_file(prompt_file) if prompt_file is not None else None
    return Plan(path, rspec, specs, built, prompt, prompt_map, prompt_file)


def iter_score_file(
    input: str | os.PathLike[str],
    rewards: str | Sequence[str] | None = None,
    *,
    workers: int | None = 1,
    chunk_size: int | None = None,
    engine: str = "pool",
    address: str | None = None,
    **plan_args: Any,
) -> Iterator[dict[str, Any]]:
    """Rows for an input (file or folder), lazily, in input order (see `engine.score_records`; with
    `engine="ray"` as Ray tasks on the cluster at `address`, or a local one of `workers` CPUs).

    `plan_args` are `plan`'s: `reward_config`, `reader`, `reader_options`, `prompt`, `prompts`,
    `names`. Raises `ReadError` / `ScoreError` before the first row when the input cannot be read or a
    name is wrong.
    """
    p = plan(input, rewards, **plan_args)
    return score_records(
        p.records(),
        p.reader,
        p.rewards,
        workers=workers,
        chunk_size=chunk_size,
        prompts=p.has_prompts,
        engine=engine,  # type: ignore[arg-type]
        address=address,
    )


def score_file(
    input: str | os.PathLike[str], rewards: str | Sequence[str] | None = None, **kwargs: Any
) -> list:
    """All rows as a list (small inputs; `iter_score_file` streams)."""
    return list(iter_score_file(input, rewards, **kwargs))


# ---------------------------------------------------------------------------------------------------
# Interruption
# ---------------------------------------------------------------------------------------------------
class _Stop:
    """SIGINT/SIGTERM handler: the first signal asks the run to stop cleanly (polled by the engine);
    a second one stops it at once (KeyboardInterrupt), though never in the middle of writing a row."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.writing = False
        self.force = False
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            print(
                f"\ndiffalign score: {signal.Signals(signum).name}: stopping after the rows already scored "
                "(again to stop at once)",
                file=sys.stderr,
            )
            return
        self.force = True
        if not self.writing:
            raise KeyboardInterrupt

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: the caller handles signals
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


class _Counted:
    """Counts the records that go through (for "wrote N of M records")."""

    def __init__(self, records: Iterator[Record]) -> None:
        self.records, self.n = records, 0

    def __iter__(self) -> Iterator[Record]:
        for r in self.records:
            self.n += 1
            yield r


def _skip_done(records: Iterator[Record], output: Output, done: int) -> None:
    """Consume the `done` records the partial output already holds, checking that their ids match."""
    if not done:
        return
    ids = output.done_ids()
    for n in range(1, done + 1):
        r = next(records, None)
        written = next(ids, None)
        if r is None:
            raise ScoreError(
                f"the input has only {n - 1} records but {output.partial} holds {done} rows: it was made "
                "from another input; delete it to start over"
            )
        if written != r.id:
            raise ScoreError(
                f"record {n} is {r.id!r} in the input but {written!r} in {output.partial}: it was made from "
                "another input; delete it to start over"
            )


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def default_output(path: str | os.PathLike[str]) -> Path:
    """INPUT.scores.csv beside the input (file or folder)."""
    p = Path(path)
    return p.with_name(p.name + ".scores.csv")


def _option(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ScoreError(f"--reader-option wants KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value) if value.strip() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffalign score",
        description="Score a file or folder of samples with the Reward classes training uses; writes one "
        "row per input record (record, id, source, [prompt], one column per reward, error), in input order.",
    )
    p.add_argument("input", nargs="?", help="input file or folder")
    p.add_argument(
        "-r",
        "--rewards",
        action="append",
        default=None,
        help="rewards: short names or class paths, comma-separated; NAME=... names a column "
        "(e.g. qed,sa or fid=diffalign.rewards.image.DigitFidelity); --list shows the short names",
    )
    p.add_argument(
        "--reward-config",
        default=None,
        help="YAML/JSON file (or inline text) with a recipe-style reward block (class_path, init_args), "
        "'reward: <block>' or 'rewards: {column: <block>, ...}'",
    )
    p.add_argument(
        "--reader",
        default=None,
        help="reader: short name or class path (default: the one the rewards declare)",
    )
    p.add_argument(
        "--reader-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the reader (repeatable; the value is read as YAML)",
    )
    p.add_argument("--column", default=None, help="table inputs: the sample column (reader option 'column')")
    p.add_argument(
        "--id-column", default=None, help="table inputs: the id column (reader option 'id_column')"
    )
    p.add_argument("--prompt", default=None, help="the prompt of every record (prompt-aware rewards)")
    p.add_argument(
        "--prompts",
        default=None,
        help="mapping file record id -> prompt (.csv with id/file and prompt columns, .jsonl, .json); "
        "default: prompts.csv or prompts.jsonl inside an input folder",
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="output: .csv, .parquet/.pq, or '-' (CSV on stdout); default INPUT.scores.csv beside the input",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted output from its first missing record"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: all cores); 1 = in process"
    )
    p.add_argument(
        "--chunk-size", type=int, default=None, help="records per worker task (default: the reader's)"
    )
    p.add_argument(
        "--engine",
        choices=("pool", "ray"),
        default="pool",
        help="pool: worker processes on this machine (default); ray: Ray tasks on a cluster (the 'ray' "
        "extra), the same rows",
    )
    p.add_argument(
        "--address",
        default=None,
        help="--engine ray: the cluster to join ('auto', 'ray://head:10001'); default: a local instance "
        "of --workers CPUs (all cores)",
    )
    p.add_argument(
        "--flush-seconds",
        type=float,
        default=5.0,
        help="completed rows are made durable in the partial output at least this often (default 5)",
    )
    p.add_argument(
        "--list", action="store_true", help="list the short names of rewards and readers, then exit"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    return p


def _list(names: ScoreNames) -> int:
    def show(table: Mapping[str, ShortName]) -> None:
        for n, s in table.items():
            args = ", ".join(f"{k}={v!r}" for k, v in s.init_args.items())
            print(f"  {n:<24} {s.class_path}" + (f"({args})" if args else ""))

    print("readers (--reader):")
    show(names.readers)
    print("rewards (-r):")
    show(names.rewards)
    print("any Reward or Reader class is also reached by its class path")
    return 0


def _progress_bar(enabled: bool, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: the worker pool forks after the bar exists
    return tqdm(
        file=sys.stderr, unit=" rec", desc="scoring", initial=initial, dynamic_ncols=True, mininterval=0.5
    )


def main(argv: Sequence[str] | None = None, names: ScoreNames | None = None) -> int:
    """`diffalign score ...`; returns the exit status: 0 done, 2 unreadable input or bad usage,
    128 + signal number when interrupted (130 for SIGINT, 143 for SIGTERM)."""
    names = names or ScoreNames()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.list:
        return _list(names)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="diffalign score: %(message)s")
    if args.input is None:
        print("diffalign score: give an input file or folder (see --help)", file=sys.stderr)
        return 2
    stop = _Stop()
    stop.install()  # from the start: a signal while the rewards load still stops cleanly
    try:
        return _run(args, argv, names, stop)
    except KeyboardInterrupt:  # a second signal before the scoring loop
        print("diffalign score: interrupted before scoring started; nothing written", file=sys.stderr)
        return 128 + int(stop.signum or signal.SIGINT)
    finally:
        stop.restore()


def _run(args: argparse.Namespace, argv: Sequence[str], names: ScoreNames, stop: _Stop) -> int:
    output: Output | None = None
    if args.address is not None and args.engine != "ray":
        print("diffalign score: --address is an option of --engine ray", file=sys.stderr)
        return 2
    try:
        options = dict(_option(o) for o in args.reader_option)
        options.update(
            {k: v for k, v in (("column", args.column), ("id_column", args.id_column)) if v is not None}
        )
        p = plan(
            args.input,
            args.rewards,
            reward_config=args.reward_config,
            reader=args.reader,
            reader_options=options,
            prompt=args.prompt,
            prompts=args.prompts,
            names=names,
        )
        out_path = args.output if args.output is not None else default_output(args.input)
        output_format(out_path)
        records = p.records()
        output = Output(out_path, p.columns, [s.column for s in p.rewards], p.meta(), args.flush_seconds)
        done = output.start(args.resume)
        _skip_done(records, output, done)
        if done:
            print(f"diffalign score: resuming after record {done} ({output.partial})", file=sys.stderr)
    except (ReadError, ScoreError, OSError, UnicodeError) as e:
        if output is not None:
            output.close(complete=False)  # what a partial output holds stays as it was
        where = "" if isinstance(e, (ReadError, ScoreError)) else f"{args.input}: "
        print(f"diffalign score: {where}{e}", file=sys.stderr)
        return 2
    counted = _Counted(records)
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    if args.engine == "ray" and args.address is not None and args.workers is None:
        workers = None  # every CPU of the cluster
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = _progress_bar(show, done)
    start, errors, complete, rows = time.perf_counter(), 0, False, None
    try:
        rows = score_records(
            counted,
            p.reader,
            p.rewards,
            workers=workers,
            chunk_size=args.chunk_size,
            prompts=p.has_prompts,
            first_record=done + 1,
            stop=stop,
            progress=bar,
            engine=args.engine,
            address=args.address,
        )
        for row in rows:
            stop.writing = True
            output.write(row)
            errors += row["error"] is not None
            stop.writing = False
            if stop.force:
                raise KeyboardInterrupt
        complete = not stop()
        if complete:
            stop.writing = True  # a signal now waits until the output file is in place
            where = output.close(complete=True)
    except KeyboardInterrupt:
        stop.signum = stop.signum or signal.SIGINT
        if rows is not None:
            rows.close()  # kills the workers: in-flight chunks are discarded
    except (ReadError, ScoreError, OSError, UnicodeError) as e:
        kept = output.close(complete=False)
        if kept is not None and not output.written:
            output.discard()  # nothing worth keeping
        print(f"diffalign score: {e}", file=sys.stderr)
        if kept is not None and output.written:
            print(f"diffalign score: the {output.written} rows written are kept in {kept}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    if not complete:
        stop.writing = False
        return _interrupted(stop, output, counted, done, argv)
    dt = time.perf_counter() - start
    n = output.written - done
    shown = "stdout" if where is None else str(where)
    resumed = f", records {done + 1}-{output.written} this run" if done else ""
    if p.prompt_map is not None and p.matched < len(p.prompt_map):
        log.warning(
            "%d of the %d prompts in %s name no record",
            len(p.prompt_map) - p.matched,
            len(p.prompt_map),
            p.prompt_file,
        )
    print(
        f"diffalign score: {output.written} records ({errors} with errors{resumed}) in {dt:.1f} s "
        f"({n / max(dt, 1e-9):.0f}/s) -> {shown}",
        file=sys.stderr,
    )
    return 0


def _interrupted(stop: _Stop, output: Output, counted: _Counted, done: int, argv: Sequence[str]) -> int:
    """Keep the partial output, say how far the run got and how to continue; exit 128 + signal."""
    signum = int(stop.signum or signal.SIGINT)
    kept = output.close(complete=False)
    total, exact = done + counted.n, True
    try:  # count the records left (cheap: no loading), unless interrupted again
        for _ in counted:
            pass
        total = done + counted.n
    except KeyboardInterrupt:
        total, exact = done + counted.n, False
    of = f"{total}" if exact else f"at least {total}"
    name = signal.Signals(signum).name
    if kept is None:
        print(
            f"diffalign score: interrupted ({name}): wrote {output.written} of {of} records to stdout",
            file=sys.stderr,
        )
    else:
        again = [a for a in argv if a != "--resume"]
        print(
            f"diffalign score: interrupted ({name}): wrote {output.written} of {of} records to {kept}; "
            f"continue with --resume:\n  diffalign score {shlex.join(again)} --resume",
            file=sys.stderr,
        )
    return 128 + signum


__all__ = [
    "Plan",
    "ScoreNames",
    "default_output",
    "iter_score_file",
    "main",
    "partial_path",
    "plan",
    "score_file",
]

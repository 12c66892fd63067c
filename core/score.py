"""`diffalign score`: score a file of samples with named rewards, one output row per input record.

    diffalign score mols.smi -r qed,sa,logp                  # -> mols.smi.scores.csv
    diffalign score mols.sdf -r qed -o scores.parquet --workers 4
    diffalign score mols.csv --column canonical_smiles -o -   # CSV to stdout

The engine here knows no modality. Readers and named rewards come from a *scoring plugin*: any module of
the `diffalign.rewards` package (or of the `diffalign.scoring` entry-point group, or named with
`--plugin`) that exposes a module attribute `SCORING` satisfying `ScoringPlugin`. Plugins are found by
iterating the package with pkgutil and importing with importlib; nothing is imported statically.

Streaming: records are read lazily, cut into chunks of `chunk_size`, and at most `2 × workers` chunks are
in flight in a process pool; rows come back and are written in input order. Memory therefore stays flat
whatever the file size. Exactly one row per input record: a record that cannot be read or parsed, or a
reward that fails, yields a row whose `error` column says why (rewards left empty). The exit status is
non-zero only when the input cannot be read at all (missing file, unknown format, no SMILES column …).

Python:

    from diffalign.core.score import score_file, iter_score_file, write_rows
    rows = score_file("mols.smi", ["qed", "sa"])                 # list of dicts (small files)
    write_rows(iter_score_file("big.smi", ["qed"], workers=8), "big.parquet")   # streaming
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import logging
import math
import multiprocessing
import os
import pkgutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from diffalign.core.extras import MissingExtraError, require

log = logging.getLogger(__name__)

PLUGIN_PACKAGE = "diffalign.rewards"
ENTRY_POINT_GROUP = "diffalign.scoring"
DEFAULT_CHUNK_SIZE = 256
PARQUET_ROW_GROUP = 65536
PARQUET_SUFFIXES = (".parquet", ".pq")


# ---------------------------------------------------------------------------------------------------
# The plugin protocol
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One input record.

    Args:
        id: identifier: the name given in the input, else its line / row / record number.
        item: picklable payload the plugin's `prepare` turns into the object rewards take (in a worker).
        error: why the record could not be read (then `item` is ignored and rewards stay empty).
        source: text echoed in the output's source column (e.g. the SMILES), "" when none.
    """

    id: str
    item: Any = None
    error: str | None = None
    source: str = ""


@runtime_checkable
class ScoringPluginProtocol(Protocol):
    """What `diffalign score` needs from a plugin (any object with these attributes will do)."""

    name: str
    rewards: Mapping[str, Callable[[Any], float]]

    def can_read(self, path: str | os.PathLike[str]) -> bool: ...

    def read(self, path: str | os.PathLike[str], **opts: Any) -> Iterator[Record]: ...


@dataclass
class ScoringPlugin:
    """A ready-made `ScoringPluginProtocol` implementation; plugins usually instantiate this.

    Args:
        name: short name (shown in messages).
        can_read: `can_read(path) -> bool`, typically by file extension.
        read: `read(path, **opts) -> Iterator[Record]`, lazy; raises `ReadError` (or OSError) when the
            file cannot be read at all. Options come from the command line (`column`, `id_column`).
        rewards: reward name -> top-level (picklable) function `fn(prepared_item) -> float`.
        prepare: top-level function run in the worker, `prepare(item) -> object the rewards take`; it
            raises (any exception) with the reason for an unparsable item. Default: identity.
        default_rewards: names scored when the user gives no `-r`.
        invalid_values: score written for a reward when the record failed (default: empty).
        source_column: name of the output column holding `Record.source`.
        warmup: optional top-level function run once in each worker (load tables, caches).
        description: formats read, for messages.
    """

    name: str
    can_read: Callable[[Any], bool]
    read: Callable[..., Iterator[Record]]
    rewards: Mapping[str, Callable[[Any], float]]
    prepare: Callable[[Any], Any] | None = None
    default_rewards: Sequence[str] = ()
    invalid_values: Mapping[str, float] = field(default_factory=dict)
    source_column: str = "source"
    warmup: Callable[[], Any] | None = None
    description: str = ""


class ReadError(Exception):
    """The input cannot be read at all (the command exits non-zero with this message)."""


class ScoreError(Exception):
    """Wrong usage: unknown reward or plugin, no plugin reads the file, bad option."""


# ---------------------------------------------------------------------------------------------------
# Plugin discovery (dynamic: pkgutil + importlib, never a static import)
# ---------------------------------------------------------------------------------------------------
def _mentions_scoring(module_name: str) -> bool:
    """Cheap pre-check: only import modules whose source mentions SCORING (rewards can be heavy)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return True
    try:
        with open(origin, encoding="utf-8", errors="replace") as f:
            return "SCORING" in f.read()
    except OSError:
        return False


def load_plugin(module_name: str) -> Any:
    """The `SCORING` object of a module; short names resolve inside `diffalign.rewards` ("molecule")."""
    candidates = [module_name] if "." in module_name else [f"{PLUGIN_PACKAGE}.{module_name}", module_name]
    errors = []
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        plugin = getattr(module, "SCORING", None)
        if plugin is None:
            raise ScoreError(f"module {name!r} has no SCORING attribute (not a scoring plugin)")
        _check_plugin(plugin, name)
        return plugin
    raise ScoreError(f"cannot import scoring plugin {module_name!r}: " + "; ".join(errors))


def _check_plugin(plugin: Any, where: str) -> None:
    missing = [a for a in ("name", "rewards", "can_read", "read") if not hasattr(plugin, a)]
    if missing:
        raise ScoreError(f"{where}.SCORING is not a scoring plugin: missing {', '.join(missing)}")


#: plugins that the last `discover_plugins` could not load for a missing extra: module -> message
UNAVAILABLE: dict[str, str] = {}


def discover_plugins(package: str = PLUGIN_PACKAGE) -> dict[str, Any]:
    """module name -> SCORING object, for every module of `package` (and entry points) that has one.

    A module that fails to import is skipped with a debug log line; one that lacks an optional package
    is remembered in `UNAVAILABLE` (module -> the error naming the extra) for the "no plugin" message.
    """
    found: dict[str, Any] = {}
    UNAVAILABLE.clear()
    try:
        pkg = importlib.import_module(package)
        names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__, package + "."))
    except ImportError as e:
        log.debug("scoring: cannot import %s: %s", package, e)
        names = []
    for name in names:
        if not _mentions_scoring(name):
            continue
        try:
            module = importlib.import_module(name)
        except MissingExtraError as e:
            UNAVAILABLE[name] = str(e)
            continue
        except Exception as e:  # noqa: BLE001 - a broken optional module must not stop scoring
            log.debug("scoring: skipping %s (%s: %s)", name, type(e).__name__, e)
            continue
        plugin = getattr(module, "SCORING", None)
        if plugin is not None and all(hasattr(plugin, a) for a in ("name", "rewards", "can_read", "read")):
            found[name] = plugin
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                found.setdefault(ep.value, ep.load())
            except Exception as e:  # noqa: BLE001
                log.debug("scoring: entry point %s failed: %s", ep.name, e)
    except Exception as e:  # noqa: BLE001
        log.debug("scoring: entry points unavailable: %s", e)
    return found


def plugin_for(path: str | os.PathLike[str], plugin: Any | str | None = None) -> Any:
    """The plugin to use for `path`: the given one (object or module name), else the first that reads it."""
    if plugin is not None:
        return load_plugin(plugin) if isinstance(plugin, str) else plugin
    plugins = discover_plugins()
    for p in plugins.values():
        try:
            if p.can_read(path):
                return p
        except Exception as e:  # noqa: BLE001
            log.debug("scoring: %s.can_read failed: %s", p.name, e)
    known = "; ".join(f"{p.name}: {getattr(p, 'description', '') or '?'}" for p in plugins.values())
    missing = "".join(f"; not loaded: {msg}" for msg in UNAVAILABLE.values())
    raise ReadError(
        f"{path}: no scoring plugin reads this kind of file (known plugins: {known or 'none found'}); "
        f"use --plugin MODULE to choose one{missing}"
    )


def resolve_rewards(plugin: Any, names: Sequence[str] | str | None) -> list[str]:
    """Validate reward names against the plugin; None/empty -> its default rewards (else all)."""
    if isinstance(names, str):
        names = [n for n in (s.strip() for s in names.split(",")) if n]
    known = list(plugin.rewards)
    if not names:
        return list(getattr(plugin, "default_rewards", ()) or known)
    unknown = [n for n in names if n not in plugin.rewards]
    if unknown:
        raise ScoreError(
            f"unknown reward{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for plugin "
            f"'{plugin.name}'; known rewards: {', '.join(known)}"
        )
    if len(set(names)) != len(names):
        raise ScoreError(f"reward names repeated: {', '.join(names)}")
    return list(names)


# ---------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _describe(e: BaseException) -> str:
    msg = str(e)
    if type(e).__name__ in ("InvalidMolecule", "ValueError") and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _init_worker(prepare: Callable[[Any], Any] | None, funcs: Sequence[tuple[str, Callable]], warmup) -> None:
    _WORKER["prepare"] = prepare
    _WORKER["funcs"] = list(funcs)
    if warmup is not None:
        try:
            warmup()
        except Exception as e:  # noqa: BLE001 - reported per row later if it matters
            log.debug("scoring: warmup failed: %s", e)


def _score_items(
    items: Sequence[Any],
    prepare: Callable[[Any], Any] | None,
    funcs: Sequence[tuple[str, Callable]],
) -> list[tuple[tuple[float | None, ...] | None, str | None]]:
    """Score items: [(values per reward or None, error or None)]; never raises for one bad item."""
    out: list[tuple[tuple[float | None, ...] | None, str | None]] = []
    for item in items:
        try:
            obj = prepare(item) if prepare is not None else item
        except Exception as e:  # noqa: BLE001
            out.append((None, _describe(e)))
            continue
        values: list[float | None] = []
        errors = []
        for name, fn in funcs:
            try:
                v = float(fn(obj))
                if not math.isfinite(v):
                    raise ValueError(f"value is {v}")
            except Exception as e:  # noqa: BLE001
                v = None
                errors.append(f"{name}: {_describe(e)}")
            values.append(v)
        out.append((tuple(values), "; ".join(errors) or None))
    return out


def _score_chunk_in_worker(items: Sequence[Any]) -> list[tuple[tuple[float | None, ...] | None, str | None]]:
    return _score_items(items, _WORKER["prepare"], _WORKER["funcs"])


# ---------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------
def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chain(head: list[list[Record]], rest: Iterator[list[Record]]) -> Iterator[list[Record]]:
    yield from head
    yield from rest


def _mp_context() -> Any:
    # fork is fastest (no re-import in workers); elsewhere the platform default (spawn / forkserver).
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform == "linux" else None)


class _Pool:
    """A ProcessPoolExecutor that can be rebuilt after a worker dies (e.g. a segfault in a C library)."""

    def __init__(self, workers: int, initargs: tuple) -> None:
        self.workers, self.initargs = workers, initargs
        self.executor: ProcessPoolExecutor | None = None
        self.restarts = 0

    def get(self) -> ProcessPoolExecutor:
        if self.executor is None:
            self.executor = ProcessPoolExecutor(
                self.workers, mp_context=_mp_context(), initializer=_init_worker, initargs=self.initargs
            )
        return self.executor

    def restart(self) -> None:
        self.restarts += 1
        self.shutdown()

    def shutdown(self, wait: bool = False) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=wait, cancel_futures=True)
            self.executor = None


def _crash_result(items: Sequence[Any], pool: _Pool) -> list:
    """Re-score a chunk whose worker died one item at a time, so only the culprit gets an error row."""
    out = []
    for item in items:
        try:
            out.extend(pool.get().submit(_score_chunk_in_worker, [item]).result())
        except BrokenProcessPool:
            pool.restart()
            out.append((None, "worker process crashed while scoring this record"))
    return out


def score_records(
    records: Iterable[Record],
    rewards: Sequence[str] | str | None,
    plugin: Any,
    *,
    workers: int | None = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_in_flight: int | None = None,
    progress: Any = None,
) -> Iterator[dict[str, Any]]:
    """Score records lazily; yields one row dict per record, in input order.

    Row keys: `record` (1-based position in the input), `id`, the plugin's `source_column`, one key per
    reward (float, or None when it could not be computed) and `error` (None when all went well; else
    the record's or the failing rewards' reasons, "; "-separated).

    `workers` > 1 scores in a process pool (None: all cores) with at most `max_in_flight`
    (default 2 × workers) chunks of `chunk_size` records outstanding; 1 scores in this process.
    `progress` is an optional object with `update(n)` (a tqdm bar).
    """
    names = resolve_rewards(plugin, rewards)
    funcs = [(n, plugin.rewards[n]) for n in names]
    prepare = getattr(plugin, "prepare", None)
    warmup = getattr(plugin, "warmup", None)
    invalid = dict(getattr(plugin, "invalid_values", {}) or {})
    source_col = getattr(plugin, "source_column", "source") or "source"
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ScoreError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise ScoreError(f"chunk size must be >= 1, got {chunk_size}")
    max_in_flight = max_in_flight or 2 * workers
    failed_values = {n: invalid.get(n) for n in names}
    counter = [0]

    def rows_for(chunk: list[Record], results: list) -> Iterator[dict[str, Any]]:
        it = iter(results)
        for r in chunk:
            counter[0] += 1
            row: dict[str, Any] = {"record": counter[0], "id": r.id, source_col: r.source}
            if r.error is not None:
                row.update(failed_values)
                row["error"] = r.error
            else:
                values, error = next(it)
                if values is None:
                    row.update(failed_values)
                else:
                    row.update(zip(names, values, strict=True))
                row["error"] = error
            yield row
        if progress is not None:
            progress.update(len(chunk))

    def payload(chunk: list[Record]) -> list[Any]:
        return [r.item for r in chunk if r.error is None]

    if warmup is not None:  # here too: forked workers then inherit the loaded tables
        try:
            warmup()
        except Exception as e:  # noqa: BLE001
            log.debug("scoring: warmup failed: %s", e)
    chunks = _chunks(records, chunk_size)
    head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    if workers == 1 or len(head) < 2:  # one chunk in all: not worth starting processes
        for chunk in _chain(head, chunks):
            yield from rows_for(chunk, _score_items(payload(chunk), prepare, funcs))
        return

    pool = _Pool(workers, (prepare, funcs, warmup))
    pending: deque[tuple[list[Record], list[Any], Future]] = deque()

    def submit(chunk: list[Record]) -> None:
        items = payload(chunk)
        pending.append((chunk, items, pool.get().submit(_score_chunk_in_worker, items)))

    def finish() -> Iterator[dict[str, Any]]:
        chunk, items, fut = pending.popleft()
        try:
            results = fut.result()
        except BrokenProcessPool:
            log.warning("scoring: a worker process died; re-scoring the affected records one by one")
            pool.restart()
            rest = [(c, i) for c, i, _ in pending]
            pending.clear()
            results = _crash_result(items, pool)
            for c, i in rest:
                pending.append((c, i, pool.get().submit(_score_chunk_in_worker, i)))
        except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be pickled: keep the rows
            log.warning("scoring: a chunk failed as a whole (%s: %s)", type(e).__name__, e)
            results = [(None, f"scoring failed: {_describe(e)}")] * len(items)
        yield from rows_for(chunk, results)

    try:
        for chunk in _chain(head, chunks):
            submit(chunk)
            while len(pending) >= max_in_flight:
                yield from finish()
        while pending:
            yield from finish()
    finally:
        pool.shutdown(wait=True)


def iter_score_file(
    path: str | os.PathLike[str],
    rewards: Sequence[str] | str | None = None,
    *,
    plugin: Any | str | None = None,
    workers: int | None = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Any = None,
    **read_opts: Any,
) -> Iterator[dict[str, Any]]:
    """Stream rows for a file (see `score_records`). Raises `ReadError` when it cannot be read at all.

    `read_opts` go to the plugin's reader (e.g. `column="smiles"`, `id_column="name"`); None values are
    dropped. The file is opened (and its header checked) before the first row is yielded.
    """
    path = Path(path)
    if not path.exists():
        raise ReadError(f"input file not found: {path}")
    if path.is_dir():
        raise ReadError(f"input is a directory, not a file: {path}")
    chosen = plugin_for(path, plugin)
    names = resolve_rewards(chosen, rewards)
    opts = {k: v for k, v in read_opts.items() if v is not None}
    try:
        records = iter(chosen.read(path, **opts))
        first = next(records, None)
    except ReadError:
        raise
    except (OSError, ValueError, UnicodeError) as e:
        raise ReadError(f"cannot read {path}: {e}") from e

    def all_records() -> Iterator[Record]:
        if first is None:
            return
        yield first
        yield from records

    return score_records(
        all_records(), names, chosen, workers=workers, chunk_size=chunk_size, progress=progress
    )


def score_file(
    path: str | os.PathLike[str], rewards: Sequence[str] | str | None = None, **kwargs: Any
) -> list[dict[str, Any]]:
    """All rows of a file as a list (convenient for small files; use `iter_score_file` for large ones)."""
    return list(iter_score_file(path, rewards, **kwargs))


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------
def default_output(path: str | os.PathLike[str]) -> Path:
    """INPUT.scores.csv beside the input."""
    p = Path(path)
    return p.with_name(p.name + ".scores.csv")


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def _write_csv(rows: Iterator[dict[str, Any]], stream: IO[str]) -> int:
    n = 0
    writer = None
    for row in rows:
        if writer is None:
            writer = csv.writer(stream, lineterminator="\n")
            writer.writerow(list(row))
        writer.writerow([_csv_cell(v) for v in row.values()])
        n += 1
    return n


def _write_parquet(rows: Iterator[dict[str, Any]], path: Path, columns: Sequence[str] | None) -> int:
    require("pyarrow", "parquet", "writing Parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    schema = None
    buf: list[dict[str, Any]] = []
    n = 0

    def flush() -> None:
        nonlocal writer
        if writer is None:
            writer = pq.ParquetWriter(str(path), schema)
        writer.write_table(pa.Table.from_pylist(buf, schema=schema))
        buf.clear()

    try:
        for row in rows:
            if schema is None:
                schema = _arrow_schema(list(row))
            buf.append(row)
            n += 1
            if len(buf) >= PARQUET_ROW_GROUP:
                flush()
        if schema is None:
            schema = _arrow_schema(list(columns or ["record", "id", "error"]))
        flush()
    finally:
        if writer is not None:
            writer.close()
    return n


def _arrow_schema(columns: Sequence[str]) -> Any:
    import pyarrow as pa

    fields = []
    for i, c in enumerate(columns):
        if c == "record":
            fields.append(pa.field(c, pa.int64()))
        elif c == "error" or i < 3:
            fields.append(pa.field(c, pa.string()))
        else:
            fields.append(pa.field(c, pa.float64()))
    return pa.schema(fields)


def write_rows(
    rows: Iterable[dict[str, Any]],
    output: str | os.PathLike[str] | IO[str],
    columns: Sequence[str] | None = None,
) -> int:
    """Write rows as CSV or Parquet (by the extension of `output`; "-" or a stream: CSV). Returns the count.

    Files are written under a temporary name and renamed into place when complete.
    """
    rows = iter(rows)
    if not isinstance(output, (str, os.PathLike)):
        return _write_csv(rows, output)
    if str(output) == "-":
        n = _write_csv(rows, sys.stdout)
        if n == 0 and columns:
            csv.writer(sys.stdout, lineterminator="\n").writerow(list(columns))
        sys.stdout.flush()
        return n
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        if out.suffix.lower() in PARQUET_SUFFIXES:
            n = _write_parquet(rows, tmp, columns)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                n = _write_csv(rows, f)
                if n == 0 and columns:
                    csv.writer(f, lineterminator="\n").writerow(list(columns))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
class _Counting:
    """Wraps the row stream to count rows with errors (for the summary line)."""

    def __init__(self, rows: Iterator[dict[str, Any]]) -> None:
        self.rows, self.n, self.errors = rows, 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.rows:
            self.n += 1
            self.errors += row.get("error") is not None
            yield row


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    tqdm.monitor_interval = 0  # no monitor thread: the worker pool forks after the bar exists
    return tqdm(file=sys.stderr, unit=" rec", desc="scoring", dynamic_ncols=True, mininterval=0.5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffalign score",
        description="Score a file of samples with named rewards; writes one row per input record "
        "(record, id, source, one column per reward, error), in input order.",
    )
    p.add_argument("input", help="input file (format by extension; e.g. .smi .csv .tsv .sdf .parquet)")
    p.add_argument(
        "-r",
        "--rewards",
        default=None,
        help="comma-separated reward names (default: the plugin's default set); --list shows them",
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="output file: .csv, or .parquet/.pq for Parquet; '-' = CSV on stdout "
        "(default: INPUT.scores.csv beside the input)",
    )
    p.add_argument("--column", default=None, help="SMILES/sample column of a table (default: auto-detect)")
    p.add_argument("--id-column", default=None, help="identifier column of a table (default: auto-detect)")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: all cores, os.cpu_count())"
    )
    p.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="records per task sent to a worker"
    )
    p.add_argument("--plugin", default=None, help="scoring plugin module (e.g. 'molecule' or a dotted name)")
    p.add_argument("--list", action="store_true", help="list the plugins and their rewards, then exit")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    return p


def _list_plugins(plugin: str | None) -> int:
    plugins = {plugin: load_plugin(plugin)} if plugin else discover_plugins()
    for p in plugins.values():
        defaults = set(getattr(p, "default_rewards", ()) or ())
        print(f"{p.name}: {getattr(p, 'description', '')}")
        print("  rewards: " + ", ".join(f"{n}{'*' if n in defaults else ''}" for n in p.rewards))
    for msg in [] if plugin else UNAVAILABLE.values():
        print(f"not loaded: {msg}")
    print("(* = scored when -r is not given)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`diffalign score ...`; returns the exit status (0 ok, 2 unreadable input or bad usage)."""
    # `--list` needs no input: let it through without a positional argument
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        plugin = None
        if "--plugin" in argv and argv.index("--plugin") + 1 < len(argv):
            plugin = argv[argv.index("--plugin") + 1]
        try:
            return _list_plugins(plugin)
        except ScoreError as e:
            print(f"diffalign score: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="diffalign score: %(message)s")
    output: str | Path = args.output if args.output is not None else default_output(args.input)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = _progress_bar(show)
    start = time.perf_counter()
    try:
        rows = iter_score_file(
            args.input,
            args.rewards,
            plugin=args.plugin,
            workers=args.workers,
            chunk_size=args.chunk_size,
            progress=bar,
            column=args.column,
            id_column=args.id_column,
        )
        chosen = plugin_for(args.input, args.plugin)
        columns = ["record", "id", getattr(chosen, "source_column", "source") or "source"]
        columns += [*resolve_rewards(chosen, args.rewards), "error"]
        counted = _Counting(rows)
        write_rows(counted, output, columns=columns)  # columns: the header of an empty input's output
    except (ReadError, ScoreError, MissingExtraError) as e:
        print(f"diffalign score: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeError) as e:  # the input became unreadable part-way, or output failed
        print(f"diffalign score: {args.input}: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - start
    where = "stdout" if str(output) == "-" else str(output)
    print(
        f"diffalign score: {counted.n} records ({counted.errors} with errors) in {dt:.1f} s "
        f"({counted.n / max(dt, 1e-9):.0f}/s) -> {where}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

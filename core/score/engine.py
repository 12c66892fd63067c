"""The scoring engine: records -> worker processes (load, batch, reward) -> rows in input order.

The main process reads records lazily, cuts them into chunks and keeps at most `max_in_flight` chunks
(default 2 × workers) in a process pool; each worker builds the reader and the rewards once from their
specs. Rows come back and are yielded in input order, so memory stays flat whatever the input size.

Per chunk, a worker loads every payload (`Reader.load`; a failure is that record's error), then for
each reward collates the loaded samples (`Reader.collate`; if that fails, e.g. images of different
sizes, rows are scored one at a time) and scores them through the reward's `evaluate` with a `Cond`
holding the records' prompts (when any are known). `core.reward.evaluate_rows` says per row why a
reward gave no score (it raised, or its score is NaN/inf), so every record yields exactly one row.

A worker that dies (a segfault in a C extension) is replaced and its chunk re-scored one record at a
time: only the record that kills a worker again gets an error. `stop()` (set by SIGINT/SIGTERM) ends the
run cleanly: rows of chunks already done are yielded, in-flight chunks are discarded, workers killed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal

import torch

from diffalign.core.reward import RewardShapeError, SampleView, evaluate_rows
from diffalign.core.score.readers import Reader, Record, prompt_text
from diffalign.core.score.specs import ReaderSpec, RewardSpec, ScoreError
from diffalign.core.types import Cond

log = logging.getLogger(__name__)

#: one result per payload: (one value per reward, None where it failed) or None, and the error text
Result = tuple[tuple[float | None, ...] | None, str | None]
#: the error of a record that killed the worker scoring it (twice: once in its chunk, once alone)
CRASHED = "worker process crashed while scoring this record"
Engine = Literal["pool", "ray"]


def describe(e: BaseException) -> str:
    """An exception as an error-column reason: its message (with the type unless it is a ValueError)."""
    msg = str(e)
    if isinstance(e, ValueError) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def join_reasons(failures: dict[str, str]) -> str | None:
    """'qed, sa: invalid molecule ...; logp: ...': columns that failed for the same reason together."""
    grouped: dict[str, list[str]] = {}
    for column, reason in failures.items():
        grouped.setdefault(reason, []).append(column)
    return "; ".join(f"{', '.join(cols)}: {reason}" for reason, cols in grouped.items()) or None


def make_cond(prompts: Sequence[Any]) -> Cond:
    """The batch's `Cond`: the prompts under "prompt" when any is known, else empty."""
    if all(p is None for p in prompts):
        return Cond.empty(len(prompts))
    return Cond({"prompt": list(prompts)}, batch_size=len(prompts))


class Scorer:
    """A reader and the rewards of the columns, as one worker (or the main process) holds them."""

    def __init__(self, reader: Reader, rewards: Sequence[Any], columns: Sequence[str]) -> None:
        self.reader, self.rewards, self.columns = reader, list(rewards), list(columns)

    def score(self, items: Sequence[tuple[Any, Any]]) -> list[Result]:
        """Results for (payload, prompt) items, in order; never raises for one bad item."""
        results: list[Result | None] = [None] * len(items)
        samples, prompts, rows = [], [], []
        for i, (payload, prompt) in enumerate(items):
            try:
                samples.append(self.reader.load(payload))
            except Exception as e:  # noqa: BLE001 - a bad record is that record's error
                results[i] = (None, describe(e))
                continue
            prompts.append(prompt)
            rows.append(i)
        if samples:
            with torch.no_grad():
                columns = [self._column(reward, samples, prompts) for reward in self.rewards]
            for k, i in enumerate(rows):
                values = tuple(col[0][k] for col in columns)
                failures = {
                    name: col[1][k] for name, col in zip(self.columns, columns, strict=True) if k in col[1]
                }
                results[i] = (values, join_reasons(failures))
        return results  # type: ignore[return-value]

    def _column(self, reward: Any, samples: list[Any], prompts: list[Any]) -> tuple[list, dict[int, str]]:
        try:
            batch = self.reader.collate(samples)
        except Exception:  # noqa: BLE001 - e.g. images of different sizes: one at a time
            values: list[float | None] = []
            reasons: dict[int, str] = {}
            for k, sample in enumerate(samples):
                try:
                    one = self.reader.collate([sample])
                except Exception as e:  # noqa: BLE001
                    values.append(None)
                    reasons[k] = describe(e)
                    continue
                v, r = self._evaluate(reward, one, prompts[k : k + 1])
                values.append(v[0])
                if 0 in r:
                    reasons[k] = r[0]
            return values, reasons
        return self._evaluate(reward, batch, prompts)

    @staticmethod
    def _evaluate(reward: Any, batch: Any, prompts: list[Any]) -> tuple[list, dict[int, str]]:
        n = len(prompts)
        try:
            scored = evaluate_rows(reward, SampleView(samples=batch, size=n), make_cond(prompts))
        except RewardShapeError as e:
            return [None] * n, {k: str(e) for k in range(n)}
        scores = scored.scores.detach().float().cpu().tolist()
        return [None if k in scored.reasons else scores[k] for k in range(n)], dict(scored.reasons)


# ---------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


class WorkerSetupError(Exception):
    """A worker could not build the reader or a reward (bad weights path, ...): the run stops."""


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the main process dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(reader: ReaderSpec, rewards: Sequence[RewardSpec]) -> None:
    # the main process handles SIGINT/SIGTERM and stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(1)
    try:
        _WORKER["scorer"] = build_scorer(reader, rewards)
    except Exception as e:  # noqa: BLE001 - reported by the first task, then the run stops
        _WORKER["error"] = describe(e)


def _score_in_worker(items: Sequence[tuple[Any, Any]]) -> list[Result]:
    if "error" in _WORKER:
        raise WorkerSetupError(_WORKER["error"])
    return _WORKER["scorer"].score(items)


def build_scorer(reader: ReaderSpec, rewards: Sequence[RewardSpec]) -> Scorer:
    """The reader and the rewards, built from their specs."""
    return Scorer(reader.build(), [s.build() for s in rewards], [s.column for s in rewards])


def _mp_context() -> Any:
    # fork is fastest (nothing re-imported in workers); elsewhere the platform default
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform == "linux" else None)


class _Pool:
    """A ProcessPoolExecutor that can be rebuilt after a worker dies, and killed at once on a stop."""

    def __init__(self, workers: int, initargs: tuple) -> None:
        self.workers, self.initargs = workers, initargs
        self.executor: ProcessPoolExecutor | None = None

    def get(self) -> ProcessPoolExecutor:
        if self.executor is None:
            self.executor = ProcessPoolExecutor(
                self.workers, mp_context=_mp_context(), initializer=_init_worker, initargs=self.initargs
            )
        return self.executor

    def submit(self, items: list) -> Future:
        return self.get().submit(_score_in_worker, items)

    def shutdown(self, kill: bool = False) -> None:
        if self.executor is None:
            return
        executor, self.executor = self.executor, None
        if kill:  # discard in-flight chunks now instead of waiting for them
            for p in list((getattr(executor, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError, AttributeError):
                    p.kill()
        executor.shutdown(wait=True, cancel_futures=True)  # joins the workers (dead ones at once)


# ---------------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------------
def _chunks(records: Iterable[Record], size: int, stop: Callable[[], bool]) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
            if stop():
                return
    if chunk and not stop():
        yield chunk


def columns_of(reader: Reader, rewards: Sequence[RewardSpec], prompts: bool) -> list[str]:
    """The output columns: record, id, the source column, [prompt], one per reward, error."""
    cols = [
        "record",
        "id",
        reader.source_column,
        *(["prompt"] if prompts else []),
        *(s.column for s in rewards),
    ]
    return [*cols, "error"]


def check_columns(reader: Reader, rewards: Sequence[RewardSpec]) -> None:
    names = [s.column for s in rewards]
    fixed = {"record", "id", reader.source_column, "prompt", "error"}
    clash = [n for n in names if n in fixed]
    if clash:
        raise ScoreError(f"reward column name {clash[0]!r} is taken by a fixed column; name it with NAME=...")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ScoreError(f"reward columns repeated: {', '.join(repeated)} (name them with NAME=...)")


def score_records(
    records: Iterable[Record],
    reader: ReaderSpec,
    rewards: Sequence[RewardSpec],
    *,
    workers: int | None = 1,
    chunk_size: int | None = None,
    max_in_flight: int | None = None,
    prompts: bool = False,
    first_record: int = 1,
    stop: Callable[[], bool] | None = None,
    progress: Any = None,
    engine: Engine = "pool",
    address: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Score records lazily; yields one row dict per record, in input order.

    Row keys are `columns_of(...)`: `record` (1-based position in the input, from `first_record`), `id`,
    the reader's source column, `prompt` (with `prompts=True`), one float per reward (None when it gave
    no score) and `error` (None when all went well; else why, "; "-separated).

    `workers` > 1 scores in a process pool with at most `max_in_flight` (default 2 × workers) chunks of
    `chunk_size` records (default: the reader's) outstanding; 1 scores in this process, and so does an
    input of one chunk (not worth starting processes). `stop()` is polled between chunks (see the module
    docstring).
    `progress` is an optional object with `update(n)` (a tqdm bar).

    `engine="ray"` scores the chunks as Ray tasks instead (`core.score.ray_engine`: the cluster at
    `address`, or a local one of `workers` CPUs), with at most `max_in_flight` chunks outstanding
    (default 2 × the cluster's CPUs) and the same rows; `workers=None` there means every CPU of the
    cluster.
    """
    built = reader.build()
    chunk_size = int(chunk_size or built.chunk_size)
    if engine not in ("pool", "ray"):
        raise ScoreError(f"engine must be 'pool' or 'ray', got {engine!r}")
    ray_workers = workers
    workers = 1 if workers is None else workers
    if workers < 1:
        raise ScoreError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise ScoreError(f"chunk size must be >= 1, got {chunk_size}")
    check_columns(built, rewards)
    names = [s.column for s in rewards]
    source = built.source_column
    stop = stop or (lambda: False)
    counter = [first_record - 1]

    def rows_for(chunk: list[Record], results: list[Result]) -> Iterator[dict[str, Any]]:
        it = iter(results)
        for r in chunk:
            counter[0] += 1
            row: dict[str, Any] = {"record": counter[0], "id": r.id, source: r.source}
            if prompts:
                row["prompt"] = prompt_text(r.prompt)
            values, error = (None, r.error) if r.error is not None else next(it)
            row.update(zip(names, values or (None,) * len(names), strict=True))
            row["error"] = error
            yield row
        if progress is not None:
            progress.update(len(chunk))

    def items(chunk: list[Record]) -> list[tuple[Any, Any]]:
        return [(r.payload, r.prompt) for r in chunk if r.error is None]

    chunks = _chunks(records, chunk_size, stop)
    if engine == "ray":
        from diffalign.core.score.ray_engine import ray_results

        results = ray_results(
            chunks,
            items,
            reader,
            rewards,
            workers=ray_workers,
            max_in_flight=max_in_flight,
            stop=stop,
            address=address,
        )
        for chunk, res in results:
            yield from rows_for(chunk, res)
        return
    head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    chunks = itertools.chain(head, chunks)
    if workers == 1 or len(head) < 2:
        local = None
        for chunk in chunks:
            if local is None:
                try:
                    local = build_scorer(reader, rewards)
                except Exception as e:  # noqa: BLE001 - e.g. a weights file that is not there
                    raise ScoreError(f"cannot build the reader or the rewards: {describe(e)}") from None
            yield from rows_for(chunk, local.score(items(chunk)))
        return
    for chunk, res in _pool_results(
        chunks, items, reader, rewards, workers, max_in_flight or 2 * workers, stop
    ):
        yield from rows_for(chunk, res)


def _pool_results(
    chunks: Iterator[list[Record]],
    items: Callable[[list[Record]], list],
    reader: ReaderSpec,
    rewards: Sequence[RewardSpec],
    workers: int,
    max_in_flight: int,
    stop: Callable[[], bool],
) -> Iterator[tuple[list[Record], list[Result]]]:
    """(chunk, results) in input order from a process pool of `workers` with at most `max_in_flight`
    chunks outstanding (see the module docstring for crashes and stops)."""
    pool = _Pool(workers, (reader, list(rewards)))
    pending: deque[tuple[list[Record], list, Future]] = deque()

    def result_of(items_: list, fut: Future) -> list[Result]:
        try:
            return fut.result()
        except WorkerSetupError as e:
            raise ScoreError(f"a worker could not build the reader or the rewards: {e}") from None
        except BrokenProcessPool:
            if stop():
                raise
            log.warning("scoring: a worker process died; re-scoring the affected records one by one")
            pool.shutdown()
            rest = [(c, i) for c, i, _ in pending]
            pending.clear()
            out = []
            for item in items_:
                try:
                    out.extend(pool.submit([item]).result())
                except BrokenProcessPool:
                    pool.shutdown()
                    out.append((None, CRASHED))
            for c, i in rest:
                pending.append((c, i, pool.submit(i)))
            return out

    finished = False
    try:
        for chunk in chunks:
            it = items(chunk)
            pending.append((chunk, it, pool.submit(it)))
            while len(pending) >= max_in_flight and not stop():
                chunk0, items0, fut = pending.popleft()
                yield chunk0, result_of(items0, fut)
            if stop():
                break
        while pending and not stop():
            chunk0, items0, fut = pending.popleft()
            yield chunk0, result_of(items0, fut)
        # stopped: the chunks already scored still count, in order; the others are discarded
        while pending and pending[0][2].done() and not pending[0][2].cancelled():
            chunk0, items0, fut = pending.popleft()
            try:
                results = fut.result()
            except Exception:  # noqa: BLE001 - a chunk that failed while stopping is discarded
                break
            yield chunk0, results
        finished = True
    finally:
        pool.shutdown(kill=not finished or stop())

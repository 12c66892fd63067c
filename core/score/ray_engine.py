"""`diffalign score --engine ray`: the chunks of the scoring engine as Ray tasks on a cluster.

Ray is the optional `ray` extra (`pip install diffalign[ray]`). The driver (this process) reads the
records lazily and cuts them into chunks exactly as the process-pool engine does; each chunk becomes
one Ray task (`num_cpus=1`), and at most `max_in_flight` tasks are outstanding, their results taken in
submission order, so the rows, their order and their error column are the process pool's and the
driver's memory stays flat whatever the input size. Each Ray worker process builds the reader and the
rewards once from their picklable specs (put into the object store once) and keeps them for the next
tasks of the same run.

A task whose worker dies (a segfault in a C extension) is not retried by Ray; its chunk is re-scored
one record per task, and only a record that kills a worker again gets an error row, as in the pool.
`stop()` ends the run: chunks already scored are yielded in order, the others cancelled.

Where the tasks run: `address` (e.g. "auto" on a node of a running cluster, or "ray://head:10001"), or
a local instance of `workers` CPUs started for this run and shut down after it. The workers import
`diffalign` and the rewards: install the project on every node (or give Ray a `runtime_env`).
"""

from __future__ import annotations

import logging
import pickle
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from diffalign.core.score.engine import (
    CRASHED,
    Result,
    Scorer,
    WorkerSetupError,
    build_scorer,
    describe,
)
from diffalign.core.score.readers import Record
from diffalign.core.score.specs import ReaderSpec, RewardSpec, ScoreError

log = logging.getLogger(__name__)

#: the scorers a Ray worker process built, by the pickled specs of their run
_SCORERS: dict[bytes, Scorer | str] = {}
#: object-store memory of a local instance (chunks are small; larger objects spill to disk)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def require_ray() -> Any:
    """The `ray` module, or a ScoreError that says how to install it (the `ray` extra)."""
    from diffalign.core.extras import MissingExtraError, require

    try:
        return require("ray", "ray", "diffalign score --engine ray")
    except MissingExtraError as e:
        raise ScoreError(str(e)) from None


def score_task(specs: tuple[ReaderSpec, list[RewardSpec]], items: Sequence[tuple[Any, Any]]) -> list[Result]:
    """One chunk in a Ray worker: the scorer of `specs` (built once per worker process), its results."""
    key = pickle.dumps(specs)
    if key not in _SCORERS:
        try:
            _SCORERS[key] = build_scorer(*specs)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops the run
            _SCORERS[key] = describe(e)
    scorer = _SCORERS[key]
    if isinstance(scorer, str):
        raise WorkerSetupError(scorer)
    return scorer.score(items)


def _start(ray: Any, address: str | None, workers: int | None) -> bool:
    """Connect to the cluster (or start a local one); True when this run started it."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        options.update(num_cpus=workers, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ScoreError(f"cannot start or reach {where}: {e}") from None
    return True


def ray_results(
    chunks: Iterator[list[Record]],
    items: Callable[[list[Record]], list],
    reader: ReaderSpec,
    rewards: Sequence[RewardSpec],
    *,
    workers: int | None = None,
    max_in_flight: int | None = None,
    stop: Callable[[], bool] = lambda: False,
    address: str | None = None,
) -> Iterator[tuple[list[Record], list[Result]]]:
    """(chunk, results) in input order, each chunk scored by one Ray task (module docstring)."""
    ray = require_ray()
    if workers is not None and workers < 1:
        raise ScoreError(f"workers must be >= 1, got {workers}")
    started = _start(ray, address, workers)
    task = ray.remote(num_cpus=1, max_retries=0)(score_task)
    # a worker that died (a segfault, os._exit) or was killed for memory while scoring a chunk
    crashes = tuple(
        getattr(ray.exceptions, n)
        for n in ("WorkerCrashedError", "OutOfMemoryError")
        if hasattr(ray.exceptions, n)
    )
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        limit = max_in_flight or 2 * (workers or cpus)
        specs = ray.put((reader, list(rewards)))
        pending: deque[tuple[list[Record], list, Any]] = deque()

        def result_of(items_: list, ref: Any) -> list[Result]:
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, WorkerSetupError):
                    raise ScoreError(f"a worker could not build the reader or the rewards: {cause}") from None
                raise ScoreError(f"a Ray scoring task failed: {describe(cause or e)}") from None
            except crashes:
                log.warning("scoring: a Ray worker died; re-scoring the affected records one by one")
                out: list[Result] = []
                for item in items_:
                    try:
                        out.extend(ray.get(task.remote(specs, [item])))
                    except crashes:
                        out.append((None, CRASHED))
                return out

        try:
            for chunk in chunks:
                it = items(chunk)
                pending.append((chunk, it, task.remote(specs, it)))
                while len(pending) >= limit and not stop():
                    chunk0, items0, ref = pending.popleft()
                    yield chunk0, result_of(items0, ref)
                if stop():
                    break
            while pending and not stop():
                chunk0, items0, ref = pending.popleft()
                yield chunk0, result_of(items0, ref)
            # stopped: the chunks already scored still count, in order; the others are cancelled
            while pending and ray.wait([pending[0][2]], timeout=0)[0]:
                chunk0, items0, ref = pending.popleft()
                try:
                    results = ray.get(ref)
                except Exception:  # noqa: BLE001 - a chunk that failed while stopping is discarded
                    break
                yield chunk0, results
        finally:
            for _, _, ref in pending:
                ray.cancel(ref, force=True)
            pending.clear()
    finally:
        if started:
            ray.shutdown()

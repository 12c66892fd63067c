"""Run `diffalign` command lines as the ranks of multi-process runs, forked from one interpreter.

    python ranks.py spec.json      # prints one JSON line: a result per run

The script imports Lightning and the toy/digit parts once, then, for each run of the spec, forks one
child per rank with the environment Lightning's own launcher gives its children (MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, NODE_RANK, LOCAL_RANK): Lightning sees processes started from outside, as under
torchrun, and joins them in a gloo process group. Each child runs `cli_main(argv)`.

A run ends when every rank has exited, or when its `timeout` passes (every rank left is then killed and
the run reports `timed_out`): a hang fails instead of stalling CI. When one rank dies (a crash, a
SIGKILL), the others are killed a few seconds later, as torchrun does.

spec.json: {"cwd": str, "runs": [{"argv": [...], "world": int, "timeout": float, "record": bool}]}.
With `record`, every rank writes `record_<run>_<rank>.pt`: the seeds and initial noise of each of its
training rollouts (what `collect_rollouts` sampled), and the number of gradient all-reduces of DDP
buckets when the run's strategy is `strategies.CountingDDPStrategy`.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

GRACE_S = 5.0  # how long the other ranks may live on after one died


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record_rollouts(path: Path) -> list:
    """Wrap the sampler of `collect_rollouts` so that each rollout's seeds and x_T are kept."""
    import diffalign.core.rollouts as rollouts

    seen: list = []
    inner = rollouts.sample_batch

    def sample_batch(policy, cond, seeds=None, *args, **kwargs):
        out = inner(policy, cond, seeds, *args, **kwargs)
        seen.append({"seeds": list(seeds), "x_T": out.trajectory.states[:, 0].detach().cpu().clone()})
        return out

    rollouts.sample_batch = sample_batch
    return seen


def _child(argv: list[str], env: dict[str, str], log: Path, record: Path | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    faulthandler.enable()  # a crash in native code (gloo, FSDP) still leaves its stack in the log
    code = 0
    try:
        import torch

        seen = _record_rollouts(record) if record is not None else None
        from diffalign.core.cli import cli_main

        cli_main(argv)
        if seen is not None:
            from tests.distributed.strategies import ALL_REDUCES

            torch.save({"rollouts": seen, "all_reduces": ALL_REDUCES[0]}, record)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _status(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _run(index: int, run: dict, cwd: Path) -> dict:
    world = int(run.get("world", 1))
    port = _free_port()
    pids, logs = [], []
    for rank in range(world):
        env = {}
        if world > 1:
            env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(world),
                "NODE_RANK": "0",
                "LOCAL_RANK": str(rank),
            }
        log = cwd / f"ranks_{index}_{rank}.log"
        record = cwd / f"record_{index}_{rank}.pt" if run.get("record") else None
        pid = os.fork()
        if pid == 0:
            _child(run["argv"], env, log, record)
        pids.append(pid)
        logs.append(log)
    deadline = time.monotonic() + float(run.get("timeout", 300))
    codes: dict[int, int] = {}
    first_failure: float | None = None
    timed_out = False
    while len(codes) < world:
        for i, pid in enumerate(pids):
            if i in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[i] = _status(status)
                if codes[i] != 0 and first_failure is None:
                    first_failure = time.monotonic()
        now = time.monotonic()
        late = first_failure is not None and now > first_failure + GRACE_S
        if now > deadline or late:
            timed_out = timed_out or now > deadline
            for i, pid in enumerate(pids):
                if i not in codes:
                    os.kill(pid, signal.SIGKILL)
                    codes[i] = _status(os.waitpid(pid, 0)[1])
        time.sleep(0.05)
    return {
        "codes": [codes[i] for i in range(world)],
        "timed_out": timed_out,
        "logs": [log.read_text()[-3000:] for log in logs],
    }


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cwd = Path(spec["cwd"])
    os.chdir(cwd)
    import torch

    torch.set_num_threads(1)
    # what every child would import lazily: import it once, here
    import lightning.pytorch  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    import diffalign.core.algorithms  # noqa: F401
    import diffalign.core.module  # noqa: F401
    import diffalign.modalities.toy  # noqa: F401
    import diffalign.rewards.toy  # noqa: F401
    from diffalign.core.cli import _build_cli_class

    for module in spec.get("imports", []):
        __import__(module)
    _build_cli_class()
    print(json.dumps([_run(i, run, cwd) for i, run in enumerate(spec["runs"])]))


if __name__ == "__main__":
    main(sys.argv[1])

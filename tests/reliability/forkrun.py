"""Run several `diffalign` command lines as separate processes that pay for `import lightning` once.

    python forkrun.py spec.json      # prints one JSON line: a result per run

The script imports the CLI, then forks one child per command line; each child runs `cli_main(argv)` and
exits with its status (a SIGKILL'd child reports -9). spec.json: {"cwd": str, "together": bool,
"runs": [[arg, ...], ...], "snapshot": str | null}. `together: false` runs the children one after
another and, after each, records the files under `snapshot` (name -> size); `together: true` starts
them all at the same instant: every child blocks on a pipe until the parent closes it (a barrier).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def _child(argv: list[str], log: Path, gate: int | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if gate is not None:
        os.read(gate, 1)  # returns (EOF) when the parent closes the write end: all start together
    code = 0
    try:
        from diffalign.core.cli import cli_main

        cli_main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["cwd"])
    import torch

    torch.set_num_threads(1)
    # what every child would import lazily: import it once, here
    import lightning.pytorch  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    import diffalign.core.algorithms  # noqa: F401
    import diffalign.core.data  # noqa: F401
    import diffalign.core.module  # noqa: F401
    import diffalign.modalities.toy  # noqa: F401
    import diffalign.rewards.toy  # noqa: F401
    from diffalign.core.cli import _build_cli_class

    _build_cli_class()

    logs = [Path(spec["cwd"]) / f"forkrun_{i}.log" for i in range(len(spec["runs"]))]
    results = []
    if spec.get("together"):
        read_end, write_end = os.pipe()
        pids = []
        for argv, log in zip(spec["runs"], logs, strict=True):
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                _child(argv, log, read_end)
            pids.append(pid)
        os.close(read_end)
        os.close(write_end)  # release every child at once
        codes = [_status(pid) for pid in pids]
        results = [{"code": c, "log": log.read_text()[-3000:]} for c, log in zip(codes, logs, strict=True)]
    else:
        for argv, log in zip(spec["runs"], logs, strict=True):
            pid = os.fork()
            if pid == 0:
                _child(argv, log, None)
            code = _status(pid)
            snap = _snapshot(Path(spec["snapshot"])) if spec.get("snapshot") else {}
            results.append({"code": code, "log": log.read_text()[-3000:], "files": snap})
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])

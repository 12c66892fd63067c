"""Files: atomic writes, run folders, checkpoint checks, package-relative paths, safetensors export."""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

PKG_PREFIX = "pkg://"


def resolve_path(spec: str | os.PathLike[str]) -> Path:
    """A filesystem path for `spec`; "pkg://package.name/file" points inside an installed package.

    Raises FileNotFoundError naming the path when it does not exist.
    """
    s = str(spec)
    if s.startswith(PKG_PREFIX):
        package, _, rel = s[len(PKG_PREFIX) :].partition("/")
        try:
            path = Path(str(resources.files(package).joinpath(rel)))
        except ModuleNotFoundError as e:
            raise FileNotFoundError(f"{s}: package {package!r} is not installed") from e
    else:
        path = Path(s).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}" + (f" (from {s})" if s != str(path) else ""))
    return path


TMP_SUFFIX = ".tmp"
# ".<name>.<8 random characters>.tmp": the temporary files of atomic_write (tempfile.mkstemp)
_TMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    A reader (or a resumed run) never sees a half-written file, even if the process is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomically write `data` as indented JSON."""
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_state_dict(
    module: torch.nn.Module, path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Atomically save a module's state dict as safetensors."""
    from safetensors.torch import save_file

    state = {
        k: v.detach().cpu().contiguous()
        for k, v in module.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    return atomic_write(path, lambda p: save_file(state, str(p), metadata=metadata))


def load_state_dict(module: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True) -> None:
    """Load safetensors weights (path or pkg:// spec) into `module`, naming the file on mismatch."""
    from safetensors.torch import load_file

    resolved = resolve_path(path)
    state = load_file(str(resolved))
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(f"weights in {resolved} do not fit {type(module).__name__}: {e}") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes to a temporary file and renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_write(path, lambda p: torch.save(checkpoint, p))


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that `atomic_write` leaves in `folder` when its process is killed.

    Only call it on a folder no live process writes to (a run folder being resumed). Returns what went.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and _TMP_NAME.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def claim_version(root: str | os.PathLike[str], name: str) -> int:
    """Create `root/name/version_N` for the first N above the existing versions and return N.

    `mkdir` either creates the folder or fails because it exists, atomically, so runs started at the same
    instant in one folder each get their own version (on collision, try the next number).
    """
    base = Path(root) / name
    base.mkdir(parents=True, exist_ok=True)
    taken = [
        int(p.name[len("version_") :])
        for p in base.iterdir()
        if p.name.startswith("version_") and p.name[len("version_") :].isdigit()
    ]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (base / f"version_{n}").mkdir()
            return n
        except FileExistsError:
            n += 1


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; the message names the file."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a Lightning checkpoint stands: epoch, optimiser steps (`step=` in checkpoint names) and
    batches that stepped (the `step` of metrics rows, which Lightning logs once per such batch)."""

    path: Path
    epoch: int
    global_step: int
    batches_stepped: int


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read a checkpoint's position memory-mapped (cheap for big files).

    Raises CheckpointError naming the file when it is missing, empty, truncated or not a checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes)")
    try:
        # a truncated zip has lost its central directory; mmap needs the zip format
        ckpt = torch.load(p, map_location="cpu", mmap=zipfile.is_zipfile(p), weights_only=False)
        step = int(ckpt["global_step"])
        epoch = int(ckpt["epoch"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {p} is not a Lightning checkpoint (no 'global_step'/'epoch')"
        ) from e
    except Exception as e:  # torch.load fails in many ways (OSError, EOFError, UnpicklingError, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {p} is unreadable: truncated or corrupt ({reason})") from e
    loop = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return CheckpointInfo(p, epoch, step, int(loop.get("_batches_that_stepped", step)))


def readable_checkpoints(folder: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every readable `*.ckpt` in `folder`, newest first (by optimiser step, then modification time)."""
    folder = Path(folder)
    found = []
    for p in folder.glob("*.ckpt") if folder.is_dir() else []:
        try:
            found.append((inspect_checkpoint(p), p.stat().st_mtime))
        except CheckpointError:
            continue
    return [info for info, _ in sorted(found, key=lambda r: (r[0].global_step, r[1]), reverse=True)]


def check_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """`inspect_checkpoint(path)`; its error adds the readable checkpoints beside the file, newest first."""
    try:
        return inspect_checkpoint(path)
    except CheckpointError as e:
        folder = Path(path).parent
        others = [c for c in readable_checkpoints(folder) if c.path != Path(path)]
        if others:
            listing = ", ".join(f"{c.path} (step {c.global_step})" for c in others)
            hint = f"; readable checkpoints of this run, newest first: {listing}"
        elif folder.is_dir() and str(folder) != ".":
            hint = f"; no readable checkpoint in {folder}"
        else:
            hint = ""
        raise CheckpointError(f"{e}{hint}") from e

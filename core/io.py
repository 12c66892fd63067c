"""Files: atomic writes, package-relative paths for shipped weights, safetensors export."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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

"""Image files for `diffalign score`: `ImageReader` (a folder of PNG/JPEG files, or one image file).

One record per image file, in file-name order (the folder itself only, unless `recursive=True`); the
record id is the file's path relative to the folder (`digit_003.png`, `a/b.png`), which is the key a
prompt mapping file uses (`prompts.csv` inside the folder: `file,prompt` rows; see
`diffalign.core.score.readers.read_prompt_file`). Files with other suffixes are not records.

`load` (in the workers) decodes a file into the image layout, float (3, H, W) in [0, 1], RGB: grayscale
is repeated to 3 channels, an alpha channel is dropped, 16-bit images are scaled from 0–65535. A file
that does not decode is that record's error. `collate` stacks images of one size into (B, 3, H, W); a
batch of mixed sizes makes the engine score its images one at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffalign.core.score.readers import Reader, ReadError, Record, relative_id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """An image file as float (3, H, W) in [0, 1]; raises ValueError naming the file when it cannot."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG
                arr = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
                return torch.from_numpy(arr)[None].repeat(3, 1, 1).contiguous()
            rgb = img.convert("RGB")
            arr = np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {Path(path).name}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageReader(Reader):
    """Reads a folder of PNG/JPEG images (or one image file) into the image layout.

    Args:
        recursive: also read images in subfolders (ids keep the subfolder: `a/b.png`).
    """

    source_column = "path"
    suffixes = (*IMAGE_SUFFIXES, "/")
    chunk_size = 32

    def __init__(self, recursive: bool = False) -> None:
        self.recursive = bool(recursive)

    def records(self, path: Path) -> Iterator[Record]:
        path = Path(path)
        if path.is_file():
            return iter([Record(path.name, payload=str(path), source=str(path))])
        try:
            files = sorted(self._images(path), key=lambda p: relative_id(p, path))
        except OSError as e:
            raise ReadError(f"cannot list {path}: {e}") from None
        return (Record(relative_id(f, path), payload=str(f), source=str(f)) for f in files)

    def _images(self, folder: Path) -> Iterator[Path]:
        walk = os.walk(folder) if self.recursive else [(str(folder), [], os.listdir(folder))]
        for root, _, names in walk:
            for name in names:
                p = Path(root) / name
                if name.lower().endswith(IMAGE_SUFFIXES) and p.is_file():
                    yield p

    def load(self, payload: Any) -> Tensor:
        return load_image(payload)

    def collate(self, samples: list[Tensor]) -> Tensor:
        shapes = {tuple(s.shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"images of {len(shapes)} different sizes cannot form one batch")
        return torch.stack(samples)

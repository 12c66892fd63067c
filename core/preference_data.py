"""Preference data: pairs (or labelled singles) read from JSONL or Parquet plus sample files.

Two pair layouts are understood:

- Pick-a-Pic: `caption`, `jpg_0`, `jpg_1`, `label_0` (1: sample 0 preferred, 0: sample 1 preferred,
  0.5: tie; `label_1` = 1 − `label_0` may be present and must agree);
- simple: `prompt`, `winner`, `loser` (optionally `label`, default 1).

and, for KTO, the unpaired layout `prompt`, `sample`, `label` (1 desirable, 0 undesirable); for
Plackett–Luce reward modelling, the ranking layout `prompt`, `ranking` (a list of ≥ 2 sample files,
best first).

Sample fields are file paths relative to the data file (or absolute). Files load by extension:
.pt (a tensor), .npy / .npz (first array), .json (a list), and images (.png, .jpg, ...) via Pillow as float
(C, H, W) in [0, 1] — the image modality's layout. A `sample_loader` dotted path replaces this for other
formats. Every malformed row (missing or unreadable file, bad or missing label, missing key) is reported
with its file and row number; `on_error: raise` stops at the first, `on_error: skip` drops it, logs the
reason and counts it in `skipped` — never silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffalign.core.data import EpochSeededSampler, EvaluationSetMixin, ShardSampler
from diffalign.core.extras import require

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class PreferenceDataError(ValueError):
    """A malformed row: the message names the file and row."""


def load_sample_file(path: Path) -> Any:
    """Load one sample file by its extension (see the module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if suffix in (".npy", ".npz"):
        import numpy as np

        arr = np.load(path)
        if suffix == ".npz":
            arr = arr[arr.files[0]]
        return torch.from_numpy(arr)
    if suffix == ".json":
        return torch.tensor(json.loads(path.read_text()))
    if suffix in IMAGE_SUFFIXES:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    raise ValueError(f"no loader for '{suffix}' files (give sample_loader)")


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(row number from 1, row dict or None, parse error or None) for a JSONL or Parquet file."""
    if path.suffix.lower() == ".parquet":
        require("pyarrow", "parquet", f"reading {path.name} (Parquet)")
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield n, row, None
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                yield n, None, f"not UTF-8 ({e.reason})"
                continue
            if not text:
                yield n, None, "empty line"
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, None, f"invalid JSON ({e.msg})"
                continue
            yield (
                n,
                (row if isinstance(row, dict) else None),
                (None if isinstance(row, dict) else "not an object"),
            )


def _label(value: Any) -> float:
    lab = float(value)
    if not 0.0 <= lab <= 1.0 or lab != lab:
        raise ValueError(f"label must be in [0, 1], got {value!r}")
    return lab


#: the keys each of our layouts reads; others must be listed in `extra_keys` (feedback's scores are).
#: Pick-a-Pic files carry many more columns (user ids, model names, ...): only its five are read.
LAYOUT_KEYS: dict[str, set[str] | None] = {
    "pickapic": None,
    "simple": {"prompt", "winner", "loser", "label"},
    "unpaired": {"prompt", "sample", "label"},
    "ranking": {"prompt", "ranking"},
}
EXTRA_KEYS = ("winner_score", "loser_score", "score", "id")


def check_sample(x: Any, key: str, shape: Sequence[int | None] | None) -> None:
    """A tensor sample must be finite and (when `shape` is given) of that shape (None: any length)."""
    if not isinstance(x, torch.Tensor):
        return
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"'{key}' has {bad} non-finite values (NaN or inf)")
    if shape is not None:
        ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape, strict=True))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"'{key}' has shape {tuple(x.shape)}; expected {want}")


class PreferenceDataset(Dataset):
    """Validated rows of a preference file, loaded into memory.

    Every row is checked where it enters: known keys only, labels in [0, 1], sample files that exist
    and load, tensor samples finite and of the expected shape (`sample_shape`, or the shape of the first
    row's samples unless `ragged`). A failure names the file and row.

    Args:
        path: JSONL or Parquet file.
        layout: "auto" (from the keys), "pickapic", "simple", "unpaired" or "ranking".
        on_error: "raise" or "skip" malformed rows (skipped rows are counted in `skipped`).
        drop_ties: drop pairs labelled 0.5 (Diffusion-DPO does).
        sample_loader: optional dotted path of a function Path -> sample.
        sample_shape: the shape every tensor sample must have (None in a position: any length there);
            default: the first row's, unless `ragged`.
        ragged: samples may differ in shape (variable-size modalities: the backbone pads them).
        extra_keys: row keys accepted besides the layout's (default: the scores `diffalign feedback`
            writes, and `id`).
    """

    def __init__(
        self,
        path: str | Path,
        layout: Literal["auto", "pickapic", "simple", "unpaired", "ranking"] = "auto",
        on_error: Literal["raise", "skip"] = "raise",
        drop_ties: bool = True,
        sample_loader: str | None = None,
        sample_shape: list[int | None] | None = None,
        ragged: bool = False,
        extra_keys: Sequence[str] = EXTRA_KEYS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"preference file not found: {self.path}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        loader: Callable[[Path], Any] = load_sample_file
        if sample_loader:
            from diffalign.core.reward import import_object

            loader = import_object(sample_loader)
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[tuple[int, str]] = []
        self.ties = 0
        self.sample_shape = list(sample_shape) if sample_shape is not None else None
        self.ragged, self.extra_keys = ragged, set(extra_keys)
        for n, row, err in iter_rows(self.path):
            try:
                if err is not None:
                    raise ValueError(err)
                item = self._parse(row, layout, loader)
                self._check(item)
            except Exception as e:  # noqa: BLE001 - every failure becomes a reported row
                msg = f"{self.path}:{n}: {e}"
                if on_error == "raise":
                    raise PreferenceDataError(msg + " (set on_error: skip to drop such rows)") from None
                self.skipped.append((n, str(e)))
                log.warning("skipping %s", msg)
                continue
            if item.get("label") == 0.5 and "winner" in item and drop_ties:
                self.ties += 1
                continue
            self.rows.append(item)
        if self.skipped:
            log.warning("%s: skipped %d malformed rows", self.path, len(self.skipped))
        if not self.rows:
            raise PreferenceDataError(
                f"{self.path}: no usable row ({len(self.skipped)} malformed, {self.ties} ties)"
            )

    def _check(self, item: dict[str, Any]) -> None:
        for key in ("winner", "loser", "sample"):
            if key in item:
                x = item[key]
                if self.sample_shape is None and not self.ragged and isinstance(x, torch.Tensor):
                    self.sample_shape = list(x.shape)  # the first row fixes the shape of the file
                check_sample(x, key, None if self.ragged else self.sample_shape)
        if "ranking" in item:
            check_sample(item["ranking"], "ranking", None)

    def _file(self, value: Any, loader: Callable[[Path], Any], key: str) -> Any:
        if value is None:
            raise ValueError(f"missing '{key}'")
        p = Path(str(value))
        p = p if p.is_absolute() else self.path.parent / p
        if not p.is_file():
            raise ValueError(f"'{key}' file not found: {p}")
        try:
            return loader(p)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read '{key}' file {p}: {type(e).__name__}: {e}") from None

    def _parse(self, row: dict[str, Any], layout: str, loader: Callable[[Path], Any]) -> dict[str, Any]:
        if layout == "auto":
            layout = (
                "pickapic"
                if "jpg_0" in row
                else "simple"
                if "winner" in row
                else "ranking"
                if "ranking" in row
                else "unpaired"
            )
        known_keys = LAYOUT_KEYS[layout]
        unknown = [] if known_keys is None else sorted(set(row) - known_keys - self.extra_keys)
        if unknown:
            known = sorted(known_keys | self.extra_keys)
            raise ValueError(f"unknown keys {unknown} for the {layout} layout (known: {known})")
        if layout == "ranking":
            if "prompt" not in row or "ranking" not in row:
                raise ValueError("missing 'prompt' or 'ranking' (ranking layout)")
            files = row["ranking"]
            if not isinstance(files, list) or len(files) < 2:
                raise ValueError("'ranking' must list at least 2 sample files, best first")
            items = [self._file(f, loader, f"ranking[{i}]") for i, f in enumerate(files)]
            return {"prompt": row["prompt"], "ranking": torch.stack([torch.as_tensor(x) for x in items])}
        if layout == "pickapic":
            for k in ("caption", "jpg_0", "jpg_1", "label_0"):
                if k not in row:
                    raise ValueError(f"missing '{k}' (Pick-a-Pic layout)")
            lab = _label(row["label_0"])
            if "label_1" in row and abs(_label(row["label_1"]) - (1 - lab)) > 1e-6:
                raise ValueError(f"label_0 {row['label_0']} and label_1 {row['label_1']} do not sum to 1")
            a, b = self._file(row["jpg_0"], loader, "jpg_0"), self._file(row["jpg_1"], loader, "jpg_1")
            win, lose, strength = (a, b, lab) if lab >= 0.5 else (b, a, 1 - lab)
            return {"prompt": row["caption"], "winner": win, "loser": lose, "label": strength}
        if layout == "simple":
            for k in ("prompt", "winner", "loser"):
                if k not in row:
                    raise ValueError(f"missing '{k}' (simple layout)")
            return {
                "prompt": row["prompt"],
                "winner": self._file(row["winner"], loader, "winner"),
                "loser": self._file(row["loser"], loader, "loser"),
                "label": _label(row.get("label", 1.0)),
            }
        for k in ("prompt", "sample", "label"):
            if k not in row:
                raise ValueError(f"missing '{k}' (unpaired layout)")
        return {
            "prompt": row["prompt"],
            "sample": self._file(row["sample"], loader, "sample"),
            "label": _label(row["label"]),
        }

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def collate_preferences(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch preference rows: samples of one shape are stacked, ragged ones (point sets or clips of
    different sizes) stay a list for the backbone's `encode` to pad along its variable axis; labels
    become a float tensor; everything else a list."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
            out[key] = torch.stack(values) if same else values
        elif key == "label":
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:
            out[key] = values
    return out


class PreferenceDataModule(EvaluationSetMixin, L.LightningDataModule):
    """Batches of preference pairs (or labelled singles) for DiffusionDPO / DiffusionKTO.

    Args:
        path: JSONL or Parquet file.
        layout, on_error, drop_ties, sample_loader, sample_shape, ragged: see `PreferenceDataset`.
        val_fraction: rows held out (seeded) for `val_dataloader` — the held-out pairs that
            `RewardModelModule` reports pair accuracy on. With 0, validation uses the fixed
            evaluation set of conditions (for `diffalign validate` of an aligned model).
        batch_size, batches_per_epoch: batches are drawn with a per-epoch seeded permutation.
        seed: order seed.
        eval_prompts: evaluation conditions (default: the file's distinct prompts, at most 16).
        eval_seeds_per_prompt, eval_seed: the fixed evaluation set.
    """

    def __init__(
        self,
        path: str,
        layout: Literal["auto", "pickapic", "simple", "unpaired", "ranking"] = "auto",
        on_error: Literal["raise", "skip"] = "raise",
        drop_ties: bool = True,
        sample_loader: str | None = None,
        sample_shape: list[int | None] | None = None,
        ragged: bool = False,
        batch_size: int = 16,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        eval_prompts: list[str | int] | None = None,
        eval_seeds_per_prompt: int = 8,
        eval_seed: int = 10_000,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        full = PreferenceDataset(path, layout, on_error, drop_ties, sample_loader, sample_shape, ragged)
        self.val_rows: list[dict[str, Any]] = []
        if val_fraction > 0:
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
            n_val = max(1, int(round(val_fraction * len(full))))
            self.val_rows = [full.rows[i] for i in order[:n_val]]
            full.rows = [full.rows[i] for i in order[n_val:]]
        self.dataset = full
        self.skipped_rows = len(full.skipped)  # reported in summary.json and the metrics
        self.batch_size, self.seed = batch_size, seed
        self.batches_per_epoch = batches_per_epoch or max(1, len(self.dataset) // batch_size)
        prompts = list(dict.fromkeys(r["prompt"] for r in self.dataset.rows))
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else prompts[:16]
        self.eval_seeds_per_prompt, self.eval_seed = eval_seeds_per_prompt, eval_seed

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(
            len(self.dataset),
            self.batch_size * self.batches_per_epoch,
            self.seed,
            replacement=False,
            batch_size=self.batch_size,
        )
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_preferences
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return super().val_dataloader()
        return DataLoader(
            self.val_rows,
            batch_size=self.batch_size,
            sampler=ShardSampler(len(self.val_rows)),
            collate_fn=collate_preferences,
        )

"""Where `diffalign score` rows go: CSV or Parquet through a partial folder, resumable after a kill.

`OUT.csv` / `OUT.parquet` (or `.pq`) are written inside the folder `.OUT.partial/` beside the output
and moved into place when the last row is written:

- CSV: `.OUT.partial/rows.csv`, appended row by row; every row is one line (a CR or LF inside a cell is
  written as the two characters `\\r` / `\\n`), flushed at least every `flush_seconds`;
- Parquet: `.OUT.partial/part-000001.parquet`, ... — complete Parquet files, each written under a
  temporary name and renamed, one at least every `flush_seconds` (or 16,384 rows); at the end they are
  joined into OUT in row groups of 65,536 rows, so the file does not depend on where a run stopped;
- `.OUT.partial/_meta.json`: the columns, reader, rewards and input of the run, checked by `--resume`.

After SIGINT/SIGTERM the folder holds every completed row, in order, as valid CSV/Parquet. After a
SIGKILL (or a power cut) the last CSV line may be cut: `--resume` keeps the complete rows and continues
from the first missing record, so the final file equals an uninterrupted run's. Other output suffixes
are refused. `-` writes CSV to stdout (no partial, no resume).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from diffalign.core.extras import MissingExtraError, require
from diffalign.core.score.specs import ScoreError

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
ROW_GROUP = 65536
PART_ROWS = 16384
META = "_meta.json"  # "_": Parquet dataset readers skip it, so pq.read_table(partial) works
ROWS_CSV = "rows.csv"


def output_format(output: str | os.PathLike[str]) -> str:
    """ "stdout", "csv" or "parquet" for an output path; any other suffix is a `ScoreError`."""
    if str(output) == "-":
        return "stdout"
    suffix = Path(output).suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in PARQUET_SUFFIXES:
        try:
            require("pyarrow", "parquet", "writing Parquet")
        except MissingExtraError as e:
            raise ScoreError(str(e)) from None
        return "parquet"
    raise ScoreError(
        f"output {output}: unknown format {suffix or '(no suffix)'!r}; write .csv, .parquet or .pq "
        "(or '-' for CSV on stdout)"
    )


def partial_path(output: str | os.PathLike[str]) -> Path:
    """The partial folder of an output file: `.NAME.partial` beside it."""
    out = Path(output)
    return out.with_name(f".{out.name}.partial")


def _text(value: Any) -> str:
    s = str(value)
    if "\n" in s or "\r" in s:
        s = s.replace("\r", "\\r").replace("\n", "\\n")
    return s


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return str(np.float32(value))  # scores are float32: the shortest text that reads back exactly
    if isinstance(value, int):
        return value
    return _text(value)


class Output:
    """Writes rows to an output (see the module docstring) and reads back what a killed run left.

    Args:
        output: the output path, or "-" for stdout.
        columns: the column names, in order.
        score_columns: which of them hold scores (float32); `record` is int64, the others strings.
        meta: what the run is (reader, rewards, input); `--resume` refuses a partial of another run.
        flush_seconds: completed rows become durable (CSV flush, Parquet part) at least this often.
    """

    def __init__(
        self,
        output: str | os.PathLike[str],
        columns: Sequence[str],
        score_columns: Sequence[str],
        meta: Mapping[str, Any] | None = None,
        flush_seconds: float = 5.0,
    ) -> None:
        self.format = output_format(output)
        self.path = None if self.format == "stdout" else Path(output)
        self.columns, self.score_columns = list(columns), set(score_columns)
        self.meta = {"format": self.format, "columns": self.columns, **dict(meta or {})}
        self.flush_seconds = flush_seconds
        self.partial = None if self.path is None else partial_path(self.path)
        self.written = 0  # rows in the output, those of the resumed run included
        self._stream: IO[str] | None = None
        self._csv: Any = None
        self._buffer: list[dict[str, Any]] = []
        self._parts = 0
        self._last_flush = time.monotonic()

    # -- starting ---------------------------------------------------------------------------------
    def existing_rows(self) -> int:
        """Rows a partial output of an earlier run holds (0 when there is none)."""
        if self.partial is None or not self.partial.is_dir():
            return 0
        if self.format == "csv":
            return self._valid_csv_rows()[0]
        return sum(n for _, n in self._valid_parts())

    def start(self, resume: bool) -> int:
        """Open the output; with `resume`, keep the rows of a partial output of the same run.

        Returns the number of rows already written (the next record to score is that + 1). Without
        `resume`, a partial output that holds rows is an error (it would be lost).
        """
        if self.path is None:
            if resume:
                raise ScoreError("--resume needs an output file (-o OUT.csv or OUT.parquet), not stdout")
            self._stream = sys.stdout
            self._csv = csv.writer(self._stream, lineterminator="\n")
            self._csv.writerow(self.columns)
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists() and not self.partial.is_dir():
            raise ScoreError(f"{self.partial} is in the way of the partial output (not a folder)")
        done = self.existing_rows()
        if done and not resume:
            raise ScoreError(
                f"{self.partial} holds {done} rows of an interrupted run; continue it with --resume, "
                "or delete it to start over"
            )
        if self.partial.is_dir() and (resume and done):
            self._check_meta()
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            _write_json(self.partial / META, self.meta)
        if self.format == "csv":
            rows = self.partial / ROWS_CSV
            if done:
                n, end = self._valid_csv_rows()
                with open(rows, "r+b") as f:  # drop a line a kill cut short
                    f.truncate(end)
            self._stream = open(rows, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
            self._csv = csv.writer(self._stream, lineterminator="\n")
            if not done:
                self._csv.writerow(self.columns)
                self._stream.flush()
        else:
            for tmp in self.partial.glob(".part-*"):
                tmp.unlink()
            self._parts = max((int(p.stem.split("-")[1]) for p, _ in self._valid_parts()), default=0)
        self.written = done
        return done

    def _check_meta(self) -> None:
        try:
            old = json.loads((self.partial / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ScoreError(
                f"{self.partial}: cannot read {META} ({e}); delete the folder to start over"
            ) from None
        current = json.loads(json.dumps(self.meta))
        differ = [k for k in sorted(set(old) | set(current)) if old.get(k) != current.get(k)]
        if differ:
            shown = "; ".join(f"{k}: was {old.get(k)!r}, now {current.get(k)!r}" for k in differ)
            raise ScoreError(
                f"{self.partial} was written by a different run ({shown}); run the same command with "
                "--resume, or delete the folder to start over"
            )

    # -- reading back what is there ---------------------------------------------------------------
    def _csv_rows(self) -> Iterator[tuple[list[str], int]]:
        """(cells, end offset) of each complete, valid row of rows.csv, in order, after the header."""
        path = self.partial / ROWS_CSV
        if not path.is_file():
            return
        with open(path, "rb") as f:
            offset = 0
            header = f.readline()
            if not header.endswith(b"\n"):
                return
            if next(csv.reader([header.decode("utf-8", "replace")]), None) != self.columns:
                raise ScoreError(
                    f"{path}: its columns are not this run's ({', '.join(self.columns)}); "
                    "delete the folder to start over"
                )
            offset += len(header)
            expected = 1
            for line in f:
                if not line.endswith(b"\n"):
                    return
                try:
                    cells = next(csv.reader([line.decode("utf-8")]))
                except (UnicodeDecodeError, csv.Error, StopIteration):
                    return
                if len(cells) != len(self.columns) or cells[0] != str(expected):
                    return
                offset += len(line)
                expected += 1
                yield cells, offset

    def _valid_csv_rows(self) -> tuple[int, int]:
        n, end = 0, None
        for _, offset in self._csv_rows():
            n, end = n + 1, offset
        if end is None:
            path = self.partial / ROWS_CSV
            end = len(path.open("rb").readline()) if path.is_file() else 0
        return n, end

    def _valid_parts(self) -> list[tuple[Path, int]]:
        import pyarrow.parquet as pq

        out, expected = [], 1
        for part in sorted(self.partial.glob("part-*.parquet")):
            try:
                table = pq.read_table(part, columns=["record"])
                names = pq.read_schema(part).names
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types
                raise ScoreError(f"{part}: unreadable ({e}); delete {self.partial} to start over") from None
            if names != self.columns:
                raise ScoreError(
                    f"{part}: its columns are not this run's; delete {self.partial} to start over"
                )
            records = table.column("record").to_pylist()
            if records != list(range(expected, expected + len(records))):
                raise ScoreError(f"{part}: rows out of order; delete {self.partial} to start over")
            expected += len(records)
            out.append((part, len(records)))
        return out

    def done_ids(self) -> Iterator[str]:
        """The ids of the rows already written, in order (to check the input is the same)."""
        if self.partial is None or not self.partial.is_dir():
            return
        if self.format == "csv":
            for cells, _ in self._csv_rows():
                yield cells[1]
            return
        import pyarrow.parquet as pq

        for part, _ in self._valid_parts():
            yield from (str(i) for i in pq.read_table(part, columns=["id"]).column("id").to_pylist())

    # -- writing ----------------------------------------------------------------------------------
    def write(self, row: Mapping[str, Any]) -> None:
        if self._csv is not None:
            self._csv.writerow([_cell(row.get(c)) for c in self.columns])
        else:
            self._buffer.append(dict(row))
            if len(self._buffer) >= PART_ROWS:
                self._write_part()
        self.written += 1
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Make every row written so far durable in the partial output."""
        if self._stream is not None:
            self._stream.flush()
        elif self._buffer:
            self._write_part()
        self._last_flush = time.monotonic()

    def _schema(self) -> Any:
        import pyarrow as pa

        def kind(c: str) -> Any:
            if c == "record":
                return pa.int64()
            return pa.float32() if c in self.score_columns else pa.string()

        return pa.schema([pa.field(c, kind(c)) for c in self.columns])

    def _write_part(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._parts += 1
        part = self.partial / f"part-{self._parts:06d}.parquet"
        tmp = self.partial / f".part-{self._parts:06d}.tmp"
        pq.write_table(pa.Table.from_pylist(self._buffer, schema=self._schema()), tmp)
        os.replace(tmp, part)
        self._buffer.clear()

    def close(self, complete: bool) -> Path | None:
        """Flush; when `complete`, move the rows into the output file and remove the partial folder.

        Returns where the rows are: the output file, the partial folder, or None for stdout.
        """
        self.flush()
        if self.path is None:
            return None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if not complete:
            return self.partial
        if self.format == "csv":
            os.replace(self.partial / ROWS_CSV, self.path)
        else:
            self._join_parts()
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        """Remove the partial folder (a run that wrote no row)."""
        if self.partial is not None:
            shutil.rmtree(self.partial, ignore_errors=True)

    def _join_parts(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tmp = self.partial / ".joined.tmp"
        schema = self._schema()
        tables: list[Any] = []
        rows = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for part, _ in self._valid_parts():
                tables.append(pq.read_table(part, schema=schema))
                rows += tables[-1].num_rows
                while rows >= ROW_GROUP:
                    joined = pa.concat_tables(tables)
                    writer.write_table(joined.slice(0, ROW_GROUP), row_group_size=ROW_GROUP)
                    tables, rows = [joined.slice(ROW_GROUP)], rows - ROW_GROUP
            if rows or not tables:
                joined = pa.concat_tables(tables) if tables else schema.empty_table()
                writer.write_table(joined, row_group_size=ROW_GROUP)
        os.replace(tmp, self.path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)

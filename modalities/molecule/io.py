"""Molecule files for `diffalign score`: `MoleculeReader` (SMILES, CSV/TSV, SDF, Parquet).

Reading (main process) never drops a record: an empty line, bytes that are not UTF-8, a malformed CSV
row, an SDF block that is broken or holds two molecules (a missing `$$$$`) becomes a record with
`error` set, and reading goes on. Parsing molecules, the expensive part, is `load` (in the workers): a
record's payload is `("smiles", text)` or `("molblock", text)` and becomes a `MoleculeSample` (the
modality's layout) whose `mol` is the sanitised molecule — or, when RDKit cannot sanitise it, `mol`
None with the reason in `error` (as `decode` reports invalid molecules), so each reward decides:
`Validity` scores 0, `AtomStability` scores the graph of the SMILES, `QED` reports the reason.
A file that cannot be read at all (missing, not Parquet, no SMILES column) raises `ReadError`.

| format | suffixes | record id |
|---|---|---|
| SMILES: `SMILES [name]` per line (*) | .smi .smiles .ism .can .txt | the name, else the line number |
| CSV / TSV with a header row | .csv, .tsv .tab | the id column's value, else the data row number |
| SDF (blocks end with `$$$$`) | .sdf .sd .mol | the block's title line, else the record number |
| Parquet (read batch by batch) | .parquet .pq | the id column's value, else the row number |

(*) a first line whose first word is "smiles" (any case) is a header and yields no record. Text formats
may be gzip-compressed (`.smi.gz`, `.csv.gz`, `.sdf.gz`). Options: `column` picks the SMILES column of a
table (default: the column named "smiles", any case, else the first whose name contains "smiles");
`id_column` the identifier (default: the first of id, name, mol_id, molecule_id, compound_id, title).
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from diffalign.core.extras import require
from diffalign.core.score.readers import Reader, ReadError, Record
from diffalign.modalities.molecule.chem import InvalidMolecule, parse_molblock, parse_smiles
from diffalign.modalities.molecule.sample import MoleculeSample

SMILES_SUFFIXES = (".smi", ".smiles", ".ism", ".can", ".txt")
CSV_SUFFIXES = (".csv",)
TSV_SUFFIXES = (".tsv", ".tab")
SDF_SUFFIXES = (".sdf", ".sd", ".mol")
PARQUET_SUFFIXES = (".parquet", ".pq")
ID_COLUMNS = ("id", "name", "mol_id", "molecule_id", "compound_id", "title")
MAX_SDF_RECORD_BYTES = 64 * 1024 * 1024
TEXT_FORMATS = {
    "smiles": SMILES_SUFFIXES,
    "csv": CSV_SUFFIXES,
    "tsv": TSV_SUFFIXES,
    "sdf": SDF_SUFFIXES,
}


def file_format(path: str | os.PathLike[str]) -> str | None:
    """smiles, csv, tsv, sdf or parquet, by the file's suffix (None when it is none of them)."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    suffix = os.path.splitext(name)[1]
    for fmt, suffixes in TEXT_FORMATS.items():
        if suffix in suffixes:
            return fmt
    if suffix in PARQUET_SUFFIXES and not gz:
        return "parquet"
    return None


class MoleculeReader(Reader):
    """Reads molecule files (see the module docstring) into `MoleculeSample`s for molecule rewards.

    Args:
        column: the SMILES column of a CSV/TSV/Parquet table: exact name, any case, or 0-based index.
        id_column: the identifier column of a table.
        format: smiles, csv, tsv, sdf or parquet, instead of the suffix's.
    """

    source_column = "smiles"
    suffixes = (
        tuple(
            s + gz
            for s in (*SMILES_SUFFIXES, *CSV_SUFFIXES, *TSV_SUFFIXES, *SDF_SUFFIXES)
            for gz in ("", ".gz")
        )
        + PARQUET_SUFFIXES
    )
    chunk_size = 256

    def __init__(
        self, column: str | None = None, id_column: str | None = None, format: str | None = None
    ) -> None:
        if format is not None and format not in (*TEXT_FORMATS, "parquet"):
            raise ValueError(f"format must be one of smiles, csv, tsv, sdf, parquet; got {format!r}")
        self.column, self.id_column, self.format = column, id_column, format

    def check(self, path: Path) -> None:
        if self.format is None:
            super().check(path)
        elif not path.is_file():
            raise ReadError(f"input not found: {path}" if not path.exists() else f"{path} is not a file")

    def records(self, path: Path) -> Iterator[Record]:
        fmt = self.format or file_format(path)
        if fmt in ("smiles", "sdf") and (self.column or self.id_column):
            raise ReadError(f"{path}: column options apply to tables (CSV, TSV, Parquet), not {fmt} files")
        if fmt == "smiles":
            return read_smiles(path)
        if fmt in ("csv", "tsv"):
            delimiter = "\t" if fmt == "tsv" else ","
            return read_table(path, column=self.column, id_column=self.id_column, delimiter=delimiter)
        if fmt == "sdf":
            return read_sdf(path)
        if fmt == "parquet":
            return read_parquet(path, column=self.column, id_column=self.id_column)
        raise ReadError(f"{path}: unknown molecule file format {Path(path).suffix!r}")

    def load(self, payload: Any) -> MoleculeSample:
        """A `MoleculeSample` from ("smiles", text) or ("molblock", text)."""
        kind, text = payload
        parse = {"smiles": parse_smiles, "molblock": parse_molblock}.get(kind)
        if parse is None:
            raise ValueError(f"unknown molecule payload {kind!r}")
        try:
            mol = parse(text)
        except InvalidMolecule as e:
            return MoleculeSample(smiles=text if kind == "smiles" else None, error=str(e))
        return MoleculeSample(mol=mol, smiles=text if kind == "smiles" else None)


def _open(path: str | os.PathLike[str]) -> IO[bytes]:
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _utf8_reason(data: bytes, err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"


def _printable(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return data.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------------
# SMILES files
# ---------------------------------------------------------------------------------------------------
def read_smiles(path: str | os.PathLike[str]) -> Iterator[Record]:
    """One record per line: `SMILES [name]`; blank lines and non-UTF-8 lines are error records."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip(b"\r\n")
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raw_parts = line.split(None, 1)
                name = _printable(raw_parts[1].strip()) if len(raw_parts) > 1 else ""
                yield Record(name or str(lineno), error=_utf8_reason(line, e), source=_printable(line))
                continue
            parts = text.split(None, 1)
            if not parts:
                yield Record(str(lineno), error="empty line")
                continue
            smiles, name = parts[0], (parts[1].strip() if len(parts) > 1 else "")
            if lineno == 1 and smiles.lower() == "smiles":
                continue  # header line
            yield Record(name or str(lineno), payload=("smiles", smiles), source=smiles)


# ---------------------------------------------------------------------------------------------------
# CSV / TSV
# ---------------------------------------------------------------------------------------------------
def find_column(names: Sequence[str], column: str | None, path: Any, what: str = "SMILES") -> str:
    """The column to use: `column` (exact, then case-insensitive, then a 0-based index), or auto-detect."""
    names = [str(n) for n in names]
    if column is not None:
        column = str(column)
        if column in names:
            return column
        folded = [n for n in names if n.strip().lower() == column.strip().lower()]
        if folded:
            return folded[0]
        if column.isdigit() and int(column) < len(names):
            return names[int(column)]
        raise ReadError(f"{path}: no column {column!r}; columns are: {', '.join(map(repr, names))}")
    exact = [n for n in names if n.strip().lower() == "smiles"]
    if exact:
        return exact[0]
    partial = [n for n in names if "smiles" in n.lower()]
    if partial:
        return partial[0]
    raise ReadError(
        f"{path}: no {what} column found (looked for a column named 'smiles'); columns are: "
        f"{', '.join(map(repr, names))}; choose one with --column"
    )


def find_id_column(names: Sequence[str], id_column: str | None, path: Any) -> str | None:
    if id_column is not None:
        return find_column(names, id_column, path, what="id")
    lowered = {str(n).strip().lower(): str(n) for n in reversed(list(names))}
    for cand in ID_COLUMNS:
        if cand in lowered:
            return lowered[cand]
    return None


def read_table(
    path: str | os.PathLike[str],
    column: str | None = None,
    id_column: str | None = None,
    delimiter: str = ",",
) -> Iterator[Record]:
    """CSV/TSV with a header row; one record per data row (a blank or malformed row is an error record).

    The header is read (and the columns found) when this is called, not on the first `next`.
    """
    f = _open(path)
    try:
        reader = csv.reader((raw.decode("utf-8", "surrogateescape") for raw in f), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise ReadError(f"{path}: empty file (expected a header row)") from None
        except csv.Error as e:
            raise ReadError(f"{path}: cannot parse the header row: {e}") from None
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        col = find_column(header, column, path)
        idc = find_id_column(header, id_column, path)
    except BaseException:
        f.close()
        raise
    return _table_rows(f, reader, header.index(col), col, header.index(idc) if idc is not None else None)


def _table_rows(f: IO[bytes], reader: Any, ci: int, col: str, ii: int | None) -> Iterator[Record]:
    with f:
        n = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                n += 1
                yield Record(str(n), error=f"malformed CSV row: {e}")
                continue
            n += 1
            rid = str(n)
            if ii is not None and ii < len(row) and row[ii].strip():
                rid = _printable(row[ii].strip())
            if not row or not any(c.strip() for c in row):
                yield Record(rid, error="empty row")
                continue
            if ci >= len(row):
                yield Record(rid, error=f"row has {len(row)} fields; no value in column {col!r}")
                continue
            cell = row[ci].strip()
            try:
                cell.encode("utf-8")
            except UnicodeEncodeError:
                raw = cell.encode("utf-8", "surrogateescape")
                try:
                    raw.decode("utf-8")
                    reason = "not valid UTF-8"
                except UnicodeDecodeError as e:
                    reason = _utf8_reason(raw, e)
                yield Record(rid, error=reason, source=_printable(raw))
                continue
            if not cell:
                yield Record(rid, error=f"empty {col!r} value")
                continue
            yield Record(rid, payload=("smiles", cell), source=cell)


# ---------------------------------------------------------------------------------------------------
# SDF
# ---------------------------------------------------------------------------------------------------
def _is_mol_end(line: bytes) -> bool:
    return line.rstrip(b"\r\n").rstrip() == b"M  END"


def _sdf_record(n: int, lines: list[bytes], too_big: bool) -> Record:
    if too_big:
        return Record(str(n), error=f"SDF record larger than {MAX_SDF_RECORD_BYTES // 2**20} MiB; skipped")
    data = b"".join(lines)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        try:
            title = lines[0].strip().decode("utf-8") if lines else ""
        except UnicodeDecodeError:
            title = ""
        return Record(title or str(n), error=_utf8_reason(data, e))
    if not text.strip():
        return Record(str(n), error="empty SDF record")
    title = text.split("\n", 1)[0].strip()
    ends = [i for i, line in enumerate(lines, 1) if _is_mol_end(line)]
    if len(ends) > 1:  # two mol blocks with no $$$$ between them: never a silently merged molecule
        return Record(
            title or str(n),
            error=f"SDF record holds {len(ends)} molecules ('M  END' on its lines "
            f"{', '.join(map(str, ends))}): a '$$$$' line between them is missing",
        )
    return Record(title or str(n), payload=("molblock", text))


def read_sdf(path: str | os.PathLike[str]) -> Iterator[Record]:
    """One record per `$$$$`-terminated block (the last block may lack the terminator).

    The file is split here, block by block, so a broken block only makes its own error row, and a block
    with two `M  END` lines (a missing `$$$$`) is an error row rather than one merged molecule. The mol
    block is parsed in the worker (hydrogens and coordinates kept).
    """
    with _open(path) as f:
        lines: list[bytes] = []
        size, n, too_big = 0, 0, False
        for raw in f:
            if raw.strip() == b"$$$$":
                n += 1
                yield _sdf_record(n, lines, too_big)
                lines, size, too_big = [], 0, False
                continue
            if too_big:
                continue
            size += len(raw)
            if size > MAX_SDF_RECORD_BYTES:
                lines, too_big = [], True
                continue
            lines.append(raw)
        if too_big or any(line.strip() for line in lines):
            yield _sdf_record(n + 1, lines, too_big)


# ---------------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------------
def read_parquet(
    path: str | os.PathLike[str],
    column: str | None = None,
    id_column: str | None = None,
    batch_size: int = 8192,
) -> Iterator[Record]:
    """Rows of a Parquet file, read `batch_size` rows at a time (only the needed columns).

    The file is opened (and the columns found) when this is called.
    """
    require("pyarrow", "parquet", "reading Parquet")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
        names = list(pf.schema_arrow.names)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ReadError(f"{path}: not a readable Parquet file ({e})") from None
    col = find_column(names, column, path)
    idc = find_id_column(names, id_column, path)
    return _parquet_rows(path, pf, col, idc, batch_size)


def _parquet_rows(path: Any, pf: Any, col: str, idc: str | None, batch_size: int) -> Iterator[Record]:
    cols = [col] + ([idc] if idc is not None and idc != col else [])
    n = 0
    batches = pf.iter_batches(batch_size=batch_size, columns=cols)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            raise ReadError(f"{path}: cannot read row group after row {n}: {e}") from None
        values = batch.column(cols.index(col)).to_pylist()
        ids = batch.column(cols.index(idc)).to_pylist() if idc is not None else [None] * len(values)
        for v, i in zip(values, ids, strict=True):
            n += 1
            rid = str(n) if i is None or str(i).strip() == "" else _printable(str(i))
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Record(rid, error=_utf8_reason(v, e), source=_printable(v))
                    continue
            if v is None:
                yield Record(rid, error=f"missing {col!r} value (null)")
            elif not isinstance(v, str):
                yield Record(rid, error=f"{col!r} value is {type(v).__name__}, not a SMILES string")
            elif not v.strip():
                yield Record(rid, error=f"empty {col!r} value")
            else:
                yield Record(rid, payload=("smiles", v.strip()), source=v.strip())

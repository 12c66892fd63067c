"""The reader protocol of `diffalign score`: how a modality's files become records, samples and batches.

A reader lives with its modality (`modalities/<m>/io.py`) and subclasses `Reader`:

    class AudioReader(Reader):
        source_column = "path"                   # the output column that echoes Record.source
        suffixes = (".wav", ".flac", "/")        # what it reads ("/" = a folder); others are refused
        chunk_size = 16                          # default records per worker task

        def __init__(self, recursive: bool = False) -> None:   # options: --reader-option recursive=true
            self.recursive = recursive

        def records(self, path):                 # driver: lazy, cheap, never drops a record
            for i, f in enumerate(sorted(Path(path).glob("*.wav")), 1):
                yield Record(f.name, payload=str(f), source=str(f))

        def load(self, payload):                 # worker: one sample of the modality's layout, or raise
            return read_wav(payload)

        def collate(self, samples):              # worker: loaded samples -> the batch rewards take
            return torch.stack(samples)

`records` runs in the main process and must stay cheap (split lines, list files); the expensive part
(parsing, decoding) is `load`, which runs in the workers. Keep `Record.payload` small and picklable
(text, a path). A record that cannot be read carries `error` (and no payload); `load` raises, with the
reason as message, for a payload that yields no sample. When `collate` raises (e.g. images of different
sizes), the rows are scored one at a time. A reader's whole state is its `__init__` options, so workers
rebuild it from (class path, options).

Prompts: a record may carry `prompt` (a string, int or dict: what `Cond["prompt"]` holds in training).
`diffalign score` also attaches prompts itself, for any reader, from `--prompt TEXT` or a mapping file
(`--prompts FILE`, or `prompts.csv` / `prompts.jsonl` inside an input folder): see `read_prompt_file`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: a mapping file found inside an input folder is used as --prompts
PROMPT_FILES = ("prompts.csv", "prompts.jsonl")
KEY_COLUMNS = ("id", "file", "name", "path")


class ReadError(Exception):
    """The input cannot be read at all (the command exits with status 2 and this message)."""


@dataclass(frozen=True)
class Record:
    """One input record.

    Args:
        id: identifier: the name given in the input, else its line / row / record number or file name.
        payload: small picklable data that `Reader.load` turns into a sample (in a worker).
        error: why the record could not be read (then there is no payload and every score is empty).
        source: text echoed in the output's source column (the SMILES as read, the file path), "".
        prompt: the record's condition for prompt-aware rewards (str, int or dict), None when unknown.
    """

    id: str
    payload: Any = None
    error: str | None = None
    source: str = ""
    prompt: Any = None


class Reader:
    """Base class of the readers of `diffalign score` (see the module docstring for the protocol).

    Class attributes:
        source_column: name of the output column holding `Record.source`.
        suffixes: file name endings it reads, lower case (".smi", ".sdf.gz"); "/" means a folder. Paths
            ending otherwise are refused with a message listing these. Empty: any path.
        chunk_size: default number of records per worker task (`--chunk-size` overrides it).
        has_prompts: True when `records` sets `Record.prompt` (adds the output's prompt column).
    """

    source_column: str = "source"
    suffixes: tuple[str, ...] = ()
    chunk_size: int = 256
    has_prompts: bool = False

    def records(self, path: Path) -> Iterator[Record]:
        """The records of `path`, lazily, in input order; raises `ReadError` when it cannot be read."""
        raise NotImplementedError

    def load(self, payload: Any) -> Any:
        """One sample of the modality's layout from a record's payload; raises with the reason."""
        return payload

    def collate(self, samples: list[Any]) -> Any:
        """The batch rewards take, from loaded samples (default: the list itself)."""
        return list(samples)

    @classmethod
    def describe(cls) -> str:
        """For messages: the class name and what it reads."""
        shown = [
            "folders" if s == "/" else (s + "[.gz]" if s + ".gz" in cls.suffixes else s)
            for s in cls.suffixes
            if not (s.endswith(".gz") and s[:-3] in cls.suffixes)
        ]
        what = ", ".join(shown) or "any path"
        return f"{cls.__name__} ({what})"

    def check(self, path: Path) -> None:
        """Raise `ReadError` unless `path` exists and is something this reader reads."""
        if not path.exists():
            raise ReadError(f"input not found: {path}")
        if not self.suffixes:
            return
        if path.is_dir():
            if "/" in self.suffixes:
                return
            raise ReadError(f"{path} is a folder; {self.describe()} reads files")
        name = path.name.lower()
        if not any(s != "/" and name.endswith(s) for s in self.suffixes):
            raise ReadError(
                f"{path}: {self.describe()} does not read '{Path(name).suffix or name}' files; "
                "choose another reader with --reader"
            )


# ---------------------------------------------------------------------------------------------------
# Prompts: --prompt, --prompts FILE, or prompts.csv / prompts.jsonl inside an input folder
# ---------------------------------------------------------------------------------------------------
def find_prompt_file(path: Path) -> Path | None:
    """The mapping file inside an input folder (`prompts.csv`, else `prompts.jsonl`), if there is one."""
    if not path.is_dir():
        return None
    for name in PROMPT_FILES:
        if (path / name).is_file():
            return path / name
    return None


def _key_column(names: list[str], where: Path) -> str:
    lowered = {n.strip().lower(): n for n in names}
    for k in KEY_COLUMNS:
        if k in lowered:
            return lowered[k]
    raise ReadError(f"{where}: no record column; name one of {', '.join(KEY_COLUMNS)} (and 'prompt')")


def read_prompt_file(path: Path) -> dict[str, Any]:
    """Record id -> prompt, from a mapping file.

    - CSV with a header: a key column (the first of id, file, name, path, any case) and `prompt`;
      prompts are strings ("a handwritten 3").
    - JSONL: one object per line with a key (id, file, name or path) and `prompt`; a prompt may be a
      string, an int or an object (`{"digit": 3}`).
    - JSON: one object {record id: prompt}.

    Keys are record ids: for a folder of files, the file name relative to the folder.
    """
    if not path.is_file():
        raise ReadError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    out: dict[str, Any] = {}
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                names = list(reader.fieldnames or [])
                key = _key_column(names, path)
                prompt = {n.strip().lower(): n for n in names}.get("prompt")
                if prompt is None:
                    raise ReadError(f"{path}: no 'prompt' column; columns are {names}")
                for row in reader:
                    if row.get(key):
                        out[row[key].strip()] = row.get(prompt)
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if not isinstance(item, Mapping) or "prompt" not in item:
                        raise ReadError(f"{path}:{n}: expected an object with 'prompt' and a key")
                    keys = [k for k in KEY_COLUMNS if k in item]
                    if not keys:
                        raise ReadError(f"{path}:{n}: no key; give one of {', '.join(KEY_COLUMNS)}")
                    out[str(item[keys[0]])] = item["prompt"]
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, Mapping):
                raise ReadError(f"{path}: expected a JSON object {{record id: prompt}}")
            out = {str(k): v for k, v in data.items()}
        else:
            raise ReadError(f"{path}: prompt files are .csv, .jsonl or .json")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise ReadError(f"{path}: cannot read prompts: {e}") from None
    return out


def prompt_text(prompt: Any) -> str:
    """A prompt as the output's prompt column shows it (objects as JSON)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, default=str)


def relative_id(path: Path, root: Path) -> str:
    """A file's record id inside an input folder: its path relative to the folder, with '/'."""
    return Path(os.path.relpath(path, root)).as_posix()

"""`diffalign score`: score a file or folder of samples with the `Reward` classes training uses.

    diffalign score mols.smi -r qed,sa,logp                       # -> mols.smi.scores.csv
    diffalign score digits/ -r digit_fidelity,jpeg_kb -o s.parquet  # a folder of PNGs + prompts.csv
    diffalign score big.smi -r qed -o big.csv --resume            # continue after Ctrl-C or a kill

The core knows no modality: a `Reader` (from the modality, `modalities/<m>/io.py`) turns the input into
records and, in worker processes, into samples of the modality's layout and batches; rewards are
built from picklable specs (class path + init args) once per worker and score batches through
`Reward.evaluate` with a `Cond` holding the prompts. Exactly one output row per input record, in input
order, with an `error` column; CSV or Parquet, written through a partial folder that survives
interruption. See docs/score.md.

Modules: `readers` (the reader protocol, prompts), `specs` (reward and reader specs), `engine`
(worker pool, ordered rows), `output` (CSV/Parquet, partial output, resume), `command` (the CLI).
"""

from diffalign.core.score.command import ScoreNames, default_output, iter_score_file, main, plan, score_file
from diffalign.core.score.engine import Scorer, columns_of, score_records
from diffalign.core.score.output import Output, output_format, partial_path
from diffalign.core.score.readers import Reader, ReadError, Record, read_prompt_file
from diffalign.core.score.specs import ReaderSpec, RewardSpec, ScoreError, ShortName, instantiate

__all__ = [
    "Output",
    "ReadError",
    "Reader",
    "ReaderSpec",
    "Record",
    "RewardSpec",
    "ScoreError",
    "ScoreNames",
    "Scorer",
    "ShortName",
    "columns_of",
    "default_output",
    "instantiate",
    "iter_score_file",
    "main",
    "output_format",
    "partial_path",
    "plan",
    "read_prompt_file",
    "score_file",
    "score_records",
]

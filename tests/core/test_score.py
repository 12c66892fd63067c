"""`diffalign score`'s engine with a toy reader and toy rewards: one row per record, in order, with
reasons; readers and rewards by class path; prompts; CSV/Parquet; partial output and --resume."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.score import (
    Output,
    Reader,
    ReadError,
    ReaderSpec,
    Record,
    RewardSpec,
    ScoreError,
    ScoreNames,
    ShortName,
    iter_score_file,
    main,
    partial_path,
    score_file,
    score_records,
)
from diffalign.core.score.command import plan

HERE = "tests.core.test_score"


class LinesReader(Reader):
    """Toy reader: each line of a .txt file is a record `VALUE [PROMPT]`; an empty line is a record
    error; `load` turns VALUE into a (1,) tensor and fails on 'bad'; `collate` refuses mixed lengths."""

    source_column = "text"
    suffixes = (".txt",)
    chunk_size = 3
    has_prompts = True

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def records(self, path):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    yield Record(str(n), error="empty line")
                    continue
                yield Record(
                    f"r{n}", payload=parts[0], source=parts[0], prompt=parts[1] if len(parts) > 1 else None
                )

    def load(self, payload):
        if payload == "bad":
            raise ValueError("cannot load 'bad'")
        if payload == "crash":
            os._exit(3)  # a worker dying (as on a segfault in a C extension)
        if payload.startswith("pair"):
            return torch.ones(2)
        return torch.tensor([len(payload) * self.scale])

    def collate(self, samples):
        return torch.stack(samples)


class Length(Reward):
    """Score: the loaded value (the payload's length × the reader's scale); NaN for 'nan' payloads."""

    reader = f"{HERE}.LinesReader"

    def __init__(self, offset: float = 0.0, name: str | None = None) -> None:
        super().__init__(name or "length")
        self.offset = offset

    def forward(self, samples, cond):
        return samples[:, 0] + self.offset


class Picky(Reward):
    """Raises on a batch holding a value of 4 (so the guard scores rows one by one); NaN on 3."""

    reader = f"{HERE}.LinesReader"

    def forward(self, samples, cond):
        v = samples[:, 0]
        if (v == 4).any():
            raise RuntimeError("four is not allowed")
        return torch.where(v == 3, torch.full_like(v, float("nan")), v * 10)


class FromPrompt(Reward):
    """Score: the prompt read as a number (checks that prompts reach `cond['prompt']`)."""

    reader = f"{HERE}.LinesReader"

    def forward(self, samples, cond):
        prompts = cond.get("prompt") or [None] * len(samples)
        if any(p is None for p in prompts):
            raise ValueError("needs prompts")
        return RewardOutput(torch.tensor([float(p) for p in prompts]))


class Sleepy(Reward):
    """Batches holding a value >= 5 take 5 s and then leave a marker file in `folder`."""

    reader = f"{HERE}.LinesReader"

    def __init__(self, folder: str) -> None:
        super().__init__("sleepy")
        self.folder = folder

    def forward(self, samples, cond):
        if (samples[:, 0] >= 5).any():
            time.sleep(5)
            (Path(self.folder) / f"finished-{os.getpid()}").touch()
        return samples[:, 0]


class OtherReader(LinesReader):
    pass


class OtherLayout(Reward):
    reader = f"{HERE}.OtherReader"

    def forward(self, samples, cond):
        return samples[:, 0]


NAMES = ScoreNames(
    rewards={"length": ShortName(f"{HERE}.Length"), "picky": ShortName(f"{HERE}.Picky")},
    readers={"lines": ShortName(f"{HERE}.LinesReader")},
)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write(tmp_path, text, name="in.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_one_row_per_record_in_order_with_reasons(tmp_path):
    src = _write(tmp_path, "ab\n\nbad\nabcd\nabc\nx\n")
    rows = score_file(src, "length,picky", names=NAMES)
    assert [r["record"] for r in rows] == list(range(1, 7))
    assert [r["id"] for r in rows] == ["r1", "2", "r3", "r4", "r5", "r6"]
    assert list(rows[0]) == ["record", "id", "text", "prompt", "length", "picky", "error"]
    assert rows[0]["length"] == 2.0 and rows[0]["picky"] == 20.0 and rows[0]["error"] is None
    assert rows[1]["error"] == "empty line" and rows[1]["length"] is None  # record error
    assert rows[2]["error"] == "cannot load 'bad'" and rows[2]["length"] is None  # load error
    # the batch holding 4 raised: rows were scored one by one, only that row lost its score
    assert rows[3]["length"] == 4.0 and rows[3]["picky"] is None
    assert rows[3]["error"] == "picky: RuntimeError: four is not allowed"
    assert rows[4]["picky"] is None and rows[4]["error"] == "picky: score is nan"  # NaN score
    assert rows[5] == {
        "record": 6, "id": "r6", "text": "x", "prompt": "", "length": 1.0, "picky": 10.0, "error": None,
    }  # fmt: skip


def test_same_reasons_are_grouped_and_scores_equal_the_reward_called_directly(tmp_path):
    src = _write(tmp_path, "abc\nab\n")
    rows = score_file(src, ["a=length", "b=picky", "c=picky"], names=NAMES)
    assert rows[0]["error"] == "b, c: score is nan" and rows[0]["a"] == 3.0
    direct = Length()(torch.tensor([[3.0], [2.0]])).scores.tolist()
    assert [r["a"] for r in rows] == direct


def test_workers_give_the_same_rows_and_a_crashing_record_gets_its_own_error(tmp_path):
    lines = ["ab", "", "bad", "abcd", "abc", "x", "abcdef"] * 5
    src = _write(tmp_path, "\n".join(lines) + "\n")
    one = score_file(src, "length,picky", names=NAMES, workers=1)
    two = score_file(src, "length,picky", names=NAMES, workers=2, chunk_size=2)
    assert len(one) == len(lines) and one == two
    crash = _write(tmp_path, "ab\nabc\ncrash\nx\nabcde\nab\nabc\n", "crash.txt")
    rows = score_file(crash, "length", names=NAMES, workers=2, chunk_size=2)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(1, 8)]
    assert "crashed" in rows[2]["error"] and rows[2]["length"] is None
    assert [r["length"] for i, r in enumerate(rows) if i != 2] == [2.0, 3.0, 1.0, 5.0, 2.0, 3.0]


def test_collate_failure_scores_rows_one_at_a_time(tmp_path):
    src = _write(tmp_path, "ab\npair\nabc\n")  # 'pair' loads as 2 values: no common batch
    rows = score_file(src, "length", names=NAMES, chunk_size=8)
    assert [r["length"] for r in rows] == [2.0, 1.0, 3.0] and all(r["error"] is None for r in rows)


def test_rewards_and_readers_by_class_path_init_args_and_config(tmp_path):
    src = _write(tmp_path, "ab\nabc\n")
    rows = score_file(src, f"{HERE}.Length", reader=f"{HERE}.LinesReader", reader_options={"scale": 2.0})
    assert list(rows[0])[4] == "Length" and [r["Length"] for r in rows] == [4.0, 6.0]
    cfg = tmp_path / "reward.yaml"
    cfg.write_text(
        "reward:\n"
        "  class_path: diffalign.core.reward.WeightedSum\n"
        "  init_args:\n"
        "    rewards:\n"
        f"      - {{class_path: {HERE}.Length, init_args: {{offset: 1.0}}}}\n"
        f"      - {{class_path: {HERE}.Picky}}\n"
        "    weights: [1.0, 0.5]\n"
    )
    rows = score_file(src, reward_config=str(cfg), names=NAMES)  # the reader comes from the terms
    assert [r["WeightedSum"] for r in rows] == [(2 + 1) + 0.5 * 20, None]  # 0.5 × NaN for "abc"
    assert rows[1]["error"] == "WeightedSum: score is nan"
    inline = f"rewards: {{plus: {{class_path: {HERE}.Length, init_args: {{offset: 10}}}}}}"
    rows = score_file(src, reward_config=inline, names=NAMES)
    assert [r["plus"] for r in rows] == [12.0, 13.0]


def test_prompts_from_records_option_and_mapping_files(tmp_path):
    src = _write(tmp_path, "ab 5\nabc\n")
    rows = score_file(src, f"{HERE}.FromPrompt")
    assert rows[0]["FromPrompt"] == 5.0 and rows[0]["prompt"] == "5"
    assert rows[1]["FromPrompt"] is None and "needs prompts" in rows[1]["error"]
    rows = score_file(src, f"{HERE}.FromPrompt", prompt="7")  # --prompt: every record
    assert [r["FromPrompt"] for r in rows] == [7.0, 7.0]
    mapping = tmp_path / "p.csv"
    mapping.write_text("id,prompt\nr2,9\nnot-a-record,1\n")
    rows = score_file(src, f"{HERE}.FromPrompt", prompts=mapping)
    assert [r["FromPrompt"] for r in rows] == [5.0, 9.0]  # the file maps r2; r1 keeps its own
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": "r1", "prompt": 2}\n\n{"file": "r2", "prompt": {"digit": 3}}\n')
    rows = score_file(src, f"{HERE}.Length", prompts=jsonl)
    assert [r["prompt"] for r in rows] == ["2", '{"digit": 3}']
    with pytest.raises(ScoreError, match="not both"):
        plan(src, f"{HERE}.Length", prompt="1", prompts=mapping)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\nr1,x\n")
    with pytest.raises(ReadError, match="no 'prompt' column"):
        plan(src, f"{HERE}.Length", prompts=bad)


def test_resolution_errors_name_the_problem(tmp_path):
    src = _write(tmp_path, "ab\n")
    with pytest.raises(ScoreError, match=r"unknown reward 'nope'.*length, picky"):
        plan(src, "nope", names=NAMES)
    with pytest.raises(ScoreError, match="cannot import"):
        plan(src, "tests.core.test_score.Missing")
    with pytest.raises(ScoreError, match="not a diffalign Reward"):
        plan(src, "collections.OrderedDict")
    with pytest.raises(ScoreError, match=r"reward 'Length'.*unexpected keyword argument 'offest'"):
        plan(src, reward_config=f"{{class_path: {HERE}.Length, init_args: {{offest: 1}}}}")
    with pytest.raises(ScoreError, match="declare different readers"):
        plan(src, f"length,{HERE}.OtherLayout", names=NAMES)
    with pytest.raises(ScoreError, match="declare no reader"):
        plan(src, "diffalign.core.testing.ConstantReward")
    with pytest.raises(ScoreError, match="its options: scale"):
        plan(src, "length", names=NAMES, reader_options={"column": "x"})
    with pytest.raises(ScoreError, match="repeated"):
        plan(src, "length,length", names=NAMES)
    with pytest.raises(ScoreError, match="taken by a fixed column"):
        plan(src, "error=length", names=NAMES)
    with pytest.raises(ReadError, match=r"does not read '\.csv'"):
        plan(_write(tmp_path, "x", "in.csv"), "length", names=NAMES)
    with pytest.raises(ReadError, match="input not found"):
        plan(tmp_path / "missing.txt", "length", names=NAMES)
    with pytest.raises(ScoreError, match="no rewards"):
        plan(src, None, names=NAMES)


def test_cli_output_formats_stdout_empty_input_and_unknown_suffixes(tmp_path, capsys):
    src = _write(tmp_path, "ab\n\nabc\n")
    assert main([str(src), "-r", "length", "--workers", "1"], NAMES) == 0
    rows = _read_csv(tmp_path / "in.txt.scores.csv")  # default output beside the input
    assert [r["length"] for r in rows] == ["2.0", "", "3.0"] and rows[1]["error"] == "empty line"
    assert "3 records (1 with errors)" in capsys.readouterr().err
    out = tmp_path / "o.parquet"
    assert main([str(src), "-r", "length,picky", "-o", str(out), "--workers", "2"], NAMES) == 0
    table = pq.read_table(out)
    assert table.column("length").to_pylist() == [2.0, None, 3.0]
    assert (
        table.schema.field("length").type == pa.float32() and table.schema.field("record").type == pa.int64()
    )
    assert main([str(src), "-r", "length", "-o", "-", "--workers", "1"], NAMES) == 0
    assert capsys.readouterr().out.splitlines() == [
        "record,id,text,prompt,length,error", "1,r1,ab,,2.0,", "2,2,,,,empty line", "3,r3,abc,,3.0,",
    ]  # fmt: skip
    for bad in ("o.xlsx", "o.json", "o"):
        assert main([str(src), "-r", "length", "-o", str(tmp_path / bad)], NAMES) == 2
        assert "unknown format" in capsys.readouterr().err
        assert not (tmp_path / bad).exists() and not partial_path(tmp_path / bad).exists()
    empty = _write(tmp_path, "", "empty.txt")
    assert main([str(empty), "-r", "length", "-o", str(tmp_path / "e.parquet")], NAMES) == 0
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0
    assert main([str(empty), "-r", "length", "-o", str(tmp_path / "e.csv")], NAMES) == 0
    assert (tmp_path / "e.csv").read_text() == "record,id,text,prompt,length,error\n"
    assert main([str(src), "-r", "nope"], NAMES) == 2 and "unknown reward 'nope'" in capsys.readouterr().err
    assert main(["--list"], NAMES) == 0 and f"{HERE}.Picky" in capsys.readouterr().out


def test_cells_with_newlines_stay_on_one_line(tmp_path):
    out = tmp_path / "o.csv"
    o = Output(out, ["record", "id", "error"], [])
    o.start(resume=False)
    o.write({"record": 1, "id": "a\nb", "error": "line one\r\nline two"})
    o.close(complete=True)
    assert out.read_text().splitlines() == ["record,id,error", "1,a\\nb,line one\\r\\nline two"]


# --- partial output and --resume (in process; tests/reliability kills real processes) -----------------
def _lines(n):
    return "".join(("" if i % 7 == 3 else "a" * (1 + i % 5)) + "\n" for i in range(n))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resume_after_a_cut_run_equals_an_uninterrupted_run(tmp_path, suffix):
    src = _write(tmp_path, _lines(40))
    full = tmp_path / f"full{suffix}"
    assert main([str(src), "-r", "length,picky", "-o", str(full), "--workers", "1"], NAMES) == 0
    out = tmp_path / f"cut{suffix}"
    p = plan(src, "length,picky", names=NAMES)
    o = Output(out, p.columns, ["length", "picky"], p.meta(), flush_seconds=0.0)
    assert o.start(resume=False) == 0
    for row in list(score_records(p.records(), p.reader, p.rewards, prompts=p.has_prompts))[:17]:
        o.write(row)
    o.close(complete=False)  # as after SIGINT: 17 rows kept
    part = partial_path(out)
    if suffix == ".csv":  # as after SIGKILL mid-write: a cut last line
        with open(part / "rows.csv", "ab") as f:
            f.write(b"18,r19,aaaa,,4.0")
    assert main([str(src), "-r", "length,picky", "-o", str(out)], NAMES) == 2  # no --resume: refused
    assert main([str(src), "-r", "length,picky", "-o", str(out), "--resume", "--workers", "2"], NAMES) == 0
    assert not part.exists()
    assert out.read_bytes() == full.read_bytes()


def test_resume_refuses_another_run_or_another_input(tmp_path, capsys):
    src = _write(tmp_path, _lines(12))
    out = tmp_path / "o.csv"
    p = plan(src, "length", names=NAMES)
    o = Output(out, p.columns, ["length"], p.meta())
    o.start(resume=False)
    for row in list(score_records(p.records(), p.reader, p.rewards, prompts=p.has_prompts))[:5]:
        o.write(row)
    o.close(complete=False)
    assert main([str(src), "-r", "l2=length", "-o", str(out), "--resume"], NAMES) == 2
    assert "columns are not this run's" in capsys.readouterr().err
    cfg = f"{{rewards: {{length: {{class_path: {HERE}.Length, init_args: {{offset: 1.0}}}}}}}}"
    assert main([str(src), "--reward-config", cfg, "-o", str(out), "--resume"], NAMES) == 2
    assert "different run" in capsys.readouterr().err
    meta = json.loads((partial_path(out) / "_meta.json").read_text())
    assert meta["rewards"][0]["class_path"] == f"{HERE}.Length"
    src.write_text("zz\n" + _lines(12))  # the same file, other records
    assert main([str(src), "-r", "length", "-o", str(out), "--resume"], NAMES) == 2
    assert "made from another input" in capsys.readouterr().err
    src.write_text(_lines(12))
    assert main([str(src), "-r", "length", "-o", str(out), "--resume"], NAMES) == 0
    assert [r["record"] for r in _read_csv(out)] == [str(i) for i in range(1, 13)]
    assert main([str(src), "-r", "length", "-o", "-", "--resume"], NAMES) == 2
    assert "not stdout" in capsys.readouterr().err


def test_stop_keeps_finished_chunks_in_order_and_discards_the_rest(tmp_path):
    src = _write(tmp_path, _lines(60))
    p = plan(src, "length", names=NAMES)
    rows = []
    for workers in (1, 2):
        got: list = []

        def stop(got=got):
            return len(got) >= 9

        stream = score_records(
            p.records(),
            p.reader,
            p.rewards,
            workers=workers,
            chunk_size=4,
            prompts=True,
            stop=lambda got=got: len(got) >= 9,
        )
        for row in stream:
            got.append(row)
        assert [r["record"] for r in got] == list(range(1, len(got) + 1)) and 9 <= len(got) < 60
        rows.append(got)
    full = list(iter_score_file(src, "length", names=NAMES))
    assert rows[0] == full[: len(rows[0])] and rows[1] == full[: len(rows[1])]


def test_stop_kills_the_workers_instead_of_waiting_for_in_flight_chunks(tmp_path):
    src = _write(tmp_path, "a\nab\nabc\n" + "aaaaa\n" * 6)  # one quick chunk, two slow ones
    p = plan(src, reward_config=f"{{class_path: {HERE}.Sleepy, init_args: {{folder: {str(tmp_path)!r}}}}}")
    got: list = []
    for row in score_records(p.records(), p.reader, p.rewards, workers=2, stop=lambda: len(got) >= 3):
        got.append(row)
    time.sleep(0.3)
    assert [r["Sleepy"] for r in got] == [1.0, 2.0, 3.0]
    assert not list(tmp_path.glob("finished-*"))  # the slow chunks were discarded, not finished


def test_reward_spec_builds_frozen_rewards_and_checks_args():
    spec = RewardSpec("x", f"{HERE}.Length", {"offset": 2.0})
    spec.check()
    r = spec.build()
    assert not r.training and r(torch.tensor([[1.0]])).scores.item() == 3.0
    assert spec.readers() == {f"{HERE}.LinesReader"}
    assert ReaderSpec(f"{HERE}.LinesReader", {"scale": 3}).build().scale == 3
    assert math.isnan(
        float(RewardSpec("x", f"{HERE}.Length", {"offset": float("nan")}).to_json()["init_args"]["offset"])
    )

"""`diffalign score`: one row per input record, in order, with reasons; CSV/Parquet; workers; fuzzing."""

from __future__ import annotations

import ast
import csv
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rdkit import Chem
from rdkit.Chem import QED, AllChem, Crippen

from diffalign.core.cli import cli_main
from diffalign.core.score import (
    ReadError,
    Record,
    ScoreError,
    ScoringPlugin,
    discover_plugins,
    iter_score_file,
    score_file,
    score_records,
    write_rows,
)
from tests.helpers import REPO

MIXED_SMI = (
    b"CCO ethanol\n"
    b"c1ccccc1\n"
    b"\n"  # empty line
    b"C1CC( broken\n"  # unparsable
    b"C(C)(C)(C)(C)C\n"  # valence error
    b"\xff\xfeCC bad-bytes\n"  # not UTF-8
    b"CC(=O)O acetic\n"
)


def _qed(s):
    return QED.qed(Chem.MolFromSmiles(s))


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_cli_mixed_smiles_file_keeps_every_row_in_order(tmp_path, capsys):
    src = tmp_path / "mixed.smi"
    src.write_bytes(MIXED_SMI)
    assert cli_main(["score", str(src), "-r", "qed,logp,validity", "--workers", "1"]) == 0
    rows = _read_csv(tmp_path / "mixed.smi.scores.csv")  # default output beside the input
    assert [r["record"] for r in rows] == [str(i) for i in range(1, 8)]
    assert [r["id"] for r in rows] == ["ethanol", "2", "3", "broken", "5", "bad-bytes", "acetic"]
    assert list(rows[0]) == ["record", "id", "smiles", "qed", "logp", "validity", "error"]
    assert float(rows[0]["qed"]) == pytest.approx(_qed("CCO"), abs=1e-12)
    assert float(rows[6]["logp"]) == pytest.approx(Crippen.MolLogP(Chem.MolFromSmiles("CC(=O)O")))
    ok = [0, 1, 6]
    assert all(rows[i]["error"] == "" and rows[i]["validity"] == "1.0" for i in ok)
    errors = {i: rows[i]["error"] for i in range(7) if i not in ok}
    assert errors[2] == "empty line"
    assert "unparsable SMILES" in errors[3]
    assert "valence" in errors[4]
    assert "not valid UTF-8" in errors[5]
    for i in errors:
        assert rows[i]["qed"] == "" and rows[i]["validity"] == "0.0"
    assert "7 records (4 with errors)" in capsys.readouterr().err


def test_csv_and_tsv_inputs_columns_and_ids(tmp_path):
    src = tmp_path / "t.csv"
    src.write_bytes(b'Name,Canonical_SMILES,other\na,CCO,1\n\nc,\xff\xfe,3\nd\n,c1ccccc1,5\ne,"CC(=O)O",6\n')
    rows = score_file(src, ["qed"])
    assert [r["id"] for r in rows] == ["a", "2", "c", "d", "5", "e"]
    assert [r["error"] is None for r in rows] == [True, False, False, False, True, True]
    assert rows[1]["error"] == "empty row" and "UTF-8" in rows[2]["error"]
    assert "no value in column 'Canonical_SMILES'" in rows[3]["error"]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("smiles\tmol_id\nCCO\tx1\nCC\tx2\n")
    rows = score_file(tsv, "mw", column="SMILES", id_column="mol_id")
    assert [r["id"] for r in rows] == ["x1", "x2"] and rows[1]["mw"] == pytest.approx(30.07, abs=0.01)


def _sdf_bytes() -> bytes:
    buf = io.StringIO()
    w = Chem.SDWriter(buf)
    for name, s in (("aspirin", "CC(=O)OC1=CC=CC=C1C(=O)O"), ("ethanol", "CCO"), ("", "c1ccccc1")):
        m = Chem.AddHs(Chem.MolFromSmiles(s))
        AllChem.EmbedMolecule(m, randomSeed=0)
        m.SetProp("_Name", name)
        w.write(m)
    w.close()
    blocks = buf.getvalue().encode().split(b"$$$$\n")[:3]
    broken = b"broken\n  RDKit\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n  garbage\nM  END\n"
    return blocks[0] + b"$$$$\n" + broken + b"$$$$\n" + blocks[1] + b"$$$$\n\xff\xff\n$$$$\n" + blocks[2]


def test_sdf_broken_block_is_one_error_row(tmp_path):
    src = tmp_path / "m.sdf"
    src.write_bytes(_sdf_bytes())  # last block has no $$$$ terminator
    rows = score_file(src, ["qed", "mmff_energy", "atom_stability"])
    assert [r["id"] for r in rows] == ["aspirin", "broken", "ethanol", "4", "5"]
    assert [r["error"] is None for r in rows] == [True, False, True, False, True]
    assert "SDF record" in rows[1]["error"] and "UTF-8" in rows[3]["error"]
    assert rows[0]["qed"] == pytest.approx(_qed("CC(=O)OC1=CC=CC=C1C(=O)O"), abs=1e-9)
    assert rows[2]["atom_stability"] == 1.0  # explicit hydrogens count as stable atoms
    assert rows[2]["mmff_energy"] is not None


def test_parquet_in_and_out(tmp_path):
    src = tmp_path / "in.parquet"
    table = pa.table({"id": ["m1", None, "m3", "m4"], "SMILES": ["CCO", "c1ccccc1", None, "C1CC("]})
    pq.write_table(table, src, row_group_size=2)
    out = tmp_path / "out.parquet"
    assert cli_main(["score", str(src), "-r", "qed,sa", "-o", str(out), "--workers", "1"]) == 0
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got] == ["m1", "2", "m3", "m4"]
    assert got[0]["qed"] == pytest.approx(_qed("CCO")) and got[0]["error"] is None
    assert "null" in got[2]["error"] and got[2]["qed"] is None
    assert "unparsable" in got[3]["error"]
    assert pq.read_schema(out).field("qed").type == pa.float64()
    csv_out = tmp_path / "out.csv"
    assert cli_main(["score", str(src), "-r", "qed,sa", "-o", str(csv_out), "--workers", "1"]) == 0
    assert [r["id"] for r in _read_csv(csv_out)] == ["m1", "2", "m3", "m4"]


def test_two_workers_give_the_same_rows_as_one(tmp_path):
    src = tmp_path / "m.smi"
    lines = [b"CCO", b"", b"c1ccccc1O", b"C1CC(", b"CC(=O)Nc1ccc(O)cc1", b"\xff", b"CCN(CC)CC"] * 6
    src.write_bytes(b"\n".join(lines) + b"\n")
    one = score_file(src, "qed,sa,logp,lipinski", workers=1)
    two = score_file(src, "qed,sa,logp,lipinski", workers=2, chunk_size=4)
    assert len(one) == len(lines) and one == two


def test_usage_errors_name_the_problem(tmp_path, capsys):
    missing = tmp_path / "nope.smi"
    assert cli_main(["score", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    src = tmp_path / "m.smi"
    src.write_text("CCO\n")
    assert cli_main(["score", str(src), "-r", "qed,foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'foo'" in err and "qed, sa, logp" in err
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n")
    assert cli_main(["score", str(table)]) == 2
    assert "no SMILES column" in capsys.readouterr().err and str(table)
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"not parquet")
    assert cli_main(["score", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    weird = tmp_path / "x.unknownext"
    weird.write_text("CCO\n")
    assert cli_main(["score", str(weird)]) == 2
    assert "no scoring plugin reads" in capsys.readouterr().err
    assert cli_main(["score", str(weird), "--plugin", "molecule", "-o", "-"]) == 2  # reader: unknown format
    assert cli_main(["score", "--list"]) == 0 and "mmff_energy" in capsys.readouterr().out


def test_stdout_output(tmp_path, capsys):
    src = tmp_path / "m.smi"
    src.write_text("CCO\nC1CC(\n")
    assert cli_main(["score", str(src), "-r", "mw", "-o", "-", "--workers", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "record,id,smiles,mw,error" and len(out) == 3 and out[2].startswith("2,2,C1CC(,,")


def test_discovery_finds_the_molecule_plugin_dynamically():
    plugins = discover_plugins()
    assert "diffalign.rewards.molecule" in plugins
    assert plugins["diffalign.rewards.molecule"].name == "molecule"


def test_core_score_imports_no_reward_or_modality():
    tree = ast.parse((REPO / "core" / "score.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith(("diffalign.rewards", "diffalign.modalities"))]


# --- the engine alone, with a toy plugin (module-level functions so the pool can pickle them) -------
def _toy_prepare(item):
    if item == "bad":
        raise ValueError("bad item")
    return item


def _toy_len(x):
    if x == "crash":
        os._exit(3)  # a worker dying (as on a segfault in a C extension)
    return float(len(x))


def _toy_fail(x):
    raise RuntimeError("always fails")


TOY = ScoringPlugin(
    name="toy",
    can_read=lambda p: False,
    read=lambda p, **o: iter(()),
    rewards={"len": _toy_len, "fail": _toy_fail},
    prepare=_toy_prepare,
)


def test_engine_error_semantics_and_worker_crash():
    records = [Record("a", "xx"), Record("b", error="unreadable"), Record("c", "bad"), Record("d", "crash")]
    records += [Record(str(i), "y" * i) for i in range(1, 9)]
    rows = list(score_records(records, ["len"], TOY, workers=2, chunk_size=3))
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert rows[0] == {"record": 1, "id": "a", "source": "", "len": 2.0, "error": None}
    assert rows[1]["error"] == "unreadable" and rows[2]["error"] == "bad item"
    assert "crashed" in rows[3]["error"] and rows[3]["len"] is None
    assert [r["len"] for r in rows[4:]] == [float(i) for i in range(1, 9)]
    rows = list(score_records([Record("a", "xx")], ["len", "fail"], TOY))
    assert (
        rows[0]["len"] == 2.0
        and rows[0]["fail"] is None
        and rows[0]["error"] == "fail: RuntimeError: always fails"
    )
    with pytest.raises(ScoreError, match="known rewards: len, fail"):
        list(score_records([], ["nope"], TOY))


def test_empty_input_writes_just_the_header(tmp_path):
    assert write_rows(iter(()), tmp_path / "e.csv", columns=["record", "id", "error"]) == 0
    assert (tmp_path / "e.csv").read_text() == "record,id,error\n"
    empty = tmp_path / "empty.smi"
    empty.write_bytes(b"")
    out = tmp_path / "empty.parquet"
    assert cli_main(["score", str(empty), "-r", "qed", "-o", str(out)]) == 0
    assert pq.read_schema(out).names == ["record", "id", "smiles", "qed", "error"]
    assert pq.read_table(out).num_rows == 0


# --- fuzzing: the readers and the score path never crash and keep one row per record -------------------
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _expected_lines(data: bytes) -> int:
    n = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    first = first[3:] if first.startswith(b"\xef\xbb\xbf") else first
    try:
        parts = first.decode("utf-8").split(None, 1)
    except UnicodeDecodeError:
        parts = []
    return n - (1 if n and parts and parts[0].lower() == "smiles" else 0)


SMILES_ALPHABET = st.sampled_from(
    list("CNOSPFcnos()[]=#@+-123456789%/\\.Hl ") + ["Cl", "Br", "\n", "\xff", "\x00"]
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(SMILES_ALPHABET, max_size=80).map(lambda x: "".join(x).encode("utf-8", "surrogateescape")),
    )
)
def test_fuzz_smiles_file(tmp_path_factory, data):
    src = tmp_path_factory.mktemp("fz") / "f.smi"
    src.write_bytes(data)
    rows = score_file(src, ["qed", "atom_stability", "lipinski"], workers=1, chunk_size=7)
    assert len(rows) == _expected_lines(data)
    assert [r["record"] for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert (r["error"] is None) == (r["qed"] is not None)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=120),
            st.sampled_from([b"$$$$", b"M  END", b"  2  1  0  0  0  0  0  0  0  0999 V2000"]),
        ),
        max_size=12,
    )
)
def test_fuzz_sdf_file(tmp_path_factory, parts):
    data = b"\n".join(parts)
    src = tmp_path_factory.mktemp("fz") / "f.sdf"
    src.write_bytes(data)
    rows = score_file(src, ["qed", "mw"], workers=1)
    lines = data.split(b"\n")
    blocks, cur = 0, []
    for line in lines:
        if line.strip() == b"$$$$":
            blocks, cur = blocks + 1, []
        else:
            cur.append(line)
    blocks += any(line.strip() for line in cur)
    assert len(rows) == blocks


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_csv_file(tmp_path_factory, body):
    src = tmp_path_factory.mktemp("fz") / "f.csv"
    src.write_bytes(b"id,smiles\n" + body)
    try:
        rows = score_file(src, ["mw"], workers=1)
    except ReadError:  # only for a header the csv module cannot parse: not the case here
        raise
    for r in rows:
        assert (r["error"] is None) == (r["mw"] is not None)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_unreadable_formats_raise_read_error_only(tmp_path_factory, data):
    src = tmp_path_factory.mktemp("fz") / "f.parquet"
    src.write_bytes(data)
    with pytest.raises(ReadError, match="f.parquet"):
        list(iter_score_file(src, ["qed"]))

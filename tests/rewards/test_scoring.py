"""`diffalign score` on real files through the Reward classes training uses: SMILES/SDF/CSV/Parquet with the
molecule rewards, PNG folders with DigitFidelity and JPEG size; malformed input; fuzzing."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rdkit import Chem
from rdkit.Chem import QED, AllChem, Crippen

from diffalign.core.cli import cli_main
from diffalign.core.score import ReadError, partial_path, plan
from diffalign.core.types import Cond
from diffalign.modalities.image import load_digit_images
from diffalign.rewards import molecule as M
from diffalign.rewards.image import DigitFidelity, JpegIncompressibility
from diffalign.rewards.scoring import NAMES, REWARDS, iter_score_file, score_file
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


def _f32(x):
    return float(torch.tensor(x, dtype=torch.float32))


def _png(path):
    """An image file as (3, H, W) in [0, 1], read with PIL here (not with the reader under test)."""
    return torch.tensor(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


# --- molecules ------------------------------------------------------------------------------------
def test_cli_mixed_smiles_file_keeps_every_row_in_order(tmp_path, capsys):
    src = tmp_path / "mixed.smi"
    src.write_bytes(MIXED_SMI)
    assert cli_main(["score", str(src), "-r", "qed,logp,validity,atom_stability", "--workers", "1"]) == 0
    rows = _read_csv(tmp_path / "mixed.smi.scores.csv")  # default output beside the input
    assert [r["record"] for r in rows] == [str(i) for i in range(1, 8)]
    assert [r["id"] for r in rows] == ["ethanol", "2", "3", "broken", "5", "bad-bytes", "acetic"]
    assert list(rows[0]) == ["record", "id", "smiles", "qed", "logp", "validity", "atom_stability", "error"]
    assert _f32(float(rows[0]["qed"])) == _f32(_qed("CCO"))  # the float32 reward, as text
    assert _f32(float(rows[6]["logp"])) == _f32(Crippen.MolLogP(Chem.MolFromSmiles("CC(=O)O")))
    ok = [0, 1, 6]
    assert all(rows[i]["error"] == "" and rows[i]["validity"] == "1.0" for i in ok)
    assert rows[2]["error"] == "empty line" and rows[2]["validity"] == ""  # no sample at all
    assert rows[5]["error"].startswith("not valid UTF-8") and rows[5]["smiles"] == "\\xff\\xfeCC bad-bytes"
    # molecules RDKit cannot parse or sanitise: each reward decides, as in training
    assert rows[3]["validity"] == "0.0" and rows[3]["qed"] == rows[3]["atom_stability"] == ""
    assert rows[3]["error"] == "qed, logp, atom_stability: unparsable SMILES 'C1CC('"
    assert rows[4]["validity"] == "0.0" and _f32(float(rows[4]["atom_stability"])) == _f32(
        5 / 6
    )  # graph kept
    assert (
        rows[4]["error"].startswith("qed, logp: invalid molecule 'C(C)(C)(C)(C)C'")
        and "valence" in rows[4]["error"]
    )
    assert "7 records (4 with errors)" in capsys.readouterr().err


def test_smiles_scores_equal_the_reward_classes_called_directly(tmp_path):
    smiles = ["CC(=O)OC1=CC=CC=C1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "c1ccccc1", "C1CC(", "C" * 30]
    src = tmp_path / "m.smi"
    src.write_text("\n".join(smiles) + "\n")
    names = ["qed", "sa", "logp", "mw", "lipinski", "validity", "atom_stability", "mol_stability"]
    rows = score_file(src, ",".join(names), workers=1)
    for name in names:
        short = REWARDS[name]
        cls = getattr(M, short.class_path.rpartition(".")[2])
        direct = cls(**short.init_args)(smiles).scores.tolist()
        got = [r[name] for r in rows]
        assert [None if math.isnan(d) else d for d in direct] == got, name
    assert rows[0]["sa"] == _f32(M.SAScore()(smiles[:1]).scores.item())  # training's (10 − SA)/9


def test_logp_reuses_the_logp_qed_computed_through_the_scoring_path(tmp_path, monkeypatch):
    src = tmp_path / "m.smi"
    src.write_text("\n".join(["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1"] * 4) + "\n")
    calls = []
    real = Crippen.MolLogP
    monkeypatch.setattr(Crippen, "MolLogP", lambda m, *a, **k: calls.append(1) or real(m, *a, **k))
    rows = score_file(src, "qed,logp", workers=1)
    assert len(calls) == 12  # QED's own logP only; `logp` read it back for each of the same molecules
    assert [r["logp"] for r in rows] == [_f32(real(Chem.MolFromSmiles(r["smiles"]))) for r in rows]
    calls.clear()
    score_file(src, "logp", workers=1)
    assert len(calls) == 12


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
    rows = score_file(tsv, "mw", reader_options={"column": "SMILES", "id_column": "mol_id"})
    assert [r["id"] for r in rows] == ["x1", "x2"] and rows[1]["mw"] == pytest.approx(30.07, abs=0.01)


def _sdf_blocks() -> list[bytes]:
    buf = io.StringIO()
    w = Chem.SDWriter(buf)
    for name, s in (("aspirin", "CC(=O)OC1=CC=CC=C1C(=O)O"), ("ethanol", "CCO"), ("", "c1ccccc1")):
        m = Chem.AddHs(Chem.MolFromSmiles(s))
        AllChem.EmbedMolecule(m, randomSeed=0)
        m.SetProp("_Name", name)
        w.write(m)
    w.close()
    return buf.getvalue().encode().split(b"$$$$\n")[:3]


def test_sdf_broken_block_and_missing_terminator_are_error_rows(tmp_path):
    blocks = _sdf_blocks()
    broken = b"broken\n  RDKit\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n  garbage\nM  END\n"
    data = blocks[0] + b"$$$$\n" + broken + b"$$$$\n" + blocks[1] + b"$$$$\n\xff\xff\n$$$$\n" + blocks[2]
    src = tmp_path / "m.sdf"
    src.write_bytes(data)  # the last block has no $$$$ terminator: fine at the end of the file
    rows = score_file(src, ["qed", "mmff_energy", "atom_stability"])
    assert [r["id"] for r in rows] == ["aspirin", "broken", "ethanol", "4", "5"]
    assert [r["error"] is None for r in rows] == [True, False, True, False, True]
    assert "SDF record" in rows[1]["error"] and "UTF-8" in rows[3]["error"]
    assert rows[0]["qed"] == _f32(_qed("CC(=O)OC1=CC=CC=C1C(=O)O"))
    assert rows[2]["atom_stability"] == 1.0  # explicit hydrogens count as stable atoms
    m = Chem.MolFromMolBlock(blocks[1].decode(), removeHs=False)
    ff = AllChem.MMFFGetMoleculeForceField(m, AllChem.MMFFGetMoleculeProperties(m))
    energy = ff.CalcEnergy() / m.GetNumAtoms()
    assert rows[2]["mmff_energy"] == _f32(-energy)  # the reward: −energy per atom of the given conformer
    # a $$$$ missing between two records: one error row, never one merged molecule
    merged = tmp_path / "merged.sdf"
    merged.write_bytes(blocks[0] + blocks[1] + b"$$$$\n" + blocks[2] + b"$$$$\n")
    rows = score_file(merged, ["qed"])
    assert [r["id"] for r in rows] == ["aspirin", "2"]  # records are what $$$$ separates
    assert rows[0]["qed"] is None and "'$$$$' line between them is missing" in rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["qed"] == _f32(_qed("c1ccccc1"))


def test_parquet_in_and_out(tmp_path):
    src = tmp_path / "in.parquet"
    table = pa.table({"id": ["m1", None, "m3", "m4"], "SMILES": ["CCO", "c1ccccc1", None, "C1CC("]})
    pq.write_table(table, src, row_group_size=2)
    out = tmp_path / "out.parquet"
    assert cli_main(["score", str(src), "-r", "qed,sa", "-o", str(out), "--workers", "1"]) == 0
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got] == ["m1", "2", "m3", "m4"]
    assert got[0]["qed"] == _f32(_qed("CCO")) and got[0]["error"] is None
    assert "null" in got[2]["error"] and got[2]["qed"] is None
    assert "unparsable" in got[3]["error"]
    assert pq.read_schema(out).field("qed").type == pa.float32()
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
    assert cli_main(["score", str(missing), "-r", "qed"]) == 2
    assert str(missing) in capsys.readouterr().err
    src = tmp_path / "m.smi"
    src.write_text("CCO\n")
    assert cli_main(["score", str(src), "-r", "qed,foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'foo'" in err and "qed, sa, logp" in err
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n")
    assert cli_main(["score", str(table), "-r", "qed"]) == 2
    assert "no SMILES column" in capsys.readouterr().err
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"not parquet")
    assert cli_main(["score", str(bad), "-r", "qed"]) == 2
    assert str(bad) in capsys.readouterr().err
    weird = tmp_path / "x.unknownext"
    weird.write_text("CCO\n")
    assert cli_main(["score", str(weird), "-r", "qed"]) == 2
    assert "does not read '.unknownext'" in capsys.readouterr().err
    opts = ["--reader", "molecule", "--reader-option", "format=smiles", "-o", "-", "--workers", "1"]
    assert cli_main(["score", str(weird), "-r", "qed", *opts]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("1,1,CCO,0.40680")
    assert cli_main(["score", str(src), "-r", "qed", "--reader", "image"]) == 2
    assert "ImageReader" in capsys.readouterr().err
    assert cli_main(["score", str(src), "-r", "qed", "-o", str(tmp_path / "o.xlsx")]) == 2
    assert "unknown format '.xlsx'" in capsys.readouterr().err
    assert cli_main(["score", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "diffalign.rewards.molecule.MMFFEnergy" in listed and "digit_fidelity" in listed


def test_stdout_output(tmp_path, capsys):
    src = tmp_path / "m.smi"
    src.write_text("CCO\nC1CC(\n")
    assert cli_main(["score", str(src), "-r", "mw", "-o", "-", "--workers", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "record,id,smiles,mw,error" and len(out) == 3 and out[2].startswith("2,2,C1CC(,,")


# --- images ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """30 real held-out digits as 16×16 PNGs; even files prompted with their digit, odd with a wrong one."""
    folder = tmp_path_factory.mktemp("digits")
    x, y = load_digit_images(16, split="test")
    lines = ["file,prompt"]
    for i in range(30):
        Image.fromarray((x[i, 0] * 255).round().byte().numpy(), mode="L").save(folder / f"d{i:03d}.png")
        asked = int(y[i]) if i % 2 == 0 else (int(y[i]) + 1 + i % 9) % 10
        lines.append(f"d{i:03d}.png,a handwritten {asked}")
    (folder / "prompts.csv").write_text("\n".join(lines) + "\n")
    (folder / "notes.txt").write_text("not an image, not a record\n")
    return folder


def test_png_folder_scores_digit_fidelity_and_jpeg_size_through_the_same_rewards(digit_folder, tmp_path):
    out = tmp_path / "s.csv"
    args = ["score", str(digit_folder), "-r", "digit_fidelity,jpeg_kb", "-o", str(out), "--workers", "2"]
    assert cli_main(args) == 0
    rows = _read_csv(out)
    assert list(rows[0]) == ["record", "id", "path", "prompt", "digit_fidelity", "jpeg_kb", "error"]
    assert [r["id"] for r in rows] == [f"d{i:03d}.png" for i in range(30)] and all(
        r["error"] == "" for r in rows
    )
    fid = [float(r["digit_fidelity"]) for r in rows]
    right, wrong = fid[0::2], fid[1::2]
    assert (
        min(right) > 0.5 and max(wrong) < 0.1 and sum(right) / 15 > 0.95
    )  # prompted digits read from prompts.csv
    # the same numbers as the Reward classes called on the loaded images with their prompts
    images = torch.stack([_png(digit_folder / r["id"]) for r in rows])
    cond = Cond({"prompt": [r["prompt"] for r in rows]})
    direct = DigitFidelity()(images, cond).scores.tolist()
    assert fid == pytest.approx(direct, rel=1e-5, abs=1e-7)
    kb = JpegIncompressibility()(images, cond).scores.tolist()
    assert [_f32(float(r["jpeg_kb"])) for r in rows] == [_f32(k) for k in kb]


def test_a_recipe_or_a_long_inline_config_names_the_reward(digit_folder):
    recipe = REPO / "recipes" / "image" / "ddpo_compressibility.yaml"  # model.init_args.reward
    rows = score_file(digit_folder, reward_config=str(recipe), workers=1)
    assert list(rows[0])[4] == "JpegCompressibility"
    kb = [r["jpeg_kb"] for r in score_file(digit_folder, "jpeg_kb", workers=1)]
    assert [r["JpegCompressibility"] for r in rows] == [-k for k in kb]
    block = "{class_path: diffalign.rewards.image.JpegIncompressibility, init_args: {quality: %d}}"
    inline = "rewards: {" + ", ".join(f"q{q}: " + block % q for q in (50, 60, 70, 80, 90)) + "}"
    assert len(inline) > 300
    rows = score_file(digit_folder, reward_config=inline, workers=1)
    assert all(r["q50"] < r["q90"] for r in rows)  # lower quality, smaller file


def test_image_prompts_option_bad_files_and_mixed_sizes(digit_folder, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        (folder / name).write_bytes((digit_folder / "d000.png").read_bytes())  # a 0
    Image.new("RGB", (24, 20), (255, 255, 255)).save(folder / "b.jpg")  # another size
    (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = score_file(folder, "digit_fidelity,brightness", prompt="a handwritten 0", workers=1)
    assert [r["id"] for r in rows] == ["a.png", "b.jpg", "c.png", "d.png"]
    assert rows[0]["digit_fidelity"] > 0.5 and rows[0] == {
        **rows[2],
        "record": 1,
        "id": "a.png",
        "path": rows[0]["path"],
    }
    assert rows[1]["brightness"] == 0.0 and rows[1]["error"] is None  # scored alone: a white 24×20 JPEG
    assert rows[3]["digit_fidelity"] is None and rows[3]["error"].startswith("cannot read image d.png")
    rows = score_file(
        folder / "a.png", "digit_fidelity", workers=1
    )  # one file, no prompt: the reward says why
    assert rows[0]["digit_fidelity"] is None and "needs the prompts" in rows[0]["error"]


def test_image_files_decode_to_the_rgb_layout(tmp_path):
    from diffalign.modalities.image.io import load_image

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.zeros_like(gray)]), mode="RGBA").save(tmp_path / "a.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "w16.png")  # 16-bit grayscale
    want = torch.tensor(gray / 255.0, dtype=torch.float32).expand(3, 3, 4)
    for name in ("g.png", "a.png", "w16.png"):
        x = load_image(tmp_path / name)
        assert x.dtype == torch.float32 and x.shape == (3, 3, 4), name
        assert torch.allclose(x, want, atol=1e-6), name  # alpha dropped; 16-bit scaled from 0-65535


def test_a_reward_that_cannot_be_built_stops_the_run_with_its_reason(digit_folder, tmp_path, capsys):
    cfg = "{class_path: diffalign.rewards.image.DigitFidelity, init_args: {weights: /nowhere/c.safetensors}}"
    for workers in ("1", "2"):
        out = tmp_path / f"o{workers}.csv"
        args = ["score", str(digit_folder), "--reward-config", cfg, "-o", str(out), "--workers", workers]
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert "could not build" in err or "cannot build" in err
        assert "/nowhere/c.safetensors" in err and not out.exists() and not partial_path(out).exists()


# --- fuzzing: the readers and the score path never crash and keep one row per record -------------------
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)


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
    blocks, cur = 0, []
    for line in data.split(b"\n"):
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
    for r in score_file(src, ["mw"], workers=1):
        assert (r["error"] is None) == (r["mw"] is not None)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_unreadable_parquet_raises_read_error_only(tmp_path_factory, data):
    src = tmp_path_factory.mktemp("fz") / "f.parquet"
    src.write_bytes(data)
    with pytest.raises(ReadError, match="f.parquet"):
        list(iter_score_file(src, ["qed"]))


def test_plan_uses_the_readers_the_rewards_declare(tmp_path):
    (tmp_path / "m.smi").write_text("CCO\n")
    assert plan(tmp_path / "m.smi", "qed", names=NAMES).reader.class_path.endswith(
        "molecule.io.MoleculeReader"
    )
    assert plan(tmp_path, "jpeg_kb", names=NAMES).reader.class_path.endswith("image.io.ImageReader")

"""`diffalign score --engine ray` on a local 2-CPU Ray instance: exactly the rows, order and error column
of the process-pool engine on the malformed molecule inputs the scoring tests use (and the toy reader's
load failures, a raising reward and a record that kills its worker), with a bounded number of chunks in
flight (the driver reads ahead at most that many chunks).

Ray starts once for the module (tens of seconds on a busy 2-core machine; its workers import torch and
RDKit once each): the tests are slow.
"""

from __future__ import annotations

import csv
import io
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray")

from diffalign.core.cli import cli_main  # noqa: E402
from diffalign.core.score import RewardSpec, ScoreError, score_records  # noqa: E402
from diffalign.core.score.command import plan  # noqa: E402
from diffalign.rewards.scoring import NAMES, score_file  # noqa: E402
from tests.core.test_score import NAMES as TOY_NAMES  # noqa: E402
from tests.core.test_score import _write  # noqa: E402
from tests.rewards.test_scoring import MIXED_SMI, _sdf_blocks  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.xdist_group("ray")]  # one Ray instance

MOLECULE_REWARDS = "qed,sa,logp,lipinski,atom_stability"


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance of 2 CPUs for the module; the engine joins it (and leaves it running)."""
    import ray

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)  # the workers import diffalign and tests.*
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024**2)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _malformed_inputs(folder) -> list:
    """The molecule scoring tests' malformed inputs: a mixed SMILES file (empty line, unparsable,
    valence error, bad bytes), an SDF with a broken block, bad bytes and a missing terminator, and a
    Parquet table with a null id, a null SMILES and an unparsable one."""
    smi = folder / "mixed.smi"
    smi.write_bytes(MIXED_SMI * 5)
    blocks = _sdf_blocks()
    broken = b"broken\n  RDKit\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n  garbage\nM  END\n"
    sdf = folder / "m.sdf"
    sdf.write_bytes(
        blocks[0] + b"$$$$\n" + broken + b"$$$$\n" + blocks[1] + b"$$$$\n\xff\xff\n$$$$\n" + blocks[2]
    )
    merged = folder / "merged.sdf"
    merged.write_bytes(blocks[0] + blocks[1] + b"$$$$\n" + blocks[2] + b"$$$$\n")
    parquet = folder / "in.parquet"
    table = pa.table({"id": ["m1", None, "m3", "m4"], "SMILES": ["CCO", "c1ccccc1", None, "C1CC("]})
    pq.write_table(table, parquet, row_group_size=2)
    return [smi, sdf, merged, parquet]


def test_ray_rows_equal_the_process_pool_on_malformed_molecule_files(ray_instance, tmp_path):
    for src in _malformed_inputs(tmp_path):
        pool = score_file(src, MOLECULE_REWARDS, workers=2, chunk_size=3)
        ray_rows = score_file(src, MOLECULE_REWARDS, engine="ray", chunk_size=3)
        assert ray_rows == pool, src.name
        assert score_file(src, MOLECULE_REWARDS, workers=1) == pool  # and the in-process engine's
        assert any(r["error"] is not None for r in pool) and any(r["error"] is None for r in pool)


def test_ray_keeps_load_errors_reward_failures_and_a_crashing_record_on_their_rows(ray_instance, tmp_path):
    lines = ["ab", "", "bad", "abcd", "abc", "x", "abcdef"] * 3
    src = _write(tmp_path, "\n".join(lines) + "\n")
    pool = score_file(src, "length,picky", names=TOY_NAMES, workers=2, chunk_size=2)
    ray_rows = score_file(src, "length,picky", names=TOY_NAMES, engine="ray", chunk_size=2)
    assert len(ray_rows) == len(lines) and ray_rows == pool
    crash = _write(tmp_path, "ab\nabc\ncrash\nx\nabcde\nab\nabc\n", "crash.txt")
    rows = score_file(crash, "length", names=TOY_NAMES, engine="ray", chunk_size=2)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(1, 8)]
    assert "crashed" in rows[2]["error"] and rows[2]["length"] is None
    assert [r["length"] for i, r in enumerate(rows) if i != 2] == [2.0, 3.0, 1.0, 5.0, 2.0, 3.0]


def test_ray_reads_ahead_at_most_the_chunks_in_flight(ray_instance, tmp_path):
    src = _write(tmp_path, "\n".join(["abc", "ab", "a"] * 20) + "\n")
    p = plan(src, "length", names=TOY_NAMES)
    read = [0]

    def counted():
        for r in p.records():
            read[0] += 1
            yield r

    chunk, in_flight = 2, 3
    ahead = []
    rows = score_records(
        counted(), p.reader, p.rewards, chunk_size=chunk, max_in_flight=in_flight, engine="ray"
    )
    for n, _ in enumerate(rows, 1):
        ahead.append(read[0] - n)
    assert len(ahead) == 60
    # the driver holds the chunks in flight and the one being cut, never the whole file
    assert max(ahead) <= (in_flight + 1) * chunk, max(ahead)


def test_cli_engine_ray_writes_the_pool_output_and_reports_a_reward_that_cannot_be_built(
    ray_instance, tmp_path, capsys
):
    src = tmp_path / "m.smi"
    src.write_bytes(MIXED_SMI)
    outs = {}
    for engine in ("pool", "ray"):
        out = tmp_path / f"{engine}.csv"
        args = ["score", str(src), "-r", "qed,sa", "-o", str(out), "--engine", engine, "--chunk-size", "2"]
        assert cli_main([*args, "--workers", "2"]) == 0
        outs[engine] = list(csv.DictReader(io.StringIO(out.read_text())))
    assert outs["ray"] == outs["pool"] and len(outs["pool"]) == 7
    bad = RewardSpec("x", "diffalign.rewards.image.DigitFidelity", {"weights": "/nowhere/c.safetensors"})
    p = plan(src, "qed", names=NAMES)
    with pytest.raises(ScoreError, match="could not build .*/nowhere/c.safetensors"):
        list(score_records(p.records(), p.reader, [bad], engine="ray", chunk_size=2))
    assert cli_main(["score", str(src), "-r", "qed", "--address", "auto", "-o", str(tmp_path / "x.csv")]) == 2
    assert "--engine ray" in capsys.readouterr().err

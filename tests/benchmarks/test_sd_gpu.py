"""benchmarks/sd_gpu.sh (diffalign beside TRL 0.23.1 on Stable Diffusion) runs end to end on a CPU with the
tiny pipeline, and its vendored TRL harness is the project's, unmodified. Without TRL the driver runs
diffalign's rows alone and says that the peer was not run.

The end-to-end test runs one row (DDPO with LoRA: TRL, then diffalign) without the lever micro-benchmark:
three processes (build, TRL, diffalign), each importing diffusers/transformers, about 45 CPU-seconds (it
took 5 minutes of wall time on 2 cores shared with a load of 13); the three rows and the levers take about
three times that: `DEVICE=cpu PRESET=tiny bash benchmarks/sd_gpu.sh` runs them all.

TRL is never installed into the project's environment: the test installs trl==0.23.1 on demand into the
git-ignored folder `.peer/trl` with `pip install --no-deps --target` (its DDPO/AlignProp trainers need only
packages the project has already); when that fails the test fails and says how to install it by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO

PEER = REPO / "benchmarks" / "peer"
TRL_VERSION = "0.23.1"
TRL_DIR = REPO / ".peer" / "trl"


def ensure_trl() -> Path:
    """`.peer/trl` holding trl==0.23.1, installed there from the package registry if missing."""
    if (TRL_DIR / f"trl-{TRL_VERSION}.dist-info").is_dir() and (TRL_DIR / "trl" / "__init__.py").is_file():
        return TRL_DIR
    TRL_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="trl-", dir=TRL_DIR.parent))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        str(staging),
        f"trl=={TRL_VERSION}",
        "pandas==3.1.1",  # TRL's trainers import it; the project does not depend on it
        "tzdata==2026.6",
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        p = None
        err = str(e)
    if p is None or p.returncode != 0 or not (staging / "trl" / "__init__.py").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        detail = err if p is None else (p.stderr or p.stdout)[-1500:]
        pytest.fail(
            f"could not install trl=={TRL_VERSION} into {TRL_DIR} from the package registry; the TRL "
            f"comparison needs it. By hand: {sys.executable} -m pip install --no-deps --target {TRL_DIR} "
            f"trl=={TRL_VERSION}\n"
            f"pip said: {detail}"
        )
    shutil.rmtree(TRL_DIR, ignore_errors=True)
    staging.rename(TRL_DIR)  # atomic: a half-finished install is never taken for a good one
    return TRL_DIR


def test_vendored_peer_harness_is_unmodified():
    manifest = dict(
        reversed(line.split()) for line in (PEER / "MANIFEST.sha256").read_text().splitlines() if line.strip()
    )
    assert sorted(manifest) == sorted(p.name for p in PEER.glob("*.py"))
    for name, digest in manifest.items():
        assert hashlib.sha256((PEER / name).read_bytes()).hexdigest() == digest, (
            f"benchmarks/peer/{name} was edited"
        )
    for shared in (REPO.parent / "shared" / "peer", REPO.parent.parent / "shared" / "peer"):
        if shared.is_dir():  # the lead's checkout sits beside ../shared/peer, a helper's one level further
            for name in manifest:
                assert (shared / name).read_bytes() == (PEER / name).read_bytes(), (
                    f"{name} differs from {shared}"
                )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sd_gpu_sh_runs_on_cpu_with_the_tiny_pipeline(tmp_path):
    site = ensure_trl()
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(
        os.environ,
        DIFFALIGN_PYTHON=sys.executable,
        DEVICE="cpu",
        PRESET="tiny",
        PEER_SITE=str(site),
        OUT=str(out),
        WORK=str(work),
        WHL_DIR=str(tmp_path / "no-wheels"),
        BUDGET="800",
        ROWS="ddpo_lora",
        LEVERS="0",
        EPOCHS="2",
        STEPS="2",
        DDPO_BATCH="2",
        DDPO_BATCHES="1",
        AP_BATCH="2",
        AP_ACCUM="1",
    )
    p = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "sd_gpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=890,
    )
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    result = json.loads((out / "sd_gpu.json").read_text())
    assert set(result["rows"]) == {"ddpo_lora"} and not result["skipped"]
    assert result["peer"] == "TRL 0.23.1"
    for row, rec in result["rows"].items():
        assert rec["status"] == {"trl": "ok", "diffalign": "ok"}, (row, rec["status"])
        for fw in ("trl", "diffalign"):
            m = rec[fw]
            assert m["sampling_per_s"] > 0 and m["e2e_per_s"] > 0 and m["peak_gib"] > 0
            assert m["e2e_per_s"] < m["sampling_per_s"]  # an epoch is sampling plus training
        assert all(v > 0 for v in rec["ratios"].values())
        # the identical workload: the same samples per epoch and trainable parameters as TRL
        trl = json.loads((work / f"trl_{row}_r0.json").read_text())
        ours = json.loads((work / f"diffalign_{row}_r0.json").read_text())
        assert [e["n_samples"] for e in ours["epochs"]] == [e["n_samples"] for e in trl["epochs"]] == [2, 2]
        assert ours["model"]["trainable_params"] == trl["model"]["trainable_params"], row
        if row.startswith("ddpo"):
            # bf16 network, float32 kernels: the ratio before any update is exactly 1 (TRL: clipfrac ~1)
            assert rec["diffalign"]["first_update_ratio_dev"] == 0.0
            assert rec["diffalign"]["clipfrac"] == 0.0
    assert result["rows"]["ddpo_lora"]["diffalign"]["profile_top"], "the profile of the LoRA row is missing"
    table = (out / "sd_gpu.md").read_text()
    assert "diffalign/TRL end-to-end" in table and "| ddpo_lora | diffalign |" in table
    assert "NOT RUN" not in table
    assert table in p.stdout  # the table is the end of what the script prints


def fake_row_json(path: Path, samples_per_s: float) -> None:
    """A row's JSON in the peer scripts' layout (what `summarise` reads), two epochs of 4 samples."""
    epoch = {"epoch_s": 4 / samples_per_s, "sampling_s": 1.0, "reward_s": 0.1, "train_s": 1.0}
    path.write_text(
        json.dumps(
            {
                "epochs": [{**epoch, "n_samples": 4, "reward_mean": -1.0}] * 2,
                "model": {"trainable_params": 10},
                "totals": {
                    "steady_samples_per_s_sampling": 4.0,
                    "steady_samples_per_s_epoch": samples_per_s,
                    "peak_mib": 512.0,
                    "peak_kind": "cpu ru_maxrss",
                },
            }
        )
    )


def test_without_trl_only_diffalign_runs_and_the_table_says_so(tmp_path, monkeypatch, capsys):
    """The driver's reporting with the row processes replaced by a stand-in that writes their JSON: no TRL
    command is started, every row says the peer was not run, there are no ratios, and the exit code is 0."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sd_gpu

    started: list[list[str]] = []

    def fake_run_step(cmd, env, timeout, log):
        started.append(cmd)
        fake_row_json(Path(cmd[cmd.index("--out") + 1]), 2.0)
        return 0, 0.1

    monkeypatch.setattr(sd_gpu, "run_step", fake_run_step)
    model = tmp_path / "work" / "tiny"
    model.mkdir(parents=True)  # an already built pipeline: the driver does not rebuild it
    (model / "peer_build_info.json").write_text(json.dumps({"preset": "tiny", "resolution": 64}))
    argv = ["run", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out")]
    argv += ["--work", str(tmp_path / "work"), "--no-levers", "--peer-unavailable", "No module named 'trl'"]
    assert sd_gpu.main(argv) == 0
    assert len(started) == 3 and all(c[1].endswith("sd_gpu.py") and c[2] == "diffalign" for c in started)
    result = json.loads((tmp_path / "out" / "sd_gpu.json").read_text())
    assert result["peer"] == "not run: No module named 'trl'"
    for rec in result["rows"].values():
        assert rec["status"] == {"trl": sd_gpu.NOT_RUN, "diffalign": "ok"}
        assert rec["ratios"] is None and rec["target"] == "-"
        assert rec["diffalign"]["e2e_per_s"] == 2.0
    table = (tmp_path / "out" / "sd_gpu.md").read_text()
    assert table.splitlines()[2] == "PEER (TRL) NOT RUN: No module named 'trl'"
    assert f"| ddpo_full | trl | {sd_gpu.NOT_RUN} |" in table
    assert "THE PEER (TRL) IS NOT RUN" in capsys.readouterr().out

"""benchmarks/sd_gpu.sh (diffalign beside TRL 0.23.1 on Stable Diffusion) runs end to end on a CPU with the
tiny pipeline, and its vendored TRL harness is the project's, unmodified.

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
@pytest.mark.timeout(1800)
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
        BUDGET="1700",
        EPOCHS="2",
        STEPS="2",
        DDPO_BATCH="2",
        DDPO_BATCHES="1",
        AP_BATCH="2",
        AP_ACCUM="1",
        LEVER_FLAGS="--no-compile --reps 2",
    )
    p = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "sd_gpu.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1790,
    )
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    result = json.loads((out / "sd_gpu.json").read_text())
    assert set(result["rows"]) == {"ddpo_lora", "alignprop_lora", "ddpo_full"} and not result["skipped"]
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
    assert {lv["name"].split(",")[0] for lv in result["levers"]} >= {"LoRA", "full", "VAE decode"}
    table = (out / "sd_gpu.md").read_text()
    assert "diffalign/TRL end-to-end" in table and "| ddpo_full | diffalign |" in table
    assert table in p.stdout  # the table is the end of what the script prints

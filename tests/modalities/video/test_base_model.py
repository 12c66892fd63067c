"""The shipped moving-digit flow model and motion classifier: small, reproducible from their recipe/script,
and the model follows its prompt only partly (so alignment has room).

Prompt following is measured on the 16 evaluation prompts × 4 seeds, sampled as the recipes sample (the
Flow-GRPO SDE, noise level 0.7, 10 steps, no guidance), with the shipped motion classifier (direction and
speed) and the image modality's digit classifier (the digit, on every frame). The measured rates are in
docs/modalities/video.md. The bounds exclude both chance and perfection. The shipped 900-step base meets
every bound but one: its digit accuracy is 0.195 against the lower bound 0.2, so
`test_shipped_base_follows_its_prompt_only_partly` stays a strict xfail (the goal it states is the issue's,
not met yet; strict: it fails the suite once a longer pretrain passes it, so the marker is removed then).

The full pretrain (about 15 CPU-minutes) is too long for the suite: it was reproduced bit for bit once
(docs/modalities/video.md), and `moving_digits_flow_base.json` records the sha256 of the shipped file and
of the file the same recipe exports when cut at 2 steps, which the suite reruns.
"""

import json
from pathlib import Path

import pytest
import torch

from diffalign.core import reproduce
from diffalign.core.io import resolve_path
from diffalign.core.kernels import FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.modalities.video import EVAL_PROMPTS, FLOW_BASE_WEIGHTS, moving_digits_backbone
from diffalign.modalities.video.train_motion_classifier import CLASSIFIER_WEIGHTS, train
from diffalign.rewards.video import FrameDigitFidelity, MotionClassifierReward
from tests.helpers import run_fit, tiny_configs

HERE = Path(__file__).resolve().parents[3] / "modalities" / "video"
RECIPE = "recipes/video/pretrain_flow.yaml"
MOTION_BOUNDS = (0.25, 0.8)  # chance 1/8
DIGIT_BOUNDS = (0.2, 0.9)  # chance 1/10


def test_shipped_files_are_small():
    for spec in (FLOW_BASE_WEIGHTS, CLASSIFIER_WEIGHTS):
        size = resolve_path(spec).stat().st_size
        assert size < 4_000_000, f"{spec}: {size} bytes"


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="a known shortfall of the shipped base: it follows its motion prompt (0.45 vs null 0.11) but its "
    "digit accuracy is 0.195, just under the 0.2 bound (null 0.07); a longer pretrain would replace the base "
    "every measured alignment figure rests on: docs/modalities/video.md",
)
def test_shipped_base_follows_its_prompt_only_partly():
    backbone = moving_digits_backbone("flow")
    policy = DiffusionPolicy(backbone, FlowSDEKernel(noise_level=0.7), num_steps=10).eval()
    prompts = [p for p in EVAL_PROMPTS for _ in range(4)]
    cond = backbone.condition({"prompt": prompts})

    def rates(c):
        gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(prompts))]
        with torch.no_grad():
            clips = backbone.decode(policy.rollout(c, generator=gens).x0)
        motion = MotionClassifierReward()(clips, cond).info["motion_accuracy"].float().mean().item()
        digit = FrameDigitFidelity(frames="all")(clips, cond).info["digit_accuracy"].float().mean().item()
        return motion, digit

    motion, digit = rates(cond)
    assert MOTION_BOUNDS[0] <= motion <= MOTION_BOUNDS[1], f"motion accuracy {motion:.2f}"
    assert DIGIT_BOUNDS[0] <= digit <= DIGIT_BOUNDS[1], f"digit accuracy {digit:.2f}"
    # the prompt is what it follows: the unconditional model (CFG's null condition) matches it less
    null_motion, null_digit = rates(cond.replace(**backbone.null_condition(cond)))
    assert null_motion < motion - 0.1 and null_digit < digit - 0.1


def test_sidecar_describes_the_shipped_file():
    """moving_digits_flow_base.json names the recipe, the shipped file's sha256 and a full reproduction
    that matched it (`diffalign reproduce recipes/video/pretrain_flow.yaml --full`)."""
    info = reproduce.load_sidecar(RECIPE)
    assert info["recipe"] == RECIPE and info["sha256"] == reproduce.sha256(resolve_path(FLOW_BASE_WEIGHTS))
    full = info["full_reproduction"]
    assert full["identical"] and full["made_sha256"] == info["sha256"] and full["steps"] == info["steps"]


@pytest.mark.slow
def test_pretrain_recipe_cut_short_reproduces_its_recorded_anchor(cleandir):
    """The full pretrain (about 15 CPU-minutes) is reproduced once per new base (docs/modalities/video.md);
    here the same recipe, real settings, cut by the sidecar's overrides (one thread, as conftest sets), must
    export the file whose sha256 the sidecar recorded: code drift that breaks reproduction fails here."""
    info = reproduce.load_sidecar(RECIPE)
    if info["torch"] != torch.__version__:
        pytest.skip(f"anchor recorded with torch {info['torch']}; bit for bit needs the same build")
    made, _ = reproduce.export(RECIPE, cleandir, *info["anchor"]["overrides"])
    assert made == reproduce.expected_anchor(info), (
        f"the cut {RECIPE} no longer exports the weights recorded for {reproduce.platform_key()}"
    )


def test_pretrain_recipe_cut_short_is_deterministic(tmp_path, monkeypatch):
    """The same recipe with its tiny test settings for 3 steps: equal bytes twice."""
    made = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        monkeypatch.chdir(folder)
        extra = tiny_configs("recipes/video/pretrain_flow.yaml", folder)
        run_fit(
            "recipes/video/pretrain_flow.yaml", folder / "runs", "--trainer.max_steps=3", extra_configs=extra
        )
        made.append((folder / "modalities/video/moving_digits_flow_base.safetensors").read_bytes())
    assert made[0] == made[1]


def test_motion_classifier_script_is_deterministic_and_its_report_matches():
    a, _ = train(steps=2, batch_size=8)
    b, _ = train(steps=2, batch_size=8)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    report = json.loads((HERE / "motion_classifier.json").read_text())
    assert report["seed"] == 0 and report["steps"] == 600  # the script's defaults reproduce the shipped file

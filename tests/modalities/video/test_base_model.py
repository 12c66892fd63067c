"""The shipped moving-digit flow model and motion classifier: small, reproducible from their recipe/script,
and the model follows its prompt only partly (so alignment has room).

Prompt following is measured on the 16 evaluation prompts × 4 seeds, sampled as the recipes sample (the
Flow-GRPO SDE, noise level 0.7, 10 steps, no guidance), with the shipped motion classifier (direction and
speed) and the image modality's digit classifier (the digit, on every frame). The measured rates are in
docs/modalities/video.md. The bounds exclude both chance and perfection; the shipped 150-step base is
still at chance, so `test_shipped_base_follows_its_prompt_only_partly` is a strict xfail until a longer
pretrain replaces it (the goal it states is the issue's, not met yet; strict: it fails the suite once the
base follows its prompt, so the marker is removed then).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.core.io import resolve_path
from diffalign.core.kernels import FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.modalities.video import EVAL_PROMPTS, FLOW_BASE_WEIGHTS, moving_digits_backbone
from diffalign.modalities.video.train_motion_classifier import CLASSIFIER_WEIGHTS, train
from diffalign.rewards.video import FrameDigitFidelity, MotionClassifierReward
from tests.helpers import run_fit, tiny_configs

HERE = Path(__file__).resolve().parents[3] / "modalities" / "video"
MOTION_BOUNDS = (0.25, 0.8)  # chance 1/8
DIGIT_BOUNDS = (0.2, 0.9)  # chance 1/10


def test_shipped_files_are_small():
    for spec in (FLOW_BASE_WEIGHTS, CLASSIFIER_WEIGHTS):
        size = resolve_path(spec).stat().st_size
        assert size < 4_000_000, f"{spec}: {size} bytes"


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 13 open: the shipped 150-step base is at chance (motion 0.156 vs chance 0.125, digit 0.113 "
    "vs 0.10: docs/modalities/video.md); a longer pretrain must replace it",
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


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 3 CPU-minutes; much longer on a shared machine
def test_pretrain_recipe_reproduces_the_shipped_weights_bit_for_bit(cleandir):
    """The whole recipe (50 steps of 16 clips, one thread as conftest sets): the same tensors, bit for bit."""
    run_fit("recipes/video/pretrain_flow.yaml", cleandir / "runs")
    made = load_file(str(cleandir / "modalities/video/moving_digits_flow_base.safetensors"))
    shipped = load_file(str(resolve_path(FLOW_BASE_WEIGHTS)))
    assert made.keys() == shipped.keys()
    for k in shipped:
        assert torch.equal(made[k], shipped[k]), k


def test_pretrain_recipe_cut_short_is_deterministic(tmp_path, monkeypatch):
    """The same recipe with its tiny test settings for 3 steps: equal bytes twice (the quick form of the
    test above)."""
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

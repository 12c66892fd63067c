"""Train the small motion classifier behind the `MotionClassifierReward` (the in-project video reward model).

    python -m diffalign.modalities.video.train_motion_classifier [--steps 600] [--seed 0]

It classifies a clip's (direction, speed) — 4 × 2 = 8 classes — from moving-digit clips of the training
digits (`data.MovingDigits`, true captions), with contrast jitter and pixel noise so that it judges
generated clips robustly; it reports accuracy on clips of the held-out digits. Writes
`modalities/video/motion_classifier.safetensors` and `modalities/video/motion_classifier.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffalign.modalities.video.conditions import DIRECTIONS, SPEEDS, MotionCondition

CLASSIFIER_WEIGHTS = "pkg://diffalign.modalities.video/motion_classifier.safetensors"
HERE = Path(__file__).resolve().parent
NUM_CLASSES = len(DIRECTIONS) * len(SPEEDS)


def motion_class(condition: MotionCondition) -> int:
    """The class id of a condition's (direction, speed): direction index × 2 + speed index."""
    if condition.direction is None or condition.speed is None:
        raise ValueError(f"a motion class needs a direction and a speed, got {condition}")
    return DIRECTIONS.index(condition.direction) * len(SPEEDS) + SPEEDS.index(condition.speed)


class MotionClassifier(nn.Module):
    """A three-layer 3D CNN over a clip's frames and frame differences → (direction, speed) logits.

    `forward` takes the video sample layout, float (B, F, 3 | 1, H, W) in [0, 1] (RGB is averaged to gray),
    and returns logits (B, 8) (`motion_class` numbers them).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(2, width, 3, padding=1), nn.SiLU(),
            nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
            nn.Conv3d(2 * width, 2 * width, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, clips: Tensor) -> Tensor:
        if clips.dim() != 5 or clips.shape[2] not in (1, 3):
            raise ValueError(f"expected clips (B, F, 3 | 1, H, W) in [0, 1], got {tuple(clips.shape)}")
        x = rearrange(clips.float().mean(2, keepdim=True), "b f c h w -> b c f h w")
        diff = F.pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 0, 0, 1))
        return self.head(self.net(torch.cat([x * 2 - 1, diff], dim=1)))


def load_motion_classifier(weights: str = CLASSIFIER_WEIGHTS) -> MotionClassifier:
    """The classifier with weights (path or pkg:// spec), frozen, in eval mode."""
    from diffalign.core.io import load_state_dict

    model = MotionClassifier()
    load_state_dict(model, weights)
    return model.requires_grad_(False).eval()


def augment(clips: Tensor, generator: torch.Generator) -> Tensor:
    """Per-clip contrast in [0.6, 1.1] and Gaussian pixel noise (σ ≤ 0.15)."""
    b = clips.shape[0]
    contrast = 0.6 + 0.5 * torch.rand((b, 1, 1, 1, 1), generator=generator)
    sigma = 0.15 * torch.rand((b, 1, 1, 1, 1), generator=generator)
    return (clips * contrast + sigma * torch.randn(clips.shape, generator=generator)).clamp(0, 1)


def labelled_clips(dataset, start: int, n: int) -> tuple[Tensor, Tensor]:
    """Clips start … start + n − 1 of a `MovingDigits` stream and their motion classes (of the truth)."""
    rows = [dataset[i] for i in range(start, start + n)]
    return torch.stack([r[0] for r in rows]), torch.tensor([motion_class(r[2]) for r in rows])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train(
    steps: int = 600, seed: int = 0, batch_size: int = 64, lr: float = 2e-3
) -> tuple[MotionClassifier, dict]:
    """Train on clips of the training digits; returns the model and a report with held-out accuracy."""
    from diffalign.modalities.video.data import MovingDigits, load_digits_8x8

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train_set = MovingDigits(*load_digits_8x8("train"), seed=seed + 1)
    test_set = MovingDigits(*load_digits_8x8("test"), seed=seed + 2)
    x_test, y_test = labelled_clips(test_set, 0, 512)
    model = MotionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = labelled_clips(train_set, step * batch_size, batch_size)
        loss = F.cross_entropy(model(augment(x, g)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    report = {
        "heldout_accuracy": round(accuracy(model, x_test, y_test), 4),
        "heldout_accuracy_augmented": round(
            accuracy(model, augment(x_test, torch.Generator().manual_seed(1)), y_test), 4
        ),
        "heldout_clips": len(y_test),
        "train_clips": steps * batch_size,
        "steps": steps,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    return model, report


def main(argv: list[str] | None = None) -> None:
    from diffalign.core.io import save_state_dict, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "motion_classifier.safetensors"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, report = train(args.steps, args.seed)
    out = save_state_dict(model, args.out)
    write_json(Path(args.out).with_suffix(".json"), report)
    print(
        f"held-out accuracy {report['heldout_accuracy']:.4f} ({report['heldout_clips']} clips); wrote {out}"
    )


if __name__ == "__main__":
    main()

"""Train the small digit classifier behind the `DigitFidelity` reward.

    python -m diffalign.modalities.image.train_digit_classifier [--epochs 40] [--seed 0]

Trains on the training split of the upsampled scikit-learn digits (the split the base model is
pretrained on), with random shifts of up to ±1 pixel, contrast jitter and pixel noise so that it judges
generated samples robustly; reports accuracy on the held-out split. Writes
`modalities/image/digit_classifier.safetensors` and `modalities/image/digit_classifier.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSIFIER_WEIGHTS = "pkg://diffalign.modalities.image/digit_classifier.safetensors"
HERE = Path(__file__).resolve().parent


class DigitClassifier(nn.Module):
    """A two-layer CNN over 16×16 grayscale digits.

    `forward` takes the image sample layout, float (B, 3, H, W) or (B, 1, H, W) in [0, 1] (RGB is
    averaged to gray, other sizes are resized bilinearly to 16×16), and returns logits (B, 10).
    """

    image_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected images (B, 3, H, W) or (B, 1, H, W) in [0, 1], got {tuple(images.shape)}"
            )
        x = images.float().mean(1, keepdim=True)
        if x.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.head(self.features(x * 2 - 1))


def load_classifier(weights: str = CLASSIFIER_WEIGHTS) -> DigitClassifier:
    """The classifier with weights (path or pkg:// spec), frozen, in eval mode."""
    from diffalign.core.io import load_state_dict

    model = DigitClassifier()
    load_state_dict(model, weights)
    return model.requires_grad_(False).eval()


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random integer shifts (±1 px), contrast in [0.7, 1.1] and Gaussian noise (σ ≤ 0.1)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (b,), generator=generator)
    dy = torch.randint(0, 3, (b,), generator=generator)
    h, w = x.shape[-2:]
    shifted = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    contrast = 0.7 + 0.4 * torch.rand((b, 1, 1, 1), generator=generator)
    sigma = 0.1 * torch.rand((b, 1, 1, 1), generator=generator)
    return (shifted * contrast + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train(
    epochs: int = 40, seed: int = 0, batch_size: int = 64, lr: float = 2e-3
) -> tuple[DigitClassifier, dict]:
    """Train on the training split; returns the model and a report with held-out accuracy."""
    from diffalign.modalities.image.data import load_digit_images

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digit_images(16, "train")
    x_test, y_test = load_digit_images(16, "test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        for s in range(0, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    g_test = torch.Generator().manual_seed(1)
    report = {
        "train_accuracy": round(accuracy(model, x_train, y_train), 4),
        "heldout_accuracy": round(accuracy(model, x_test, y_test), 4),
        "heldout_accuracy_augmented": round(accuracy(model, augment(x_test, g_test), y_test), 4),
        "train_images": len(y_train),
        "heldout_images": len(y_test),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "image_size": 16,
    }
    return model, report


def main(argv: list[str] | None = None) -> None:
    from diffalign.core.io import save_state_dict, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "digit_classifier.safetensors"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, report = train(args.epochs, args.seed)
    out = save_state_dict(model, args.out)
    write_json(Path(args.out).with_suffix(".json"), report)
    acc, n = report["heldout_accuracy"], report["heldout_images"]
    print(f"held-out accuracy {acc:.4f} ({n} images); wrote {out}")


if __name__ == "__main__":
    main()

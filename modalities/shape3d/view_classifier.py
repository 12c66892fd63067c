"""The classifier of rendered views behind the `ViewClassFidelity` reward, and how it is trained.

    python -m diffalign.modalities.shape3d.view_classifier [--epochs 12] [--seed 0]

A small CNN reads one rendered view (the renderer of `render.py`, 32×32, shaded gray) and names the
primitive (6 classes, `SHAPES` order). It is trained on views of generated primitives (their own seed,
never the base models' training shapes) from random cameras (azimuth uniform, elevation 15°–75°), with
augmentations that make it judge generated clouds robustly: coordinate jitter (σ up to 0.04), dropped
points (up to 30 %), a few stray points, and ±10 % scale. It reports accuracy on held-out primitives
seen from the four "orbit" cameras the reward uses (alternately 25° and 65° high), per view and per
shape (the views' mean log-probabilities, as the reward's `class_accuracy`). Writes
`modalities/shape3d/view_classifier.safetensors` and `view_classifier.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.modalities.shape3d.conditioning import SHAPES

CLASSIFIER_WEIGHTS = "pkg://diffalign.modalities.shape3d/view_classifier.safetensors"
HERE = Path(__file__).resolve().parent
IMAGE_SIZE = 32


class ViewClassifier(nn.Module):
    """Three conv layers over a 32×32 view; `forward` takes views (N, 1 or 3, H, W) in [0, 1] (colour is
    averaged to gray, other sizes resized bilinearly) and returns logits (N, 6)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, len(SHAPES))
        )

    def forward(self, views: Tensor) -> Tensor:
        if views.dim() != 4 or views.shape[1] not in (1, 3):
            raise ValueError(f"expected views (N, 1 or 3, H, W) in [0, 1], got {tuple(views.shape)}")
        x = views.float().mean(1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return self.head(self.features(x * 2 - 1))


def load_view_classifier(weights: str = CLASSIFIER_WEIGHTS) -> ViewClassifier:
    """The classifier with weights (path or pkg:// spec), frozen, in eval mode."""
    from diffalign.core.io import load_state_dict

    model = ViewClassifier()
    load_state_dict(model, weights)
    return model.requires_grad_(False).eval()


def augment(points: Tensor, mask: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Jitter, drop, stray points and rescale a batch of clouds (B, N, 3) with mask (B, N)."""
    b, n, _ = points.shape
    sigma = 0.04 * torch.rand((b, 1, 1), generator=g)
    p = points * (0.9 + 0.2 * torch.rand((b, 1, 1), generator=g)) + sigma * torch.randn(
        points.shape, generator=g
    )
    keep = torch.rand((b, n), generator=g) >= 0.3 * torch.rand((b, 1), generator=g)
    m = mask * keep
    stray = (torch.rand((b, n), generator=g) < 0.03) & (mask > 0)
    p = torch.where(stray[..., None], (torch.rand(points.shape, generator=g) * 2 - 1) * 0.8, p)
    return p * m[..., None], m


def random_cameras(count: int, g: torch.Generator) -> list:
    from diffalign.modalities.shape3d.render import parse_views

    return parse_views({"random": count, "elevation": [15.0, 75.0]}, g)


def render_views(points: Tensor, mask: Tensor, g: torch.Generator, batch: int = 128) -> Tensor:
    """One view (N, 1, 32, 32) per cloud from its own random camera."""
    from diffalign.modalities.shape3d.render import render_points

    out = []
    for s in range(0, len(points), batch):
        p, m = points[s : s + batch], mask[s : s + batch]
        cams = [[c] for c in random_cameras(len(p), g)]
        out.append(render_points(p, m, cams, IMAGE_SIZE)[:, 0])
    return torch.cat(out)


@torch.no_grad()
def accuracy(model: nn.Module, views: Tensor, labels: Tensor) -> float:
    return (model(views).argmax(-1) == labels).float().mean().item()


def orbit_views(points: Tensor, mask: Tensor) -> Tensor:
    """(B·4, 1, 32, 32) views of each cloud from the reward's "orbit" cameras."""
    from diffalign.modalities.shape3d.render import render_points

    return render_points(points, mask, "orbit", IMAGE_SIZE).flatten(0, 1)


def train(
    epochs: int = 12,
    seed: int = 0,
    num_shapes: int = 3000,
    batch_size: int = 64,
    lr: float = 2e-3,
    num_heldout: int = 600,
) -> tuple[ViewClassifier, dict]:
    """Train on freshly rendered, augmented views every epoch; returns the model and a report on
    `num_heldout` held-out primitives."""
    from diffalign.modalities.shape3d.data import CLASSIFIER_SEED, CLASSIFIER_TEST_SEED, make_dataset

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train_set = make_dataset(num_shapes, CLASSIFIER_SEED)
    test_set = make_dataset(num_heldout, CLASSIFIER_TEST_SEED)
    y_train, y_test = train_set.labels, test_set.labels
    model = ViewClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.perf_counter()
    for _ in range(epochs):
        p, m = augment(train_set.points, train_set.mask, g)
        with torch.no_grad():
            views = render_views(p, m, g)
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        for s in range(0, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(model(views[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    test_views = orbit_views(test_set.points, test_set.mask)
    g_test = torch.Generator().manual_seed(1)
    p, m = augment(test_set.points, test_set.mask, g_test)
    with torch.no_grad():
        per_shape = model(test_views).log_softmax(-1).reshape(len(y_test), 4, -1).mean(1).argmax(-1)
    report = {
        "heldout_view_accuracy": round(accuracy(model, test_views, y_test.repeat_interleave(4)), 4),
        "heldout_shape_accuracy_4_views": round((per_shape == y_test).float().mean().item(), 4),
        "heldout_view_accuracy_augmented": round(
            accuracy(model, orbit_views(p, m), y_test.repeat_interleave(4)), 4
        ),
        "train_shapes": num_shapes,
        "heldout_shapes": len(y_test),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "image_size": IMAGE_SIZE,
    }
    return model, report


def main(argv: list[str] | None = None) -> None:
    from diffalign.core.io import save_state_dict, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-shapes", type=int, default=3000)
    ap.add_argument("--out", default=str(HERE / "view_classifier.safetensors"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, report = train(args.epochs, args.seed, args.num_shapes)
    out = save_state_dict(model, args.out)
    write_json(Path(args.out).with_suffix(".json"), report)
    print(
        f"held-out view accuracy {report['heldout_view_accuracy']:.4f} "
        f"({report['heldout_shapes']} shapes × 4 views); wrote {out}"
    )


if __name__ == "__main__":
    main()

"""The shape modality's backbone: point-cloud diffusion with a Point-E-style transformer.

Model space: (B, N, 3 + C) with N = `max_points`: coordinates × `coordinate_scale` (world units × 2 by
default, so the primitives' coordinates have a spread near 0.6), then C colour channels mapped from
[0, 1] to [−1, 1] (C = 0 or 3). The mask (B, N) marks real points (`variable_axis` 0); padded rows are
exactly 0 and the core keeps them so.

Sample layout (what `decode` returns, what shape rewards take), a dict of tensors:

- "points": (B, N, 3) float, world units, +z up, padded rows 0;
- "mask": (B, N) float, 1 on real points;
- "colors": (B, N, 3) in [0, 1], padded rows 0 (colour models only);
- "images": (B, V, 1 or 3, H, W) in [0, 1], only when a reward asks for views (see `decode`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.backbone import Backbone, standard_scheduler
from diffalign.core.functional import Generator, masked_noise, pad_along, pad_stack
from diffalign.core.types import Cond
from diffalign.modalities.shape3d.conditioning import ATTRIBUTES, condition_ids
from diffalign.modalities.shape3d.transformer import PointTransformer

#: the shipped flow-matching model (trained by recipes/shape3d/pretrain_shapes_flow.yaml)
FLOW_BASE_WEIGHTS = "pkg://diffalign.modalities.shape3d/shapes_flow_base.safetensors"
#: decode options a reward may ask for
DECODE_OPTIONS = ("views", "image_size", "sigma")


def _count_draws(n: Tensor, lo: int, hi: int, generator: Generator) -> Tensor:
    """Point counts: n where given (> 0), else uniform in [lo, hi] from the row's generator."""
    b = n.shape[0]
    if generator is None or isinstance(generator, torch.Generator):
        g = generator if generator is None or generator.device.type == "cpu" else None
        draws = torch.randint(lo, hi + 1, (b,), generator=g)
    else:
        gens = list(generator)
        if len(gens) != b:
            raise ValueError(f"got {len(gens)} generators for a batch of {b}")
        draws = torch.cat(
            [torch.randint(lo, hi + 1, (1,), generator=g if g.device.type == "cpu" else None) for g in gens]
        )
    return torch.where(n.cpu() > 0, n.cpu(), draws)


class ShapeBackbone(Backbone):
    """Point-cloud diffusion over primitives (or any point clouds) with a `PointTransformer`.

    Conditions (batch key "prompt"): prompt strings ("a tall cylinder"), shape ids or attribute dicts
    (`conditioning.parse_condition`). `encode_condition` gives attribute ids (0 = unspecified) and
    `num_points` (0 = draw the count uniformly in [min_points, max_points] from the row's generator in
    `init_noise`). The null condition leaves every attribute unspecified and keeps the point counts.

    Args:
        max_points: N, the padded size of model space.
        min_points: the smallest point count `init_noise` draws.
        color_channels: 0 (geometry only) or 3 (RGB per point).
        width, depth, heads: the transformer.
        prediction_type: "flow" (rectified flow, v = ε − x0; sample with `FlowSDEKernel`), or "epsilon",
            "v_prediction", "sample" on a DDPM schedule (sample with `DDIMKernel` / `DDPMKernel`).
        num_train_timesteps, beta_schedule: the noise schedule (beta_schedule unused for "flow").
        coordinate_scale: model-space coordinates = world coordinates × this.
        image_size, sigma: default size (pixels) and splat width of rendered views.
        backend: geometry/render backend ("auto": pytorch3d when installed, else torch).
        weights: safetensors weights (path or pkg:// spec); default the shipped flow model. None: random.
        pretrained: a local folder written by `save_pretrained` (`config.json` with the architecture,
            `model.safetensors`): a point-cloud model of any size brought from elsewhere. Its config
            replaces the architecture arguments above and its weights replace `weights`.
    """

    #: constructor arguments `save_pretrained` writes to config.json (the architecture and schedule)
    CONFIG_KEYS = (
        "max_points",
        "min_points",
        "color_channels",
        "width",
        "depth",
        "heads",
        "fourier",
        "prediction_type",
        "num_train_timesteps",
        "beta_schedule",
        "coordinate_scale",
    )

    variable_axis = 0
    decode_chunk_size = 64

    def __init__(
        self,
        max_points: int = 96,
        min_points: int = 64,
        color_channels: int = 0,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] = "flow",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        coordinate_scale: float = 2.0,
        image_size: int = 32,
        sigma: float = 1.0,
        backend: Literal["auto", "torch", "pytorch3d"] = "auto",
        weights: str | None = FLOW_BASE_WEIGHTS,
        fourier: int = 3,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            config, weights = _pretrained_folder(pretrained)
            max_points, min_points, color_channels = (
                config["max_points"],
                config["min_points"],
                config["color_channels"],
            )
            width, depth, heads, fourier = (
                config["width"],
                config["depth"],
                config["heads"],
                config["fourier"],
            )
            prediction_type, coordinate_scale = config["prediction_type"], config["coordinate_scale"]
            num_train_timesteps, beta_schedule = config["num_train_timesteps"], config["beta_schedule"]
        if prediction_type not in ("epsilon", "v_prediction", "sample", "flow"):
            raise ValueError(
                f"prediction_type must be epsilon, v_prediction, sample or flow, got {prediction_type!r}"
            )
        if not 1 <= min_points <= max_points:
            raise ValueError(f"need 1 <= min_points <= max_points, got {min_points}, {max_points}")
        if color_channels not in (0, 3):
            raise ValueError(f"color_channels must be 0 or 3, got {color_channels}")
        self.max_points, self.min_points, self.color_channels = max_points, min_points, color_channels
        self.prediction_type = prediction_type
        self.num_train_timesteps, self.beta_schedule = num_train_timesteps, beta_schedule
        self.coordinate_scale = float(coordinate_scale)
        self.image_size, self.sigma, self.backend = image_size, sigma, backend
        attributes = {a: len(v) for a, v in ATTRIBUTES.items() if a != "color" or color_channels}
        self.width, self.depth, self.heads, self.fourier = width, depth, heads, fourier
        self.net = PointTransformer(3 + color_channels, attributes, width, depth, heads, fourier)
        if weights is not None:
            from diffalign.core.io import load_state_dict

            load_state_dict(self, weights)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write `config.json` (the architecture, `CONFIG_KEYS`) and `model.safetensors` into `folder`, the
        layout `ShapeBackbone(pretrained=folder)` loads."""
        from diffalign.core.io import save_state_dict, write_json

        folder = Path(folder)
        write_json(folder / "config.json", {k: getattr(self, k) for k in self.CONFIG_KEYS})
        save_state_dict(self, folder / "model.safetensors")
        return folder

    @property
    def channels(self) -> int:
        return 3 + self.color_channels

    @property
    def device(self) -> torch.device:
        return self.net.output.weight.device

    # -- schedule and conditions ---------------------------------------------------------------------
    def make_scheduler(self) -> Any:
        return standard_scheduler(self.prediction_type, self.num_train_timesteps, self.beta_schedule)

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """`{"prompt": [...]}` → attribute ids (B,) and `num_points` (B,) (see `conditioning`)."""
        if "prompt" not in batch:
            raise KeyError(
                f"ShapeBackbone needs conditions under batch key 'prompt'; got keys {sorted(batch)}"
            )
        prompts = batch["prompt"]
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        elif isinstance(prompts, Tensor):
            prompts = prompts.reshape(-1).tolist()
        ids = condition_ids(list(prompts))
        if not self.color_channels:
            ids.pop("color")
        if (ids["num_points"] > self.max_points).any():
            raise ValueError(
                f"num_points must be at most max_points={self.max_points}, got {ids['num_points'].tolist()}"
            )
        return {k: v.to(self.device) for k, v in ids.items()}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        return {a: torch.zeros_like(cond[a]) for a in self.net.attributes}

    def mask_for(self, counts: Tensor) -> Tensor:
        """(B, N) float mask of the first `counts` points of each row."""
        ar = torch.arange(self.max_points, device=counts.device)
        return (ar[None, :] < counts[:, None]).float()

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor]:
        counts = _count_draws(cond["num_points"], self.min_points, self.max_points, generator).to(self.device)
        mask = self.mask_for(counts)
        x = masked_noise((mask.shape[0], self.max_points, self.channels), generator, mask, device=self.device)
        return x, mask

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        b = x_t.shape[0]
        m = (
            torch.ones(x_t.shape[:2], device=x_t.device)
            if mask is None
            else mask.reshape(b, -1).to(x_t.device)
        )
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.dim() == 0 else t
        return self.net(x_t.float(), t, {a: cond[a] for a in self.net.attributes}, m)

    # -- sample layout -------------------------------------------------------------------------------
    def features(self, samples: Mapping[str, Tensor]) -> Tensor:
        """Diversity features of decoded shapes (`core.guards`), invariant to the order of the points
        (the flattened points are not: the same shape with its points permuted would look far away):
        16 quantiles of each coordinate and 16 of the distance to the centroid, over each shape's real
        points (B, 64), in world units."""
        points, mask = samples["points"].detach().float(), samples["mask"].detach()
        levels = torch.linspace(0, 1, 16, device=points.device)
        out = []
        for p, m in zip(points, mask, strict=True):
            real = p[m > 0] if bool((m > 0).any()) else torch.zeros(1, 3, device=p.device)
            radius = (real - real.mean(0)).norm(dim=1, keepdim=True)
            out.append(torch.quantile(torch.cat([real, radius], dim=1), levels, dim=0).T.reshape(-1))
        return torch.stack(out)

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> dict[str, Tensor]:
        """Model space → the sample layout (module docstring); differentiable.

        Options (what a reward asks for in `Reward.request`):
            views: cameras to render (`render.parse_views`: a view-set name such as "quad", a list of
                camera dicts, or `{"random": n}` drawn from the request's generator) → "images".
            image_size, sigma: of the rendered views (defaults: the backbone's).
        """
        generator = request.pop("generator", None)
        unknown = sorted(set(request) - set(DECODE_OPTIONS))
        if unknown:
            raise ValueError(f"ShapeBackbone.decode takes {', '.join(DECODE_OPTIONS)}; got {unknown}")
        m = (
            torch.ones(x0.shape[:2], device=x0.device)
            if mask is None
            else mask.reshape(x0.shape[0], -1).to(x0)
        )
        out = {"points": x0[..., :3] / self.coordinate_scale * m[..., None], "mask": m}
        if self.color_channels:
            out["colors"] = ((x0[..., 3:] + 1) / 2).clamp(0, 1) * m[..., None]
        if "views" in request:
            from diffalign.modalities.shape3d.render import parse_views, render_points

            cameras = parse_views(request["views"], generator)
            out["images"] = render_points(
                out["points"],
                m,
                cameras,
                int(request.get("image_size", self.image_size)),
                float(request.get("sigma", self.sigma)),
                colors=out.get("colors"),
                backend=self.backend,
            )
        elif set(request) - {"views"}:
            raise ValueError(f"ShapeBackbone.decode: {sorted(request)} only apply with 'views'")
        return out

    def encode(self, samples: Any) -> tuple[Tensor, Tensor]:
        """Samples to model space `(x0 (B, N, 3 + C), mask (B, N))`.

        Accepts the sample layout (a dict with "points" (B, n, 3), optional "mask" and "colors"), a list
        of clouds ((n_i, 3) or (n_i, 3 + C) tensors/arrays, or layout dicts of one cloud), or PLY/OBJ
        paths (a path or a list; read by `io.read_point_cloud`). Clouds of more than `max_points` points
        raise.
        """
        if isinstance(samples, (str, os.PathLike)) or (
            isinstance(samples, Sequence) and samples and isinstance(samples[0], (str, os.PathLike))
        ):
            from diffalign.modalities.shape3d.io import read_point_cloud

            paths = [samples] if isinstance(samples, (str, os.PathLike)) else list(samples)
            samples = [read_point_cloud(p, max_points=self.max_points) for p in paths]
        if isinstance(samples, Mapping):
            points = torch.as_tensor(samples["points"]).float()
            if points.dim() != 3 or points.shape[-1] != 3:
                raise ValueError(f"'points' must be (B, N, 3), got {tuple(points.shape)}")
            mask = samples.get("mask")
            mask = (
                torch.ones(points.shape[:2])
                if mask is None
                else torch.as_tensor(mask).float().reshape(points.shape[:2])
            )
            colors = samples.get("colors")
            feats = points if colors is None else torch.cat([points, torch.as_tensor(colors).float()], dim=-1)
        else:
            clouds = [self._cloud(c, i) for i, c in enumerate(samples)]
            if not clouds:
                raise ValueError("encode got no samples")
            feats, mask = pad_stack(clouds, axis=0)
            mask = mask.reshape(feats.shape[:2])
        if feats.shape[1] > self.max_points:
            counts = mask.sum(1)
            if (counts > self.max_points).any():
                raise ValueError(
                    f"clouds of {int(counts.max())} points exceed max_points={self.max_points} of this model"
                )
            feats, mask = feats[:, : self.max_points], mask[:, : self.max_points]
        feats, mask = pad_along(feats, self.max_points, 1), pad_along(mask, self.max_points, 1)
        has_color = feats.shape[-1] > 3
        if self.color_channels and not has_color:
            raise ValueError("this is a colour model: the samples need colours ('colors' or (n, 6) clouds)")
        x = feats[..., :3] * self.coordinate_scale
        if self.color_channels:
            x = torch.cat([x, feats[..., 3:6].clamp(0, 1) * 2 - 1], dim=-1)
        return (x * mask[..., None]).to(self.device), mask.to(self.device)

    def _cloud(self, c: Any, i: int) -> Tensor:
        if isinstance(c, Mapping):
            p = torch.as_tensor(c["points"]).float()
            if "mask" in c:
                p = p[torch.as_tensor(c["mask"]).reshape(-1) > 0]
            if "colors" in c:
                col = torch.as_tensor(c["colors"]).float().reshape(-1, 3)
                col = col[torch.as_tensor(c["mask"]).reshape(-1) > 0] if "mask" in c else col
                p = torch.cat([p, col], dim=-1)
        else:
            p = torch.as_tensor(c).float()
        if p.dim() != 2 or p.shape[1] not in (3, 6):
            raise ValueError(f"sample {i}: a cloud is (n, 3) or (n, 6) with colours, got {tuple(p.shape)}")
        if p.shape[0] > self.max_points:
            raise ValueError(
                f"sample {i} has {p.shape[0]} points; this model takes at most {self.max_points}"
            )
        return p

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    # -- output files of `diffalign sample` -----------------------------------------------------------
    def save_samples(
        self, samples: Mapping[str, Tensor], folder: str | Path, prompts: Sequence[Any], start_index: int = 0
    ) -> Path:
        """Write one `diffalign sample` batch into `folder`: `shapes/{index:05d}.ply` per sample (its real
        points, with colours for colour models; `io.write_point_cloud`) and `samples.png`, rendered views
        of every sample so far (one row per prompt, one column per seed; rewritten after each batch)."""
        from diffalign.modalities.shape3d.grids import ShapeGridWriter
        from diffalign.modalities.shape3d.io import write_samples

        write_samples(samples, Path(folder) / "shapes", start_index)
        if getattr(self, "_grid_writer", None) is None:
            self._grid_writer = ShapeGridWriter()
        return self._grid_writer(samples, folder, prompts, start_index=start_index)


def _pretrained_folder(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """(config, weights path) of a `save_pretrained` folder; a missing file or key is named."""
    import json

    from diffalign.core.io import resolve_path

    root = resolve_path(folder)
    if not root.is_dir():
        raise NotADirectoryError(
            f"pretrained must be a folder with config.json and model.safetensors: {root}"
        )
    missing = [f for f in ("config.json", "model.safetensors") if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} has no {' or '.join(missing)} (write one with save_pretrained)")
    config = json.loads((root / "config.json").read_text())
    absent = [k for k in ShapeBackbone.CONFIG_KEYS if k not in config]
    if absent:
        raise ValueError(f"{root / 'config.json'} lacks {absent}")
    return config, str(root / "model.safetensors")

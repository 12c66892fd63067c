"""Learned image rewards from LOCAL weights: LAION aesthetic, PickScore, CLIP score, HPSv2, ImageReward.

Every reward here is a frozen `diffalign.core.Reward` that takes decoded images, float (B, 3, H, W) in
[0, 1] (the image modality's documented layout), and returns (B,) scores. Resizing, centre cropping and
normalisation are torch ops inside the reward, so the score is differentiable with respect to the
images wherever the model is (`differentiable = True`): reward backpropagation (DRaFT, AlignProp,
ReFL) and guidance work with them.

Nothing is downloaded: every constructor takes a local folder or file and raises FileNotFoundError
naming what is missing.

Prompts (text-image rewards): the reward reads the prompt text of each sample from `cond["prompt"]`,
a list of B strings — what `Backbone.condition` records for every backbone (Stable Diffusion included),
and what you pass when you call the reward yourself: `reward(images, {"prompt": ["a cat", ...]})`. The
core's `Cond` keeps that metadata aligned with the rows through guidance, resampling and re-scoring. A
KeyError says so when it is missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.core.extras import require
from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond

require("transformers", "image-models", "diffalign.rewards.image_models")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------
def _require(path: str | Path, what: str, is_dir: bool) -> Path:
    p = Path(path).expanduser()
    if is_dir and not p.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {p} (give a local path; nothing is downloaded)")
    if not is_dir and not p.is_file():
        raise FileNotFoundError(f"{what}: file not found: {p} (give a local path; nothing is downloaded)")
    return p


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_clip_model(folder: str | Path, what: str = "CLIP model", dtype: str = "float32") -> Any:
    """A transformers `CLIPModel` from a local folder (config.json + model weights), frozen, eval mode."""
    from transformers import CLIPModel

    p = _require(folder, what, is_dir=True)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {p} has no config.json (expected a transformers CLIPModel folder)")
    if not any(f.suffix in (".safetensors", ".bin") for f in p.iterdir()):
        raise FileNotFoundError(f"{what}: {p} has no *.safetensors / *.bin weights")
    model = CLIPModel.from_pretrained(str(p), local_files_only=True, dtype=_dtype(dtype))
    return model.requires_grad_(False).eval()


def prompts_from_cond(cond: Cond | dict[str, Any], batch_size: int, who: str) -> list[str]:
    """The B prompt strings of a batch, `cond["prompt"]` (what `Backbone.condition` records)."""
    if "prompt" not in cond or isinstance(cond["prompt"], Tensor):
        raise KeyError(
            f"{who} scores images against their prompts: it needs the prompt text under cond['prompt'] "
            f"(a list of strings); got keys {sorted(cond)}"
        )
    prompts = [str(p) for p in cond["prompt"]]
    if len(prompts) != batch_size:
        raise ValueError(f"{who}: {len(prompts)} prompts for {batch_size} images")
    return prompts


class ClipImagePreprocess(nn.Module):
    """CLIPImageProcessor's steps in torch (differentiable): resize the shorter side to `size` (bicubic,
    antialiased), centre-crop `crop` × `crop`, normalise with `mean`/`std`. Input (B, 3, H, W) in [0, 1].
    """

    def __init__(
        self,
        size: int = 224,
        crop: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        self.size, self.crop = int(size), int(crop or size)
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_folder(cls, folder: Path, image_size: int) -> ClipImagePreprocess:
        """Read preprocessor_config.json when the folder has one, else CLIP's defaults at `image_size`."""
        cfg_path = folder / "preprocessor_config.json"
        if not cfg_path.is_file():
            return cls(image_size, image_size)
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))

        def side(v: Any) -> int:
            if isinstance(v, dict):
                return int(v.get("shortest_edge") or v.get("height") or image_size)
            return int(v) if v is not None else image_size

        return cls(
            side(cfg.get("size")),
            side(cfg.get("crop_size", cfg.get("size"))),
            cfg.get("image_mean", CLIP_MEAN),
            cfg.get("image_std", CLIP_STD),
        )

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.crop, round(h * scale)), max(self.crop, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - self.crop) // 2, (nw - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class _ClipReward(Reward):
    """CLIP image/text towers + preprocessing, with features computed the same way in every version of
    transformers: tower pooler output → projection (what `get_image_features` / `get_text_features` do)."""

    reader = "diffalign.modalities.image.io.ImageReader"

    differentiable = True

    def __init__(
        self, clip_path: str, name: str, what: str, keep_text: bool = True, dtype: str = "float32"
    ) -> None:
        super().__init__(name)
        self.clip = load_clip_model(clip_path, what, dtype)
        folder = Path(clip_path).expanduser()
        self.preprocess = ClipImagePreprocess.from_folder(folder, self.clip.config.vision_config.image_size)
        self.tokenizer = None
        if keep_text:
            from diffalign.modalities.image.stable_diffusion import load_clip_tokenizer

            self.tokenizer = load_clip_tokenizer(folder)
            self.max_length = int(
                min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
            )
        else:  # image-only rewards drop the text tower (123 M parameters for ViT-L/14)
            self.clip.text_model = None
            self.clip.text_projection = None
        self.freeze()

    def image_features(self, images: Tensor) -> Tensor:
        dtype = self.clip.visual_projection.weight.dtype
        pixels = self.preprocess(images).to(dtype)
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
        return self.clip.visual_projection(pooled).float()

    def text_features(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        assert self.tokenizer is not None
        tok = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.no_grad():  # the prompts are data: no gradient into the text tower
            out = self.clip.text_model(
                input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device)
            ).pooler_output
            return self.clip.text_projection(out).float()

    def cosine(self, images: Tensor, cond: Cond) -> Tensor:
        prompts = prompts_from_cond(cond, images.shape[0], self.name)
        img = F.normalize(self.image_features(images), dim=-1)
        txt = F.normalize(self.text_features(prompts, img.device), dim=-1)
        return (img * txt).sum(-1)


# ---------------------------------------------------------------------------------------------------
# LAION aesthetic predictor
# ---------------------------------------------------------------------------------------------------
class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (christophschuhmann/improved-aesthetic-predictor, `MLP`):
    Linear(d,1024)-Dropout(0.2)-Linear(1024,128)-Dropout(0.2)-Linear(128,64)-Dropout(0.1)-Linear(64,16)-
    Linear(16,1), on L2-normalised CLIP image embeddings (d = 768 for ViT-L/14). Keys `layers.{0,2,4,6,7}`.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


def load_head_state(path: str | Path, what: str) -> dict[str, Tensor]:
    """A state dict from a local .pth/.pt/.ckpt (torch, weights only) or .safetensors file."""
    p = _require(path, what, is_dir=False)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {p} does not hold a state dict")
    return state


class LaionAesthetic(Reward):
    """LAION aesthetic score (≈1–10): CLIP ViT-L/14 image embedding → L2 norm → the LAION MLP head.

    The score DDPO's "aesthetic" task maximises (ddpo-pytorch `aesthetic_score`).

    Args:
        clip_path: local transformers CLIPModel folder of openai/clip-vit-large-patch14 (config.json,
            model.safetensors, optionally preprocessor_config.json). Only the vision tower is kept.
        head_path: local file of the head, `sac+logos+ava1-l14-linearMSE.pth` from
            christophschuhmann/improved-aesthetic-predictor (or the same state dict as .safetensors).
        dtype: dtype of the CLIP tower ("bfloat16" halves its memory on a GPU); the head and the scores
            stay float32.

    Differentiable in the images.
    """

    reader = "diffalign.modalities.image.io.ImageReader"

    differentiable = True

    def __init__(
        self, clip_path: str, head_path: str, dtype: str = "float32", name: str | None = None
    ) -> None:
        super().__init__(name or "aesthetic")
        self.clip = _ClipReward(clip_path, "clip", "LaionAesthetic CLIP model", keep_text=False, dtype=dtype)
        dim = int(self.clip.clip.config.projection_dim)
        self.head = AestheticMLP(dim)
        state = load_head_state(head_path, "LaionAesthetic head")
        state = {k.removeprefix("mlp."): v for k, v in state.items()}
        try:
            self.head.load_state_dict(state)
        except RuntimeError as e:
            raise RuntimeError(
                f"LaionAesthetic head {head_path} does not fit the MLP on {dim}-d CLIP embeddings: {e}"
            ) from e
        self.freeze()

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        emb = F.normalize(self.clip.image_features(samples), dim=-1)
        return RewardOutput(scores=self.head(emb.to(self.head.layers[0].weight.dtype)).float())


# ---------------------------------------------------------------------------------------------------
# Text-image rewards on CLIP
# ---------------------------------------------------------------------------------------------------
class PickScore(_ClipReward):
    """PickScore (Kirstain et al., 2023): logit_scale.exp() × cos(image, prompt) of the PickScore CLIP.

    Same formula as the reference (`model.logit_scale.exp() * text_embs @ image_embs.T`); typical
    values ≈ 18–23.

    Args:
        clip_path: local folder with the PickScore model (yuvalkirstain/PickScore_v1: CLIPModel
            ViT-H/14) AND the tokenizer files of its processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K:
            vocab.json, merges.txt, tokenizer_config.json, preprocessor_config.json) copied beside it.
        dtype: dtype of the CLIP model (scores are float32).

    Prompts come from `cond` (see the module docstring). Differentiable in the images.
    """

    def __init__(self, clip_path: str, dtype: str = "float32", name: str | None = None) -> None:
        super().__init__(clip_path, name or "pickscore", "PickScore model", dtype=dtype)

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        cos = self.cosine(samples, cond)
        return RewardOutput(scores=self.clip.logit_scale.exp().float() * cos, info={"cosine": cos.detach()})


class CLIPScore(_ClipReward):
    """CLIPScore (Hessel et al., 2021): w · max(cos(image, prompt), 0) with w = 2.5.

    Args:
        clip_path: local transformers CLIPModel folder with its tokenizer files (the paper uses
            ViT-B/32, openai/clip-vit-base-patch32; any CLIP works).
        weight: w (2.5 as in the paper, which rescales the cosine to roughly [0, 1]).
        prompt_prefix: text put before each prompt; the paper's reference code uses "A photo depicts ";
            the default "" scores the bare prompt.
        dtype: dtype of the CLIP model (scores are float32).

    Prompts come from `cond` (see the module docstring). Differentiable in the images (except where the
    cosine is clipped at 0).
    """

    def __init__(
        self,
        clip_path: str,
        weight: float = 2.5,
        prompt_prefix: str = "",
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        super().__init__(clip_path, name or "clipscore", "CLIPScore model", dtype=dtype)
        self.weight = weight
        self.prompt_prefix = prompt_prefix

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        if self.prompt_prefix:
            prompts = prompts_from_cond(cond, samples.shape[0], self.name)
            cond = {"prompt": [self.prompt_prefix + p for p in prompts]}
        cos = self.cosine(samples, cond)
        return RewardOutput(scores=self.weight * cos.clamp_min(0), info={"cosine": cos.detach()})


# ---------------------------------------------------------------------------------------------------
# HPSv2 and ImageReward
# ---------------------------------------------------------------------------------------------------
def open_clip_to_hf_clip(
    state: dict[str, Tensor],
    vision_heads: int,
    text_heads: int,
    quick_gelu: bool = False,
    eos_token_id: int | None = None,
) -> Any:
    """Build a transformers `CLIPModel` holding the weights of an open_clip ViT CLIP state dict.

    The architecture (widths, depths, patch and image size, vocabulary, context length, projection
    dim) is read from the tensor shapes; the head counts cannot be (open_clip fuses q/k/v) and are
    given: ViT-H-14 has 16 vision heads (head width 80) and 16 text heads. open_clip's ViT-H-14 uses exact
    GELU; OpenAI's CLIP weights use QuickGELU (`quick_gelu=True`).

    Mapping: visual.conv1 → patch_embedding, class/positional embeddings, ln_pre → pre_layrnorm,
    resblocks.i.{ln_1, ln_2, attn.in_proj (split into q, k, v), attn.out_proj, mlp.c_fc, mlp.c_proj} →
    layers.i.{layer_norm1, layer_norm2, q/k/v_proj, out_proj, fc1, fc2}, ln_post → post_layernorm,
    visual.proj (transposed) → visual_projection; the text tower likewise with ln_final →
    final_layer_norm and text_projection (transposed). Both pool like open_clip: the class token after
    ln_post, and the end-of-text token after ln_final (`eos_token_id`, default the last vocabulary id,
    49407 in CLIP's vocabulary; open_clip pools at the largest id, which is that token).
    """
    from transformers import CLIPConfig, CLIPModel

    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in ("visual.conv1.weight", "visual.proj", "token_embedding.weight") if k not in state]
    if missing:
        raise ValueError(f"not an open_clip ViT CLIP state dict: no {missing}")

    def depth(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})

    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    t_vocab, t_width = state["token_embedding.weight"].shape
    proj = state.get("text_projection", state.get("text_projection.weight"))
    act = "quick_gelu" if quick_gelu else "gelu"
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=depth("visual.transformer.resblocks."),
            num_attention_heads=vision_heads,
            image_size=grid * patch,
            patch_size=patch,
            hidden_act=act,
        ),
        text_config=dict(
            vocab_size=t_vocab,
            hidden_size=t_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=depth("transformer.resblocks."),
            num_attention_heads=text_heads,
            max_position_embeddings=state["positional_embedding"].shape[0],
            hidden_act=act,
            eos_token_id=t_vocab - 1 if eos_token_id is None else eos_token_id,
            bos_token_id=None,
            pad_token_id=None,
        ),
        projection_dim=state["visual.proj"].shape[1],
    )
    out: dict[str, Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            a, b = f"{src}{i}.", f"{dst}{i}."
            for x, y in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):  # fmt: skip
                out[f"{b}{y}.weight"], out[f"{b}{y}.bias"] = state[f"{a}{x}.weight"], state[f"{a}{x}.bias"]
            for kind in ("weight", "bias"):
                q, k, v = state[f"{a}attn.in_proj_{kind}"].chunk(3)
                out[f"{b}self_attn.q_proj.{kind}"] = q
                out[f"{b}self_attn.k_proj.{kind}"] = k
                out[f"{b}self_attn.v_proj.{kind}"] = v

    vc, tc = config.vision_config, config.text_config
    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.", vc.num_hidden_layers)
    blocks("transformer.resblocks.", "text_model.encoder.layers.", tc.num_hidden_layers)
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    for x, y in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"vision_model.{y}.{kind}"] = state[f"visual.{x}.{kind}"]
    out["visual_projection.weight"] = state["visual.proj"].t()
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    for kind in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{kind}"] = state[f"ln_final.{kind}"]
    out["text_projection.weight"] = proj.t() if "text_projection" in state else proj
    out["logit_scale"] = state["logit_scale"].reshape(())
    model = CLIPModel(config)
    result = model.load_state_dict({k: v.float().contiguous() for k, v in out.items()}, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"open_clip → CLIPModel conversion left missing {missing[:5]} / unexpected {unexpected[:5]}"
        )
    return model.requires_grad_(False).eval()


class HPSv2(_ClipReward):
    """Human Preference Score v2 / v2.1 (Wu et al., 2023): cos(image, prompt) of the HPS-tuned CLIP ViT-H-14.

    The HPSv2 checkpoint is an open_clip state dict. It is converted in memory to a transformers
    `CLIPModel` (`open_clip_to_hf_clip`), so neither open_clip_torch nor torchvision is needed; the
    conversion is checked against open_clip itself by tests/rewards/test_image_models.py when open_clip is
    importable. Score = the diagonal of normalised image @ text features, as HPSv2's `score()` (≈ 0.2–0.35).

    Args:
        checkpoint_path: local `HPS_v2_compressed.pt` or `HPS_v2.1_compressed.pt` (a dict with
            "state_dict", or the state dict itself; .safetensors also read).
        tokenizer_path: local folder with the CLIP BPE tokenizer (vocab.json + merges.txt, e.g. the
            tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K; the vocabulary is OpenAI CLIP's).
        vision_heads, text_heads: attention heads (16 and 16 for ViT-H-14).
        dtype: dtype of the converted model (scores are float32).

    Preprocessing: shorter side to 224 (bicubic), centre crop, OpenAI CLIP mean/std, as open_clip's
    validation transform. Prompts come from `cond` (see the module docstring). Differentiable in the images.
    """

    def __init__(
        self,
        checkpoint_path: str,
        tokenizer_path: str,
        vision_heads: int = 16,
        text_heads: int = 16,
        dtype: str = "float32",
        name: str | None = None,
    ) -> None:
        Reward.__init__(self, name or "hpsv2")
        from diffalign.modalities.image.stable_diffusion import load_clip_tokenizer

        state = load_head_state(checkpoint_path, "HPSv2 checkpoint")
        self.tokenizer = load_clip_tokenizer(_require(tokenizer_path, "HPSv2 tokenizer", is_dir=True))
        self.clip = open_clip_to_hf_clip(
            state, vision_heads, text_heads, eos_token_id=self.tokenizer.eos_token_id
        ).to(_dtype(dtype))
        size = self.clip.config.vision_config.image_size
        self.preprocess = ClipImagePreprocess(size, size)
        self.max_length = int(self.clip.config.text_config.max_position_embeddings)
        self.freeze()

    def forward(self, samples: Tensor, cond: Cond) -> RewardOutput:
        return RewardOutput(scores=self.cosine(samples, cond))


class ImageReward(Reward):
    """ImageReward (Xu et al., 2023) — NOT AVAILABLE in this build.

    ImageReward is a BLIP ViT-L image encoder + BERT text encoder with cross-attention and an MLP head,
    shipped by the `image-reward` package (its own BLIP code, timm 0.6, fairscale, and a BERT tokenizer it
    fetches from the Hub at construction). Raises NotImplementedError.
    """

    def __init__(self, checkpoint_path: str, name: str | None = None) -> None:
        super().__init__(name or "imagereward")
        raise NotImplementedError(
            "ImageReward is not available: it needs the `image-reward` package (its own BLIP model code, "
            "timm 0.6.x, fairscale) and downloads a BERT tokenizer from the Hub when built, which "
            "diffalign never does. See docs/rewards/image_models.md"
        )


__all__ = [
    "AestheticMLP",
    "CLIPScore",
    "ClipImagePreprocess",
    "HPSv2",
    "ImageReward",
    "LaionAesthetic",
    "PickScore",
    "open_clip_to_hf_clip",
    "load_clip_model",
    "prompts_from_cond",
]

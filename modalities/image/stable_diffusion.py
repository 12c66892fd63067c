"""Stable Diffusion (latent diffusion with a CLIP text encoder) as a diffalign `Backbone`.

Loads the five parts of a diffusers Stable Diffusion folder from a LOCAL path, never from the Hub:

```
<pretrained_path>/
├── unet/            config.json + diffusion_pytorch_model[.<variant>].safetensors (or .bin)
├── vae/             config.json + diffusion_pytorch_model[.<variant>].safetensors (or .bin)
├── text_encoder/    config.json + model[.<variant>].safetensors (or .bin)
├── tokenizer/       vocab.json + merges.txt (+ tokenizer_config.json), or tokenizer.json
└── scheduler/       scheduler_config.json
```

Model space is the VAE latent space, (B, C, H/f, W/f) with f = 2^(len(vae block_out_channels) − 1)
(8 for SD 1.x/2.x). `decode` returns the image modality's documented layout: float (B, 3, H, W) in
[0, 1]. Conditioning (`encode_condition`) is `"encoder_hidden_states"`: (B, L, D), the last hidden state
of the frozen CLIP text encoder; `Backbone.condition` adds the prompt text as metadata under "prompt",
which text-image rewards (`diffalign.rewards.image_models`) read directly.

`make_tiny_sd_pipeline(path)` writes a tiny random-weight folder of the same layout (tests, recipe
smoke runs on a CPU).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffalign.core.backbone import Backbone
from diffalign.core.extras import require
from diffalign.core.functional import Generator, randn
from diffalign.core.types import Cond

require("transformers", "image-models", "diffalign.modalities.image.stable_diffusion")

DType = Literal["float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


NO_LORA = "{what}: this backbone has no LoRA adapters (wrap it in diffalign.core.lora.LoRABackbone)"

# the files that must be present in each part's folder: (what, any of these names)
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ---------------------------------------------------------------------------------------------------
# Local loading helpers (no download, clear errors)
# ---------------------------------------------------------------------------------------------------
def require_folder(root: str | Path, part: str, needs: Sequence[Sequence[str]], what: str = "") -> Path:
    """Return `root/part` after checking that it holds, for each group in `needs`, one of its files.

    A group is a list of alternatives: a file name, or a suffix starting with "." (any file ending so).
    Raises FileNotFoundError naming the part, the folder and the missing file; nothing is downloaded.
    """
    root = Path(root).expanduser()
    folder = root / part if part else root
    label = what or f"'{part}'"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{label}: folder {root} does not exist (give a local path; nothing is downloaded)"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"{label} is missing: no folder {folder}")
    names = {p.name for p in folder.iterdir() if p.is_file()}
    for group in needs:
        ok = any(
            (alt.startswith(".") and any(n.endswith(alt) for n in names)) or alt in names for alt in group
        )
        if not ok:
            raise FileNotFoundError(f"{label} is incomplete: {folder} has none of {list(group)}")
    return folder


def load_clip_tokenizer(folder: str | Path) -> Any:
    """A CLIP tokenizer from a local folder (vocab.json + merges.txt, or tokenizer.json).

    transformers 5 can return an empty 2-token tokenizer without raising when files are not found, so
    the size is checked against vocab.json (or must exceed 2 tokens) and a ValueError names the folder.
    """
    from transformers import CLIPTokenizer

    folder = require_folder(folder, "", [["vocab.json", "tokenizer.json"]], what=f"CLIP tokenizer {folder}")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    vocab_file = folder / "vocab.json"
    expected = len(json.loads(vocab_file.read_text(encoding="utf-8"))) if vocab_file.is_file() else 3
    if len(tok) < expected:
        raise ValueError(
            f"the CLIP tokenizer in {folder} loaded with {len(tok)} tokens (expected >= {expected}): "
            "its vocab.json / merges.txt / tokenizer.json are not usable"
        )
    return tok


def _weights_group(variant: str | None) -> list[str]:
    return list(_WEIGHT_SUFFIXES) if variant is None else [f".{variant}{s}" for s in _WEIGHT_SUFFIXES]


# ---------------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------------
class StableDiffusionBackbone(Backbone):
    """Stable Diffusion 1.x / 2.x (UNet2DConditionModel + AutoencoderKL + CLIP text encoder), local weights.

    Args:
        pretrained_path: a LOCAL diffusers folder with unet/, vae/, text_encoder/, tokenizer/ and
            scheduler/ (the layout of `StableDiffusionPipeline.save_pretrained`). A missing part raises
            FileNotFoundError naming it; nothing is ever downloaded.
        resolution: image side in pixels (512 for SD 1.5, 768 for SD 2.x-v); the latent side is
            resolution / f, f = the VAE's down-sampling factor (8 for SD).
        dtype: dtype of the frozen parts, the VAE and text encoder ("bfloat16" halves their memory on a
            GPU). The UNet stays float32 (it is what trains); with LoRA (`core.lora.LoRABackbone`, the one
            LoRA path of every backbone) its frozen base can go to bfloat16 with the wrapper's
            `base_dtype`. `denoise` runs in the UNet's weight dtype and returns float32.
        gradient_checkpointing: recompute UNet activations in the backward pass (less memory, one more
            forward pass per backward); useful for reward backpropagation at 512 px.
        prediction_type: override the scheduler config's prediction_type ("epsilon" for SD 1.x/2.x-base,
            "v_prediction" for SD 2.x-v); None reads it from scheduler/scheduler_config.json.
        encode_mode: what `encode(images)` returns: "mean" (the VAE posterior mean, deterministic; the
            default) or "sample" (a draw from the posterior, as when training SD; uses torch's global RNG).
        variant: weight-file variant to load, e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors.
        channels_last: keep the UNet's and VAE's convolution weights and inputs in the channels-last memory
            layout (NHWC), which GPU convolution kernels prefer in bf16/fp16; the result is the same
            computation. Off by default: on a CPU it is often slower (see docs/performance.md).
        decode_chunk_size: images the VAE decodes at once (`SampleView` splits a batch into chunks of this
            many; None: the whole batch). Bounds the decoder's memory at 512 px, where it is large.

    Attention runs through PyTorch's `scaled_dot_product_attention` (diffusers' `AttnProcessor2_0`, its
    default with torch 2), which picks flash / memory-efficient kernels on a GPU.

    LoRA: wrap the backbone, `LoRABackbone(StableDiffusionBackbone(...), rank=4)`: the adapters go into
    the UNet (`lora_target`), the VAE and text encoder are `frozen_modules` (shared with the reference,
    never copied). `save_lora` / `load_lora` read and write the adapters in diffusers' LoRA format.

    Parts are loaded with `from_pretrained(<pretrained_path>/<part>, local_files_only=True)`. The VAE and
    the text encoder are frozen and always in eval mode; `train()` only reaches the UNet.
    """

    frozen_modules = ("vae", "text_encoder")

    def __init__(
        self,
        pretrained_path: str,
        resolution: int = 512,
        dtype: DType = "float32",
        gradient_checkpointing: bool = False,
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        encode_mode: Literal["mean", "sample"] = "mean",
        variant: str | None = None,
        channels_last: bool = False,
        decode_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if encode_mode not in ("mean", "sample"):
            raise ValueError(f"encode_mode must be 'mean' or 'sample', got {encode_mode!r}")
        root = Path(pretrained_path).expanduser()
        weights = _weights_group(variant)
        unet_dir = require_folder(root, "unet", [["config.json"], weights])
        vae_dir = require_folder(root, "vae", [["config.json"], weights])
        text_dir = require_folder(root, "text_encoder", [["config.json"], weights])
        tok_dir = require_folder(root, "tokenizer", [["vocab.json", "tokenizer.json"]])
        sched_dir = require_folder(root, "scheduler", [["scheduler_config.json"]])

        self.pretrained_path = str(root)
        self.frozen_dtype = _DTYPES[dtype]
        self.encode_mode = encode_mode
        kw: dict[str, Any] = {"local_files_only": True}
        if variant is not None:
            kw["variant"] = variant
        self.unet = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32, **kw)
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=self.frozen_dtype, **kw)
        # transformers 5 names it `dtype` (diffusers still `torch_dtype`)
        self.text_encoder = CLIPTextModel.from_pretrained(str(text_dir), dtype=self.frozen_dtype, **kw)
        self.tokenizer = load_clip_tokenizer(tok_dir)
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()

        self.scheduler_config = self._read_scheduler_config(sched_dir, prediction_type)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{sched_dir / 'scheduler_config.json'}: prediction_type {self.prediction_type!r} is not "
                "supported (epsilon or v_prediction)"
            )

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE factor {self.vae_scale_factor}"
            )
        self.resolution = resolution
        self.latent_size = resolution // self.vae_scale_factor
        self.latent_channels = int(self.unet.config.in_channels)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        shift = getattr(self.vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if decode_chunk_size is not None and decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be >= 1 or null, got {decode_chunk_size}")
        self.decode_chunk_size = decode_chunk_size
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self._null_cache: dict[tuple[str, torch.dtype], Tensor] = {}

    # -- construction helpers ------------------------------------------------------------------------
    @staticmethod
    def _read_scheduler_config(folder: Path, prediction_type: str | None) -> dict[str, Any]:
        path = folder / "scheduler_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        if "_class_name" not in config:
            raise ValueError(f"{path} has no _class_name: not a diffusers scheduler config")
        if prediction_type is not None:
            config["prediction_type"] = prediction_type
        return config

    # -- LoRA weights in diffusers' format ------------------------------------------------------------
    LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

    def save_lora(self, folder: str | Path) -> Path:
        """Write the adapters as `<folder>/pytorch_lora_weights.safetensors` in diffusers' LoRA format.

        A stock diffusers pipeline loads it: `StableDiffusionPipeline.from_pretrained(sd_path)
        .load_lora_weights(folder)`; so does `LoRABackbone(StableDiffusionBackbone(...), weights=folder)`.
        The LoRA config (rank, alpha, targets) is stored in the file's metadata. Returns the file path.
        """
        require("peft", "image-models", "StableDiffusionBackbone.save_lora")
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora:
            raise ValueError(NO_LORA.format(what="save_lora"))
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        meta = self.unet.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            str(folder), unet_lora_layers=state, safe_serialization=True, unet_lora_adapter_metadata=meta
        )
        return Path(folder) / self.LORA_WEIGHT_NAME

    @property
    def has_lora(self) -> bool:
        """Whether LoRA adapters are in the UNet (put there by `core.lora.LoRABackbone`)."""
        adapted = any("lora_" in n for n, _ in self.unet.named_parameters())
        return hasattr(self.unet, "peft_config") and adapted

    def load_lora(self, path: str | Path) -> None:
        """Load LoRA weights saved by `save_lora` (or by diffusers; a folder or the .safetensors file) into
        the UNet's adapters. Raises FileNotFoundError naming the path, ValueError when keys or shapes do
        not fit."""
        require("peft", "image-models", "StableDiffusionBackbone.load_lora")
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        p = Path(path).expanduser()
        file = p / self.LORA_WEIGHT_NAME if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"LoRA weights not found: {file}")
        if not self.has_lora:
            raise ValueError(NO_LORA.format(what="load_lora"))
        state = {
            k.removeprefix("unet."): v for k, v in load_file(str(file)).items() if not k.startswith("text_")
        }
        state = convert_unet_state_dict_to_peft(state)
        expected = {n.replace(".default", "") for n, _ in self.unet.named_parameters() if "lora_" in n}
        if set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise ValueError(
                f"LoRA weights in {file} do not fit: unexpected {extra[:3]}, missing {missing[:3]}"
            )
        try:
            set_peft_model_state_dict(self.unet, state, adapter_name="default")
        except RuntimeError as e:
            raise ValueError(f"LoRA weights in {file} do not fit these adapters (rank?): {e}") from e
        for n, prm in self.unet.named_parameters():
            if "lora_" in n:
                prm.data = prm.data.float()

    # -- the Backbone interface ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def make_scheduler(self) -> Any:
        """A fresh scheduler of the class and config saved in scheduler/scheduler_config.json."""
        import diffusers

        config = dict(self.scheduler_config)
        cls = getattr(diffusers, config["_class_name"], None)
        if cls is None:
            raise ValueError(f"unknown scheduler class {config['_class_name']!r} in {self.pretrained_path}")
        return cls.from_config(config)

    @torch.no_grad()
    def _embed(self, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(
            [str(p) for p in prompts],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0].float()

    def encode_condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """{"prompt": [str, ...]} → {"encoder_hidden_states": (B, L, D) float32}, the last hidden state of
        the frozen text encoder (run without gradient)."""
        prompts = batch.get("prompt")
        if prompts is None:
            raise KeyError(
                f"StableDiffusionBackbone needs text prompts under 'prompt'; got keys {sorted(batch)}"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        return {"encoder_hidden_states": self._embed(prompts)}

    def null_condition(self, cond: Cond) -> dict[str, Tensor]:
        """The empty-prompt embedding repeated to the batch size."""
        hs = cond["encoder_hidden_states"]
        key = (str(hs.device), hs.dtype)
        if key not in self._null_cache:
            self._null_cache = {key: self._embed([""]).to(device=hs.device, dtype=hs.dtype)}
        return {"encoder_hidden_states": self._null_cache[key].expand(hs.shape[0], -1, -1)}

    def init_noise(self, cond: Cond, generator: Generator = None) -> tuple[Tensor, Tensor | None]:
        """Standard-normal latents (B, C, resolution/f, resolution/f), float32."""
        b = cond["encoder_hidden_states"].shape[0]
        shape = (b, self.latent_channels, self.latent_size, self.latent_size)
        return randn(shape, generator, device=self.device), None

    def denoise(self, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None = None) -> Tensor:
        """unet(x_t, t, encoder_hidden_states).sample as float32 (ε or v, per `prediction_type`)."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        dtype = self.unet.conv_in.weight.dtype  # float32, or a LoRA wrapper's bfloat16 base
        hs = cond["encoder_hidden_states"].to(dtype)
        x = x_t.to(dtype, memory_format=torch.channels_last) if self.channels_last else x_t.to(dtype)
        return self.unet(x, t, encoder_hidden_states=hs).sample.float().contiguous()

    def decode(self, x0: Tensor, mask: Tensor | None = None, **request: Any) -> Tensor:
        """Latents → images float32 (B, 3, H, W) in [0, 1]: vae.decode(z / scaling + shift), then x/2 + ½.

        Differentiable with respect to the latents (the VAE is frozen, not detached). `SampleView` calls it
        `decode_chunk_size` rows at a time (set it to bound the VAE's memory). No decode options.
        """
        request.pop("generator", None)
        if request:
            raise ValueError(f"StableDiffusionBackbone.decode takes no options, got {sorted(request)}")
        z = x0.to(self.frozen_dtype) / self.scaling_factor + self.shift_factor
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        images = self.vae.decode(z).sample.float().contiguous()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode(self, samples: Tensor) -> tuple[Tensor, None]:
        """Images (B, 3, H, W) in [0, 1] → (latents ((posterior mean or sample) − shift) × scaling, None).

        `encode_mode="mean"` (default) is deterministic: decode(encode(x)) is the VAE reconstruction.
        `encode_mode="sample"` draws from the posterior with torch's global RNG (what SD training does).
        """
        x = samples.to(self.device, self.frozen_dtype) * 2 - 1
        dist = self.vae.encode(x).latent_dist
        z = dist.mean if self.encode_mode == "mean" else dist.sample()
        return ((z.float() - self.shift_factor) * self.scaling_factor).float(), None

    def lora_target(self) -> nn.Module:
        """LoRA adapters go into the UNet (never the VAE or the text encoder)."""
        return self.unet

    def train(self, mode: bool = True) -> StableDiffusionBackbone:
        """Only the UNet changes mode; the frozen VAE and text encoder stay in eval mode."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self


# ---------------------------------------------------------------------------------------------------
# A tiny random-weight pipeline folder (tests, CPU smoke runs)
# ---------------------------------------------------------------------------------------------------
_TINY_WORDS = (  # noqa: SIM905 - a word list reads best as text
    "a photo of an the cat dog horse bird fish car tree house red blue green small large painting "
    "cute happy old man woman child in on with beach forest city"
).split()


def tiny_clip_vocab(model_max_length: int = 77) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-BPE vocabulary (special tokens, letters, a few words with their merges)."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    return vocab, list(dict.fromkeys(merges))


def make_tiny_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Any:
    """Build a tiny CLIPTokenizer in code, assert its size, save it to `folder` (also vocab.json/merges.txt).

    Built as CLIPTokenizer(vocab=dict, merges=list): transformers 5 silently ignores vocab_file/merges_file.
    """
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    assert len(tok) == len(vocab), f"tiny CLIP tokenizer has {len(tok)} tokens, expected {len(vocab)}"
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and vocab["cat</w>"] in ids, f"tiny tokenizer is broken: {ids}"
    folder = Path(folder)
    tok.save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return tok


def make_tiny_sd_pipeline(
    path: str | Path,
    seed: int = 0,
    vae_blocks: int = 2,
    scheduler: Literal["pndm", "ddim"] = "pndm",
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
) -> Path:
    """Write a tiny random-weight Stable Diffusion folder (same layout and classes as SD 1.5) to `path`.

    UNet2DConditionModel with block_out_channels (8, 16), AutoencoderKL with `vae_blocks` blocks of 8
    channels (latent factor 2^(vae_blocks−1)), a 2-layer CLIPTextModel of width 16, a tiny in-code
    CLIP tokenizer, and SD 1.5's scheduler config (PNDM, or DDIM). A few MB; builds in about a second.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = make_tiny_clip_tokenizer(path / "tokenizer")
    hidden = 16
    text_config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        projection_dim=hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(text_config).save_pretrained(str(path / "text_encoder"))
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=2,
        norm_num_groups=4,
    ).save_pretrained(str(path / "unet"))
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        block_out_channels=(8,) * vae_blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.18215,
    ).save_pretrained(str(path / "vae"))
    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if scheduler == "pndm":
        PNDMScheduler(skip_prk_steps=True, **common).save_pretrained(str(path / "scheduler"))
    else:
        DDIMScheduler(clip_sample=False, **common).save_pretrained(str(path / "scheduler"))
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler"}[scheduler]],
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    return path


__all__ = [
    "StableDiffusionBackbone",
    "load_clip_tokenizer",
    "make_tiny_clip_tokenizer",
    "make_tiny_sd_pipeline",
    "require_folder",
]

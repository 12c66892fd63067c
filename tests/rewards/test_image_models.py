"""Learned image rewards on random-weight instances of their architectures (tiny configs, local folders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffalign.core.types import Cond
from diffalign.modalities.image.stable_diffusion import (
    load_clip_tokenizer,
    make_tiny_clip_tokenizer,
)
from diffalign.rewards.image_models import (
    AestheticMLP,
    ClipImagePreprocess,
    CLIPScore,
    HPSv2,
    ImageReward,
    LaionAesthetic,
    PickScore,
    open_clip_to_hf_clip,
)
from tests.helpers import make_tiny_clip_folder

PROMPTS = ["a photo of a cat", "a red car", "a small house"]
IMAGE_SIZE, PROJ = 32, 12


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    return make_tiny_clip_folder(folder, seed, image_size=IMAGE_SIZE, projection_dim=PROJ)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="module")
def head_path(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("head") / "aesthetic_head.pth"
    torch.save(AestheticMLP(PROJ).state_dict(), path)
    return path


@pytest.fixture
def images() -> torch.Tensor:
    """Non-square, larger than the CLIP input: exercises resize and centre crop."""
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def square() -> torch.Tensor:
    """Exactly the CLIP input size: preprocessing is normalisation only (exact comparisons)."""
    return torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def _reference_features(
    clip, tokenizer, images: torch.Tensor, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image/text features through transformers' own get_*_features and CLIPImageProcessor.

    Images must already be IMAGE_SIZE square: the processor then only normalises, so the comparison is exact.
    """
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    assert images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    pixels = proc(
        images=list(images.numpy().transpose(0, 2, 3, 1)),
        do_rescale=False,
        do_resize=False,
        do_center_crop=False,
        return_tensors="pt",
    )
    tok = tokenizer(prompts, padding=True, return_tensors="pt")

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        img = feats(clip.get_image_features(pixel_values=pixels.pixel_values))
        txt = feats(clip.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


# ---------------------------------------------------------------------------------------------------
def test_preprocess_matches_shapes_and_clip_processor(images):
    from transformers import CLIPImageProcessor

    pre = ClipImagePreprocess(IMAGE_SIZE)
    out = pre(images)
    assert out.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    proc = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    ref = proc(images=list(images.numpy().transpose(0, 2, 3, 1)), do_rescale=False, return_tensors="pt")
    # PIL's bicubic resize vs torch's antialiased bicubic: close, not bit-equal
    assert (out - ref.pixel_values).abs().mean() < 0.05
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        pre(torch.rand(2, 32, 32))


def test_laion_aesthetic_scores_differentiably(clip_path, head_path, images, square):
    reward = LaionAesthetic(str(clip_path), str(head_path))
    assert reward.differentiable and reward.name == "aesthetic"
    assert not any(p.requires_grad for p in reward.parameters())
    assert reward.clip.clip.text_model is None  # image-only: the text tower is dropped
    x = images.clone().requires_grad_(True)
    scores = reward(x, {}).scores
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    # the same score by hand: CLIP image features -> L2 norm -> the head
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(clip_path), local_files_only=True).eval()
    img, _ = _reference_features(clip, load_clip_tokenizer(clip_path), square, PROMPTS)
    head = AestheticMLP(PROJ).eval()
    head.load_state_dict(torch.load(head_path, weights_only=True))
    with torch.no_grad():
        expected = head(img)
    assert torch.allclose(reward(square, {}).scores, expected, atol=1e-5)


def test_laion_aesthetic_reads_safetensors_and_rejects_bad_files(clip_path, head_path, tmp_path, images):
    from safetensors.torch import save_file

    state = torch.load(head_path, weights_only=True)
    st = tmp_path / "head.safetensors"
    save_file(state, str(st))
    a = LaionAesthetic(str(clip_path), str(head_path))(images, {}).scores
    b = LaionAesthetic(str(clip_path), str(st))(images, {}).scores
    assert torch.equal(a, b)

    with pytest.raises(FileNotFoundError, match="head: file not found: .*missing.pth"):
        LaionAesthetic(str(clip_path), str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="CLIP model: folder not found: .*no_clip"):
        LaionAesthetic(str(tmp_path / "no_clip"), str(head_path))
    wrong = tmp_path / "wrong.pth"
    torch.save(AestheticMLP(768).state_dict(), wrong)
    with pytest.raises(RuntimeError, match="does not fit the MLP on 12-d CLIP embeddings"):
        LaionAesthetic(str(clip_path), str(wrong))


def test_pickscore_is_scaled_cosine_and_reads_prompts_from_cond(clip_path, images, square):
    reward = PickScore(str(clip_path))
    x = images.clone().requires_grad_(True)
    out = reward(x, {"prompt": PROMPTS})
    assert out.scores.shape == (3,) and torch.isfinite(out.scores).all()
    out.scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    img, txt = _reference_features(reward.clip, reward.tokenizer, square, PROMPTS)
    expected = reward.clip.logit_scale.exp() * (img * txt).sum(-1)
    assert torch.allclose(reward(square, {"prompt": PROMPTS}).scores, expected, atol=1e-4)
    # a backbone's Cond (tensors beside the prompt metadata) gives the same scores
    via_cond = reward(images, Cond({"prompt": PROMPTS, "encoder_hidden_states": torch.zeros(3, 1)}))
    assert torch.allclose(via_cond.scores, out.scores.detach())
    # the prompt matters
    swapped = reward(images, {"prompt": PROMPTS[::-1]}).scores
    assert not torch.allclose(swapped, out.scores.detach())

    # bfloat16 weights (half the memory on a GPU): float32 scores near the float32 ones
    half = PickScore(str(clip_path), dtype="bfloat16")
    assert half.clip.visual_projection.weight.dtype == torch.bfloat16
    scores16 = half(square, {"prompt": PROMPTS}).scores
    assert scores16.dtype == torch.float32 and torch.allclose(scores16, expected, atol=0.3)
    with pytest.raises(ValueError, match="dtype must be one of"):
        PickScore(str(clip_path), dtype="float64")

    with pytest.raises(KeyError, match="prompt text"):
        reward(images, {"encoder_hidden_states": torch.zeros(3)})
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        reward(images, {"prompt": PROMPTS[:2]})


def test_clipscore_is_clipped_weighted_cosine(clip_path, images, square):
    reward = CLIPScore(str(clip_path))
    out = reward(square, {"prompt": PROMPTS})
    cos = out.info["cosine"]
    assert torch.allclose(out.scores, 2.5 * cos.clamp_min(0))
    assert ((out.scores >= 0) & (out.scores <= 2.5)).all()
    img, txt = _reference_features(reward.clip, reward.tokenizer, square, PROMPTS)
    assert torch.allclose(cos, (img * txt).sum(-1), atol=1e-5)
    prefixed = CLIPScore(str(clip_path), weight=1.0, prompt_prefix="a photo of ")
    p = prefixed(images, {"prompt": PROMPTS}).info["cosine"]
    q = CLIPScore(str(clip_path))(images, {"prompt": ["a photo of " + s for s in PROMPTS]}).info["cosine"]
    assert torch.allclose(p, q)


def test_clip_rewards_name_a_missing_or_incomplete_folder(tmp_path, clip_path):
    with pytest.raises(FileNotFoundError, match="PickScore model: folder not found: .*nothing is downloaded"):
        PickScore(str(tmp_path / "PickScore_v1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        CLIPScore(str(tmp_path / "empty"))


def random_open_clip_state(vocab: int, width: int = 16, layers: int = 1, seed: int = 0) -> dict:
    """A random state dict in open_clip's ViT CLIP layout (the layout of HPS_v2_compressed.pt)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return 0.2 * torch.randn(*shape, generator=g)

    state = {
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(17, width),  # (32 / 8)^2 patches + class token
        "visual.conv1.weight": r(width, 3, 8, 8),
        "visual.proj": r(width, PROJ),
        "token_embedding.weight": r(vocab, width),
        "positional_embedding": r(77, width),
        "text_projection": r(width, PROJ),
        "logit_scale": torch.tensor(4.6),
    }
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        state[f"{ln}.weight"], state[f"{ln}.bias"] = 1 + r(width), r(width)
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks."):
        for i in range(layers):
            b = f"{prefix}{i}."
            for ln in ("ln_1", "ln_2"):
                state[f"{b}{ln}.weight"], state[f"{b}{ln}.bias"] = 1 + r(width), r(width)
            state[f"{b}attn.in_proj_weight"], state[f"{b}attn.in_proj_bias"] = (
                r(3 * width, width),
                r(3 * width),
            )
            state[f"{b}attn.out_proj.weight"], state[f"{b}attn.out_proj.bias"] = r(width, width), r(width)
            state[f"{b}mlp.c_fc.weight"], state[f"{b}mlp.c_fc.bias"] = r(2 * width, width), r(2 * width)
            state[f"{b}mlp.c_proj.weight"], state[f"{b}mlp.c_proj.bias"] = r(width, 2 * width), r(width)
    return state


def test_hpsv2_scores_cosine_of_the_converted_open_clip_model(tmp_path, images, square):
    tok = make_tiny_clip_tokenizer(tmp_path / "tokenizer")
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in random_open_clip_state(len(tok)).items()}}, ckpt)
    reward = HPSv2(str(ckpt), str(tmp_path / "tokenizer"), vision_heads=2, text_heads=2)
    assert reward.differentiable and not any(p.requires_grad for p in reward.parameters())
    x = images.clone().requires_grad_(True)
    scores = reward(x, {"prompt": PROMPTS}).scores
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-6).all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    img, txt = _reference_features(reward.clip, reward.tokenizer, square, PROMPTS)
    assert torch.allclose(reward(square, {"prompt": PROMPTS}).scores, (img * txt).sum(-1), atol=1e-5)

    with pytest.raises(FileNotFoundError, match="HPSv2 checkpoint: file not found: .*HPS_v2.1"):
        HPSv2(str(tmp_path / "HPS_v2.1_compressed.pt"), str(tmp_path / "tokenizer"))
    with pytest.raises(FileNotFoundError, match="HPSv2 tokenizer: folder not found"):
        HPSv2(str(ckpt), str(tmp_path / "no_tokenizer"))
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an open_clip ViT CLIP state dict"):
        HPSv2(str(tmp_path / "other.pt"), str(tmp_path / "tokenizer"))


def test_open_clip_conversion_matches_open_clip():
    """The converted CLIPModel computes open_clip's own features (runs where open_clip is importable)."""
    open_clip_model = pytest.importorskip("open_clip.model")
    torch.manual_seed(0)
    oc = open_clip_model.CLIP(
        embed_dim=PROJ,
        vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32, mlp_ratio=2),
        text_cfg=dict(context_length=77, vocab_size=200, width=64, heads=2, layers=2, mlp_ratio=2),
    ).eval()
    with torch.no_grad():
        for p in oc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = open_clip_to_hf_clip(oc.state_dict(), vision_heads=2, text_heads=2)
    x = torch.randn(3, 3, 32, 32)
    ids = torch.zeros(3, 77, dtype=torch.long)
    for i, n in enumerate([5, 9, 3]):  # start token, random tokens, end-of-text = the largest id (199)
        ids[i, 0], ids[i, 1:n], ids[i, n] = 198, torch.randint(1, 190, (n - 1,)), 199
    with torch.no_grad():
        img = hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)
        txt = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
        assert torch.allclose(img, oc.encode_image(x), atol=1e-5)
        assert torch.allclose(txt, oc.encode_text(ids), atol=1e-5)
        assert torch.allclose(hf.logit_scale, oc.logit_scale)


def test_unavailable_rewards_say_why(tmp_path):
    with pytest.raises(NotImplementedError, match="image-reward"):
        ImageReward(str(tmp_path / "ImageReward.pt"))

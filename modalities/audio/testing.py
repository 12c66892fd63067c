"""Tiny audio backbones built in code (random weights) for contract tests: a few thousand parameters,
clips of two notes at most, a handful of Griffin–Lim iterations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.modalities.audio.backbone import MelBackbone, WaveformBackbone

TINY_MEL: dict[str, Any] = {
    "note_samples": 512,
    "max_notes": 2,
    "n_mels": 8,
    "griffin_lim_iters": 4,
    "block_out_channels": (8, 16),
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "embed_dim": 8,
    "roll_channels": 2,
}
TINY_WAVE: dict[str, Any] = {
    "note_samples": 256,
    "max_notes": 2,
    "block_out_channels": (8, 8, 32),
    "embed_dim": 8,
    "cond_channels": 4,
}


def tiny_mel_backbone(**overrides: Any) -> MelBackbone:
    """A random-weight `MelBackbone`: 8 mel bands, notes of 512 samples (4 frames), two notes at most."""
    return MelBackbone(**{**TINY_MEL, **overrides, "weights": None})


def tiny_wave_backbone(**overrides: Any) -> WaveformBackbone:
    """A random-weight `WaveformBackbone`: notes of 256 samples, two notes at most."""
    return WaveformBackbone(**{**TINY_WAVE, **overrides, "weights": None})


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, RoBERTa) writes bytes as."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def make_tiny_roberta_tokenizer(folder: str | Path | None = None, model_max_length: int = 32) -> Any:
    """A byte-level BPE `RobertaTokenizer` built in code: the special tokens and the 256 byte symbols, no
    merges (every character is a token), so any text tokenizes. Saved to `folder` when given. Built as
    RobertaTokenizer(vocab=dict, merges=list) and its size asserted (transformers 5 ignores file paths)."""
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _byte_symbols():
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    tok = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    assert len(tok) == len(vocab), f"tiny Roberta tokenizer has {len(tok)} tokens, expected {len(vocab)}"
    ids = tok("a C4 note").input_ids
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) == 11, f"tiny tokenizer is broken: {ids}"
    if folder is not None:
        tok.save_pretrained(str(folder))
    return tok


def make_tiny_clap_folder(folder: str | Path, seed: int = 0, sampling_rate: int = 48000) -> Path:
    """A tiny random `ClapModel` (HTSAT audio tower of 2 stages, 16 mel bands; a 1-layer text tower) with
    its tokenizer and `ClapFeatureExtractor`, saved like `ClapProcessor.save_pretrained` (2 s of context)."""
    import torch

    from diffalign.core.extras import require

    require("transformers", "audio", "make_tiny_clap_folder")
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = make_tiny_roberta_tokenizer(folder)
    config = ClapConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=tok.model_max_length + 4, projection_dim=8,
        ),
        audio_config=dict(
            num_mel_bins=16, spec_size=64, window_size=4, patch_size=2, patch_stride=(2, 2), hidden_size=16,
            depths=(1, 1), num_attention_heads=(2, 2), patch_embeds_hidden_size=8, projection_dim=8,
            enable_fusion=False,
        ),
        projection_dim=8,
    )  # fmt: skip
    ClapModel(config).save_pretrained(str(folder))
    ClapFeatureExtractor(
        feature_size=16, sampling_rate=sampling_rate, hop_length=sampling_rate // 100, max_length_s=2,
        fft_window_size=1024, truncation="rand_trunc", padding="repeatpad",
    ).save_pretrained(str(folder))  # fmt: skip
    return folder

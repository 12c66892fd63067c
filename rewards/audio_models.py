"""Learned audio rewards from LOCAL weights: the CLAP text–audio score (transformers' `ClapModel`).

`CLAPScore(clap_path)` loads a CLAP folder as `ClapModel.save_pretrained` writes it, with its
tokenizer and feature extractor (`ClapProcessor.save_pretrained`, e.g. laion/clap-htsat-unfused
downloaded beforehand): config.json + weights, tokenizer files, preprocessor_config.json. Nothing is
downloaded; a missing file raises FileNotFoundError naming it.

The score of a clip is the cosine similarity of CLAP's (normalised) audio and text embeddings, times
`scale` (CLAP's logit scale is about 100 when trained; the default 1 keeps cosines in [−1, 1]). The
reward asks `decode` for the feature extractor's sample rate (48 kHz for LAION CLAP) through its
decode request, so clips reach the feature extractor at the rate it was trained at; each clip is cut to
its real length first. The text is the prompt of each row (`cond["prompt"]`; a dict prompt is written
out as its canonical text). Not differentiable (the feature extractor works in numpy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffalign.core.extras import require
from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import Cond
from diffalign.rewards.audio import AUDIO_READER, as_audio

require("transformers", "audio", "diffalign.rewards.audio_models")


def _require(folder: Path, names: list[str], what: str) -> None:
    present = {p.name for p in folder.iterdir()}
    for name in names:
        if not any((n.endswith(name) if name.startswith(".") else n == name) for n in present):
            raise FileNotFoundError(f"{what}: {folder} has no {name} (nothing is downloaded)")


def load_clap(folder: str | Path) -> tuple[Any, Any, Any]:
    """(ClapModel frozen in eval mode, tokenizer, ClapFeatureExtractor) from a local folder."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"CLAP model: folder not found: {p} (give a local path; nothing is downloaded)"
        )
    _require(p, ["config.json", "preprocessor_config.json"], "CLAP model")
    if not any(f.suffix in (".safetensors", ".bin") for f in p.iterdir()):
        raise FileNotFoundError(f"CLAP model: {p} has no *.safetensors / *.bin weights")
    model = ClapModel.from_pretrained(str(p), local_files_only=True).requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if len(tokenizer) < 4:
        raise ValueError(
            f"the tokenizer in {p} loaded with {len(tokenizer)} tokens: its files are not usable"
        )
    features = ClapFeatureExtractor.from_pretrained(str(p), local_files_only=True)
    return model, tokenizer, features


class CLAPScore(Reward):
    """Cosine similarity of CLAP audio and text embeddings × `scale` (see the module docstring).

    Args:
        clap_path: a LOCAL folder with the CLAP model, its tokenizer and its feature extractor.
        scale: multiplies the cosine.
        template: how a prompt becomes text ("{}" uses it as is; e.g. "the sound of {}").
    """

    reader = AUDIO_READER

    def __init__(
        self, clap_path: str, scale: float = 1.0, template: str = "{}", name: str | None = None
    ) -> None:
        model, tokenizer, features = load_clap(clap_path)
        super().__init__(name or "clap_score", request={"sample_rate": int(features.sampling_rate)})
        self.model, self.tokenizer, self.features = model, tokenizer, features
        self.scale, self.template = scale, template

    def texts(self, cond: Cond, n: int) -> list[str]:
        from diffalign.modalities.audio.prompts import parse_prompt

        prompts = cond.get("prompt") if cond is not None else None
        if prompts is None or len(prompts) != n:
            raise KeyError(
                f"{self.name} scores audio against its prompt: it needs cond['prompt'] (one per sample)"
            )
        return [self.template.format(p if isinstance(p, str) else parse_prompt(p).text()) for p in prompts]

    @torch.no_grad()
    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        audio = as_audio(samples, self.name)
        rate = int(self.features.sampling_rate)
        if audio.sample_rate != rate:
            from diffalign.modalities.audio.layout import resample

            audio = resample(audio, rate)
        clips = [c.mean(0).cpu().numpy() for c in audio.clips()]
        feats = self.features(clips, sampling_rate=rate, return_tensors="pt")
        text = self.tokenizer(self.texts(cond, len(audio)), padding=True, return_tensors="pt")
        device = audio.audio.device
        self.model.to(device)
        out = self.model(
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
            input_features=feats["input_features"].to(device),
            is_longer=feats.get("is_longer", torch.zeros(len(clips), 1, dtype=torch.bool)).to(device),
        )
        cosine = (out.audio_embeds * out.text_embeds).sum(-1)
        return RewardOutput(scores=self.scale * cosine.float(), info={"clap_cosine": cosine.float()})

"""Audio modality: synthesized notes and melodies, mel-spectrogram and waveform diffusion.

Sample layout (what `decode` returns, what audio rewards take): `AudioSamples` — audio float
(B, C, L) in [−1, 1] (mono, C = 1), lengths (B,) (padding explicit, zero), sample_rate in Hz (8 kHz
for the embedded models). Condition: an audio prompt, text ("a C4 square note, quiet") or a dict
(`parse_prompt`). `MelBackbone` diffuses 32-band log-mel spectrograms with a diffusers
`UNet2DConditionModel` and decodes them with a fixed Griffin–Lim inverse; `WaveformBackbone` diffuses
waveforms with a diffusers `UNet1DModel`. `AudioLDMBackbone` runs the same recipes on an AudioLDM
pipeline from a local diffusers folder (LoRA through peft).
"""

from diffalign.core.extras import require

require("torchaudio", "audio", "diffalign.modalities.audio")  # mel transforms, Griffin-Lim, resampling
require("soundfile", "audio", "diffalign.modalities.audio")  # WAV/FLAC I/O
require("pyloudnorm", "audio", "diffalign.modalities.audio")  # ITU-R BS.1770 loudness
require("scipy", "audio", "diffalign.modalities.audio")  # the plucked-string filter

from diffalign.modalities.audio.backbone import (  # noqa: E402
    MEL_BASE_WEIGHTS,
    WAVE_BASE_WEIGHTS,
    AudioBackbone,
    MelBackbone,
    WaveformBackbone,
)
from diffalign.modalities.audio.data import AudioDataModule, make_clips, note_prompts  # noqa: E402
from diffalign.modalities.audio.layout import AudioSamples, apply_request, crop_window, resample  # noqa: E402
from diffalign.modalities.audio.mel import MelCodec  # noqa: E402
from diffalign.modalities.audio.prompts import (  # noqa: E402
    LOUDNESS,
    LOUDNESS_LUFS,
    NOTES,
    TIMBRES,
    AudioPrompt,
    audio_prompt,
    note_frequency,
    parse_prompt,
)
from diffalign.modalities.audio.synth import NOTE_SAMPLES, SAMPLE_RATE, synthesize  # noqa: E402

_LAZY = {  # AudioLDM pulls in transformers: imported on first use only
    "AudioLDMBackbone": "diffalign.modalities.audio.audioldm",
    "make_tiny_audioldm_pipeline": "diffalign.modalities.audio.audioldm",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffalign.modalities.audio' has no attribute {name!r}")


__all__ = [
    "LOUDNESS",
    "LOUDNESS_LUFS",
    "MEL_BASE_WEIGHTS",
    "NOTES",
    "NOTE_SAMPLES",
    "SAMPLE_RATE",
    "TIMBRES",
    "WAVE_BASE_WEIGHTS",
    "AudioBackbone",
    "AudioDataModule",
    "AudioLDMBackbone",
    "AudioPrompt",
    "AudioSamples",
    "MelBackbone",
    "MelCodec",
    "WaveformBackbone",
    "apply_request",
    "audio_prompt",
    "crop_window",
    "make_clips",
    "make_tiny_audioldm_pipeline",
    "note_frequency",
    "note_prompts",
    "parse_prompt",
    "resample",
    "synthesize",
]

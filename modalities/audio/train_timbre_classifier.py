"""Train the small timbre classifier behind the `TimbreFidelity` reward (sine, square, sawtooth, plucked).

    python -m diffalign.modalities.audio.train_timbre_classifier [--epochs 12] [--seed 0]

Trains on synthesized clips of 1–3 notes at random pitches (110–1000 Hz, continuous, wider than the
embedded models' C4–C5), random levels (−40 … −12 LUFS) and the four timbres; half of the clips go
through the mel model's Griffin–Lim round trip (`mel.MelCodec`) and some get noise, so that the
classifier judges decoded samples of both audio backbones, not only clean synthesis. Reports accuracy
on held-out clips at the embedded notes, clean and round-tripped. Writes
`modalities/audio/timbre_classifier.safetensors` and `modalities/audio/timbre_classifier.json`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.modalities.audio.prompts import NOTES, TIMBRES
from diffalign.modalities.audio.synth import NOTE_SAMPLES, SAMPLE_RATE, envelope, oscillator

CLASSIFIER_WEIGHTS = "pkg://diffalign.modalities.audio/timbre_classifier.safetensors"
HERE = Path(__file__).resolve().parent


class TimbreClassifier(nn.Module):
    """A three-layer CNN over a level-normalised log-mel spectrogram (40 bands, 50 Hz–4 kHz at 8 kHz).

    `forward(audio (B, C, L), sample_rate, lengths=None)` takes the audio sample layout's fields (clips
    at another rate are resampled to 8 kHz, channels averaged), normalises each clip to its loudest
    bin (so the level does not matter), pools over the real frames and returns logits (B, 4) in the order
    of `prompts.TIMBRES`. Differentiable.
    """

    sample_rate = SAMPLE_RATE
    hop = 128

    def __init__(self) -> None:
        super().__init__()
        import torchaudio

        # a list keeps the fixed filterbank out of the weights
        mel = torchaudio.transforms.MelSpectrogram(
            self.sample_rate, n_fft=512, hop_length=self.hop, n_mels=40, f_min=50.0, f_max=4000.0, power=2.0
        )
        self._mel = [mel]
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(32, len(TIMBRES))

    def forward(self, audio: Tensor, sample_rate: int, lengths: Tensor | None = None) -> Tensor:
        x = audio.float()
        x = x.mean(1) if x.dim() == 3 else x
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[-1], device=x.device)
        if sample_rate != self.sample_rate:
            import torchaudio

            x = torchaudio.functional.resample(x, sample_rate, self.sample_rate)
            lengths = (lengths.double() * self.sample_rate / sample_rate).round().long()
        frames = -(-lengths.to(x.device) // self.hop)
        power = self._mel[0].to(x.device)(x)[..., : max(1, -(-x.shape[-1] // self.hop))]  # (B, 40, T)
        t = power.shape[-1]
        valid = (torch.arange(t, device=x.device)[None] < frames[:, None]).float()  # (B, T)
        db = 10 * torch.log10(power + 1e-10)
        top = torch.where(valid[:, None] > 0, db, torch.full_like(db, -1e9)).amax((1, 2), keepdim=True)
        h = ((db - top).clamp(min=-80.0) / 40.0 + 1.0) * valid[:, None]
        h = self.features(h[:, None])  # (B, 32, 40/4, T/4)
        pooled_valid = F.max_pool1d(valid[:, None], 4, ceil_mode=False)[:, 0][:, : h.shape[-1]]
        if pooled_valid.shape[-1] < h.shape[-1]:
            pooled_valid = F.pad(pooled_valid, (0, h.shape[-1] - pooled_valid.shape[-1]))
        w = pooled_valid[:, None, None, :]
        pooled = (h * w).sum((2, 3)) / (w.sum((2, 3)) * h.shape[2]).clamp_min(1.0)
        return self.head(pooled)


def load_classifier(weights: str = CLASSIFIER_WEIGHTS) -> TimbreClassifier:
    """The classifier with weights (path or pkg:// spec), frozen, in eval mode."""
    from diffalign.core.io import load_state_dict

    model = TimbreClassifier()
    load_state_dict(model, weights)
    return model.requires_grad_(False).eval()


def random_clip(generator: torch.Generator, timbre: str) -> Tensor:
    """1–3 notes of `timbre` at random pitches (110–1000 Hz) and a random level, (1, L) float32."""
    k = int(torch.randint(1, 4, (), generator=generator))
    notes = []
    for _ in range(k):
        f0 = math.exp(math.log(110.0) + float(torch.rand((), generator=generator)) * math.log(1000.0 / 110.0))
        notes.append(
            oscillator(timbre, f0, NOTE_SAMPLES, SAMPLE_RATE, generator) * envelope(NOTE_SAMPLES, SAMPLE_RATE)
        )
    x = torch.cat(notes)[None]
    gain_db = -40.0 + 28.0 * float(torch.rand((), generator=generator))  # −40 … −12 dB RMS
    x = x / x.pow(2).mean().sqrt().clamp_min(1e-9) * 10 ** (gain_db / 20)
    return x.clamp(-1, 1).float()


def make_set(n: int, seed: int, round_trip: float = 0.5, noise: float = 0.3) -> tuple[list[Tensor], Tensor]:
    """n random clips (timbres cycling) with Griffin–Lim round trips and noise at the given rates."""
    from diffalign.modalities.audio.mel import MelCodec

    codec = MelCodec(f_max=2500.0)
    g = torch.Generator().manual_seed(seed)
    clips, labels = [], []
    for i in range(n):
        label = i % len(TIMBRES)
        x = random_clip(g, TIMBRES[label])
        if float(torch.rand((), generator=g)) < round_trip:
            x = codec.decode(codec.encode(x[None]))[0]
        if float(torch.rand((), generator=g)) < noise:
            snr_db = 10.0 + 30.0 * float(torch.rand((), generator=g))
            x = x + torch.randn(x.shape, generator=g) * x.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)
        clips.append(x.clamp(-1, 1))
        labels.append(label)
    return clips, torch.tensor(labels)


def heldout_set(round_trip: bool, seed: int = 1) -> tuple[list[Tensor], Tensor]:
    """One clip per (embedded note, timbre, level) × 2 phases, clean or through Griffin–Lim."""
    from diffalign.modalities.audio.mel import MelCodec
    from diffalign.modalities.audio.prompts import LOUDNESS
    from diffalign.modalities.audio.synth import synthesize

    codec = MelCodec(f_max=2500.0)
    g = torch.Generator().manual_seed(seed)
    clips, labels = [], []
    for t, timbre in enumerate(TIMBRES):
        for note in NOTES:
            for level in LOUDNESS:
                for _ in range(2):
                    x = synthesize(f"a {note} {timbre} note, {level}", generator=g)
                    clips.append(codec.decode(codec.encode(x[None]))[0] if round_trip else x)
                    labels.append(t)
    return clips, torch.tensor(labels)


def _batch(clips: list[Tensor]) -> tuple[Tensor, Tensor]:
    from diffalign.core.functional import pad_stack

    audio, _ = pad_stack(clips, axis=1)
    return audio, torch.tensor([c.shape[-1] for c in clips])


def accuracy(model: nn.Module, clips: list[Tensor], labels: Tensor) -> float:
    with torch.no_grad():
        audio, lengths = _batch(clips)
        return (model(audio, SAMPLE_RATE, lengths).argmax(-1) == labels).float().mean().item()


def train(
    epochs: int = 12, seed: int = 0, num_clips: int = 3000, batch_size: int = 64, lr: float = 3e-3
) -> tuple[TimbreClassifier, dict]:
    """Train on freshly synthesized clips; returns the model and a report with held-out accuracies."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    clips, labels = make_set(num_clips, seed)
    model = TimbreClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-num_clips // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(num_clips, generator=g).tolist()
        for s in range(0, num_clips, batch_size):
            idx = perm[s : s + batch_size]
            audio, lengths = _batch([clips[i] for i in idx])
            loss = F.cross_entropy(model(audio, SAMPLE_RATE, lengths), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    clean, clean_y = heldout_set(False)
    rt, rt_y = heldout_set(True)
    report = {
        "train_accuracy": round(accuracy(model, clips[:1000], labels[:1000]), 4),
        "heldout_accuracy": round(accuracy(model, clean, clean_y), 4),
        "heldout_accuracy_griffin_lim": round(accuracy(model, rt, rt_y), 4),
        "train_clips": num_clips,
        "heldout_clips": len(clean),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "sample_rate": SAMPLE_RATE,
        "timbres": list(TIMBRES),
    }
    return model, report


def main(argv: list[str] | None = None) -> None:
    from diffalign.core.io import save_state_dict, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "timbre_classifier.safetensors"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, report = train(args.epochs, args.seed)
    out = save_state_dict(model, args.out)
    write_json(Path(args.out).with_suffix(".json"), report)
    print(f"held-out accuracy {report['heldout_accuracy']:.4f} clean, "
          f"{report['heldout_accuracy_griffin_lim']:.4f} after Griffin-Lim; wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()

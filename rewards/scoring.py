"""`diffalign score` with the project's short names: a small table, like TRL's reward-name dict.

A short name stands for a `Reward` class and its init args (`-r qed`), or a reader (`--reader image`);
everything else is reached by class path (`-r diffalign.rewards.image.DigitFidelity`,
`--reader mypkg.io.MyReader`). This table only holds strings: it imports nothing. Add a row here for a
new reward or reader that deserves a short name.

Molecule rewards score invalid molecules NaN here (`invalid_value=nan`), so the output leaves their
cells empty and names the reason in the error column; `validity` keeps 0 (the score of an invalid
molecule). Training uses the same classes with the same defaults otherwise: `sa` is SAScore's
(10 − SA)/9 in [0, 1] and `mmff_energy` is MMFFEnergy's minus the MMFF94 energy per atom, both higher
is better.

    from diffalign.rewards.scoring import score_file
    rows = score_file("mols.smi", "qed,sa")                            # list of row dicts
    rows = score_file("digits/", "digit_fidelity", prompts="labels.csv")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffalign.core.score import ScoreNames, ShortName
from diffalign.core.score import iter_score_file as _iter_score_file
from diffalign.core.score import main as _main

NAN = float("nan")
_MOL = "diffalign.rewards.molecule."
_IMG = "diffalign.rewards.image."
_VID = "diffalign.rewards.video."
_S3D = "diffalign.rewards.shape3d."

_AUD = "diffalign.rewards.audio."

REWARDS: dict[str, ShortName] = {
    # molecules (RDKit): SMILES, SDF, CSV/Parquet tables
    "validity": ShortName(_MOL + "Validity", {"invalid_value": 0.0}),
    "qed": ShortName(_MOL + "QED", {"invalid_value": NAN}),
    "sa": ShortName(_MOL + "SAScore", {"invalid_value": NAN}),
    "logp": ShortName(_MOL + "LogP", {"invalid_value": NAN}),
    "mw": ShortName(_MOL + "MolecularWeight", {"invalid_value": NAN}),
    "lipinski": ShortName(_MOL + "Lipinski", {"invalid_value": NAN}),
    "atom_stability": ShortName(_MOL + "AtomStability", {"invalid_value": NAN}),
    "mol_stability": ShortName(_MOL + "MoleculeStability", {"invalid_value": NAN}),
    "mmff_energy": ShortName(_MOL + "MMFFEnergy", {"invalid_value": NAN}),
    # images: folders of PNG/JPEG
    "digit_fidelity": ShortName(_IMG + "DigitFidelity"),
    "jpeg_kb": ShortName(_IMG + "JpegIncompressibility"),
    "jpeg_compressibility": ShortName(_IMG + "JpegCompressibility"),
    "brightness": ShortName(_IMG + "Brightness"),
    # video: GIFs, .pt clips, folders of frames, a clips/prompts.json manifest
    "temporal_flicker": ShortName(_VID + "TemporalFlicker"),
    "subject_consistency": ShortName(_VID + "SubjectConsistency"),
    "motion_agreement": ShortName(_VID + "MotionAgreement"),
    "frame_digit_fidelity": ShortName(_VID + "FrameDigitFidelity"),
    "motion_classifier": ShortName(_VID + "MotionClassifierReward"),
    # shape3d: folders of .ply/.obj point clouds or meshes (the last two read the prompt)
    "mirror_symmetry": ShortName(_S3D + "MirrorSymmetry"),
    "surface_uniformity": ShortName(_S3D + "SurfaceUniformity"),
    "stability": ShortName(_S3D + "Stability"),
    "view_class_fidelity": ShortName(_S3D + "ViewClassFidelity"),
    "chamfer_to_target": ShortName(_S3D + "ChamferToTarget", {"yaw_steps": 8}),
    # audio: folders of WAV/FLAC/OGG (prompts from prompts.csv or --prompt: "a C4 square note, quiet")
    "pitch_accuracy": ShortName(_AUD + "PitchAccuracy"),
    "loudness_lufs": ShortName(_AUD + "LoudnessLUFS"),
    "rms_loudness": ShortName(_AUD + "RMSLoudness"),
    "spectral_flatness": ShortName(_AUD + "SpectralFlatness"),
    "clipping_ratio": ShortName(_AUD + "ClippingRatio"),
    "noise_floor": ShortName(_AUD + "NoiseFloor"),
    "timbre_fidelity": ShortName(_AUD + "TimbreFidelity"),
}

READERS: dict[str, ShortName] = {
    "molecule": ShortName("diffalign.modalities.molecule.io.MoleculeReader"),
    "image": ShortName("diffalign.modalities.image.io.ImageReader"),
    "video": ShortName("diffalign.modalities.video.io.ClipReader"),
    "shape3d": ShortName("diffalign.modalities.shape3d.io.PointCloudReader"),
    # audio
    "audio": ShortName("diffalign.modalities.audio.io.AudioReader"),
}

NAMES = ScoreNames(rewards=REWARDS, readers=READERS)


def main(argv: Sequence[str] | None = None) -> int:
    """`diffalign score ...` (see `diffalign.core.score.command.main`) with these short names."""
    return _main(argv, names=NAMES)


def iter_score_file(input: Any, rewards: Any = None, **kwargs: Any) -> Any:
    """`diffalign.core.score.iter_score_file` with these short names."""
    return _iter_score_file(input, rewards, names=kwargs.pop("names", NAMES), **kwargs)


def score_file(input: Any, rewards: Any = None, **kwargs: Any) -> list[dict[str, Any]]:
    """All rows of an input as a list (small inputs; `iter_score_file` streams)."""
    return list(iter_score_file(input, rewards, **kwargs))

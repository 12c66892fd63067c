"""What people look at and what `diffalign score` reads: GIF grids, contact sheets, per-clip GIFs, the
before/after callback, clip readers, and the video scoring plugin."""

from types import SimpleNamespace

import pytest
import torch

from diffalign.core.policy import DiffusionPolicy
from diffalign.modalities.video.callbacks import ClipGrid
from diffalign.modalities.video.gifs import ClipGridWriter, contact_sheet, gif_grid
from diffalign.modalities.video.io import iter_clips, read_clip, write_clip_gif, write_clips
from diffalign.modalities.video.testing import tiny_video_backbone


def gray_clip(frames=5, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(frames, 1, size, size, generator=g).expand(-1, 3, -1, -1).clone()
    x[2] = x[1]  # identical consecutive frames: Pillow merges them in the GIF
    return x


def test_gif_round_trip_keeps_every_frame(tmp_path):
    clip = gray_clip()
    path = write_clip_gif(clip, tmp_path / "c.gif")
    back = read_clip(path)
    assert back.shape == clip.shape
    assert (back - clip).abs().max() <= 0.5 / 255 + 1e-6
    static = clip[:1].expand(4, -1, -1, -1)
    assert read_clip(write_clip_gif(static, tmp_path / "s.gif")).shape[0] == 4


def test_frame_folders_tensors_and_errors(tmp_path):
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray((torch.full((4, 5, 3), 40 * i, dtype=torch.uint8)).numpy()).save(
            frames / f"{i:03d}.png"
        )
    clip = read_clip(frames)
    assert clip.shape == (3, 3, 4, 5) and clip[2, 0, 0, 0] == pytest.approx(80 / 255)
    torch.save(torch.rand(2, 1, 4, 4), tmp_path / "t.pt")
    assert read_clip(tmp_path / "t.pt").shape == (2, 3, 4, 4)
    torch.save(torch.rand(2, 4, 4) + 2, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected a clip tensor"):
        read_clip(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        read_clip(tmp_path / "none.gif")


def test_mp4_round_trip_through_pyav(tmp_path):
    """An MP4 written by PyAV (lossless H.264 4:4:4) reads back with every frame; a broken file and a
    video-less container are named."""
    pytest.importorskip("av", reason="PyAV (the video extra) is not installed: MP4 is not exercised")
    from diffalign.modalities.video.io import ClipReader, write_clip_video

    g = torch.Generator().manual_seed(1)
    clip = torch.rand(6, 3, 16, 16, generator=g)
    clip[3] = clip[2]  # identical consecutive frames stay two frames
    path = write_clip_video(clip, tmp_path / "3_left_fast.mp4")
    back = read_clip(path)
    assert back.shape == clip.shape
    assert (back - clip).abs().max() <= 3 / 255  # RGB -> YUV -> RGB rounding only
    assert (back[3] - back[2]).abs().max() <= 1 / 255
    rows = list(iter_clips(tmp_path))
    assert [(r[0], r[2]) for r in rows] == [("3_left_fast.mp4", "3_left_fast")]
    records = list(ClipReader().records(tmp_path))
    assert [r.id for r in records] == ["3_left_fast.mp4"]
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="broken.mp4: not a readable video"):
        read_clip(tmp_path / "broken.mp4")


def test_mp4_without_pyav_names_the_extra(tmp_path, monkeypatch):
    import sys

    from diffalign.core.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ModuleNotFoundError
    (tmp_path / "v.mp4").write_bytes(b"\0")
    with pytest.raises(MissingExtraError, match=r"diffalign\[video\]"):
        read_clip(tmp_path / "v.mp4")


def test_write_clips_and_iter_clips_keep_prompts(tmp_path):
    clips = torch.stack([gray_clip(seed=s) for s in range(3)])
    prompts = ["a 3 moving left, fast", {"digit": 1, "direction": "up", "speed": "slow"}, "a 7"]
    write_clips(clips[:2], tmp_path, prompts[:2])
    write_clips(clips[2:], tmp_path, prompts[2:], start_index=2)
    rows = list(iter_clips(tmp_path))
    assert [r[0] for r in rows] == ["clip_000000.gif", "clip_000001.gif", "clip_000002.gif"]
    assert [r[2] for r in rows] == prompts
    assert all(isinstance(r[1], torch.Tensor) and r[1].shape == (5, 3, 6, 6) for r in rows)
    (tmp_path / "zz_broken.gif").write_bytes(b"GIF89a")
    named = {r[0]: r for r in iter_clips(tmp_path)}
    assert isinstance(named["zz_broken.gif"][1], str) and named["zz_broken.gif"][2] == "zz_broken"


def test_grids_and_contact_sheets():
    rows = [("a 1", torch.rand(2, 5, 3, 6, 6)), ("a 2", torch.rand(1, 5, 3, 6, 6))]
    frames = gif_grid(rows, scale=2, title="t")
    assert len(frames) == 5 and len({f.size for f in frames}) == 1
    sheet = contact_sheet(rows, scale=1)
    assert sheet.size[1] > 3 * 6  # three lines of frames
    with pytest.raises(ValueError, match="one shape"):
        gif_grid([("a", torch.rand(1, 5, 3, 6, 6)), ("b", torch.rand(1, 4, 3, 6, 6))])


def test_clip_grid_writer_accumulates_batches(tmp_path):
    writer = ClipGridWriter(scale=1)
    writer(torch.rand(2, 3, 3, 4, 4), tmp_path, ["p", "q"])
    gif = writer(torch.rand(2, 3, 3, 4, 4), tmp_path, ["p", "q"], start_index=2)
    assert writer.count == 4 and [len(v) for v in writer.rows.values()] == [2, 2]
    assert gif.is_file() and (tmp_path / "samples.png").is_file()


def test_save_samples_writes_grid_sheet_and_scorable_clips(tmp_path):
    from diffalign.rewards.scoring import score_file
    from diffalign.rewards.video import MotionAgreement, TemporalFlicker

    backbone = tiny_video_backbone()
    clips = torch.rand(2, 4, 3, 8, 8)
    clips[1] = clips[1, :1]  # a static clip
    prompts = ["a 3 moving left, fast", "a 5 moving up, slow"]
    backbone.save_samples(clips, tmp_path, prompts)
    assert (tmp_path / "samples.gif").is_file() and (tmp_path / "samples.png").is_file()
    rows = score_file(
        tmp_path / "clips" / "prompts.json", ["temporal_flicker", "motion_agreement"], workers=1
    )
    assert [r["id"] for r in rows] == ["clip_000000.gif", "clip_000001.gif"] and not any(
        r["error"] for r in rows
    )
    back = torch.stack([read_clip(tmp_path / "clips" / r["id"]) for r in rows])
    flicker = TemporalFlicker()(back, {"prompt": prompts}).scores
    motion = MotionAgreement()(back, {"prompt": prompts}).scores
    assert [r["temporal_flicker"] for r in rows] == pytest.approx(flicker.tolist(), abs=1e-5)
    assert [r["motion_agreement"] for r in rows] == pytest.approx(motion.tolist(), abs=1e-5)
    assert rows[1]["temporal_flicker"] == pytest.approx(1.0)


def test_clip_grid_callback_writes_before_and_after(tmp_path):
    backbone = tiny_video_backbone()
    module = SimpleNamespace(policy=DiffusionPolicy(backbone, num_steps=2))
    trainer = SimpleNamespace(
        is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path), global_step=0, loggers=[]
    )
    cb = ClipGrid(prompts=["a 1 moving left, fast", "a 2"], seeds_per_prompt=2, scale=1)
    cb.on_fit_start(trainer, module)
    cb.on_fit_end(trainer, module)
    for name in ("samples_before.gif", "samples_before.png", "samples_after.gif", "samples_after.png"):
        assert (tmp_path / name).is_file(), name
    assert (
        read_clip(tmp_path / "samples_after.gif").shape[0] == backbone.num_frames
    )  # one GIF frame per clip frame

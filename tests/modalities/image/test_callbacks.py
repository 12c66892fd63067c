"""SampleGrid writes labelled before/after grids and logs them to TensorBoard-like loggers."""

from types import SimpleNamespace

import torch
from PIL import Image

from diffalign.core.policy import DiffusionPolicy
from diffalign.modalities.image.callbacks import SampleGrid, image_grid, sample_images
from diffalign.modalities.image.testing import tiny_image_backbone


class _Experiment:
    def __init__(self):
        self.images = []

    def add_image(self, tag, array, global_step=0):
        self.images.append((tag, array.shape, global_step))


def _fake(tmp_path):
    module = SimpleNamespace(policy=DiffusionPolicy(tiny_image_backbone(), num_steps=2))
    exp = _Experiment()
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True, global_step=0,
        loggers=[SimpleNamespace(experiment=exp)],
    )  # fmt: skip
    return trainer, module, exp


def test_sample_grid_writes_before_and_after(tmp_path):
    trainer, module, exp = _fake(tmp_path)
    prompts = ["a handwritten 1", "a handwritten 2", "a handwritten 3"]
    cb = SampleGrid(prompts=prompts, seeds_per_prompt=2, scale=2)
    cb.on_fit_start(trainer, module)
    trainer.global_step = 5
    cb.on_fit_end(trainer, module)
    before, after = Image.open(tmp_path / "samples_before.png"), Image.open(tmp_path / "samples_after.png")
    assert before.size == after.size and before.mode == "RGB"
    assert before.size[1] > 3 * 8 * 2  # three labelled rows of 16-pixel tiles plus a title
    # the weights did not change, so the same prompts and seeds give the same picture
    assert before.tobytes() != Image.new("RGB", before.size, "white").tobytes()
    assert [t for t, _, _ in exp.images] == ["samples/before", "samples/after"]
    assert exp.images[0][1][0] == 3  # CHW


def test_same_seeds_same_samples():
    module = SimpleNamespace(policy=DiffusionPolicy(tiny_image_backbone(), num_steps=2))
    a = sample_images(module, ["a handwritten 4"] * 2, [1, 2])
    b = sample_images(module, ["a handwritten 4"] * 2, [1, 2])
    assert torch.equal(a, b) and a.shape == (2, 3, 8, 8)


def test_image_grid_size():
    grid = image_grid(torch.rand(6, 3, 4, 4), columns=3, row_labels=["x", "y"], scale=1)
    assert grid.size[1] == 2 * (4 + 2) + 2


def test_sample_grids_reach_tensorboard_during_training(tmp_path):
    """A tiny digit run through the CLI: the TensorBoard event file holds the before grid, one grid per
    epoch but the last (every_n_epochs=1), and the after grid."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers import run_fit, tiny_configs

    every_epoch = tmp_path / "every_epoch.yaml"  # the fragment's two callbacks, the grid every epoch
    every_epoch.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: diffalign.modalities.image.callbacks.SampleGrid\n"
        "      init_args: {prompts: ['a handwritten 1', 'a handwritten 7'], seeds_per_prompt: 2,"
        " every_n_epochs: 1}\n"
        "    - class_path: diffalign.core.callbacks.RewardEvaluation\n"
    )
    tiny = tiny_configs("recipes/image/ddpo_digit_fidelity.yaml", tmp_path)
    run = run_fit(
        "recipes/image/ddpo_digit_fidelity.yaml",
        tmp_path,
        "--trainer.max_epochs=3",
        "--data.init_args.batches_per_epoch=1",
        extra_configs=(*tiny, every_epoch),
    )
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert {"samples/before", "samples/train", "samples/after", "reward_curve"} == set(tags)
    assert [e.step for e in events.Images("samples/train")] == [1, 2]  # after epochs 0 and 1 (1 step each)
    assert [e.step for e in events.Images("samples/before")] == [0]
    after = events.Images("samples/after")
    assert [e.step for e in after] == [3] and after[0].width > 0 and after[0].height > 0

"""Test-time sampling on the digits: `ImageBackbone.save_samples` grids and the `recipes/image/sample_*`
recipes through `diffalign sample`."""

import json

import pytest
import torch
from PIL import Image

from diffalign.modalities.image.grids import PromptGridWriter, labelled_grid
from diffalign.modalities.image.testing import tiny_image_backbone
from tests.helpers import REPO

PAD, TITLE = 2, 16  # the grid's gap between tiles and title height (grids.labelled_grid)


def grid_size(rows: int, columns: int, tile: int, longest_label: int) -> tuple[int, int]:
    """Expected (width, height) of a titled, labelled grid."""
    label_w = 8 + 7 * longest_label
    return label_w + columns * (tile + PAD) + PAD, TITLE + rows * (tile + PAD) + PAD


def test_save_samples_writes_a_growing_labelled_grid(tmp_path):
    backbone = tiny_image_backbone()  # 8×8 samples: tiles upscaled 8× to 64 px
    a, b, c = "a handwritten 1", "a handwritten 2", "a handwritten 3"
    first = torch.stack([torch.zeros(3, 8, 8)] * 2 + [torch.ones(3, 8, 8)] * 2)  # a: black, b: white
    backbone.save_samples(first, tmp_path, [a, a, b, b], start_index=0)
    path = tmp_path / "samples.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == grid_size(rows=2, columns=2, tile=64, longest_label=len(a))
        label_w = 8 + 7 * len(a)
        x0, y0 = label_w + PAD + 32, TITLE + PAD + 32  # centre of the first tile
        assert img.getpixel((x0, y0)) == (0, 0, 0)  # prompt a's row holds its (black) samples
    # the next batch continues the same grid: b gets a third column, c a new row
    second = torch.full((3, 3, 8, 8), 0.5)
    backbone.save_samples(second, tmp_path, [b, c, c], start_index=4)
    with Image.open(path) as img:
        assert img.size == grid_size(rows=3, columns=3, tile=64, longest_label=len(a))
        assert img.getpixel((label_w + PAD + 2 * 66 + 32, TITLE + PAD + 66 + 32)) == (128, 128, 128)
    # start_index 0 starts a new grid
    backbone.save_samples(torch.rand(1, 3, 8, 8), tmp_path, [c], start_index=0)
    with Image.open(path) as img:
        assert img.size == grid_size(rows=1, columns=1, tile=64, longest_label=len(c))


def test_grid_writer_wraps_long_rows_and_checks_shapes(tmp_path):
    writer = PromptGridWriter(scale=2, max_columns=2)
    path = writer(torch.rand(5, 3, 8, 8), tmp_path, ["a handwritten 5"] * 5)
    with Image.open(path) as img:  # 5 samples of one prompt: rows of 2, 2 and 1
        assert img.size == grid_size(rows=3, columns=2, tile=16, longest_label=len("a handwritten 5"))
    with pytest.raises(ValueError, match="one prompt per row"):
        writer(torch.rand(2, 3, 8, 8), tmp_path, ["a handwritten 5"])
    with pytest.raises(ValueError, match="one shape"):
        labelled_grid([("x", torch.rand(1, 3, 8, 8)), ("y", torch.rand(1, 3, 4, 4))])


def _sample(recipe: str, out, *args: str) -> dict:
    from diffalign.core.cli import cli_main

    argv = ["sample", "--config", str(REPO / "recipes" / "image" / f"{recipe}.yaml"), "--output", str(out)]
    assert cli_main([*argv, "--progress", "false", *args]) == 0
    return json.loads((out / "results.json").read_text())


PROMPTS = '["a handwritten 3", "a handwritten 7"]'


@pytest.mark.slow
def test_sample_recipe_writes_rewards_nfe_and_grid(tmp_path):
    res = _sample("sample_plain", tmp_path, "--prompts", PROMPTS, "--seeds_per_prompt", "1")
    assert res["method"] == "PlainSampling" and res["reward_name"] == "digit_fidelity"
    assert res["samples"] == 2 and res["failed"] == 0 and res["nfe_per_sample"] == 10
    assert [r["prompt"] for r in res["rows"]] == ["a handwritten 3", "a handwritten 7"]
    assert all(0 <= r["reward"] <= 1 and r["nfe"] == 10 for r in res["rows"])
    assert res["reward_mean"] == pytest.approx(sum(r["reward"] for r in res["rows"]) / 2)
    with Image.open(tmp_path / "samples.png") as img:  # 16×16 digits upscaled to 64 px, one row per prompt
        assert img.size == grid_size(rows=2, columns=1, tile=64, longest_label=len("a handwritten 3"))
    saved = torch.load(tmp_path / "samples.pt")
    assert saved["x0"].shape == (2, 1, 16, 16) and saved["seeds"] == [10_000, 11_000]


@pytest.mark.slow
def test_best_of_4_keeps_its_best_candidate_and_ignores_the_batch_size(tmp_path):
    """Each (prompt, seed) has its own generator, from which its 4 candidates draw: the output of a row
    is the same whether the rows run one per batch or together, and it is the best of its candidates."""
    one = _sample("sample_best_of_n", tmp_path / "one", "--prompts", PROMPTS, "--seeds_per_prompt", "2",
                  "--batch_size", "1")  # fmt: skip
    best = _sample("sample_best_of_n", tmp_path / "best", "--prompts", PROMPTS, "--seeds_per_prompt", "1",
                   "--batch_size", "1")  # fmt: skip
    together = _sample("sample_best_of_n", tmp_path / "together", "--prompts", PROMPTS,
                       "--seeds_per_prompt", "2", "--batch_size", "4")  # fmt: skip
    assert best["nfe_per_sample"] == 40
    assert [r["reward"] for r in one["rows"]] == pytest.approx(
        [r["reward"] for r in together["rows"]], abs=1e-6
    )
    from diffalign.core.guidance import BestOfN
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.sampling import row_generators
    from diffalign.modalities.image import ImageBackbone
    from diffalign.rewards.image import DigitFidelity

    policy = DiffusionPolicy(ImageBackbone(), num_steps=3)
    cond = policy.backbone.condition({"prompt": ["a handwritten 3", "a handwritten 7"]})
    res = BestOfN(n=4)(policy, cond, DigitFidelity(), row_generators([1, 2]))
    torch.testing.assert_close(res.scores, res.extras["candidate_scores"].max(dim=1).values)
    with Image.open(tmp_path / "best" / "samples.png") as img:  # two batches, one grid
        assert img.size == grid_size(rows=2, columns=1, tile=64, longest_label=len("a handwritten 3"))

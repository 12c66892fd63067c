"""Inputs checked where they enter: malformed preference rows and sample files name the file and row;
the skip policy's counts reach summary.json; a preference pair's condition reaches the backbone."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.core.preference_data import PreferenceDataError, PreferenceDataModule, PreferenceDataset


def _write(folder, rows, samples):
    for name, x in samples.items():
        torch.save(x, folder / name)
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"a.pt": torch.zeros(2), "b.pt": torch.ones(2)}


@pytest.mark.parametrize(
    "bad_row,bad_files,message",
    [
        ({"prompt": 0, "winner": "nan.pt", "loser": "b.pt"}, {"nan.pt": torch.tensor([float("nan"), 0.0])},
         "'winner' has 1 non-finite values"),
        ({"prompt": 0, "winner": "big.pt", "loser": "b.pt"}, {"big.pt": torch.zeros(3)},
         r"'winner' has shape \(3,\); expected \(2\)"),
        ({"prompt": 0, "winner": "a.pt", "loser": "b.pt", "winnner": "x"}, {},
         "unknown keys \\['winnner'\\]"),
        ({"prompt": 0, "winner": "a.pt", "loser": "gone.pt"}, {}, "'loser' file not found"),
        ({"prompt": 0, "winner": "a.pt", "loser": "b.pt", "label": 2}, {}, "label must be in"),
    ],
    ids=["nan", "shape", "unknown_key", "missing_file", "label"],
)  # fmt: skip
def test_malformed_rows_name_file_and_row_and_skip_counts(tmp_path, bad_row, bad_files, message):
    rows = [
        {"prompt": 0, "winner": "a.pt", "loser": "b.pt"},
        bad_row,
        {"prompt": 1, "winner": "b.pt", "loser": "a.pt"},
    ]
    path = _write(tmp_path, rows, {**GOOD, **bad_files})
    with pytest.raises(PreferenceDataError, match=rf"pairs.jsonl:2: {message}"):
        PreferenceDataset(path)
    ds = PreferenceDataset(path, on_error="skip")
    assert len(ds) == 2 and [n for n, _ in ds.skipped] == [2]
    assert PreferenceDataModule(str(path), on_error="skip", batch_size=2).skipped_rows == 1


def test_ragged_samples_are_accepted_when_declared(tmp_path):
    rows = [{"prompt": 0, "winner": "a.pt", "loser": "c.pt"}]
    path = _write(tmp_path, rows, {**GOOD, "c.pt": torch.zeros(3)})
    with pytest.raises(PreferenceDataError, match="expected"):
        PreferenceDataset(path, sample_shape=[2])
    assert len(PreferenceDataset(path, ragged=True)) == 1
    assert len(PreferenceDataset(path, sample_shape=[None])) == 1


def test_toy_dpo_trains_each_pair_under_its_own_condition(tmp_path):
    """Preference batches carry `label` (the preference strength) beside `prompt`: the condition the
    backbone sees must be each pair's prompt, never the label."""
    from diffalign.core.algorithms import DiffusionDPO
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.core.rollouts import AlignContext
    from diffalign.core.testing import ToyBackbone

    rows = [{"prompt": p, "winner": "a.pt", "loser": "b.pt", "label": 1.0} for p in (0, 1, 2, 3, 3, 2)]
    path = _write(tmp_path, rows, GOOD)
    dm = PreferenceDataModule(str(path), batch_size=6)
    batch = next(iter(dm.train_dataloader()))
    seen = []

    class Recording(ToyBackbone):
        def denoise(self, x_t, t, cond, mask=None):
            seen.append(cond["label"].tolist())
            return super().denoise(x_t, t, cond, mask)

    policy = DiffusionPolicy(Recording(hidden=8, depth=1), num_steps=2)
    policy.backbone.freeze_reference()
    ctx = AlignContext(policy, None, torch.Generator().manual_seed(0), torch.device("cpu"))
    algo = DiffusionDPO(beta=10.0)
    data, _ = algo.prepare(ctx, batch)
    algo(policy, data)["loss"].backward()
    prompts = [int(p) for p in batch["prompt"]]
    assert seen and all(s == prompts + prompts for s in seen)  # winners then losers, each pair's prompt


def test_summary_reports_dropped_samples_and_skipped_rows(cleandir):
    from tests.helpers import run_fit, summary

    run = run_fit(
        "recipes/toy/ddpo_mode.yaml",
        cleandir / "runs",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--data.init_args.eval_seeds_per_prompt=2",
        "--model.init_args.on_invalid_reward=drop",
    )
    s = summary(run)
    assert s["reward_dropped"] == 0 and "data_skipped_rows" not in s  # a prompt list has no rows to skip

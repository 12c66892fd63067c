"""`diffalign reproduce` (core/reproduce.py): the sidecar of a shipped base and its anchor, on the toy
pretrain recipe cut to one step (the modalities' suites check their own shipped bases' anchors)."""

import json
import shutil

import pytest

from diffalign.core import reproduce
from tests.helpers import REPO

RECIPE = "recipes/toy/pretrain.yaml"
ANCHOR = ["--trainer.max_steps=1", "--data.init_args.num_samples=512"]


def test_the_export_path_and_sidecar_come_from_the_recipe():
    assert reproduce.exported_path(RECIPE) == "modalities/toy/toy_base.safetensors"
    assert reproduce.sidecar_path(RECIPE) == REPO / "modalities/toy/toy_base.json"
    with pytest.raises(ValueError, match="no ExportBackbone"):
        reproduce.exported_path("recipes/toy/ddpo_mode.yaml")
    with pytest.raises(FileNotFoundError, match="--record"):
        reproduce.load_sidecar(RECIPE, REPO / "no_such_sidecar.json")


def test_record_writes_an_anchor_that_the_same_cut_reproduces_and_another_does_not(tmp_path):
    sidecar = tmp_path / "toy_base.json"
    shutil.copy(REPO / "modalities/toy/toy_base.safetensors", tmp_path / "toy_base.safetensors")
    info = reproduce.record(RECIPE, ANCHOR, sidecar=sidecar)
    assert reproduce.load_sidecar(RECIPE, sidecar) == info
    assert info["recipe"] == RECIPE and info["anchor"]["overrides"] == ANCHOR
    assert info["sha256"] == reproduce.sha256(REPO / "modalities/toy/toy_base.safetensors")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same, steps = reproduce.export(RECIPE, tmp_path / "a", *ANCHOR)
    lr = "--model.init_args.optimizer.init_args.lr=0.001"
    other, _ = reproduce.export(RECIPE, tmp_path / "b", *ANCHOR, lr)
    assert steps == 1 and same == info["anchor"]["sha256"]
    assert other != same  # a changed training run shows in the anchor


def test_anchors_are_kept_per_platform_and_add_platform_keeps_the_rest(tmp_path):
    """Kernels round differently on another CPU ISA or vendor: `--record` keys its anchor by this machine's
    `platform_key`, `expected_anchor` picks this platform's (else the recording's), `--add-platform` adds
    this machine's anchor to a sidecar recorded elsewhere without touching the rest."""
    sidecar = tmp_path / "toy_base.json"
    shutil.copy(REPO / "modalities/toy/toy_base.safetensors", tmp_path / "toy_base.safetensors")
    info = reproduce.record(RECIPE, ANCHOR, sidecar=sidecar)
    here = reproduce.platform_key()
    assert info["anchor"]["by_platform"] == {here: info["anchor"]["sha256"]}
    assert reproduce.expected_anchor(info) == info["anchor"]["sha256"]
    elsewhere = dict(
        info, anchor={"overrides": ANCHOR, "sha256": "0" * 64, "by_platform": {"other CPU": "0" * 64}}
    )
    assert reproduce.expected_anchor(elsewhere) == "0" * 64  # no anchor for this platform: the recording's
    sidecar.write_text(json.dumps(elsewhere))
    added = reproduce.add_platform(RECIPE, sidecar=sidecar)
    assert added["anchor"]["by_platform"] == {"other CPU": "0" * 64, here: info["anchor"]["sha256"]}
    assert added["anchor"]["sha256"] == "0" * 64 and added["sha256"] == info["sha256"]
    assert reproduce.expected_anchor(added) == info["anchor"]["sha256"]
    specific, coarse = reproduce.platform_keys()
    assert specific == here and specific.startswith(coarse + " ")
    by_coarse = dict(
        info, anchor={"overrides": ANCHOR, "sha256": "0" * 64, "by_platform": {coarse: "1" * 64}}
    )
    assert reproduce.expected_anchor(by_coarse) == "1" * 64  # a sidecar keyed without the CPU model
    by_coarse["anchor"]["by_platform"][specific] = "2" * 64
    assert reproduce.expected_anchor(by_coarse) == "2" * 64  # the specific key wins

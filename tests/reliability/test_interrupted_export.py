"""A pretrain run stopped by SIGTERM or SIGINT exports nothing (shipped base weights are never overwritten by
a half-trained model) and exits non-zero with a short message; the same run left alone exports."""

from tests.helpers import QUIET, REPO
from tests.reliability.common import forkrun

EXPORTED = "modalities/toy/toy_base.safetensors"  # where recipes/toy/pretrain.yaml's ExportBackbone writes


def pretrain(run_root: str, *extra: str) -> list[str]:
    recipe = str(REPO / "recipes/toy/pretrain.yaml")
    tiny = ["--trainer.max_epochs=2", "--data.init_args.batches_per_epoch=3", *QUIET]
    return ["fit", "--config", recipe, "--run_root", run_root, *tiny, *extra]


def signal_at(name: str) -> list[str]:
    return [
        "--trainer.callbacks+=diffalign.core.testing.SignalAt",
        "--trainer.callbacks.init_args.epoch=1",
        f"--trainer.callbacks.init_args.signal={name}",
    ]


def test_a_stopped_pretrain_exports_nothing_and_says_so(tmp_path):
    runs = [
        pretrain("term", *signal_at("SIGTERM")),
        pretrain("int", *signal_at("SIGINT")),
        pretrain("whole"),
    ]
    term, interrupt, whole = forkrun(tmp_path, runs, snapshot=tmp_path)
    assert term["code"] == 143, term["log"]
    assert "stopped by SIGTERM" in term["log"] and "Traceback" not in term["log"]
    assert interrupt["code"] == 1, interrupt["log"]
    assert EXPORTED not in term["files"] and EXPORTED not in interrupt["files"]
    # both stopped after a completed epoch: its checkpoint is there to resume from
    assert "term/pretrain/version_0/checkpoints/last.ckpt" in term["files"], sorted(term["files"])
    assert whole["code"] == 0, whole["log"]
    assert EXPORTED in whole["files"]

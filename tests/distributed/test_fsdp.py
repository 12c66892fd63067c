"""FSDP on CPU with gloo and 2 processes (torch's FSDP through Lightning's FSDPStrategy; see
strategies.py for the CPU shim), on the toy, for full fine-tuning and LoRA.

Sharding must not change the math: a DDPO step with the KL to the reference (a frozen copy for full
fine-tuning, the adapters switched off for LoRA) and an EMA gives the same weights, the same exported
(EMA) weights and the same evaluation as DDP on 2 ranks; the EMA shards survive a resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.common import DDP, explain, fit, last_weights, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

RUN_TIMEOUT = 300
FSDP = [
    "--trainer.devices=2",
    "--trainer.accelerator=cpu",
    '--trainer.strategy={"class_path": "tests.distributed.strategies.CPUFSDPStrategy"}',
]
LORA = """
model:
  init_args:
    policy:
      init_args:
        backbone:
          class_path: diffalign.core.lora.LoRABackbone
          init_args:
            backbone: {class_path: diffalign.modalities.toy.MixtureBackbone}
            rank: 2
            target_modules: [net.0, net.2]
"""


def _config(folder: Path, name: str, lora: bool) -> Path:
    """SGD with momentum (optimiser state to shard and resume), DDPO with a KL to the reference, an EMA,
    and the weights exported at the end."""
    text = f"""
model:
  init_args:
    optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.05, momentum: 0.5}}}}
    ema_decay: 0.5
    algorithm: {{init_args: {{kl_coef: 0.1}}}}
trainer:
  callbacks:
    - class_path: diffalign.core.callbacks.ExportBackbone
      init_args: {{path: {folder / name / "export.safetensors"}}}
"""
    path = folder / f"{name}.yaml"
    path.write_text(text)
    if lora:
        (folder / f"{name}_lora.yaml").write_text(LORA)
    return path


def _argv(folder: Path, name: str, strategy: list[str], lora: bool, *extra: str, root: str = "") -> dict:
    """A 2-rank toy DDPO run under `folder/root` (default `name`); its run folder is named `name` after
    its config file, and it exports to `folder/name/export.safetensors`."""
    configs = ["--config", str(_config(folder, name, lora))]
    if lora:
        configs += ["--config", str(folder / f"{name}_lora.yaml")]
    argv = fit(
        "toy/ddpo_mode.yaml",
        folder / (root or name),
        *configs,
        "--trainer.max_epochs=1",
        "--data.init_args.batch_size=8",
        "--data.init_args.batches_per_epoch=2",
        "--data.init_args.eval_seeds_per_prompt=2",
        *strategy,
        *extra,
    )
    return {"argv": argv, "world": 2, "timeout": RUN_TIMEOUT}


def _run(root: Path) -> Path:
    (version,) = list(root.glob("*/version_*"))
    return version


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("fsdp")
    last = cwd / "fsdp_full" / "fsdp_full" / "version_0" / "checkpoints" / "last.ckpt"
    specs = [
        _argv(cwd, "ddp_full", DDP, False, "--trainer.max_epochs=2"),
        _argv(cwd, "fsdp_full", FSDP, lora=False),
        # the 1-epoch FSDP run, resumed to 2 epochs in its own folder (exporting to fsdp_resumed/)
        _argv(
            cwd,
            "fsdp_resumed",
            FSDP,
            False,
            "--trainer.max_epochs=2",
            "--ckpt_path",
            str(last),
            root="fsdp_full",
        ),
        _argv(cwd, "ddp_lora", DDP, lora=True),
        _argv(cwd, "fsdp_lora", FSDP, lora=True),
    ]
    for r in run_ranks(cwd, specs):
        assert r["codes"] == [0, 0] and not r["timed_out"], explain(r)
    return cwd


def _export(cwd: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(cwd / name / "export.safetensors"))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(a.keys() ^ b.keys())[:4]}"
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-6, f"{what}: FSDP differs from DDP by {worst:.2e}"


def _summaries(*runs: Path) -> list[dict]:
    return [json.loads((r / "summary.json").read_text()) for r in runs]


def test_fsdp_lora_trains_exports_and_evaluates_as_ddp(runs):
    ddp, fsdp = _run(runs / "ddp_lora"), _run(runs / "fsdp_lora")
    _close(last_weights(ddp), last_weights(fsdp), "LoRA checkpoint weights")
    _close(_export(runs, "ddp_lora"), _export(runs, "fsdp_lora"), "LoRA exported EMA weights")
    a, b = _summaries(ddp, fsdp)
    assert b["eval_samples"] == a["eval_samples"] == 8
    assert b["reward_after"] == pytest.approx(a["reward_after"], abs=1e-5)
    from diffalign.modalities.toy import MixtureBackbone

    live = {k.removeprefix("policy.backbone."): v for k, v in last_weights(fsdp).items()}
    for k, v in MixtureBackbone().state_dict().items():  # only the adapters train: the base stays
        module, _, leaf = f"inner.{k}".rpartition(".")  # peft keeps an adapted layer's own as base_layer
        name = f"inner.{k}" if f"inner.{k}" in live else f"{module}.base_layer.{leaf}"
        assert torch.equal(live[name], v), k
    moved = [float(v.abs().max()) for k, v in live.items() if "lora_B" in k]  # lora_B starts at 0
    assert moved and max(moved) > 1e-4


def test_fsdp_full_fine_tuning_resumed_ends_as_uninterrupted_ddp(runs):
    ddp, fsdp = _run(runs / "ddp_full"), _run(runs / "fsdp_full")  # FSDP: 1 epoch, then resumed
    _close(last_weights(ddp), last_weights(fsdp), "checkpoint weights after 2 epochs")
    # the EMA (sharded under FSDP, its shards checkpointed per rank) exports the same averages
    _close(_export(runs, "ddp_full"), _export(runs, "fsdp_resumed"), "exported EMA weights")
    a, b = _summaries(ddp, fsdp)
    assert a["global_step"] == b["global_step"] == 2 and b["eval_samples"] == 8
    assert b["reward_before"] == pytest.approx(a["reward_before"], abs=1e-6)
    assert b["reward_after"] == pytest.approx(a["reward_after"], abs=1e-5)
    from diffalign.modalities.toy import MixtureBackbone

    base = MixtureBackbone().state_dict()
    live = {k.removeprefix("policy.backbone."): v for k, v in last_weights(fsdp).items()}
    export = _export(runs, "fsdp_resumed")
    assert max(float((live[k] - base[k]).abs().max()) for k in base) > 1e-3  # the comparison sees steps
    assert max(float((export[k] - live[k]).abs().max()) for k in base) > 1e-5  # the EMA is not the live

"""The trainer fragments of recipes/_base/distributed/ (ddp, fsdp, torchrun, slurm): each composes with a
recipe, and the trainer it resolves to runs under the cluster environment its launcher announces (the
world a rank would join), built here without starting processes."""

from __future__ import annotations

import pytest
import yaml

from diffalign.core.cli import cli_main

FRAGMENTS = ("ddp", "fsdp", "torchrun", "slurm")


def _resolved(capsys, fragment: str, *extra: str) -> dict:
    with pytest.raises(SystemExit) as e:
        cli_main(
            [
                "fit",
                "--config",
                "toy/ddpo_mode",
                "--config",
                f"_base/distributed/{fragment}",
                *extra,
                "--print_config",
            ]
        )
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _trainer(trainer_cfg: dict):
    """A Trainer from a resolved `trainer:` block, the way LightningCLI builds it."""
    from jsonargparse import ArgumentParser
    from lightning import Trainer

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Trainer, "trainer")
    cfg = parser.parse_object({"trainer": trainer_cfg})
    return parser.instantiate(cfg).trainer


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_fragment_composes_with_a_recipe(capsys, fragment):
    cfg = _resolved(capsys, fragment)
    strategy = cfg["trainer"]["strategy"]
    want = "FSDPStrategy" if fragment == "fsdp" else "DDPStrategy"
    assert strategy["class_path"] == f"lightning.pytorch.strategies.{want}"
    assert cfg["model"]["init_args"]["algorithm"]["class_path"].endswith("DDPO")  # the recipe is intact
    if fragment == "fsdp":
        assert strategy["init_args"]["sharding_strategy"] == "FULL_SHARD"


def _cpu(cfg: dict, **overrides) -> dict:
    """The resolved trainer block on the CPU (gloo) with `overrides`, without loggers or callbacks."""
    t = dict(cfg["trainer"], accelerator="cpu", logger=False, callbacks=None, **overrides)
    t.pop("default_root_dir", None)
    return t


@pytest.fixture(autouse=True)
def _keep_rank_zero(monkeypatch):
    """A trainer built under a launcher's environment sets Lightning's process-wide rank (rank 9 of 16);
    restore it, or every later run in this process believes it is not rank 0 and writes no logs."""
    import lightning.fabric.utilities.rank_zero as fabric_rank_zero
    import lightning.pytorch.utilities.rank_zero as pl_rank_zero

    funcs = (fabric_rank_zero.rank_zero_only, pl_rank_zero.rank_zero_only)
    for fn in {id(f): f for f in funcs}.values():
        monkeypatch.setattr(fn, "rank", getattr(fn, "rank", 0), raising=False)


def test_ddp_fragment_on_two_cpu_processes(capsys, tmp_path):
    trainer = _trainer(_cpu(_resolved(capsys, "ddp"), devices=2, default_root_dir=str(tmp_path)))
    from lightning.pytorch.strategies import DDPStrategy

    assert type(trainer.strategy) is DDPStrategy and trainer.num_devices == 2
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is False


def test_torchrun_fragment_joins_the_world_torchrun_announces(capsys, tmp_path, monkeypatch):
    env = {
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "GROUP_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "run",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    trainer = _trainer(_cpu(_resolved(capsys, "torchrun"), default_root_dir=str(tmp_path)))
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    world = trainer.strategy.cluster_environment
    assert isinstance(world, TorchElasticEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 8, 16)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (9, 1, 1)
    assert world.main_address == "10.0.0.1" and world.main_port == 29500


def test_slurm_fragment_joins_the_world_slurm_announces(capsys, tmp_path, monkeypatch):
    env = {
        "SLURM_NTASKS": "16",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_PROCID": "10",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[01-02]",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "diffalign",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    trainer = _trainer(_cpu(_resolved(capsys, "slurm"), default_root_dir=str(tmp_path)))
    from lightning.fabric.plugins.environments import SLURMEnvironment

    world = trainer.strategy.cluster_environment
    assert isinstance(world, SLURMEnvironment) and world.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (16, 10, 2, 1)
    assert world.main_address == "gpu01"

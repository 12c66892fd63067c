"""AlignmentModule: checkpoint contents, non-finite losses and atomic writes (kill-and-resume:
tests/reliability/test_resume.py)."""

import pytest
import torch

from diffalign.core.algorithms import Algorithm
from diffalign.core.io import AtomicCheckpointIO, atomic_write
from diffalign.core.module import AlignmentModule, NonFiniteLossError
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.testing import LinearReward, ToyBackbone


def make_module(algorithm, reward=None, **kw):
    return AlignmentModule(
        DiffusionPolicy(ToyBackbone(hidden=8, depth=1), num_steps=2), algorithm, reward, **kw
    )


def test_reward_is_frozen_and_kept_out_of_the_state_dict():
    class WithWeights(LinearReward):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(2, 1)

    from diffalign.core.algorithms import DDPO

    module = make_module(DDPO(), WithWeights())
    assert not any(k.startswith(("reward", "_reward")) or ".head." in k for k in module.state_dict())
    assert not any(p.requires_grad for p in module.reward.parameters())


def test_algorithm_that_needs_a_reward_refuses_none():
    from diffalign.core.algorithms import DDPO

    with pytest.raises(ValueError, match="needs a reward"):
        make_module(DDPO())


def test_non_finite_loss_stops_training():
    class NanLoss(Algorithm):
        needs_reward = False

        def prepare(self, ctx, batch):
            return None, {}

        def forward(self, policy, micro):
            p = next(policy.parameters())
            return {"loss": p.sum() * float("nan")}

    module = make_module(NanLoss())

    class FakeTrainer:
        pass

    module.optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    with pytest.raises(NonFiniteLossError, match="NanLoss loss is nan"):
        module.training_step({"prompt": [0]}, 0)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_text("old")

    def broken(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"a": torch.ones(2)}, tmp_path / "x.ckpt")
    assert torch.equal(torch.load(tmp_path / "x.ckpt")["a"], torch.ones(2))


def test_checkpoints_can_leave_frozen_weights_out():
    from diffalign.core.algorithms import DDPO

    module = make_module(DDPO(), LinearReward(), checkpoint_frozen_weights=False)
    frozen = "policy.backbone.net.0.weight"
    module.policy.backbone.net[0].weight.requires_grad_(False)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert frozen not in ckpt["state_dict"] and "policy.backbone.net.2.weight" in ckpt["state_dict"]
    assert module.strict_loading is False
    other = make_module(DDPO(), LinearReward(), checkpoint_frozen_weights=False)
    other.load_state_dict(ckpt["state_dict"], strict=False)
    assert torch.equal(other.policy.backbone.net[2].weight, module.policy.backbone.net[2].weight)


def test_ema_tracks_the_weights_and_swaps_in_temporarily():
    from diffalign.core.algorithms import DDPO

    module = make_module(DDPO(), LinearReward(), ema_decay=0.5)
    p = module.policy.backbone.net[0].weight
    module._update_ema()  # first call copies
    first = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    module._update_ema()  # update 2: diffusers' warm-up decay min(0.5, 2/11)
    ema = module.ema_parameters()["backbone.net.0.weight"]
    assert torch.allclose(ema, first + 1 - 2 / 11)
    live = p.detach().clone()
    with module.ema_weights():
        assert torch.allclose(p, first + 1 - 2 / 11)
    assert torch.equal(p, live)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    other = make_module(DDPO(), LinearReward(), ema_decay=0.5)
    other.on_load_checkpoint(ckpt)
    assert other.ema_updates == 2 and torch.equal(other.ema_parameters()["backbone.net.0.weight"], ema)
    with pytest.raises(ValueError, match="ema_decay"):
        make_module(DDPO(), LinearReward(), ema_decay=1.5)

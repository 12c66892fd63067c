"""Speed options of the sampling loop that leave the algorithm unchanged (docs/performance.md): no per-step
host copies or host synchronisation, bf16 autocast with float32 kernels (ratio stays 1), generators on the
policy's device, shorter training rollouts, torch.compile plumbing."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffalign.core import sampling
from diffalign.core.kernels import DDIMKernel, DDPMKernel
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward
from diffalign.core.rollouts import AlignContext, collect_rollouts
from diffalign.core.testing import LinearReward, ToyBackbone


class HostToDeviceCopies(TorchDispatchMode):
    """Counts ops that take a CPU tensor and return a tensor on another device (a host → device copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(a.device.type == "cpu" for a in ins) and any(o.device.type != "cpu" for o in outs):
            self.count += 1
        return out


def meta_rollout_copies(policy: DiffusionPolicy, cond, event: tuple[int, ...], steps: int) -> int:
    """Host → device copies of one rollout on the meta device (noise passed in: no generator there).

    On meta tensors `.item()`, `bool()` and `.tolist()` raise, so the rollout finishing also proves the loop
    asks the host nothing (no synchronisation)."""
    b = len(cond)
    policy.num_steps = steps
    x_T = torch.zeros((b, *event), device="meta")
    noises = torch.zeros((b, steps, *event), device="meta")
    with HostToDeviceCopies() as copies:
        traj = policy.rollout(cond, x_T=x_T, noises=noises)
    assert traj.states.shape[:2] == (b, steps + 1) and traj.states.device.type == "meta"
    return copies.count


@pytest.mark.parametrize("kernel", [DDIMKernel(eta=1.0), DDPMKernel()], ids=["ddim", "ddpm"])
def test_denoising_loop_copies_nothing_per_step_and_never_syncs(kernel):
    backbone = ToyBackbone(dim=3)
    cond = backbone.condition({"prompt": [0, 1, 2]})
    backbone.to("meta")
    cond = cond.to("meta")
    policy = DiffusionPolicy(backbone, kernel, num_steps=3, guidance_scale=4.0)
    first = meta_rollout_copies(policy, cond, (3,), 2)  # the schedule's tables move once, then stay
    few, many = (meta_rollout_copies(policy, cond, (3,), n) for n in (3, 9))
    # only the rollout's timesteps move (once); nothing moves per step
    assert few == many == 1 and first >= few, f"{type(kernel).__name__}: {first}, {few}, {many} copies"


def test_bf16_autocast_keeps_log_probs_float32_and_the_ratio_at_one():
    torch.manual_seed(0)
    backbone = ToyBackbone(dim=4, hidden=32)
    policy = DiffusionPolicy(backbone, num_steps=5, guidance_scale=3.0, autocast="bfloat16")
    plain = DiffusionPolicy(backbone, num_steps=5, guidance_scale=3.0)
    cond = backbone.condition({"prompt": [0, 1, 2, 3]})
    x = torch.randn(4, 4)
    t = torch.full((4,), 500)
    out = policy.model_output(x, t, cond)
    assert out.dtype == torch.float32
    ref = plain.model_output(x, t, cond)
    assert not torch.equal(out, ref), "autocast had no effect (the network ran in float32)"
    assert torch.allclose(out, ref, atol=5e-2, rtol=5e-2)

    traj = policy.rollout(cond, sampling.row_generators([1, 2, 3, 4]))
    assert traj.log_probs.dtype == torch.float32 and traj.states.dtype == torch.float32
    for step in range(traj.num_steps):
        again = policy.log_prob(traj, step).log_prob
        assert torch.equal(again, traj.log_probs[:, step]), f"ratio != 1 at step {step}"


def test_autocast_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match="autocast"):
        DiffusionPolicy(ToyBackbone(), autocast="int8")


def test_generators_live_on_the_policy_device_unless_opted_out(monkeypatch):
    backbone = ToyBackbone()
    assert DiffusionPolicy(backbone).generator_device == torch.device("cpu")
    assert DiffusionPolicy(backbone, device_generators=False).generator_device == torch.device("cpu")
    seen = []
    original = sampling.row_generators

    def spy(seeds, device=None):
        seen.append(device)
        return original(seeds, device)

    monkeypatch.setattr(sampling, "row_generators", spy)
    policy = DiffusionPolicy(backbone, num_steps=2)
    sampling.sample_batch(policy, backbone.condition({"prompt": [0, 1]}), [5, 6])
    assert seen == [policy.generator_device]


def test_rollout_steps_shorten_training_rollouts_only():
    torch.manual_seed(0)
    backbone = ToyBackbone(dim=2, hidden=16)
    policy = DiffusionPolicy(backbone, num_steps=6, rollout_steps=3)
    ctx = AlignContext(
        policy, GuardedReward(LinearReward(), "raise"), torch.Generator().manual_seed(0), "cpu"
    )
    traj, _ = collect_rollouts(ctx, {"prompt": [0, 1, 2]})
    assert traj.num_steps == 3 and traj.states.shape[1] == 4
    for step in range(3):  # re-scoring follows the trajectory's own step count: ratio 1
        assert torch.allclose(policy.log_prob(traj, step).log_prob, traj.log_probs[:, step], atol=1e-6)
    evaluation = sampling.sample_batch(policy, backbone.condition({"prompt": [0]}), [7])
    assert evaluation.trajectory.num_steps == 6
    with pytest.raises(ValueError, match="rollout_steps"):
        DiffusionPolicy(backbone, rollout_steps=0)


def test_compile_needs_a_network_submodule():
    with pytest.raises(ValueError, match="lora_target"):
        DiffusionPolicy(ToyBackbone(), compile=True)


class SlowLinear(LinearReward):
    """LinearReward that records the thread it scores in and whether grad mode was on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def forward(self, samples, cond):
        import threading

        self.calls.append((threading.current_thread().name, torch.is_grad_enabled()))
        return super().forward(samples, cond)


@pytest.mark.parametrize("async_reward", [False, True], ids=["chunks", "chunks-async"])
def test_chunked_and_async_rollouts_give_the_same_samples_and_rewards(async_reward):
    backbone = ToyBackbone(dim=2, hidden=16)
    policy = DiffusionPolicy(backbone, num_steps=3)
    batch = {"prompt": [0, 1, 2, 3, 1]}

    def collect(**kw):
        reward = SlowLinear()
        gen = torch.Generator().manual_seed(4)
        ctx = AlignContext(policy, GuardedReward(reward, "raise"), gen, "cpu", **kw)
        return collect_rollouts(ctx, batch)[0], reward.calls

    whole, calls = collect()
    parts, part_calls = collect(rollout_chunk_size=2, async_reward=async_reward)
    assert len(calls) == 1 and len(part_calls) == 3  # chunks of 2, 2, 1
    assert torch.equal(whole.states, parts.states)
    # the per-sample log-prob is a sum over the event: on AVX-512 CPUs its vector kernel depends on the batch
    # size, so chunks of 2 may round the last bit differently (the samples themselves stay exact)
    torch.testing.assert_close(whole.log_probs, parts.log_probs, rtol=1e-6, atol=1e-6)
    assert torch.equal(whole.rewards, parts.rewards) and whole.cond.prompts == parts.cond.prompts
    assert torch.equal(whole.extras["seed"], parts.extras["seed"])
    threads = {name for name, _ in part_calls}
    assert (threads != {"MainThread"}) == async_reward
    assert not any(grad for _, grad in part_calls)  # the worker thread scores without grad too


def test_async_reward_needs_chunks():
    from diffalign.core.algorithms import DDPO
    from diffalign.core.module import AlignmentModule

    policy = DiffusionPolicy(ToyBackbone(dim=2, hidden=16), num_steps=3)
    with pytest.raises(ValueError, match="rollout_chunk_size"):
        AlignmentModule(policy, DDPO(), LinearReward(), async_reward=True)
    with pytest.raises(ValueError, match="rollout_chunk_size"):
        AlignmentModule(policy, DDPO(), LinearReward(), rollout_chunk_size=0)


def test_guidance_runs_conditional_and_unconditional_rows_in_one_call(monkeypatch):
    backbone = ToyBackbone(dim=2, hidden=16)
    policy = DiffusionPolicy(backbone, num_steps=4, guidance_scale=3.0)
    calls = []
    original = backbone.denoise

    def counting(x_t, t, cond, mask=None):
        calls.append(x_t.shape[0])
        return original(x_t, t, cond, mask)

    monkeypatch.setattr(backbone, "denoise", counting)
    policy.rollout(backbone.condition({"prompt": [0, 1, 2]}), sampling.row_generators([1, 2, 3]))
    assert calls == [6] * 4  # one call per step, with the 3 conditional and 3 unconditional rows

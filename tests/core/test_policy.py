"""DiffusionPolicy: rollouts, re-scoring, guidance, truncated gradients, hooks, seeding."""

import pytest
import torch

from diffalign.core.kernels import DDIMKernel, DDPMKernel, FlowSDEKernel
from diffalign.core.policy import DiffusionPolicy, RolloutHook
from diffalign.core.testing import ToyBackbone, check_backbone

BATCH = {"prompt": [0, 1, 2, 3]}


def make_policy(kernel=None, prediction_type="epsilon", **kw):
    return DiffusionPolicy(ToyBackbone(hidden=16, depth=2, prediction_type=prediction_type), kernel, **kw)


@pytest.mark.parametrize(
    "prediction_type,kernel",
    [
        ("epsilon", DDIMKernel(1.0)),
        ("v_prediction", DDPMKernel()),
        ("sample", DDIMKernel(0.7)),
        ("flow", FlowSDEKernel(0.7)),
    ],
)
def test_contract_on_every_kernel(prediction_type, kernel):
    check_backbone(ToyBackbone(hidden=16, depth=2, prediction_type=prediction_type), BATCH, kernel)


def test_rollout_shapes_and_timesteps():
    policy = make_policy(num_steps=5)
    cond = policy.backbone.condition(BATCH)
    traj = policy.rollout(cond, torch.Generator().manual_seed(0))
    assert traj.states.shape == (4, 6, 2)
    assert traj.timesteps.shape == (4, 5) and traj.log_probs.shape == (4, 5)
    assert (traj.timesteps[:, :-1] > traj.timesteps[:, 1:]).all(), "timesteps must decrease"
    assert not traj.states.requires_grad


def test_guidance_changes_samples_and_rescoring_still_exact():
    torch.manual_seed(1)
    bb = ToyBackbone(hidden=16, depth=2)
    plain, guided = DiffusionPolicy(bb, num_steps=4), DiffusionPolicy(bb, num_steps=4, guidance_scale=3.0)
    cond = bb.condition(BATCH)
    a = plain.rollout(cond, torch.Generator().manual_seed(0))
    b = guided.rollout(cond, torch.Generator().manual_seed(0))
    assert not torch.allclose(a.x0, b.x0)
    for step in range(4):
        assert torch.allclose(guided.log_prob(b, step).log_prob, b.log_probs[:, step], atol=1e-5)
    # the guided output is u + w (c - u)
    x, t = torch.randn(4, 2), torch.full((4,), 500)
    u = bb.denoise(x, t, bb.null_condition(cond))
    c = bb.denoise(x, t, cond)
    assert torch.allclose(guided.model_output(x, t, cond), u + 3.0 * (c - u), atol=1e-6)


def test_per_sample_generators_make_rows_independent_of_batch():
    policy = make_policy(num_steps=3)
    full = policy.rollout(
        policy.backbone.condition({"prompt": [0, 1, 2]}),
        [torch.Generator().manual_seed(s) for s in (7, 8, 9)],
    )
    alone = policy.rollout(policy.backbone.condition({"prompt": [1]}), [torch.Generator().manual_seed(8)])
    assert torch.allclose(full.states[1], alone.states[0], atol=1e-6)


class _CallRecorder:
    def __init__(self, backbone):
        self.calls = []
        self.inner = backbone.denoise
        backbone.denoise = self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.calls.append(out.requires_grad)
        return out


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_gradient_flows_only_through_last_k_steps(k):
    policy = make_policy(num_steps=6)
    rec = _CallRecorder(policy.backbone)
    traj = policy.rollout(policy.backbone.condition(BATCH), torch.Generator().manual_seed(0), grad_steps=k)
    assert rec.calls == [False] * (6 - k) + [True] * k
    assert traj.x0.requires_grad == (k > 0)
    if k:
        traj.x0.sum().backward()
        assert all(p.grad is not None for p in policy.backbone.parameters())


def test_truncated_gradient_equals_manual_last_step_gradient():
    """With K = 1 the gradient is that of the last step alone, from a detached x_1."""
    policy = make_policy(num_steps=4)
    cond = policy.backbone.condition(BATCH)
    traj = policy.rollout(cond, torch.Generator().manual_seed(3), grad_steps=1)
    traj.x0.pow(2).sum().backward()
    g1 = [p.grad.clone() for p in policy.backbone.parameters()]
    policy.zero_grad()
    x1, t = traj.states[:, -2].detach(), traj.timesteps[:, -1]
    mean = policy.kernel.step(policy.model_output(x1, t, cond), t, x1, prev_sample=traj.x0.detach()).mean
    (mean + (traj.x0.detach() - mean.detach())).pow(2).sum().backward()
    for a, p in zip(g1, policy.backbone.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    bb = ToyBackbone(hidden=16, depth=2)
    grads = []
    for ckpt in (False, True):
        policy = DiffusionPolicy(bb, num_steps=4, gradient_checkpointing=ckpt)
        bb.zero_grad()
        traj = policy.rollout(bb.condition(BATCH), torch.Generator().manual_seed(0), grad_steps=3)
        traj.x0.sum().backward()
        grads.append([p.grad.clone() for p in bb.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_hooks_can_edit_model_output_and_samples():
    class Zero(RolloutHook):
        def __init__(self):
            self.seen = []

        def before_step(self, policy, state):
            state.model_output = torch.zeros_like(state.model_output)

        def after_step(self, policy, state):
            self.seen.append(state.index)
            state.prev_sample = state.prev_sample.clamp(-0.1, 0.1)

    hook = Zero()
    policy = make_policy(num_steps=5)
    traj = policy.rollout(policy.backbone.condition(BATCH), torch.Generator().manual_seed(0), hooks=[hook])
    assert hook.seen == list(range(5))
    assert traj.states[:, 1:].abs().max() <= 0.1 + 1e-6


def test_reference_context_is_frozen_initial_model():
    bb = ToyBackbone(hidden=16, depth=2)
    with pytest.raises(RuntimeError, match="freeze_reference"), bb.reference():
        pass
    bb.freeze_reference()
    x, t, cond = torch.randn(4, 2), torch.full((4,), 300), bb.condition(BATCH)
    before = bb.denoise(x, t, cond).detach()
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.1)
    with bb.reference() as ref:
        assert torch.allclose(ref.denoise(x, t, cond), before)
        assert not any(p.requires_grad for p in ref.parameters())
    assert "_reference_copy" not in "".join(bb.state_dict())


def test_backbone_and_scheduler_must_agree_on_the_prediction_type():
    from diffusers import DDPMScheduler

    class Mismatch(ToyBackbone):
        def make_scheduler(self):
            return DDPMScheduler(num_train_timesteps=1000, clip_sample=False)  # says epsilon

    with pytest.raises(ValueError, match="'v_prediction' but its scheduler"):
        DiffusionPolicy(Mismatch(hidden=8, depth=1, prediction_type="v_prediction"))

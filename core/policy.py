"""The sampling policy: a backbone, a transition kernel, a step count and classifier-free guidance.

`DiffusionPolicy.rollout` is the one sampling loop of the project, written out plainly. Every training
algorithm and every test-time method goes through it: policy gradient reads the stored log-probs,
reward backpropagation keeps the graph through the last K steps, test-time methods attach hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffalign.core.backbone import Backbone
from diffalign.core.functional import Generator
from diffalign.core.kernels import DDIMKernel, StepOutput, TransitionKernel
from diffalign.core.types import Cond, Trajectory, as_cond

_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RolloutState:
    """What a hook sees at step `index` of a rollout; hooks may replace `model_output` or `prev_sample`.

    `before_step` runs after the denoiser call and before the kernel step (guidance edits
    `model_output`); `after_step` runs after the kernel step (resampling edits `prev_sample`, `cond`).
    """

    index: int
    t: Tensor
    x_t: Tensor
    cond: Cond
    mask: Tensor | None
    model_output: Tensor | None = None
    step: StepOutput | None = None
    prev_sample: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class RolloutHook:
    """Per-step callback for `DiffusionPolicy.rollout`; override either method."""

    def before_step(self, policy: DiffusionPolicy, state: RolloutState) -> None:  # noqa: B027
        pass

    def after_step(self, policy: DiffusionPolicy, state: RolloutState) -> None:  # noqa: B027
        pass


class DiffusionPolicy(nn.Module):
    """A backbone sampled by a transition kernel, seen as a stochastic policy over denoising steps.

    Args:
        backbone: the modality's denoiser.
        kernel: the per-step math (default: DDIM with eta = 1, DDPO's sampler).
        num_steps: sampling steps T.
        guidance_scale: classifier-free guidance weight w (1 = no guidance). The guided output
            u + w·(c − u) is the policy in both sampling and re-scoring.
        gradient_checkpointing: recompute denoiser activations in the backward pass of steps that
            keep their graph (reward backprop through many steps).
        autocast: run the denoiser call under `torch.autocast` in this dtype ("bfloat16" on a GPU: the
            network's matrix products in bf16 over float32 weights); the kernels, log-probs and
            importance ratios stay float32 (the denoiser's output is cast back), so re-scoring a
            trajectory under unchanged weights still gives a ratio of exactly 1. None: no autocast.
        rollout_steps: sampling steps of TRAINING rollouts (`core.rollouts.collect_rollouts`: DDPO, DPOK,
            GRPO, ...), when fewer than `num_steps` are wanted there; evaluation, `diffalign sample` and
            test-time methods keep `num_steps`. This changes the algorithm (the trained chain is shorter
            than the evaluated one): a speed/quality trade, see docs/performance.md. None: `num_steps`.
        device_generators: on a GPU, each row's noise generator (the seeding rule's one generator per row)
            lives on the GPU, so step noise is drawn there with no CPU → GPU copy per step. A (condition,
            seed) pair then gives the same sample on every run on that kind of device, but not the same
            sample as CPU-drawn noise; False draws on the CPU everywhere (and copies each step's noise).
        compile: `torch.compile` the denoising network (`backbone.lora_target()`, e.g. the UNet) in
            place: True for torch's defaults, or a dict of `torch.compile` arguments (`{"mode":
            "reduce-overhead"}` captures CUDA graphs, for static shapes; `{"mode": "max-autotune"}`). The
            first calls compile (minutes for an SD UNet); recompiles happen when shapes change.
    """

    def __init__(
        self,
        backbone: Backbone,
        kernel: TransitionKernel | None = None,
        num_steps: int = 20,
        guidance_scale: float = 1.0,
        gradient_checkpointing: bool = False,
        autocast: Literal["bfloat16", "float16"] | None = None,
        rollout_steps: int | None = None,
        device_generators: bool = True,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if rollout_steps is not None and rollout_steps < 1:
            raise ValueError(f"rollout_steps must be >= 1 (or null for num_steps), got {rollout_steps}")
        if autocast not in (None, *_AUTOCAST):
            raise ValueError(f"autocast must be one of {sorted(_AUTOCAST)} or null, got {autocast!r}")
        self.backbone = backbone
        self.kernel = (kernel or DDIMKernel(eta=1.0)).bind(backbone.make_scheduler())
        if self.kernel.prediction_type != backbone.prediction_type:
            raise ValueError(
                f"{type(backbone).__name__}.prediction_type is {backbone.prediction_type!r} but its "
                f"scheduler (and so {type(self.kernel).__name__}) says {self.kernel.prediction_type!r}: "
                "make_scheduler() must describe what denoise() predicts"
            )
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.gradient_checkpointing = gradient_checkpointing
        self.autocast = autocast
        self.rollout_steps = rollout_steps
        self.device_generators = device_generators
        self.compile_options = compile  # not `self.compile`: that is nn.Module's method
        if compile:
            compile_network(backbone, compile)

    @property
    def generator_device(self) -> torch.device:
        """Where the per-row noise generators live: the backbone's accelerator when `device_generators`
        (and it is on one), else the CPU."""
        p = next(self.backbone.parameters(), None)
        if self.device_generators and p is not None and p.device.type not in ("cpu", "meta"):
            return p.device
        return torch.device("cpu")

    # -- model output --------------------------------------------------------------------------------
    def model_output(
        self,
        x_t: Tensor,
        t: Tensor,
        cond: Cond,
        mask: Tensor | None = None,
        backbone: Backbone | None = None,
    ) -> Tensor:
        """The (guided) denoiser output; `backbone` overrides the policy's (e.g. the reference).

        With guidance the conditional and unconditional passes run as one batched call.
        """
        net = backbone if backbone is not None else self.backbone
        if self.autocast is not None:
            with torch.autocast(x_t.device.type, dtype=_AUTOCAST[self.autocast]):
                return self._guided(net, x_t, t, cond, mask).float()
        return self._guided(net, x_t, t, cond, mask)

    def _guided(self, net: Backbone, x_t: Tensor, t: Tensor, cond: Cond, mask: Tensor | None) -> Tensor:
        if self.guidance_scale == 1.0:
            return net.denoise(x_t, t, cond, mask)
        cond = as_cond(cond, x_t.shape[0])
        null = cond.replace(**dict(net.null_condition(cond)))  # metadata the null form leaves out is kept
        both = Cond.cat([cond, null])

        def twice(v: Tensor) -> Tensor:
            return repeat(v, "b ... -> (two b) ...", two=2)

        t2 = twice(t) if t.dim() > 0 else t
        m2 = twice(mask) if mask is not None else None
        out = net.denoise(twice(x_t), t2, both, m2)
        out_c, out_u = rearrange(out, "(two b) ... -> two b ...", two=2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def _timesteps(self, device: torch.device, num_steps: int | None = None) -> Tensor:
        return self.kernel.set_timesteps(num_steps or self.num_steps, device=device)

    # -- sampling ------------------------------------------------------------------------------------
    def rollout(
        self,
        cond: Cond,
        generator: Generator = None,
        grad_steps: int | None = None,
        hooks: Sequence[RolloutHook] = (),
        x_T: Tensor | None = None,
        mask: Tensor | None = None,
        noises: Tensor | None = None,
        sde_window: tuple[int, int] | None = None,
        record_means: bool = False,
        num_steps: int | None = None,
    ) -> Trajectory:
        """Sample one trajectory per condition row.

        Args:
            cond: batched conditioning from `backbone.condition(batch)`.
            generator: a torch.Generator or one per sample (then each row depends on its own seed only).
            grad_steps: keep the autograd graph through the last K denoiser calls (None or 0: no
                graph at all; `num_steps`: the whole chain). Earlier steps run without grad.
            hooks: per-step `RolloutHook`s.
            x_T: initial noise to start from instead of `backbone.init_noise` (with its `mask`).
            noises: (B, T, *event) standard-normal noise of each step instead of the generator's draws
                (direct noise optimisation passes tensors that require grad).
            sde_window: (start, stop): only steps start … stop−1 are stochastic, the others take the
                kernel's deterministic ODE step (MixGRPO / Flow-GRPO-Fast). The trajectory then keeps only
                the window (sparse storage): states x_start … x_stop, the window's timesteps and log-probs,
                with the final sample in `extras["x0"]`, the schedule's length in
                `extras["schedule_steps"]` and `start` in `extras["step_offset"]`.
            record_means: also keep each kept step's Gaussian mean in `extras["means"]` (B, T, *event)
                (GRPO-Guard normalises the ratio with the behaviour policy's means).
            num_steps: sampling steps of this rollout (default `self.num_steps`; training rollouts pass
                `rollout_steps`).
        """
        cond = as_cond(cond)
        if x_T is None:
            x_T, mask = self.backbone.init_noise(cond, generator)
        device = x_T.device
        n = int(num_steps or self.num_steps)
        timesteps = self._timesteps(device, n)
        k = 0 if grad_steps is None else min(int(grad_steps), n)
        start, stop = (0, n) if sde_window is None else (int(sde_window[0]), int(sde_window[1]))
        if not 0 <= start < stop <= n:
            raise ValueError(f"sde_window must satisfy 0 <= start < stop <= {n}, got {sde_window}")
        x = x_T.float()
        noises_need_grad = torch.is_grad_enabled() and (
            x_T.requires_grad or (noises is not None and noises.requires_grad)
        )
        states, log_probs, means = ([x] if start == 0 else []), [], []
        for i, t in enumerate(timesteps):
            keep_graph = i >= n - k and torch.is_grad_enabled()
            with nullcontext() if keep_graph or noises_need_grad else torch.no_grad():
                tb = t.expand(x.shape[0])
                if keep_graph and self.gradient_checkpointing:
                    out = checkpoint(self.model_output, x, tb, cond, mask, use_reentrant=False)
                else:
                    out = self.model_output(x, tb, cond, mask)
                state = RolloutState(index=i, t=tb, x_t=x, cond=cond, mask=mask, model_output=out)
                for h in hooks:
                    h.before_step(self, state)
                # the sample is mean + std·noise: with a kept graph, gradient flows through the mean
                step = self.kernel.step(
                    state.model_output,
                    tb,
                    x,
                    generator=generator,
                    mask=mask,
                    noise=noises[:, i] if noises is not None else None,
                    deterministic=not start <= i < stop,
                )
                state.step, state.prev_sample = step, step.prev_sample
                for h in hooks:
                    h.after_step(self, state)
                x, cond, mask = state.prev_sample, state.cond, state.mask
            if start <= i + 1 <= stop:  # x is now x_{i+1}: keep x_start … x_stop
                states.append(x)
            if start <= i < stop:
                log_probs.append(state.step.log_prob.detach())
                if record_means:
                    means.append(state.step.mean.detach())
        b = x.shape[0]
        extras: dict[str, Any] = {}
        if sde_window is not None:
            extras = {"x0": x, "schedule_steps": n, "step_offset": start}
        if record_means:
            extras["means"] = torch.stack(means, dim=1)
        return Trajectory(
            states=torch.stack(states, dim=1),
            timesteps=timesteps[start:stop].to(device).unsqueeze(0).expand(b, -1).clone(),
            log_probs=torch.stack(log_probs, dim=1),
            cond=cond,
            mask=mask,
            extras=extras,
        )

    @contextmanager
    def sampling_with(self, kernel: TransitionKernel | None) -> Iterator[DiffusionPolicy]:
        """Temporarily sample with another kernel (e.g. the deterministic ODE for DiffusionNFT's rollouts);
        None keeps the policy's own. The kernel is bound to the backbone's scheduler on first use."""
        if kernel is None:
            yield self
            return
        if kernel.scheduler is None:
            kernel.bind(self.backbone.make_scheduler())
        if kernel.prediction_type != self.backbone.prediction_type:
            raise ValueError(
                f"{type(kernel).__name__} samples {kernel.prediction_type!r} models but the backbone "
                f"predicts {self.backbone.prediction_type!r}"
            )
        own, self.kernel = self.kernel, kernel
        try:
            yield self
        finally:
            self.kernel = own

    @torch.no_grad()
    def sample(self, cond: Cond, generator: Generator = None, **kwargs: Any) -> Tensor:
        """Final samples only, in model space (no graph)."""
        return self.rollout(cond, generator, **kwargs).x0

    # -- re-scoring ----------------------------------------------------------------------------------
    def log_prob(self, traj: Trajectory, step: int | Tensor, backbone: Backbone | None = None) -> StepOutput:
        """Re-score transition `step` of each row under the current weights (or under `backbone`).

        `step` is an int or a (B,) index tensor (each row its own step, as DDPO's shuffled timesteps).
        """
        n = int(traj.extras.get("schedule_steps", traj.num_steps))  # a windowed trajectory: its schedule
        if self.kernel.num_steps != n:
            self.kernel.set_timesteps(n, device=traj.states.device)
        b = traj.batch_size
        idx = torch.as_tensor(step, device=traj.states.device).long()
        idx = idx.expand(b) if idx.dim() == 0 else idx
        rows = torch.arange(b, device=traj.states.device)
        x_t, x_next, t = traj.states[rows, idx], traj.states[rows, idx + 1], traj.timesteps[rows, idx]
        out = self.model_output(x_t, t, traj.cond, traj.mask, backbone=backbone)
        return self.kernel.step(out, t, x_t, prev_sample=x_next, mask=traj.mask)


def compile_network(backbone: Backbone, options: bool | dict[str, Any]) -> nn.Module:
    """`torch.compile` the backbone's denoising network (`lora_target()`) in place (`nn.Module.compile`:
    parameter names and checkpoints are unchanged) and return it. Compilation is lazy: it happens at
    the first call, after LoRA adapters are in place."""
    net = backbone.lora_target()
    if net is backbone:
        raise ValueError(
            f"compile: {type(backbone).__name__}.lora_target() returns the backbone itself; compile needs "
            "the network its denoise() calls (a submodule such as the UNet)"
        )
    net.compile(**(options if isinstance(options, dict) else {}))
    return net

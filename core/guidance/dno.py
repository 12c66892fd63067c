"""Direct noise optimisation (DNO): optimise the sampler's noise, not the model.

Tang et al., "Inference-Time Alignment of Diffusion Models with Direct Noise Optimization",
arXiv:2405.18881. The initial noise x_T and every injected step noise ε_t are parameters z; the
sampler is a differentiable map G(z) (gradients through the whole chain; activation checkpointing
keeps memory bounded). Adam minimises −r(G(z)) + γ·R(z), where R keeps z typical of N(0, I): the
flattened noise of each sample is split (after a fixed random permutation) into blocks of `block_size`;
a block's mean m and variance v are penalised as k·m²/2 + k·(v − 1)²/4, the negative log-likelihoods
of their large-sample distributions under N(0, I) (a simplified form of the paper's concentration-bound
probabilities). Without R the optimiser drives z off the typical set and "hacks" the reward.
Needs a differentiable reward. Cost: `steps` × (forward + backward) of the full chain.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.core.functional import expand_mask, masked_noise
from diffalign.core.guidance.base import TestTimeMethod
from diffalign.core.reward import SampleView


def noise_regulariser(z: Tensor, block_size: int = 64, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample penalty keeping flattened noise `z` (B, D) typical of N(0, I).

    Its expectation under N(0, I) is about 1 per block; it grows quadratically as the block means leave 0
    and the block variances leave 1.
    """
    b, d = z.shape
    perm = torch.randperm(d, generator=generator).to(z.device)
    zp = z[:, perm]
    k = min(block_size, d)
    n_blocks = d // k
    blocks = zp[:, : n_blocks * k].reshape(b, n_blocks, k)
    m = blocks.mean(dim=2)
    v = blocks.var(dim=2, unbiased=True)
    return (k * m**2 / 2 + k * (v - 1) ** 2 / 4).sum(dim=1)


class DirectNoiseOptimization(TestTimeMethod):
    """Optimise x_T and the injected noises by backprop through the sampler.

    Args:
        steps: optimiser steps.
        lr: Adam learning rate on the noise.
        reg_weight: γ of the typicality regulariser (0 disables it).
        block_size: block size of the regulariser.
        optimize_injected: also optimise each step's noise (else only x_T).
        gradient_checkpointing: recompute denoiser activations in the backward pass.
    """

    def __init__(
        self,
        steps: int = 20,
        lr: float = 0.05,
        reg_weight: float = 1.0,
        block_size: int = 64,
        optimize_injected: bool = True,
        gradient_checkpointing: bool = True,
    ) -> None:
        if steps < 0 or lr <= 0 or reg_weight < 0:
            raise ValueError("need steps >= 0, lr > 0, reg_weight >= 0")
        self.steps, self.lr, self.reg_weight, self.block_size = steps, lr, reg_weight, block_size
        self.optimize_injected, self.gradient_checkpointing = optimize_injected, gradient_checkpointing
        self.history: list[float] = []

    def sample(self, policy, cond, reward, generator):
        if not reward.differentiable:
            raise ValueError(
                f"direct noise optimisation back-propagates through the reward; '{reward.name}' is not "
                "differentiable (use best-of-N, FK steering or SVDD)"
            )
        x_T, mask = policy.backbone.init_noise(cond, generator)
        b, event = x_T.shape[0], x_T.shape[1:]
        step_mask = (
            None if mask is None else expand_mask(mask, x_T).unsqueeze(1).expand(b, policy.num_steps, *event)
        )
        noises = masked_noise((b, policy.num_steps, *event), generator, step_mask, device=x_T.device)
        z_T = x_T.detach().clone().requires_grad_(True)
        z_eps = noises.detach().clone().requires_grad_(self.optimize_injected)
        params = [z_T] + ([z_eps] if self.optimize_injected else [])
        # padded entries (mask 0) are not noise: they get no gradient, and the regulariser sees a fixed
        # typical draw in their place
        keep = None
        if mask is not None:
            keep = torch.cat([expand_mask(mask, x_T).reshape(b, -1), step_mask.reshape(b, -1)], dim=1) > 0
            filler = torch.randn(keep.shape, generator=torch.Generator().manual_seed(1)).to(x_T.device)
        masks = [None if mask is None else expand_mask(mask, x_T), step_mask]
        opt = torch.optim.Adam(params, lr=self.lr)
        reg_gen = torch.Generator().manual_seed(0)
        saved_ckpt = policy.gradient_checkpointing
        policy.gradient_checkpointing = self.gradient_checkpointing
        self.history = []
        try:
            for _ in range(self.steps):
                with torch.enable_grad():
                    traj = policy.rollout(
                        cond, None, grad_steps=policy.num_steps, x_T=z_T, mask=mask, noises=z_eps
                    )
                    r = reward.evaluate(SampleView(policy.backbone, traj.x0, traj.mask), cond).scores
                    flat = torch.cat([z_T.reshape(b, -1), z_eps.reshape(b, -1)], dim=1)
                    if keep is not None:
                        flat = torch.where(keep, flat, filler)
                    reg = noise_regulariser(flat, self.block_size, reg_gen.manual_seed(0))
                    loss = (-r + self.reg_weight * reg).sum()
                    grads = torch.autograd.grad(loss, params)  # model weights get no .grad
                for p, g, m in zip(params, grads, masks, strict=False):
                    p.grad = g if m is None else g * m
                opt.step()
                self.history.append(float(r.detach().mean()))
        finally:
            policy.gradient_checkpointing = saved_ckpt
        with torch.no_grad():
            traj = policy.rollout(cond, None, x_T=z_T.detach(), mask=mask, noises=z_eps.detach())
        return (
            traj.x0,
            traj.mask,
            {"x_T": z_T.detach(), "noises": z_eps.detach(), "reward_history": self.history},
        )

"""Which denoising steps GRPO's update and the motion reward live in, at the shipped moving-digit base.

    python benchmarks/video_grpo_steps.py            # about 100 CPU-s, one thread

Two measurements on the Flow-GRPO SDE (noise level 0.7, 10 steps) toward `MotionAgreement`:

1. the GRPO policy-gradient term of each step at the start of training (ratio 1):
   ‖∇θ mean_i A_i · log p_t(x_i)‖ over 4 prompts × 8 rollouts, A the group-normalised rewards, and the
   re-scored minus sampled log-probs (0: the re-scoring is consistent), and the range of the cosines
   between two steps' terms;
2. how much the final reward depends on each step's noise: with the initial noise and every step's noise
   fixed, only step t's noise (or x_T) is redrawn 8 times for each of 2 prompts, and the within-variant
   standard deviation of the reward is reported.

Prints both tables; writes nothing.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PROMPTS = ["a 3 moving right, fast", "a 4 moving up, slow", "a 9 moving left, fast", "a 6 moving down, slow"]


def main(group: int = 8, variants: int = 8) -> None:
    from diffalign.core import DiffusionPolicy, FlowSDEKernel
    from diffalign.modalities.video import moving_digits_backbone
    from diffalign.rewards.video import MotionAgreement

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.process_time()
    bb = moving_digits_backbone("flow")
    policy = DiffusionPolicy(bb, FlowSDEKernel(noise_level=0.7), num_steps=10)
    reward = MotionAgreement()
    cond = bb.condition({"prompt": [p for p in PROMPTS for _ in range(group)]})
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(PROMPTS) * group)]
    with torch.no_grad():
        traj = policy.rollout(cond, gens)
        r = reward(bb.decode(traj.x0), cond).scores.view(len(PROMPTS), group)
    print("reward per prompt: mean", r.mean(1).numpy().round(3), "std", r.std(1).numpy().round(3))
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    params = [p for p in bb.parameters() if p.requires_grad]
    grads = []
    print("| step | timestep | ‖policy-gradient term‖ | mean log p | max |re-scored − sampled| |")
    print("|---|---|---|---|---|")
    for t in range(traj.log_probs.shape[1]):
        lp = policy.log_prob(traj, t).log_prob
        g = torch.autograd.grad(-(adv * lp).mean(), params)
        grads.append(torch.cat([x.flatten() for x in g]))
        gap = float((lp.detach() - traj.log_probs[:, t]).abs().max())
        print(
            f"| {t} | {float(traj.timesteps[0, t]):.0f} | {float(grads[-1].norm()):.4f} | "
            f"{float(lp.detach().mean()):.2f} | {gap:.1e} |",
            flush=True,
        )
    g = torch.stack(grads)
    early, late = float(g[:4].sum(0).norm()), float(g[6:].sum(0).norm())
    print(f"‖sum of steps 0-3‖ {early:.4f}, of steps 6-9 {late:.4f}")
    unit = g / g.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T)[~torch.eye(len(g), dtype=torch.bool)]
    print(f"cosine between two steps' terms: {float(cos.min()):.2f} … {float(cos.max()):.2f}")

    torch.manual_seed(0)
    steps, event = traj.log_probs.shape[1], traj.states.shape[2:]
    noise, x_t = torch.randn(2, steps, *event), torch.randn(2, *event)
    cond2 = bb.condition({"prompt": [p for p in PROMPTS[:2] for _ in range(variants)]})
    print("\n| noise redrawn | within-variant reward std |")
    print("|---|---|")
    with torch.no_grad():
        for t in range(-1, steps):
            noises = noise.repeat_interleave(variants, 0)
            x_T = x_t.repeat_interleave(variants, 0)
            gen = torch.Generator().manual_seed(77 + t)
            if t < 0:
                x_T = torch.randn(x_T.shape, generator=gen)
            else:
                noises[:, t] = torch.randn(noises[:, t].shape, generator=gen)
            out = policy.rollout(cond2, x_T=x_T, noises=noises)
            s = reward(bb.decode(out.x0), cond2).scores.view(2, variants)
            print(f"| {'x_T' if t < 0 else f'step {t}'} | {float(s.std(1).mean()):.4f} |", flush=True)
    print(f"CPU {time.process_time() - t0:.0f} s")


if __name__ == "__main__":
    main()

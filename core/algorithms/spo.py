"""SPO: step-aware preference optimisation.

Liang et al., "Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step
Preference Optimization", arXiv:2406.04314. Preferences are formed at intermediate steps rather than
on final samples: from a state x_t, draw `num_candidates` next states from the policy's transition,
let a step-aware judge rank them, and train a DPO loss on the best vs the worst candidate of that step:

    loss = −log σ(β·[(log π_θ(xʷ|x_t) − log π_ref(xʷ|x_t)) − (log π_θ(xˡ|x_t) − log π_ref(xˡ|x_t))])

The chain then continues from a randomly chosen candidate (so later steps see on-policy states). The
judge here is the reward of each candidate's one-step prediction x̂0 (the decoded candidate at the last
step) — a training-free stand-in for the paper's learned step-aware preference model. Pairs are formed
at a random `step_fraction` of the steps; ties are skipped, and deterministic steps (std 0, such as a
DDPM schedule's last step) form no pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm, AlignContext
from diffalign.core.functional import randn
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.types import Cond


@dataclass
class StepPairs:
    x_t: Tensor
    t: Tensor
    winner: Tensor
    loser: Tensor
    cond: Cond
    mask: Tensor | None

    def __len__(self) -> int:
        return self.x_t.shape[0]

    def rows(self, idx: Tensor) -> StepPairs:
        return StepPairs(
            self.x_t[idx],
            self.t[idx],
            self.winner[idx],
            self.loser[idx],
            {k: v[idx] for k, v in self.cond.items()},
            None if self.mask is None else self.mask[idx],
        )


class SPO(Algorithm):
    """Step-aware preference pairs from the policy's own candidates.

    Args:
        num_candidates: next-state candidates per step (≥ 2).
        beta: β of the DPO loss.
        step_fraction: fraction of the steps at which pairs are formed (random, per batch).
        train_batch_size: pairs per micro-batch (None: all).
    """

    needs_reference = True

    def __init__(
        self,
        num_candidates: int = 4,
        beta: float = 1.0,
        step_fraction: float = 1.0,
        train_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_candidates < 2 or beta <= 0 or not 0 < step_fraction <= 1:
            raise ValueError("need num_candidates >= 2, beta > 0, 0 < step_fraction <= 1")
        self.num_candidates, self.beta, self.step_fraction, self.train_batch_size = (
            num_candidates,
            beta,
            step_fraction,
            train_batch_size,
        )

    @torch.no_grad()
    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[StepPairs, dict[str, float]]:
        policy, backbone, gen = ctx.policy, ctx.policy.backbone, ctx.generator
        cond = backbone.encode_condition(batch)
        x, mask = backbone.init_noise(cond, gen)
        x = x.float()
        timesteps = policy.kernel.set_timesteps(policy.num_steps, device=x.device)
        n_pick = max(1, round(self.step_fraction * policy.num_steps))
        chosen = set(torch.randperm(policy.num_steps, generator=gen)[:n_pick].tolist())
        m, n = self.num_candidates, x.shape[0]
        cond_m = {k: v.repeat_interleave(m, dim=0) for k, v in cond.items()}
        mask_m = mask.repeat_interleave(m, dim=0) if mask is not None else None
        pairs: list[tuple[Tensor, ...]] = []
        ties = judged = 0
        final_scores = None
        for i, t in enumerate(timesteps):
            tb = t.expand(n)
            step = policy.kernel.step(policy.model_output(x, tb, cond, mask), tb, x, generator=gen, mask=mask)
            cands = step.mean.unsqueeze(1) + step.std.unsqueeze(1) * randn(
                (n, m, *x.shape[1:]), gen, device=x.device
            )
            flat = cands.reshape(n * m, *x.shape[1:])
            if float(step.std.max()) == 0.0:  # a deterministic step (e.g. DDPM's last): no choice to judge
                x = step.prev_sample
                continue
            if i in chosen or i == policy.num_steps - 1:
                if i + 1 < len(timesteps):
                    tn = timesteps[i + 1].expand(n * m)
                    x0 = policy.kernel.pred_x0(policy.model_output(flat, tn, cond_m, mask_m), tn, flat)
                else:
                    x0 = flat
                scored = ctx.reward(backbone.decode(x0, mask_m), cond_m, n * m)
                v = torch.where(
                    scored.keep.to(x.device),
                    scored.scores.to(x.device).float(),
                    torch.full((n * m,), float("nan"), device=x.device),
                ).reshape(n, m)
                if i == policy.num_steps - 1:
                    final_scores = v
            if i in chosen:
                best = torch.nan_to_num(v, nan=float("-inf")).argmax(1)
                worst = torch.nan_to_num(v, nan=float("inf")).argmin(1)
                ok = (best != worst) & torch.isfinite(v).all(1)
                judged += n
                ties += int((~ok).sum())
                rows = torch.arange(n, device=x.device)[ok]
                if len(rows):
                    pairs.append((x[rows], tb[rows], cands[rows, best[rows]], cands[rows, worst[rows]], rows))
            pick = torch.randint(0, m, (n,), generator=gen).to(x.device)
            x = cands[torch.arange(n, device=x.device), pick]
        if not pairs:
            raise RuntimeError("SPO: every candidate set was tied or invalid; no pair to train on")
        rows = torch.cat([p[4] for p in pairs])
        data = StepPairs(
            torch.cat([p[0] for p in pairs]),
            torch.cat([p[1] for p in pairs]),
            torch.cat([p[2] for p in pairs]),
            torch.cat([p[3] for p in pairs]),
            {k: v[rows] for k, v in cond.items()},
            None if mask is None else mask[rows],
        )
        metrics = {"pairs": float(len(data)), "tie_fraction": ties / max(1, judged)}
        if final_scores is not None:
            metrics["reward_mean"] = float(torch.nan_to_num(final_scores).mean())
        return data, metrics

    def minibatches(self, data: StepPairs, generator: torch.Generator) -> Iterator[list[StepPairs]]:
        n = len(data)
        bs = self.train_batch_size or n
        perm = torch.randperm(n, generator=generator).to(data.x_t.device)
        yield [data.rows(perm[s : s + bs]) for s in range(0, n, bs)]

    def forward(self, policy: DiffusionPolicy, micro: StepPairs) -> dict[str, Tensor]:
        def logps(backbone: Any = None) -> tuple[Tensor, Tensor]:
            out = policy.model_output(micro.x_t, micro.t, micro.cond, micro.mask, backbone=backbone)
            w = policy.kernel.step(
                out, micro.t, micro.x_t, prev_sample=micro.winner, mask=micro.mask
            ).log_prob
            l = policy.kernel.step(out, micro.t, micro.x_t, prev_sample=micro.loser, mask=micro.mask).log_prob
            return w, l

        lp_w, lp_l = logps()
        with policy.backbone.reference() as ref:
            ref_w, ref_l = logps(ref)
        inside = self.beta * ((lp_w - ref_w) - (lp_l - ref_l))
        return {"loss": -F.logsigmoid(inside).mean(), "implicit_acc": (inside.detach() > 0).float().mean()}

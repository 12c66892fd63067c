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

Sampling goes through the project's one loop (`core.sampling.sample_batch` with `SPOCandidateHook`,
a rollout hook that draws, judges and picks the candidates after each kernel step).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.distributed import RowShard
from diffalign.core.functional import expand_mask, masked_noise
from diffalign.core.policy import DiffusionPolicy, RolloutHook, RolloutState
from diffalign.core.reward import GuardedReward, SampleView
from diffalign.core.rollouts import AlignContext
from diffalign.core.sampling import draw_seeds_tensor, policy_generators, repeat_generators, sample_batch
from diffalign.core.types import Batch


class SPOCandidateHook(RolloutHook):
    """After each stochastic step: draw `m` candidate next states, judge them at the `chosen` steps
    (and the last), record (best, worst) pairs, and continue from a random candidate."""

    def __init__(
        self,
        reward: GuardedReward,
        m: int,
        chosen: set[int],
        generators: list[torch.Generator],
        pick: Any,
        rows: RowShard | None = None,
    ) -> None:
        self.reward, self.m, self.chosen = reward, m, chosen
        self.generators, self.pick_generator = generators, pick
        self.rows = rows  # this rank's rows of the global batch: picks are drawn for all of them
        self.pairs: list[Batch] = []
        self.ties = self.judged = 0
        self.final_scores: Tensor | None = None

    def after_step(self, policy: DiffusionPolicy, state: RolloutState) -> None:
        step, i, last = state.step, state.index, policy.num_steps - 1
        if float(step.std.max()) == 0.0:  # a deterministic step (e.g. DDPM's last): no choice to judge
            return
        n, m, event = state.x_t.shape[0], self.m, step.mean.shape[1:]
        mask_m = state.mask.repeat_interleave(m, dim=0) if state.mask is not None else None
        noise = masked_noise(
            (n * m, *event), repeat_generators(self.generators, m), mask_m, device=step.mean.device
        )
        cands = step.mean.unsqueeze(1) + step.std.unsqueeze(1) * noise.reshape(n, m, *event)
        if state.mask is not None:  # padded entries keep their value
            keep = expand_mask(state.mask, step.mean).unsqueeze(1) > 0
            cands = torch.where(keep, cands, state.x_t.float().unsqueeze(1))
        if i in self.chosen or i == last:
            flat = cands.reshape(n * m, *event)
            cond_m = state.cond.repeat_interleave(m)
            if i < last:
                tn = policy.kernel.scheduler.timesteps[i + 1].to(flat.device).expand(n * m)
                x0 = policy.kernel.pred_x0(policy.model_output(flat, tn, cond_m, mask_m), tn, flat)
            else:
                x0 = flat
            scored = self.reward(SampleView(policy.backbone, x0, mask_m), cond_m)
            v = torch.where(
                scored.keep.to(flat.device),
                scored.scores.to(flat.device).float(),
                torch.full((n * m,), float("nan"), device=flat.device),
            ).reshape(n, m)
            if i == last:
                self.final_scores = v
            if i in self.chosen:
                best = torch.nan_to_num(v, nan=float("-inf")).argmax(1)
                worst = torch.nan_to_num(v, nan=float("inf")).argmin(1)
                ok = (best != worst) & torch.isfinite(v).all(1)
                self.judged += n
                self.ties += int((~ok).sum())
                rows = torch.arange(n, device=flat.device)[ok]
                if len(rows):
                    self.pairs.append(
                        Batch(
                            x_t=state.x_t[rows].float(),
                            t=state.t[rows],
                            winner=cands[rows, best[rows]],
                            loser=cands[rows, worst[rows]],
                            cond=state.cond[rows],
                            mask=None if state.mask is None else state.mask[rows],
                        )
                    )
        rows = self.rows if self.rows is not None else RowShard(0, n, n)
        pick = rows.draw(lambda k: torch.randint(0, m, (k,), generator=self.pick_generator)).to(cands.device)
        state.prev_sample = cands[torch.arange(n, device=cands.device), pick]


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
        self.num_candidates, self.beta = num_candidates, beta
        self.step_fraction, self.train_batch_size = step_fraction, train_batch_size

    @torch.no_grad()
    def prepare(self, ctx: AlignContext, batch: Mapping[str, Any]) -> tuple[Batch, dict[str, float]]:
        policy, gen = ctx.policy, ctx.generator
        cond = policy.backbone.condition(batch)
        n_pick = max(1, round(self.step_fraction * policy.num_steps))
        chosen = set(torch.randperm(policy.num_steps, generator=gen)[:n_pick].tolist())
        rows = ctx.rows(len(cond))
        seeds = rows.draw(lambda n: draw_seeds_tensor(gen, n)).tolist()
        gens = policy_generators(policy, seeds)
        hook = SPOCandidateHook(ctx.reward, self.num_candidates, chosen, gens, gen, rows)
        sample_batch(policy, cond, seeds, hooks=[hook])
        if not any(ctx.ranks.flags(bool(hook.pairs))):  # every rank stops, or none does
            raise RuntimeError("SPO: every candidate set was tied or invalid; no pair to train on")
        data = Batch.cat(hook.pairs) if hook.pairs else None  # None: this rank has none, others do
        metrics = {
            "pairs": float(len(data) if data is not None else 0),
            "tie_fraction": hook.ties / max(1, hook.judged),
        }
        if hook.final_scores is not None:
            metrics["reward_mean"] = float(torch.nan_to_num(hook.final_scores).mean())
        return data, metrics

    def minibatches(self, data: Batch | None, generator: torch.Generator) -> Iterator[list[Batch]]:
        if data is None:
            return
        n = len(data)
        bs = self.train_batch_size or n
        perm = torch.randperm(n, generator=generator).to(data.x_t.device)
        yield [data[perm[s : s + bs]] for s in range(0, n, bs)]

    def forward(self, policy: DiffusionPolicy, micro: Batch) -> dict[str, Tensor]:
        def logps(backbone: Any = None) -> tuple[Tensor, Tensor]:
            out = policy.model_output(micro.x_t, micro.t, micro.cond, micro.mask, backbone=backbone)
            k = policy.kernel
            w = k.step(out, micro.t, micro.x_t, prev_sample=micro.winner, mask=micro.mask).log_prob
            l = k.step(out, micro.t, micro.x_t, prev_sample=micro.loser, mask=micro.mask).log_prob
            return w, l

        lp_w, lp_l = logps()
        with policy.backbone.reference() as ref:
            ref_w, ref_l = logps(ref)
        inside = self.beta * ((lp_w - ref_w) - (lp_l - ref_l))
        return {"loss": -F.logsigmoid(inside).mean(), "implicit_acc": (inside.detach() > 0).float().mean()}

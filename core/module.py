"""`AlignmentModule`: the Lightning system that runs any algorithm on any policy and reward.

It receives its parts (policy, algorithm, reward, optimiser callables) and builds none of them.
Optimisation is manual so that online methods can collect a batch and then take several updates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from diffalign.core.algorithms.base import Algorithm, AlignContext
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward, OnInvalid, Reward


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops instead of updating on garbage."""


class AlignmentModule(L.LightningModule):
    """Runs `algorithm` on `policy` against `reward`.

    Args:
        policy: the sampler being aligned.
        algorithm: the alignment method.
        reward: what to maximise (None for methods that learn from data alone). It is frozen and kept
            out of checkpoints.
        optimizer: optimiser factory over the backbone's trainable parameters.
        lr_scheduler: optional scheduler factory, stepped after every optimiser step.
        max_grad_norm: gradient-norm clip (None: no clipping).
        on_invalid_reward: "raise" stops on a NaN/inf or raising reward naming the sample;
            "drop" drops such samples, counts them and logs `train/reward_dropped`.
        seed: seed of the run's own generator (rollout noise, shuffling, dropout of conditions). Its
            state is saved in checkpoints, so a resumed run continues the same random stream.
        checkpoint_frozen_weights: False leaves parameters with requires_grad=False out of checkpoints
            (set it for LoRA runs on large models; the frozen weights are rebuilt from the recipe).
        ema_decay: keep an exponential moving average of the trainable parameters (e.g. 0.99), updated
            after every optimiser step with decay min(ema_decay, (1 + n)/(10 + n)) at update n; the
            final evaluation, validate/test/predict and the weight export use it (`ema_weights()`);
            rollouts for training use the live weights.
    """

    def __init__(
        self,
        policy: DiffusionPolicy,
        algorithm: Algorithm,
        reward: Reward | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        on_invalid_reward: OnInvalid = "raise",
        seed: int = 0,
        checkpoint_frozen_weights: bool = True,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.algorithm = algorithm
        if algorithm.needs_reward and reward is None:
            raise ValueError(f"{type(algorithm).__name__} needs a reward: set model.init_args.reward")
        if algorithm.needs_differentiable_reward and reward is not None and not reward.differentiable:
            raise ValueError(
                f"{type(algorithm).__name__} back-propagates through the reward, but reward "
                f"'{reward.name}' ({type(reward).__name__}) is not differentiable; use a policy-gradient "
                "method (DDPO, DPOK, GRPO) or a differentiable reward"
            )
        self._reward = [reward.freeze()] if reward is not None else []  # a list keeps it out of state_dict
        self.guarded_reward = GuardedReward(reward, on_invalid_reward) if reward is not None else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self.checkpoint_frozen_weights = checkpoint_frozen_weights
        # checkpoints without frozen weights load non-strictly (the frozen ones are already in place)
        self.strict_loading = checkpoint_frozen_weights
        self.generator = torch.Generator().manual_seed(seed)
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.ema: dict[str, torch.Tensor] = {}
        self.ema_updates = 0
        if algorithm.needs_reference:
            # taken now, before any checkpoint is restored: the reference is the initial model
            policy.backbone.freeze_reference()

    @property
    def reward(self) -> Reward | None:
        return self._reward[0] if self._reward else None

    @property
    def reward_queries(self) -> int:
        return self.guarded_reward.queries if self.guarded_reward else 0

    def forward(self, cond: dict[str, torch.Tensor], generator: Any = None) -> torch.Tensor:
        """Sample final model-space samples for `cond` (inference)."""
        return self.policy.sample(cond, generator)

    def setup(self, stage: str) -> None:
        if self.reward is not None:
            self.reward.to(self.device)

    def on_fit_start(self) -> None:
        if self.reward is not None:
            self.reward.to(self.device)

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        ctx = AlignContext(self.policy, self.guarded_reward, self.generator, self.device)
        data, metrics = self.algorithm.prepare(ctx, batch)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        updates = 0
        first_dev = 0.0  # largest |ratio − 1| before the first update of this batch: must be ~0
        for micro_batches in self.algorithm.minibatches(data, self.generator):
            for micro in micro_batches:
                out = self.algorithm(self.policy, micro)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"{type(self.algorithm).__name__} loss is {loss.item()} at global step "
                        f"{self.global_step} (batch {batch_idx}); stopping instead of training on it"
                    )
                self.manual_backward(loss / len(micro_batches))
                for k, v in out.items():
                    if k == "ratio_max_dev":
                        if updates == 0:
                            first_dev = max(first_dev, float(v))
                        continue
                    sums[k] += float(v.detach())
                    counts[k] += 1
            if self.max_grad_norm is not None:
                self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._update_ema()
            if sched is not None:
                sched.step()
            updates += 1
        logged = {k: sums[k] / counts[k] for k in sums}
        logged.update(metrics)
        logged["updates"] = float(updates)
        if "ratio_mean" in logged:
            logged["first_update_ratio_dev"] = first_dev
        if self.guarded_reward is not None:
            logged["reward_queries"] = float(self.guarded_reward.queries)
            logged["reward_dropped_total"] = float(self.guarded_reward.dropped)
        logged = {k: v for k, v in logged.items() if math.isfinite(v)}
        self.log_dict(
            {f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False, batch_size=1
        )
        if "reward_mean" in logged:
            self.log("reward", logged["reward_mean"], prog_bar=True, on_step=True, batch_size=1)
        elif "loss" in logged:
            self.log("loss", logged["loss"], prog_bar=True, on_step=True, batch_size=1)

    # -- evaluation: validate / test / predict over the data module's fixed evaluation set --------------
    @torch.no_grad()
    def _sample_and_score(self, batch: dict[str, Any]) -> dict[str, Any]:
        backbone = self.policy.backbone
        cond = backbone.encode_condition(batch)
        gens = [torch.Generator().manual_seed(int(s)) for s in batch["seed"]]
        traj = self.policy.rollout(cond, generator=gens)
        samples = backbone.decode(traj.x0, traj.mask)
        out = {"prompt": batch["prompt"], "seed": batch["seed"], "samples": samples}
        if self.reward is not None:
            out["rewards"] = self.reward(samples, cond).scores.detach().float()
        return out

    def _log_eval(self, prefix: str, batch: dict[str, Any]) -> None:
        with self.ema_weights():
            out = self._sample_and_score(batch)
        if "rewards" in out:
            r = out["rewards"]
            finite = r[torch.isfinite(r)]
            self.log(
                f"{prefix}/reward_mean",
                finite.mean() if len(finite) else torch.tensor(float("nan")),
                batch_size=len(r),
                prog_bar=True,
            )
            self.log(
                f"{prefix}/reward_failed",
                float((~torch.isfinite(r)).sum()),
                batch_size=len(r),
                reduce_fx="sum",
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_eval("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_eval("test", batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Samples (decoded) and rewards for each (prompt, seed) of the evaluation set."""
        with self.ema_weights():
            return self._sample_and_score(batch)

    def on_predict_epoch_end(self) -> None:
        from pathlib import Path

        from diffalign.core.io import atomic_write

        preds = self.trainer.predict_loop.predictions
        if not preds or not self.trainer.is_global_zero or self.trainer.log_dir is None:
            return
        path = Path(self.trainer.log_dir) / "predictions.pt"
        atomic_write(path, lambda p: torch.save(preds, p))
        print(f"wrote {sum(len(b['seed']) for b in preds)} predictions to {path}")

    def configure_optimizers(self) -> Any:
        params = list(self.policy.backbone.trainable_parameters())
        if not params:
            raise ValueError("the backbone has no trainable parameters")
        opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.lr_scheduler_factory(opt)}

    # -- EMA -----------------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.policy.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_decay is None:
            return
        self.ema_updates += 1
        # warm-up as diffusers' EMAModel: early on the average must not hold on to the initial weights
        decay = min(self.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        for name, p in self._trainable().items():
            if name not in self.ema:
                self.ema[name] = p.detach().clone()
            else:
                if self.ema[name].device != p.device:  # restored on CPU before the model moved to its device
                    self.ema[name] = self.ema[name].to(p.device)
                self.ema[name].lerp_(p.detach(), 1.0 - decay)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the policy (a no-op without EMA)."""
        if not self.ema:
            yield
            return
        params = self._trainable()
        saved = {n: params[n].detach().clone() for n in self.ema}
        with torch.no_grad():
            for n, v in self.ema.items():
                params[n].copy_(v.to(params[n].device))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    # -- checkpoint state ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.checkpoint_frozen_weights:
            # frozen weights come back from their source (a local folder, shipped file) when the recipe is
            # built again: checkpoints of a LoRA run hold the adapters, not gigabytes of base model
            frozen = {f"{n}" for n, p in self.named_parameters() if not p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["diffalign"] = {
            "generator": self.generator.get_state(),
            "reward_queries": self.reward_queries,
            "reward_dropped": self.guarded_reward.dropped if self.guarded_reward else 0,
            "ema": {k: v.detach().cpu() for k, v in self.ema.items()},
            "ema_updates": self.ema_updates,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("diffalign")
        if not state:
            return
        self.generator.set_state(state["generator"])
        self.ema = {k: v.to(self.device) for k, v in state.get("ema", {}).items()}
        self.ema_updates = int(state.get("ema_updates", 0))
        if self.guarded_reward is not None:
            self.guarded_reward.queries = int(state.get("reward_queries", 0))
            self.guarded_reward.dropped = int(state.get("reward_dropped", 0))

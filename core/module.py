"""`AlignmentModule`: the Lightning system that runs any algorithm on any policy and reward.

It receives its parts (policy, algorithm, reward, optimiser callables) and builds none of them.
Optimisation is manual so that online methods can collect a batch and then take several updates.

Several processes (DDP, FSDP, DeepSpeed through Lightning's strategies) train one global batch: each
rank samples and scores its rows (seeds and training noise cut from the global batch's draws, see
`core.distributed`), statistics over rewards are taken over every rank's rows, and every rank runs the
same number of optimiser steps and backward passes — a rank with fewer micro-batches (rewards dropped,
fewer preference pairs) back-propagates a zero loss — with gradients synchronised once per optimiser
step, on its last backward pass. Metrics are reduced over the ranks once per training step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from diffalign.core.algorithms.base import Algorithm
from diffalign.core.distributed import Ranks, clip_sharded_grad_norm, is_fsdp_strategy, is_sharded
from diffalign.core.policy import DiffusionPolicy
from diffalign.core.reward import GuardedReward, OnInvalid, Reward
from diffalign.core.rollouts import AlignContext


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
        seed: seed of the run's own generator (rollout seeds, shuffling, dropout of conditions). Its
            state is saved in checkpoints, so a resumed run continues the same random stream. With
            several processes the run generator is the same stream on every rank and draws for the rows
            of the global batch (each rank keeps its rows' seeds and noise, so ranks never share noise
            and the global batch is the one a single process would sample); each rank also has its own
            stream for draws sized by its local data (shuffles), seeded from (seed, global rank,
            epoch, batch), so it needs no checkpoint state and resumes exactly.
        checkpoint_frozen_weights: False leaves parameters with requires_grad=False out of checkpoints
            (set it for LoRA runs on large models; the frozen weights are rebuilt from the recipe).
        ema_decay: keep an exponential moving average of the trainable parameters (e.g. 0.99) with
            diffusers' `EMAModel`, stepped after every optimiser step: update n (from 1) uses decay
            min(ema_decay, n/(9 + n)), so the first update copies the weights. The final evaluation,
            validate/test/predict and the weight export use it (`ema_weights()`); rollouts for training
            use the live weights. (Lightning's weight-averaging callback is not used: it averages a deep
            copy of the whole LightningModule, frozen base models included, and hooks automatic
            optimisation's step; the EMA here holds only the trainable parameters.)
        rollout_chunk_size: sample each training rollout batch this many rows at a time (None: all at
            once): the samples are the same (one seed per row), sampling memory smaller.
        async_reward: with `rollout_chunk_size`, score each chunk in a worker thread while the next one
            samples (a `RemoteReward` or another slow reward, as ddpo-pytorch does with a thread pool;
            see `AlignContext`).

    The module knows no algorithm: it logs every named term an algorithm's `forward` returns, reduced
    over the micro-batches of a batch as the algorithm declares (`Algorithm.metric_reduction`), plus
    the metrics of `prepare`.
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
        rollout_chunk_size: int | None = None,
        async_reward: bool = False,
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
        if rollout_chunk_size is not None and rollout_chunk_size < 1:
            raise ValueError(f"rollout_chunk_size must be >= 1 (or null), got {rollout_chunk_size}")
        if async_reward and rollout_chunk_size is None:
            raise ValueError("async_reward overlaps scoring with the next chunk: set rollout_chunk_size too")
        self.rollout_chunk_size, self.async_reward = rollout_chunk_size, async_reward
        self.checkpoint_frozen_weights = checkpoint_frozen_weights
        # checkpoints without frozen weights load non-strictly (the frozen ones are already in place)
        self.strict_loading = checkpoint_frozen_weights
        self.generator = torch.Generator().manual_seed(seed)
        # (queries, dropped) summed over the ranks after the last training step (several processes)
        self._reward_totals: tuple[int, int] | None = None
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.ema: Any = None  # diffusers EMAModel over the trainable parameters, made at the first update
        self._ema_state: dict[str, Any] | None = None  # restored from a checkpoint before `ema` exists
        if algorithm.needs_reference:
            # taken now, before any checkpoint is restored: the reference is the initial model
            policy.backbone.freeze_reference()

    @property
    def reward(self) -> Reward | None:
        return self._reward[0] if self._reward else None

    @property
    def reward_queries(self) -> int:
        """Reward queries of training so far, over every rank."""
        return self._reward_counts()[0]

    @property
    def reward_dropped(self) -> int:
        """Samples the `on_invalid_reward: drop` policy dropped in training so far, over every rank."""
        return self._reward_counts()[1]

    def _reward_counts(self) -> tuple[int, int]:
        if self._reward_totals is not None:
            return self._reward_totals
        if self.guarded_reward is None:
            return 0, 0
        return self.guarded_reward.queries, self.guarded_reward.dropped

    def forward(self, cond: dict[str, torch.Tensor], generator: Any = None) -> torch.Tensor:
        """Sample final model-space samples for `cond` (inference)."""
        return self.policy.sample(cond, generator)

    def setup(self, stage: str) -> None:
        if self.reward is not None:
            self.reward.to(self.device)

    def on_fit_start(self) -> None:
        if self.reward is not None:
            self.reward.to(self.device)

    def configure_model(self) -> None:
        """Under FSDP: wrap each of the backbone's `shard_units()` as an FSDP unit (every denoiser call
        then gathers and frees its weights, as the several forward passes of a training step need); the
        rest (frozen VAE, text encoder, a reference copy) stays whole on every rank. Other strategies:
        nothing."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not is_fsdp_strategy(strategy):
            return
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import wrap

        backbone = self.policy.backbone
        units = backbone.shard_units()
        for name in units:
            parent_name, _, attr = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            child = getattr(parent, attr)
            if not isinstance(child, FullyShardedDataParallel):
                setattr(parent, attr, wrap(child))
        # everything outside the units (frozen modules: VAE, text encoder) stays whole on every rank: with
        # wrapped units inside, Lightning does not wrap the module itself
        inside = {id(p) for name in units for p in backbone.get_submodule(name).parameters()}
        outside = [n for n, p in self.policy.named_parameters() if p.requires_grad and id(p) not in inside]
        if outside:
            raise ValueError(
                f"FSDP: trainable parameters outside the backbone's shard units {units}: {outside[:4]}; "
                f"override {type(backbone).__name__}.shard_units() to name the modules denoise() calls"
            )

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        ranks = Ranks.current()
        own = None  # this rank's stream for draws sized by local data (several processes only)
        if ranks.distributed:
            own_seed = rank_seed(self.seed, ranks.rank, self.current_epoch, batch_idx)
            own = torch.Generator().manual_seed(own_seed)
        ctx = AlignContext(
            self.policy,
            self.guarded_reward,
            self.generator,
            self.device,
            ranks,
            own,
            self.rollout_chunk_size,
            self.async_reward,
        )
        data, metrics = self.algorithm.prepare(ctx, batch)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        terms = MetricAggregator(self.algorithm.metric_reduction)
        updates = 0
        last: list[Any] = []  # micro-batches of an earlier step, to fill in passes with
        steps = self.algorithm.minibatches(data, ctx.local_generator)
        for micro_batches, passes in aligned_steps(ranks, steps):
            for j in range(passes):
                # gradients are synchronised across ranks once per optimiser step, on its last pass
                with self._gradient_sync(j == passes - 1):
                    out = self.algorithm(self.policy, micro_batches[j]) if j < len(micro_batches) else None
                    self._check_finite(ranks, out, batch_idx)
                    if out is None:  # other ranks have more micro-batches in this step
                        self.manual_backward(self._zero_loss(micro_batches or last))
                        continue
                    last = micro_batches
                    self.manual_backward(out["loss"] / len(micro_batches))
                terms.add(out, first_update=updates == 0)
            if self.max_grad_norm is not None:
                self._clip(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self._update_ema()
            if sched is not None:
                sched.step()
            updates += 1
        logged = terms.result()
        logged.update(metrics)
        logged["updates"] = float(updates)
        if self.guarded_reward is not None:
            logged["reward_queries"] = float(self.guarded_reward.queries)
            logged["reward_dropped_total"] = float(self.guarded_reward.dropped)
        skipped = getattr(getattr(self._trainer, "datamodule", None), "skipped_rows", None)
        if skipped is not None:
            logged["data_skipped_rows"] = float(skipped)
        logged = {k: v for k, v in logged.items() if math.isfinite(v)}
        if ranks.distributed:  # one collective: every metric reduced over the ranks that report it
            logged = ranks.reduce_metrics(logged, {**self.algorithm.metric_reduction, **RANK_REDUCTION})
            if self.guarded_reward is not None:
                self._reward_totals = (int(logged["reward_queries"]), int(logged["reward_dropped_total"]))
        self.log_dict(
            {f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False, batch_size=1
        )
        shown = self.algorithm.progress_metric if self.algorithm.progress_metric in logged else "loss"
        if shown in logged:
            name = "reward" if shown == "reward_mean" else shown
            self.log(name, logged[shown], prog_bar=True, on_step=True, batch_size=1)

    def _gradient_sync(self, sync: bool) -> Any:
        """No gradient all-reduce on this backward pass unless `sync` (DDP's `no_sync`; strategies
        without it synchronise every pass, which is correct, only slower)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if sync or not hasattr(strategy, "block_backward_sync"):
            return nullcontext()
        return strategy.block_backward_sync()

    def _zero_loss(self, micro_batches: list[Any]) -> torch.Tensor:
        """A loss of 0 for a pass that another rank spends on a micro-batch this rank lacks: the
        gradients this rank adds are 0 but it joins the gradient all-reduce. It runs one of this rank's
        micro-batches (times 0) when it has one, since sharded weights are gathered in forward passes."""
        if micro_batches:
            return self.algorithm(self.policy, micro_batches[0])["loss"] * 0.0
        if is_sharded(self._trainer):
            raise RuntimeError(
                f"{type(self.algorithm).__name__}: this rank has no micro-batch to train on while others "
                "do (e.g. no decided preference pair); under FSDP every rank needs data in every step"
            )
        return sum((p * 0).sum() for p in self._trainable())

    def _clip(self, opt: Any) -> None:
        """Clip the gradients' global norm to `max_grad_norm` (under FSDP over every rank's shards, a
        collective: Lightning's norm clipping refuses FSDP)."""
        if is_sharded(self._trainer):
            clip_sharded_grad_norm(self._trainable(), self.max_grad_norm)
        else:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def _check_finite(self, ranks: Ranks, out: dict[str, Any] | None, batch_idx: int) -> None:
        """Stop on a NaN/inf loss — on every rank at once when several train (a collective)."""
        loss = out["loss"] if out is not None else None
        ok = loss is None or bool(torch.isfinite(loss))
        bad = [r for r, fine in enumerate(ranks.flags(ok)) if not fine] if ranks.distributed else []
        if ok and not bad:
            return
        where = f" on rank {', '.join(map(str, bad))}" if bad else ""
        value = f" is {loss.item()}" if loss is not None and not ok else " is not finite"
        raise NonFiniteLossError(
            f"{type(self.algorithm).__name__} loss{value}{where} at global step {self.global_step} "
            f"(batch {batch_idx}); stopping instead of training on it"
        )

    # -- evaluation: validate / test / predict over the data module's fixed evaluation set --------------
    @torch.no_grad()
    def _sample_and_score(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Samples (decoded) and rewards of an evaluation batch, through the one sampling path."""
        from diffalign.core.sampling import sample_batch, score_batch

        cond = self.policy.backbone.condition(batch)
        sampled = sample_batch(self.policy, cond, [int(s) for s in batch["seed"]])
        out = {"prompt": list(batch["prompt"]), "seed": list(batch["seed"]), "samples": sampled.samples()}
        if self.reward is not None:
            score_batch(sampled, self.reward)
            out["rewards"] = sampled.scores.cpu()
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
        ranks = Ranks.current()
        if ranks.distributed:  # each rank predicted one contiguous shard of the set: rank order is set order
            preds = [b for part in ranks.gather_objects(list(preds or [])) for b in part]
        log_dir = self.trainer.log_dir  # a collective: every rank asks
        if not preds or not self.trainer.is_global_zero or log_dir is None:
            return
        path = Path(log_dir) / "predictions.pt"
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
    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def _ensure_ema(self) -> Any:
        """The EMAModel (made on first use, loading the checkpointed state if there is one), or None."""
        if self.ema is None and self.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._trainable(), decay=self.ema_decay)
            if self._ema_state is not None:
                self.ema.load_state_dict(self._ema_state)
                self._ema_state = None
        if self.ema is not None:
            self.ema.to(self._trainable()[0].device)  # restored on CPU before the model moved
        return self.ema

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_decay is not None:
            self._ensure_ema().step(self._trainable())

    def ema_parameters(self) -> dict[str, torch.Tensor]:
        """The averaged value of each trainable parameter, by name (empty before the first update)."""
        ema = self._ensure_ema() if self.ema_updates else None
        if ema is None:
            return {}
        names = [n for n, p in self.policy.named_parameters() if p.requires_grad]
        return dict(zip(names, ema.shadow_params, strict=True))

    @property
    def ema_updates(self) -> int:
        """Optimiser steps the EMA has seen (0 without EMA)."""
        if self.ema is not None:
            return int(self.ema.optimization_step)
        return int((self._ema_state or {}).get("optimization_step", 0))

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the policy (a no-op without EMA or before an update)."""
        if self.ema_updates == 0 or self._ensure_ema() is None:
            yield
            return
        params = self._trainable()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # -- checkpoint state ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.checkpoint_frozen_weights:
            # frozen weights come back from their source (a local folder, shipped file) when the recipe is
            # built again: checkpoints of a LoRA run hold the adapters, not gigabytes of base model
            frozen = {f"{n}" for n, p in self.named_parameters() if not p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        # the run generator is the same on every rank; the counts are totals over the ranks
        checkpoint["diffalign"] = {
            "generator": self.generator.get_state(),
            "reward_queries": self.reward_queries,
            "reward_dropped": self.reward_dropped,
            "ema": self._ema_checkpoint(),
        }

    def _ema_checkpoint(self) -> dict[str, Any] | None:
        if self.ema is None:
            state = self._ema_state
        else:
            state = self.ema.state_dict()
            state["shadow_params"] = [p.detach().cpu() for p in state["shadow_params"]]
        if state is not None and is_sharded(self._trainer):
            # sharded weights: each rank averages its own shard; the checkpoint keeps every rank's
            # (rank 0 writes it; a collective, as Lightning calls this hook on every rank)
            shards = Ranks.current().gather_objects(state["shadow_params"])
            state = {**state, "shadow_params": None, "shards": shards}
        return state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("diffalign")
        if not state:
            return
        self.generator.set_state(state["generator"])
        ema = state.get("ema")
        if isinstance(ema, dict) and ema.get("shards") is not None:  # saved under FSDP: this rank's shard
            ranks = Ranks.current()
            if len(ema["shards"]) != ranks.world_size:
                raise RuntimeError(
                    f"the checkpoint's EMA is sharded over {len(ema['shards'])} processes; resume it on as "
                    f"many (this run has {ranks.world_size})"
                )
            mine = ema["shards"][ranks.rank]
            ema = {k: v for k, v in ema.items() if k != "shards"} | {"shadow_params": mine}
        self.ema, self._ema_state = None, ema if isinstance(ema, dict) and "shadow_params" in ema else None
        if self.guarded_reward is not None:
            queries, dropped = int(state.get("reward_queries", 0)), int(state.get("reward_dropped", 0))
            ranks = Ranks.current()
            first = ranks.rank == 0
            # rank 0 carries the totals so far, the others start from 0: the sum over ranks stays right
            self.guarded_reward.queries = queries if first else 0
            self.guarded_reward.dropped = dropped if first else 0
            self._reward_totals = (queries, dropped) if ranks.distributed else None


def rank_seed(seed: int, rank: int, epoch: int = 0, batch: int = 0) -> int:
    """The seed of rank `rank`'s own stream for training batch `batch` of epoch `epoch` of a run seeded
    `seed`: a function of those four numbers only, so a resumed run draws what the uninterrupted one did
    and no two ranks (or batches) share a stream."""
    key = ((seed * 1_000_003 + rank) * 1_000_033 + epoch) * 1_000_037 + batch
    g = torch.Generator().manual_seed(key % 2**63)
    return int(torch.randint(0, 2**62, (1,), generator=g))


#: how training metrics that are not an algorithm's terms combine over the ranks
RANK_REDUCTION = {
    "reward_dropped": "sum",
    "reward_queries": "sum",
    "reward_dropped_total": "sum",
    "data_skipped_rows": "max",  # every rank reads the whole file
    "updates": "max",
}


def aligned_steps(ranks: Ranks, steps: Iterator[list[Any]]) -> Iterator[tuple[list[Any], int]]:
    """(this rank's micro-batches, backward passes to run) for each optimiser step, such that every rank
    runs as many optimiser steps and passes as the rank with the most (a collective per step with
    several ranks: a rank with fewer fills in with zero-loss passes, never a hang)."""
    it = iter(steps)
    while True:
        micro = next(it, None)
        if not ranks.distributed:
            if micro is None:
                return
            yield micro, len(micro)
            continue
        counts = ranks.gather_objects(-1 if micro is None else len(micro))
        if max(counts) < 0:
            return
        yield (micro or []), max(counts)


class MetricAggregator:
    """Aggregates the named terms of an algorithm's micro-batches into one value per name.

    `reduction` maps a name to "mean" (default), "max", "sum", "last" or "first_max" (the max over the
    micro-batches of the first optimiser step only).
    """

    def __init__(self, reduction: dict[str, str]) -> None:
        self.reduction = dict(reduction)
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, out: dict[str, Any], first_update: bool) -> None:
        for k, v in out.items():
            if self.reduction.get(k) == "first_max" and not first_update:
                continue
            self.values[k].append(float(v.detach() if isinstance(v, torch.Tensor) else v))

    def result(self) -> dict[str, float]:
        out = {}
        for k, vs in self.values.items():
            how = self.reduction.get(k, "mean")
            if how in ("max", "first_max"):
                out[k] = max(vs)
            elif how == "sum":
                out[k] = sum(vs)
            elif how == "last":
                out[k] = vs[-1]
            elif how == "mean":
                out[k] = sum(vs) / len(vs)
            else:
                raise ValueError(f"unknown metric reduction {how!r} for {k!r}")
        return out

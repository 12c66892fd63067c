"""Reward-hacking guards: what the evaluation measures beside the training reward, and when it warns.

A training reward is a proxy. When the policy learns to satisfy the proxy rather than the intent — one
classifier-pleasing blob for every seed of a prompt, over-saturated images, a grid artefact — the proxy
keeps rising while everything else falls. On the fixed evaluation set (the same (prompt, seed) pairs
before, during and after training) the guards measure:

- **gold reward**: a held-out reward the recipe names (`RewardEvaluation(gold_reward=...)`), scored on
  the same samples as the proxy: the proxy-vs-gold gap over training;
- **diversity within a prompt**: the mean pairwise Euclidean distance of the samples of one prompt in a
  feature space, and their Vendi score (Friedman & Dieng, arXiv:2210.02410: exp of the entropy of the
  eigenvalues of K/n; 1 when all samples are the same, n when they are all unlike), averaged over
  prompts. K is the Gaussian kernel exp(−d²/(2h²)) with the bandwidth h fixed at the first evaluation
  (the median within-prompt distance before training), so the score is comparable over a run and
  meaningful in any feature space, low-dimensional ones included. The feature space is a function the
  recipe names (`features: pkg.module.fn`, called as fn(samples, cond) → (B, D)) or the backbone's
  `features(samples)` (default: the samples themselves, flattened — points, pixels);
- **KL to the reference**: Σ_t KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) along the policy's own evaluation
  trajectories — the closed-form Gaussian KL of each stochastic step, summed over event dims and steps
  (nats per sample), an unbiased estimate of the path KL, which bounds the KL of the final samples.
  Deterministic steps contribute nothing; a sampler without stochastic steps reports none.

`GuardRule.check` warns when the proxy has risen since the start while diversity (either measure)
fell below (1 − diversity_drop) of its start, the gold reward fell by more than `gold_drop`, or the KL
exceeds `max_kl`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffalign.core.functional import gaussian_kl_same_std

FeatureFn = Callable[[Any, Any], Tensor]


# -- diversity --------------------------------------------------------------------------------------
def mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over the n(n−1)/2 pairs of rows of `features` (n, D); NaN for n < 2."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    d = torch.cdist(features.double()[None], features.double()[None])[0]
    return float(d.sum() / (n * (n - 1)))


def vendi_score(features: Tensor, bandwidth: float | None = None) -> float:
    """The Vendi score of rows of `features` (n, D): exp(−Σ λ log λ) over the eigenvalues λ of K/n, with
    K the Gaussian kernel exp(−‖f_i − f_j‖²/(2h²)) of bandwidth h, or the cosine similarity when no
    bandwidth is given. 1 ≤ VS ≤ n; NaN for n < 1."""
    n = features.shape[0]
    if n < 1:
        return float("nan")
    f = features.double()
    if bandwidth is None:
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        k = f @ f.T
    else:
        k = torch.exp(-(torch.cdist(f[None], f[None])[0] ** 2) / (2 * float(bandwidth) ** 2))
    lam = torch.linalg.eigvalsh(k / n).clamp_min(0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def _groups(keys: list[str]) -> list[Tensor]:
    rows: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        rows.setdefault(k, []).append(i)
    return [torch.tensor(r) for r in rows.values() if len(r) >= 2]


def median_within_prompt_distance(features: Tensor, keys: list[str]) -> float:
    """The median distance between two samples of the same prompt (the Vendi bandwidth of a run)."""
    dists = []
    for rows in _groups(keys):
        d = torch.cdist(features[rows].double()[None], features[rows].double()[None])[0]
        dists.append(d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)])
    return float(torch.cat(dists).quantile(0.5)) if dists else float("nan")


def prompt_diversity(features: Tensor, keys: list[str], bandwidth: float | None = None) -> dict[str, float]:
    """Mean over prompts (with ≥ 2 samples) of the within-prompt mean pairwise distance and Vendi score
    (Gaussian kernel of `bandwidth`; cosine similarity when None)."""
    groups = _groups(keys)
    if not groups:
        return {"diversity": float("nan"), "vendi": float("nan"), "diversity_prompts": 0}
    dist = [mean_pairwise_distance(features[rows]) for rows in groups]
    vendi = [vendi_score(features[rows], bandwidth) for rows in groups]
    return {
        "diversity": sum(dist) / len(dist),
        "vendi": sum(vendi) / len(vendi),
        "diversity_prompts": len(dist),
    }


def resolve_features(spec: str | FeatureFn | None, backbone: Any) -> tuple[FeatureFn | None, str]:
    """The feature function a recipe names (a dotted path or a callable), else the backbone's `features`;
    returns it and a name for the summary."""
    if spec is not None:
        from diffalign.core.reward import import_object

        fn = import_object(spec) if isinstance(spec, str) else spec
        if not callable(fn):
            raise ValueError(f"features: {spec!r} is not callable")
        return fn, spec if isinstance(spec, str) else getattr(fn, "__name__", "features")
    own = getattr(backbone, "features", None)
    if own is None:
        return None, "none"
    return (lambda samples, cond: own(samples)), f"{type(backbone).__name__}.features"


# -- KL to the reference ----------------------------------------------------------------------------
@torch.no_grad()
def path_kl(policy: Any, traj: Any, reference: Any) -> tuple[Tensor, int]:
    """Per-sample Σ_t KL(π_θ ‖ π_ref) of the stochastic steps of `traj` (nats, summed over event dims),
    and the number of stochastic steps. `reference` is the frozen backbone (`backbone.reference()`)."""
    total = torch.zeros(traj.batch_size, device=traj.states.device)
    stochastic = 0
    for j in range(traj.num_steps):
        own = policy.log_prob(traj, j)
        if float(own.std.max()) == 0.0:
            continue
        stochastic += 1
        ref = policy.log_prob(traj, j, backbone=reference)
        total += gaussian_kl_same_std(own.mean, ref.mean, own.std, traj.mask, "sum")
    return total, stochastic


# -- one evaluation's measurements ------------------------------------------------------------------
class GuardMeter:
    """Collects what the guards need from the batches of one evaluation (`evaluate_reward(on_batch=...)`):
    per-sample features, gold scores and KL estimates, keyed by prompt; `result()` reduces them.

    Under several processes each rank sees its shard of the set, padded with repeats of the last pair
    (so every rank makes the same denoiser calls). `finish(real, ranks)` — which `evaluate_reward` calls
    on every rank after its last batch — keeps this rank's `real` rows of the set and gathers every
    rank's rows in the set's order, so `result()` then reduces the whole set, each pair once, and gives
    the same values on every rank (the early stop decided from them agrees everywhere).
    """

    def __init__(
        self,
        module: Any,
        gold: Any = None,
        features: FeatureFn | None = None,
        kl: bool = True,
        bandwidth: float | None = None,
    ) -> None:
        self.module, self.gold, self.features, self.kl = module, gold, features, kl
        self.bandwidth = bandwidth  # the Vendi kernel's; None: set from these samples
        self.keys: list[str] = []
        self.feats: list[Tensor] = []  # one (B, D) tensor per batch, then one for the whole set
        self.gold_scores: list[float] = []  # per row
        self.kls: list[float] = []  # per row (NaN where the batch had no stochastic step)
        self.stochastic_steps = 0
        self.notes: list[str] = []

    def __call__(self, batch: Any) -> None:
        from diffalign.core.advantages import row_keys

        self.keys.extend(row_keys(batch.cond))
        if self.features is not None:
            f = self.features(batch.samples(), batch.cond)
            if f is None:
                self.features = None
                self.feats = []
                self.notes.append("the feature function returned None: no diversity")
            else:
                self.feats.append(torch.as_tensor(f).detach().float().reshape(len(batch), -1).cpu())
        if self.gold is not None:
            self.gold_scores.extend(gold_scores(self.gold, batch).tolist())
        if self.kl and batch.trajectory is not None:
            try:
                with self.module.policy.backbone.reference() as ref:
                    kl, steps = path_kl(self.module.policy, batch.trajectory, ref)
            except RuntimeError as e:  # no reference model kept
                self.kl = False
                self.kls = []
                self.notes.append(f"no KL to the reference: {e}")
                return
            self.stochastic_steps = max(self.stochastic_steps, steps)
            self.kls.extend(kl.cpu().tolist() if steps else [float("nan")] * len(batch))

    def finish(self, real: int, ranks: Any) -> None:
        """Keep the first `real` rows (the set's; the rest pad the shard) and gather every rank's rows in
        rank order (a collective with several processes: every rank calls it once per evaluation)."""
        feats = torch.cat(self.feats)[:real] if self.feats else None
        mine = {
            "keys": self.keys[:real],
            "feats": feats,
            "gold": self.gold_scores[:real],
            "kls": self.kls[:real],
            "steps": self.stochastic_steps,
            "notes": self.notes,
            "features": self.features is not None,
            "kl": self.kl,
        }
        parts = ranks.gather_objects(mine)
        self.keys = [k for p in parts for k in p["keys"]]
        # when any rank lost its features (or its reference), no rank reports them: the values agree
        with_feats = all(p["features"] for p in parts)
        present = [p["feats"] for p in parts if p["feats"] is not None]
        self.feats = [torch.cat(present)] if with_feats and present else []
        if not with_feats:
            self.features = None
        self.gold_scores = [g for p in parts for g in p["gold"]]
        self.kl = all(p["kl"] for p in parts)
        self.kls = [v for p in parts for v in p["kls"]] if self.kl else []
        self.stochastic_steps = max(p["steps"] for p in parts)
        self.notes = [n for p in parts for n in p["notes"]]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.feats:
            feats = torch.cat(self.feats)
            if self.bandwidth is None or not math.isfinite(self.bandwidth) or self.bandwidth <= 0:
                self.bandwidth = median_within_prompt_distance(feats, self.keys)
            ok = math.isfinite(self.bandwidth) and self.bandwidth > 0
            out.update(prompt_diversity(feats, self.keys, self.bandwidth if ok else None))
            out["vendi_bandwidth"] = self.bandwidth
        if self.gold is not None:
            ok = [s for s in self.gold_scores if math.isfinite(s)]
            out["gold_mean"] = sum(ok) / len(ok) if ok else float("nan")
            out["gold_failed"] = len(self.gold_scores) - len(ok)
        kls = [v for v in self.kls if math.isfinite(v)]
        if kls:
            out["kl_to_reference"] = sum(kls) / len(kls)
            out["kl_stochastic_steps"] = self.stochastic_steps
        if self.notes:
            out["notes"] = list(dict.fromkeys(self.notes))
        return out


def gold_scores(gold: Any, batch: Any) -> Tensor:
    """The gold reward of a sampled batch (NaN where it fails; never raises for a failing sample)."""
    from diffalign.core.reward import GuardedReward, RewardError

    try:
        scored = GuardedReward(gold, on_invalid="drop")(batch.view, batch.cond)
    except RewardError:
        return torch.full((len(batch),), float("nan"))
    s = scored.scores.detach().float().cpu().clone()
    s[~scored.keep.cpu()] = float("nan")
    return s


# -- the warning rule -------------------------------------------------------------------------------
class GuardRule:
    """When to warn: the proxy reward rose by more than `min_reward_rise` since the start while

    - diversity within a prompt (mean pairwise distance or Vendi score) fell below (1 − diversity_drop)
      of its value at the start, or
    - the gold reward fell by more than `gold_drop` (in its own units), or
    - the KL to the reference exceeds `max_kl` (None: never).

    `check(start, now)` takes two evaluations (`{"mean": proxy, "guards": {...}}`) and returns the
    warnings, one sentence each.
    """

    def __init__(
        self,
        diversity_drop: float = 0.5,
        gold_drop: float = 0.05,
        max_kl: float | None = None,
        min_reward_rise: float = 0.0,
    ) -> None:
        if not 0 < diversity_drop < 1:
            raise ValueError(f"diversity_drop must be in (0, 1), got {diversity_drop}")
        self.diversity_drop, self.gold_drop = diversity_drop, gold_drop
        self.max_kl, self.min_reward_rise = max_kl, min_reward_rise

    def check(self, start: dict[str, Any], now: dict[str, Any]) -> list[str]:
        r0, r1 = start.get("mean"), now.get("mean")
        g0, g1 = start.get("guards") or {}, now.get("guards") or {}
        out = []
        if (
            self.max_kl is not None
            and _finite(g1.get("kl_to_reference"))
            and g1["kl_to_reference"] > self.max_kl
        ):
            out.append(
                f"the KL to the reference is {g1['kl_to_reference']:.3g} nats (max_kl {self.max_kl:g})"
            )
        if not (_finite(r0) and _finite(r1)) or r1 - r0 <= self.min_reward_rise:
            return out
        rose = f"the training reward rose {r0:.4g} → {r1:.4g} while"
        for key, what in (
            ("diversity", "diversity within a prompt"),
            ("vendi", "the Vendi score within a prompt"),
        ):
            a, b = g0.get(key), g1.get(key)
            if _finite(a) and _finite(b) and a > 0 and b < (1 - self.diversity_drop) * a:
                change = f"{b / a - 1:+.0%}; threshold −{self.diversity_drop:.0%}"
                out.append(f"{rose} {what} fell {a:.4g} → {b:.4g} ({change})")
        a, b = g0.get("gold_mean"), g1.get("gold_mean")
        if _finite(a) and _finite(b) and b < a - self.gold_drop:
            out.append(f"{rose} the gold reward fell {a:.4g} → {b:.4g} (threshold −{self.gold_drop:g})")
        return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# -- what RewardEvaluation runs ---------------------------------------------------------------------
class RewardGuards:
    """The guards of one run, as `core.callbacks.RewardEvaluation` runs them (on by default there).

    `evaluate(module, pairs, batch_size)` scores the evaluation set once (proxy reward through
    `evaluate_reward`, plus the guards' measurements in the same pass) and returns the evaluation with a
    "guards" entry; `record(step, evaluation)` keeps it in the history and returns the rule's warnings
    against the first evaluation. `setup(module)` keeps a frozen reference for the KL when the run has
    none (LoRA runs have one for free; a full fine-tune pays one copy of the trainable network).

    Args:
        gold_reward: the held-out reward (None: no gold).
        features: dotted path of the feature function (None: the backbone's `features`).
        kl_to_reference: estimate the KL to the reference (costs two denoiser passes per step).
        rule: the warning rule.
    """

    def __init__(
        self,
        gold_reward: Any = None,
        features: str | None = None,
        kl_to_reference: bool = True,
        rule: GuardRule | None = None,
    ) -> None:
        self.gold = gold_reward.freeze() if gold_reward is not None else None
        self.features_spec, self.kl = features, kl_to_reference
        self.rule = rule or GuardRule()
        self.history: list[dict[str, Any]] = []  # {"step", "reward", **guards}
        self.warnings: list[dict[str, Any]] = []
        self.bandwidth: float | None = None

    def setup(self, module: Any) -> None:
        backbone = module.policy.backbone
        if self.gold is not None:
            self.gold.to(module.device)
        if not self.kl:
            return
        try:
            with backbone.reference():
                pass
        except RuntimeError:
            backbone.freeze_reference()

    def evaluate(self, module: Any, pairs: list, batch_size: int) -> dict[str, Any]:
        from diffalign.core.callbacks import evaluate_reward

        features, name = resolve_features(self.features_spec, module.policy.backbone)
        meter = GuardMeter(module, self.gold, features, self.kl, self.bandwidth)
        out = evaluate_reward(module, pairs, batch_size, on_batch=meter)
        out["guards"] = {**meter.result(), "feature_space": name}
        self.bandwidth = meter.bandwidth  # the first evaluation fixes the Vendi bandwidth of the run
        return out

    def record(self, step: int, evaluation: dict[str, Any]) -> list[str]:
        """Keep an evaluation at optimiser step `step` (replacing a later one kept at that same step) and
        return the rule's new warnings against the first evaluation."""
        point = {"step": int(step), "reward": evaluation.get("mean"), **(evaluation.get("guards") or {})}
        point.pop("notes", None)
        if len(self.history) > 1 and self.history[-1]["step"] == point["step"]:
            self.history[-1] = point
        else:
            self.history.append(point)
        start = self.history[0]
        seen = {(w["step"], w["message"]) for w in self.warnings}
        checked = self.rule.check({"mean": start["reward"], "guards": start}, evaluation)
        messages = [m for m in checked if (int(step), m) not in seen]
        self.warnings.extend({"step": int(step), "message": m} for m in messages)
        return messages

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "warnings": list(self.warnings), "bandwidth": self.bandwidth}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.warnings = list(state.get("warnings", []))
        self.bandwidth = state.get("bandwidth")

    def plot(self, axes: list[Any]) -> None:
        """One panel per measured quantity (diversity, Vendi, gold reward with the proxy, KL) over steps."""
        panels = [
            ("diversity", "diversity within a prompt"),
            ("vendi", "Vendi score within a prompt"),
            ("gold_mean", "gold reward"),
            ("kl_to_reference", "KL to reference (nats)"),
        ]
        shown = [(k, t) for k, t in panels if any(_finite(h.get(k)) for h in self.history)]
        for ax, (key, title) in zip(axes, shown, strict=False):
            pts = [(h["step"], h[key]) for h in self.history if _finite(h.get(key))]
            ax.plot(*zip(*pts, strict=True), marker="o", lw=1.2, label=title)
            if key == "gold_mean":
                proxy = [(h["step"], h["reward"]) for h in self.history if _finite(h.get("reward"))]
                if proxy:
                    ax.plot(
                        *zip(*proxy, strict=True), marker=".", ls="--", lw=1, label="training reward (eval)"
                    )
                ax.legend(fontsize=7)
            for w in self.warnings:
                ax.axvline(w["step"], color="red", lw=0.8, alpha=0.5)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("optimiser step")

    def panels(self) -> int:
        keys = ("diversity", "vendi", "gold_mean", "kl_to_reference")
        return sum(any(_finite(h.get(k)) for h in self.history) for k in keys)


def describe(guards: dict[str, Any]) -> str:
    """One line per measured guard (before → after) and the warnings, for the end-of-run printout."""
    before, after = guards.get("before") or {}, guards.get("after") or {}
    parts = []
    for key, name in (
        ("diversity", "diversity"),
        ("vendi", "Vendi"),
        ("gold_mean", "gold"),
        ("kl_to_reference", "KL"),
    ):
        a, b = before.get(key), after.get(key)
        if _finite(b):
            parts.append(f"{name} {a:.4g} -> {b:.4g}" if _finite(a) else f"{name} {b:.4g}")
    line = "guards: " + (", ".join(parts) if parts else "nothing measured")
    if after.get("feature_space"):
        line += f" (features: {after['feature_space']})"
    for w in guards.get("warnings") or []:
        line += f"\nWARNING step {w['step']}: possible reward hacking: {w['message']}"
    return line

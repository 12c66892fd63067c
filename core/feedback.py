"""AI feedback: turn a base model and any reward into a preference dataset (self-alignment data).

`diffalign feedback --config recipes/<m>/feedback_<reward>.yaml --output DIR` samples
`samples_per_prompt` candidates per prompt from the policy, ranks them with the reward, and writes
`DIR/pairs.jsonl` in the simple layout (`prompt`, `winner`, `loser`, `label`, plus both scores) with the
decoded samples saved as .pt files beside it — ready for `PreferenceDataModule` and DiffusionDPO.
Pairs per prompt: the best vs the worst candidate, then the second best vs the second worst, and so on
(`pairs_per_prompt` of them); pairs whose scores tie or are not finite are skipped and counted.
The recipe format is the sampling recipe's (policy, reward, prompts, seed) plus these two keys.
Candidate j of the i-th prompt is sampled from seed `seed + 1000·i + j` (`core.sampling.seed_pairs`), so
its sample is the one `diffalign sample` and evaluation draw for that (prompt, seed).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.core.types import Batch


def _detached(sample: Any) -> Any:
    """A CPU copy of one decoded sample to save: tensors are detached (also inside a dict layout); other
    objects (e.g. molecules) are saved as they are."""
    if isinstance(sample, dict):
        return {k: _detached(v) for k, v in sample.items()}
    return sample.detach().cpu().clone() if isinstance(sample, torch.Tensor) else sample


def _row(samples: Any, k: int) -> Any:
    """Sample k of a decoded batch: an item of a list or tensor, or, for a dict layout of batch-first
    entries (`{"points": (B, N, 2), "mask": (B, N)}`), the dict of every entry's row k. A `Batch` layout
    (e.g. audio clips with their sample rate) indexes itself: its pass-through values are not rows."""
    if isinstance(samples, Mapping) and not isinstance(samples, Batch):
        return {key: v[k] for key, v in samples.items()}
    return samples[k]


def make_preference_dataset(
    policy: Any,
    reward: Any,
    prompts: Sequence[Any],
    output: Path,
    samples_per_prompt: int = 4,
    pairs_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    layout: str = "pairs",
) -> dict[str, Any]:
    """Sample, rank and write pairs (or, with layout "unpaired", every candidate labelled 1 if it ranks in
    the top half of its prompt's candidates, else 0 — data for DiffusionKTO); returns counts."""
    if layout not in ("pairs", "unpaired"):
        raise ValueError(f"layout must be 'pairs' or 'unpaired', got {layout!r}")
    if samples_per_prompt < 2 or not 1 <= pairs_per_prompt <= samples_per_prompt // 2:
        raise ValueError("need samples_per_prompt >= 2 and 1 <= pairs_per_prompt <= samples_per_prompt // 2")
    from diffalign.core.sampling import sample_pairs, seed_pairs

    output.mkdir(parents=True, exist_ok=True)
    (output / "samples").mkdir(exist_ok=True)
    policy.eval()
    reward.freeze()
    n = samples_per_prompt
    written = skipped = 0
    lines: list[str] = []
    per_batch = max(1, batch_size // n)
    # candidate j of prompt i is the (prompt, seed + 1000·i + j) pair of the seeding rule
    pairs = seed_pairs(list(prompts), n, seed)
    for k, batch in enumerate(sample_pairs(policy, pairs, per_batch * n, reward)):
        b = k * per_batch
        chunk = list(prompts[b : b + per_batch])
        samples = batch.samples()
        scores = batch.scores.cpu()
        for i, prompt in enumerate(chunk):
            s = scores[i * n : (i + 1) * n]
            order = torch.argsort(torch.nan_to_num(s, nan=float("-inf")), descending=True).tolist()
            if layout == "unpaired":
                for rank, j in enumerate(order):
                    if not math.isfinite(float(s[j])):
                        skipped += 1
                        continue
                    rel = Path("samples") / f"{b + i:06d}_{j}.pt"
                    torch.save(_detached(_row(samples, i * n + j)), output / rel)
                    lines.append(
                        json.dumps(
                            {
                                "prompt": prompt,
                                "sample": str(rel),
                                "label": float(rank < n // 2),
                                "score": float(s[j]),
                            }
                        )
                    )
                    written += 1
                continue
            for k in range(pairs_per_prompt):
                w, l = order[k], order[-1 - k]
                sw, sl = float(s[w]), float(s[l])
                if not (math.isfinite(sw) and math.isfinite(sl)) or sw == sl:
                    skipped += 1
                    continue
                paths = []
                for j in (w, l):
                    rel = Path("samples") / f"{b + i:06d}_{j}.pt"
                    torch.save(_detached(_row(samples, i * n + j)), output / rel)
                    paths.append(str(rel))
                lines.append(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "winner": paths[0],
                            "loser": paths[1],
                            "label": 1.0,
                            "winner_score": sw,
                            "loser_score": sl,
                        }
                    )
                )
                written += 1
    (output / "pairs.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return {
        "rows": written,
        "skipped": skipped,
        "prompts": len(prompts),
        "file": str(output / "pairs.jsonl"),
    }


def main(argv: Sequence[str]) -> int:
    """Entry point of `diffalign feedback`."""
    from jsonargparse import ArgumentError

    from diffalign.core.cli import explain_config_error
    from diffalign.core.recipes import expand_config_args
    from diffalign.core.sample import build_parser

    argv, names = expand_config_args(argv)  # recipe names and `bases:` -> several --config
    parser = build_parser(require_method=False)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--pairs_per_prompt", type=int, default=1)
    parser.add_argument("--layout", type=str, default="pairs", help="pairs (DPO) or unpaired (KTO)")
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as e:
        print(explain_config_error(str(e), names[::-1], argv), file=sys.stderr)
        return 2
    init = parser.instantiate_classes(cfg)
    device = torch.device(cfg.device)
    init.policy.to(device)
    init.reward.to(device)
    prompts = [p for p in cfg.prompts for _ in range(cfg.seeds_per_prompt)]
    output = Path(cfg.output) if cfg.output else Path("feedback") / (Path(names[-1]).stem if names else "run")
    result = make_preference_dataset(
        init.policy,
        init.reward,
        prompts,
        output,
        cfg.samples_per_prompt,
        cfg.pairs_per_prompt,
        cfg.seed,
        cfg.batch_size,
        cfg.layout,
    )
    print(json.dumps(result))
    return 0
